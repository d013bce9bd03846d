package vmstate

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

func TestDeltaRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	old := make([]byte, 16*1024)
	for i := range old {
		old[i] = byte(rng.IntN(256))
	}
	for round := range 200 {
		cur := bytes.Clone(old)
		for range rng.IntN(20) {
			at := rng.IntN(len(cur))
			for i := at; i < min(len(cur), at+rng.IntN(100)+1); i++ {
				cur[i] = byte(rng.IntN(256))
			}
		}
		delta := EncodeDelta(old, cur)
		got, err := ApplyDelta(old, delta)
		require.NoError(t, err, "round %d", round)
		require.Equal(t, cur, got, "round %d", round)
		old = cur
	}
	same := EncodeDelta(old, old)
	assert.Equal(t, binary.BigEndian.AppendUint32(nil, uint32(len(old))), same, "no change, no runs")

	// Eight NV bytes of a counter: a run of eight, not the image.
	cur := bytes.Clone(old)
	binary.BigEndian.PutUint64(cur[1000:], binary.BigEndian.Uint64(old[1000:])+1)
	assert.LessOrEqual(t, len(EncodeDelta(old, cur)), 4+6+8)
}

func TestApplyDeltaRefuses(t *testing.T) {
	image := make([]byte, 100)
	run := func(off uint32, n uint16, data ...byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, off)
		return append(binary.BigEndian.AppendUint16(b, n), data...)
	}
	header := binary.BigEndian.AppendUint32(nil, 100)
	for name, tc := range map[string]struct {
		delta []byte
		want  string
	}{
		"short header":   {[]byte{0, 0, 0}, "shorter than its header"},
		"other length":   {binary.BigEndian.AppendUint32(nil, 99), "made for an image of 99 bytes, not 100"},
		"cut run header": {append(bytes.Clone(header), 0, 0, 0, 1, 0), "run header truncated"},
		"empty run":      {append(bytes.Clone(header), run(5, 0)...), "an empty run at offset 5"},
		"past the end":   {append(bytes.Clone(header), run(99, 2, 1, 2)...), "ends past the image's 100 bytes"},
		"cut run":        {append(bytes.Clone(header), run(0, 3, 1, 2)...), "a run of 3 bytes truncated to 2"},
		"out of order":   {append(append(bytes.Clone(header), run(10, 1, 1)...), run(5, 1, 1)...), "before the end of the one before"},
		"overlap":        {append(append(bytes.Clone(header), run(10, 2, 1, 1)...), run(11, 1, 1)...), "before the end of the one before"},
		"huge offset":    {append(bytes.Clone(header), run(0xffffffff, 1, 1)...), "ends past the image"},
	} {
		_, err := ApplyDelta(image, tc.delta)
		assert.ErrorIs(t, err, ErrBadDelta, name)
		assert.ErrorContains(t, err, tc.want, name)
	}
	assert.Equal(t, make([]byte, 100), image, "the image given is never changed")
}

// Writes store deltas, a whole image comes back before the chain grows
// long, and every generation loads as saved, in a fresh process's view.
func TestSealedDeltas(t *testing.T) {
	root := t.TempDir()
	s := open(t, filepath.Join(root, "vm1"), filepath.Join(root, "host.key"), "vm1")
	defer s.Close()
	marker := []byte("PLAINTEXT-MARKER")
	image := bytes.Repeat([]byte{0x5a}, 16*1024)
	copy(image[4000:], marker)
	require.NoError(t, s.Save(image))

	var wholes int
	for gen := uint64(2); gen <= 150; gen++ {
		image = bytes.Clone(image)
		binary.BigEndian.PutUint64(image[8000:], gen) // a counter
		copy(image[12000:], marker)                   // and a changed marker
		image[12000] = byte(gen)
		require.NoError(t, s.Save(image))

		rec, err := s.Store.Get("vm1")
		require.NoError(t, err)
		require.Equal(t, gen, rec.Newest())
		require.LessOrEqual(t, len(rec.Deltas), maxDeltas)
		if len(rec.Deltas) == 0 {
			wholes++
		}
		for _, d := range rec.Deltas {
			require.NotContains(t, string(d), string(marker[1:]), "a delta is sealed")
			require.Less(t, len(d), 200, "a delta holds the change, not the image")
		}
		fresh := &Sealed{Store: s.Store, Key: s.Key, VMID: "vm1", SoleVM: true}
		got, err := fresh.Load()
		require.NoError(t, err)
		require.Equal(t, image, got, "generation %d", gen)
	}
	assert.GreaterOrEqual(t, wholes, 2, "whole images come back as the chain grows")
	assert.LessOrEqual(t, wholes, 10, "but most writes are deltas")
}

