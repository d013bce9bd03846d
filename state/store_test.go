package state

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRecordRoundTrip(t *testing.T) {
	r := &Record{VMID: "vm1", Generation: 42, Created: time.Unix(1700000000, 5).UTC(), Engine: "go-tpm-tools v0.4.11 nv16384", Sealed: []byte("sealed")}
	b, err := r.MarshalBinary()
	require.NoError(t, err)
	got, err := ParseRecord(b)
	require.NoError(t, err)
	assert.Equal(t, r, got)

	for _, bad := range [][]byte{nil, b[:3], b[:len(b)-1], append(append([]byte(nil), b...), 0), append([]byte("VTSR\x03"), b[5:]...)} {
		_, err := ParseRecord(bad)
		assert.ErrorIs(t, err, ErrCorrupt, "%x", bad)
	}

	// Version 1, written before deltas, ends after the image.
	v1 := append([]byte("VTSR\x01"), b[5:len(b)-3]...)
	got, err = ParseRecord(v1)
	require.NoError(t, err)
	assert.Equal(t, r, got)

	withDeltas := &Record{VMID: "vm1", Generation: 7, Created: r.Created, Engine: r.Engine, Sealed: []byte("base"), Deltas: [][]byte{[]byte("d8"), []byte("d9")}}
	delta := &Record{VMID: "vm1", Generation: 8, Created: r.Created, Engine: r.Engine, Sealed: []byte("d8"), Delta: true}
	for _, want := range []*Record{withDeltas, delta} {
		b, err := want.MarshalBinary()
		require.NoError(t, err)
		got, err := ParseRecord(b)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	assert.Equal(t, uint64(9), withDeltas.Newest())
}

func TestStoreDeltas(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	require.NoError(t, err)
	defer s.Close()
	rec := func(vmID string, gen uint64, sealed string, delta bool) *Record {
		return &Record{VMID: vmID, Generation: gen, Created: time.Unix(1, 0).UTC(), Engine: "e", Sealed: []byte(sealed), Delta: delta}
	}
	require.NoError(t, s.Put(rec("a", 1, "base a", false)))
	require.NoError(t, s.Put(rec("a/b", 1, "base a/b", false)))
	require.NoError(t, s.Put(rec("a", 2, "change 2", true)))
	require.NoError(t, s.Put(rec("a", 3, "change 3", true)))
	require.NoError(t, s.Put(rec("a/b", 2, "change of a/b", true)))

	got, err := s.Get("a")
	require.NoError(t, err)
	assert.Equal(t, "base a", string(got.Sealed))
	assert.Equal(t, [][]byte{[]byte("change 2"), []byte("change 3")}, got.Deltas, "in order, and only VM a's")
	assert.Equal(t, uint64(3), got.Newest())

	// A whole record drops the deltas it replaces, in the same commit.
	require.NoError(t, s.Put(rec("a", 4, "whole 4", false)))
	got, err = s.Get("a")
	require.NoError(t, err)
	assert.Empty(t, got.Deltas)
	assert.Equal(t, uint64(4), got.Newest())
	got, err = s.Get("a/b")
	require.NoError(t, err)
	assert.Len(t, got.Deltas, 1, "another VM's deltas stay")

	// A gap in the generations is a corrupt state, never a silently older one.
	require.NoError(t, s.Put(rec("a", 6, "change 6", true)))
	_, err = s.Get("a")
	assert.ErrorIs(t, err, ErrCorrupt)
	assert.ErrorContains(t, err, "delta of generation 6 follows generation 4")

	assert.ErrorContains(t, s.Put(&Record{VMID: "a", Generation: 7, Sealed: []byte("x"), Deltas: [][]byte{{1}}}), "carries no deltas")

	require.NoError(t, s.DeleteVM(&VM{Name: "a/b", ID: "a/b"}))
	require.NoError(t, s.Put(rec("a/b", 1, "new a/b", false)))
	got, err = s.Get("a/b")
	require.NoError(t, err)
	assert.Empty(t, got.Deltas, "deleting the VM deleted its deltas")
}

func TestStorePutGetList(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	require.NoError(t, err)
	_, err = s.Get("vm1")
	assert.ErrorIs(t, err, ErrNotFound)

	r := &Record{VMID: "vm1", Generation: 1, Created: time.Unix(1, 0).UTC(), Engine: "e", Sealed: []byte("x")}
	require.NoError(t, s.Put(r))
	got, err := s.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, r, got)

	_, err = Open(dir, Options{})
	assert.ErrorIs(t, err, ErrLocked, "a second opener while the first holds the store")

	// A record that does not parse is reported, listed, and left alone.
	require.NoError(t, s.db.Set([]byte(recordPrefix+"vm2"), []byte("garbage"), nil))
	_, err = s.Get("vm2")
	assert.ErrorIs(t, err, ErrCorrupt)
	list, err := s.List()
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.Equal(t, "vm1", list[0].VMID)
	assert.NoError(t, list[0].Err)
	assert.Equal(t, "vm2", list[1].VMID)
	assert.ErrorIs(t, list[1].Err, ErrCorrupt)
	assert.Equal(t, len("garbage"), list[1].Size)
	require.NoError(t, s.Close())

	// Reopened, the records are there.
	s, err = Open(dir, Options{})
	require.NoError(t, err)
	defer s.Close()
	got, err = s.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, r, got)
}

