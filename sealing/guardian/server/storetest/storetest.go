// Package storetest checks a guardian Store implementation against the
// contract the server relies on; the stores' tests run it.
package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing/guardian/server"
)

// Run checks what the guardian server relies on of a Store, on an empty
// one.
func Run(t *testing.T, st server.Store) {
	t.Helper()
	ctx := context.Background()
	_, err := st.Get(ctx, "hosts/none")
	assert.ErrorIs(t, err, server.ErrNotFound)
	assert.ErrorIs(t, st.Delete(ctx, "hosts/none"), server.ErrNotFound)

	require.NoError(t, st.Create(ctx, "hosts/a", []byte("1"), 0))
	assert.ErrorIs(t, st.Create(ctx, "hosts/a", []byte("2"), 0), server.ErrExists)
	require.NoError(t, st.Put(ctx, "hosts/a", []byte("3")))
	v, err := st.Get(ctx, "hosts/a")
	require.NoError(t, err)
	assert.Equal(t, "3", string(v))

	assert.ErrorIs(t, st.Swap(ctx, "hosts/a", []byte("1"), []byte("4")), server.ErrChanged)
	require.NoError(t, st.Swap(ctx, "hosts/a", []byte("3"), []byte("4")))
	assert.ErrorIs(t, st.Swap(ctx, "hosts/none", []byte("3"), []byte("4")), server.ErrNotFound)

	for _, k := range []string{"audit/3", "audit/1", "audit/2", "auditx", "hosts/b"} {
		require.NoError(t, st.Create(ctx, k, []byte(k), 0))
	}
	all, err := st.List(ctx, "audit/", 0)
	require.NoError(t, err)
	assert.Equal(t, []server.KeyValue{{Key: "audit/1", Value: []byte("audit/1")}, {Key: "audit/2", Value: []byte("audit/2")}, {Key: "audit/3", Value: []byte("audit/3")}}, all)
	last, err := st.List(ctx, "audit/", 2)
	require.NoError(t, err)
	assert.Equal(t, []server.KeyValue{{Key: "audit/2", Value: []byte("audit/2")}, {Key: "audit/3", Value: []byte("audit/3")}}, last)

	// A key with a ttl keeps it across a Swap, and is gone after it.
	require.NoError(t, st.Create(ctx, "nonces/n", []byte("fresh"), 2*time.Second))
	require.NoError(t, st.Swap(ctx, "nonces/n", []byte("fresh"), []byte("used")))
	require.Eventually(t, func() bool {
		_, err := st.Get(ctx, "nonces/n")
		return errors.Is(err, server.ErrNotFound)
	}, 30*time.Second, 100*time.Millisecond)
	require.NoError(t, st.Create(ctx, "nonces/n", []byte("again"), time.Minute), "an expired key can be created again")

	require.NoError(t, st.Delete(ctx, "hosts/a"))
	_, err = st.Get(ctx, "hosts/a")
	assert.ErrorIs(t, err, server.ErrNotFound)
	require.NoError(t, st.Ping(ctx))
}
