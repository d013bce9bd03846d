package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestKeysSealedUnderTheKEK(t *testing.T) {
	dir := t.TempDir()
	kek, err := LoadKEK(filepath.Join(dir, "kek"), false)
	assert.ErrorContains(t, err, "copy it from the replica where init ran")
	assert.Nil(t, kek)
	kek, err = LoadKEK(filepath.Join(dir, "kek"), true)
	require.NoError(t, err)
	fi, err := os.Stat(filepath.Join(dir, "kek"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	keys, token, err := NewKeys("fabric-a")
	require.NoError(t, err)
	sealed, err := SealKeys(keys, kek)
	require.NoError(t, err)
	signing, err := keys.Signing.Bytes()
	require.NoError(t, err)
	assert.False(t, bytes.Contains(sealed, keys.Encryption.Bytes()), "no private key in the clear")
	assert.False(t, bytes.Contains(sealed, signing), "no private key in the clear")
	assert.False(t, bytes.Contains(sealed, []byte(token)), "no admin token")

	again, err := LoadKEK(filepath.Join(dir, "kek"), false)
	require.NoError(t, err)
	opened, err := OpenKeys(sealed, again)
	require.NoError(t, err)
	assert.Equal(t, keys.Encryption.Bytes(), opened.Encryption.Bytes())
	assert.Equal(t, keys.Signing.Public(), opened.Signing.Public())
	assert.Equal(t, keys.CA.Raw, opened.CA.Raw)
	assert.True(t, opened.adminTokenOK(token))
	assert.False(t, opened.adminTokenOK(token+"0"))

	other, err := LoadKEK(filepath.Join(dir, "other-kek"), true)
	require.NoError(t, err)
	_, err = OpenKeys(sealed, other)
	assert.ErrorContains(t, err, "is this the KEK it was sealed under?")
}
