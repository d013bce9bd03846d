package state

import (
	"io/fs"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A VM's key protector is created once, is not a state record, and goes
// with the VM.
func TestProtector(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	require.NoError(t, err)
	defer s.Close()
	_, err = s.GetProtector("id1")
	assert.ErrorIs(t, err, ErrNotFound)

	require.NoError(t, s.CreateProtector("id1", []byte(`{"p":1}`)))
	err = s.CreateProtector("id1", []byte(`{"p":2}`))
	assert.ErrorIs(t, err, ErrProtectorExists)
	assert.ErrorIs(t, err, fs.ErrExist)
	got, err := s.GetProtector("id1")
	require.NoError(t, err)
	assert.Equal(t, `{"p":1}`, string(got), "never replaced")
	assert.ErrorContains(t, s.CreateProtector("id2", nil), "0 bytes")

	records, err := s.List()
	require.NoError(t, err)
	assert.Empty(t, records)

	require.NoError(t, s.DeleteVM(&VM{Name: "vm1", ID: "id1"}))
	_, err = s.GetProtector("id1")
	assert.ErrorIs(t, err, ErrNotFound, "the protector goes with the VM")
}
