package state

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestVMRoundTrip(t *testing.T) {
	v := &VM{Name: "vm1", ID: "0123abcd", Created: time.Unix(1700000000, 7).UTC(), Ctrl: "/run/vtpmd/vm1.ctrl", Data: "/run/vtpmd/vm1.data", Running: true, StartupClear: true}
	b, err := v.MarshalBinary()
	require.NoError(t, err)
	got, err := ParseVM(b)
	require.NoError(t, err)
	assert.Equal(t, v, got)

	flags := append([]byte(nil), b...)
	flags[len(flags)-1] = 4
	for _, bad := range [][]byte{nil, b[:4], b[:len(b)-1], append(append([]byte(nil), b...), 0), append([]byte("VTVM\x02"), b[5:]...), flags} {
		_, err := ParseVM(bad)
		assert.ErrorIs(t, err, ErrCorrupt, "%x", bad)
	}
}

func TestRegistry(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	require.NoError(t, err)
	defer s.Close()
	_, err = s.GetVM("vm1")
	assert.ErrorIs(t, err, ErrNoVM)
	assert.ErrorIs(t, err, ErrNotFound)

	v := &VM{Name: "vm1", ID: "id1", Created: time.Unix(1, 0).UTC(), Ctrl: "/c"}
	require.NoError(t, s.PutVM(v))
	require.NoError(t, s.PutVM(&VM{Name: "vm2", ID: "id2", Created: time.Unix(2, 0).UTC(), Ctrl: "/c2", Running: true}))
	require.NoError(t, s.Put(&Record{VMID: "id1", Generation: 1, Sealed: []byte("x")}))
	got, err := s.GetVM("vm1")
	require.NoError(t, err)
	assert.Equal(t, v, got)

	// Registry entries are not state records, and the other way round.
	records, err := s.List()
	require.NoError(t, err)
	require.Len(t, records, 1)
	list, err := s.ListVMs()
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.Equal(t, "vm1", list[0].Name)
	assert.Equal(t, "vm2", list[1].Name)
	assert.True(t, list[1].VM.Running)

	require.NoError(t, s.DeleteVM(v))
	_, err = s.GetVM("vm1")
	assert.ErrorIs(t, err, ErrNoVM)
	_, err = s.Get("id1")
	assert.ErrorIs(t, err, ErrNotFound, "the state record goes with the VM")

	require.NoError(t, s.db.Set([]byte(vmPrefix+"bad"), []byte("garbage"), nil))
	list, err = s.ListVMs()
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.ErrorIs(t, list[0].Err, ErrCorrupt)
}
