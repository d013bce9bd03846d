package server_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing/guardian/server"
	"github.com/vtpmd/vtpmd/sealing/guardian/server/storetest"
)

func TestLocalStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	st, err := server.OpenLocalStore(dir, nil)
	require.NoError(t, err)
	storetest.Run(t, st)
	require.NoError(t, st.Put(context.Background(), "hosts/h1", []byte("kept")))
	require.NoError(t, st.Close())

	st, err = server.OpenLocalStore(dir, nil)
	require.NoError(t, err)
	defer st.Close()
	v, err := st.Get(context.Background(), "hosts/h1")
	require.NoError(t, err)
	assert.Equal(t, "kept", string(v), "durable across a reopen")
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
}