// A delta that does not open is refused with the VM, the generation and
// the reason, and everything stored is kept.
func TestCorruptDelta(t *testing.T) {
	root := t.TempDir()
	s := open(t, filepath.Join(root, "vm1"), filepath.Join(root, "host.key"), "vm1")
	defer s.Close()
	require.NoError(t, s.Save(bytes.Repeat([]byte{1}, 1024)))
	require.NoError(t, s.Save(bytes.Repeat([]byte{2}, 1024)))
	// A change of all 1024 bytes is too big for a delta: make a small one.
	img := bytes.Repeat([]byte{2}, 1024)
	img[10] = 3
	require.NoError(t, s.Save(img))
	rec, err := s.Store.Get("vm1")
	require.NoError(t, err)
	require.Len(t, rec.Deltas, 1)

	delta := &state.Record{VMID: "vm1", Generation: rec.Generation + 1, Created: rec.Created, Engine: rec.Engine, Delta: true, Sealed: bytes.Clone(rec.Deltas[0])}
	delta.Sealed[len(delta.Sealed)-1] ^= 1
	// The whole record again (which drops its delta), then the bad delta.
	require.NoError(t, s.Store.Put(&state.Record{VMID: "vm1", Generation: rec.Generation, Created: rec.Created, Engine: rec.Engine, Sealed: rec.Sealed}))
	require.NoError(t, s.Store.Put(delta))

	fresh := &Sealed{Store: s.Store, Key: s.Key, VMID: "vm1", SoleVM: true}
	_, err = fresh.Load()
	assert.ErrorIs(t, err, sealing.ErrAuth)
	assert.ErrorContains(t, err, `state of VM "vm1": the change of generation 3 does not apply`)
	kept, err := s.Store.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, [][]byte{delta.Sealed}, kept.Deltas)
}

// A lock handed to another process and back: what that process stored in
// between is the base of the next write, which is whole, never a delta on
// an image the store no longer holds.
func TestDeltasAfterLockHandOver(t *testing.T) {
	root := t.TempDir()
	dir, key := filepath.Join(root, "vm1"), &sealing.HostKey{Path: filepath.Join(root, "host.key")}
	image := func(b byte) []byte {
		img := bytes.Repeat([]byte{0x11}, 4096)
		img[100] = b
		return img
	}
	source, err := OpenLockable(context.Background(), openDir(dir), key, "vm1", nil, true)
	require.NoError(t, err)
	require.NoError(t, source.Save(image(1)))
	require.NoError(t, source.Save(image(2)))
	require.NoError(t, source.Unlock())

	dest, err := OpenLockable(context.Background(), openDir(dir), key, "vm1", nil, true)
	require.NoError(t, err)
	got, err := dest.Load()
	require.NoError(t, err)
	require.True(t, bytes.Equal(image(2), got))
	require.NoError(t, dest.Save(image(3)))
	require.NoError(t, dest.Save(image(4)))
	require.NoError(t, dest.Unlock())

	require.NoError(t, source.Save(image(5)), "the source takes the lock back and writes")
	require.NoError(t, source.Unlock())

	fresh, err := OpenLockable(context.Background(), openDir(dir), key, "vm1", nil, true)
	require.NoError(t, err)
	defer fresh.Unlock()
	got, err = fresh.Load()
	require.NoError(t, err)
	assert.True(t, bytes.Equal(image(5), got), "the source's last write is the state, byte %d is %d", 100, got[100])
	rec, err := fresh.sealed.Store.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(5), rec.Newest(), "generations go on from the newest stored")
	assert.Empty(t, rec.Deltas, "the write after the hand-over is whole")
}
