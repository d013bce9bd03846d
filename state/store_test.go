package state

import (
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

	for _, bad := range [][]byte{nil, b[:3], b[:len(b)-1], append(append([]byte(nil), b...), 0), append([]byte("VTSR\x02"), b[5:]...)} {
		_, err := ParseRecord(bad)
		assert.ErrorIs(t, err, ErrCorrupt, "%x", bad)
	}
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