// Concurrent Puts all land; pebble groups their syncs.
func TestConcurrentPuts(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	require.NoError(t, err)
	defer s.Close()
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := uint64(1); g <= 20; g++ {
				assert.NoError(t, s.Put(&Record{VMID: string(rune('a' + i)), Generation: g, Sealed: make([]byte, 16<<10)}))
			}
		}()
	}
	wg.Wait()
	list, err := s.List()
	require.NoError(t, err)
	assert.Len(t, list, 16)
	for _, e := range list {
		r, err := s.Get(e.VMID)
		require.NoError(t, err)
		assert.Equal(t, uint64(20), r.Generation)
	}
}

// A store's new log is zero-filled ahead of its records, chunk after
// chunk as they come: a copy of the directory taken while the store is
// open, as a crash leaves it, replays every record written, its zeroed tail
// read as the log's end.
func TestZeroFilledLogReplays(t *testing.T) {
	const chunk = 4096
	dir := t.TempDir()
	s, err := Open(dir, Options{LogZeroFill: chunk})
	require.NoError(t, err)
	defer s.Close()
	logs, err := filepath.Glob(filepath.Join(dir, "*.log"))
	require.NoError(t, err)
	require.Len(t, logs, 1)
	info, err := os.Stat(logs[0])
	require.NoError(t, err)
	assert.Equal(t, int64(chunk), info.Size(), "the new log is zero-filled")

	require.NoError(t, s.Put(&Record{VMID: "vm1", Generation: 1, Engine: "e", Sealed: []byte("whole")}))
	delta := bytes.Repeat([]byte{0xa5}, 500)
	for gen := uint64(2); gen <= 40; gen++ {
		delta[0] = byte(gen)
		require.NoError(t, s.Put(&Record{VMID: "vm1", Generation: gen, Engine: "e", Sealed: delta, Delta: true}))
	}
	log, err := os.ReadFile(logs[0])
	require.NoError(t, err)
	assert.Greater(t, len(log), 39*500, "the zeros followed the records")
	assert.Equal(t, make([]byte, chunk/2), log[len(log)-chunk/2:], "zeros ahead of the last record")

	crashed := t.TempDir()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		if e.Name() == "LOCK" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(crashed, e.Name()), b, 0o600))
	}
	c, err := Open(crashed, Options{})
	require.NoError(t, err)
	defer c.Close()
	got, err := c.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(40), got.Newest())
	assert.Equal(t, delta, got.Deltas[len(got.Deltas)-1])
}
