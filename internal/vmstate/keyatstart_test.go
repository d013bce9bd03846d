package vmstate

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing"
)

// guardedKeys is a KeyAtStart source over a host key that can be made to
// fail, as a guardian that is down: it records what it was told.
type guardedKeys struct {
	sealing.HostKey
	down   error
	stored []bool
}

func (g *guardedKeys) StartKey(ctx context.Context, vmID string, stored bool) (*sealing.Key, error) {
	g.stored = append(g.stored, stored)
	if g.down != nil {
		return nil, g.down
	}
	return g.StateKey(ctx, vmID)
}

func TestKeyAtStartIsObtainedAtFirstUseAndRetried(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "vm1")
	keys := &guardedKeys{HostKey: sealing.HostKey{Path: filepath.Join(root, "host.key")}}
	// The down guardian's error wraps fs.ErrNotExist (a missing file): it
	// must not read as a TPM without state.
	keys.down = fmt.Errorf("guardian unreachable: %w", fs.ErrNotExist)
	l, err := OpenLockable(context.Background(), openDir(dir), keys, "vm1", nil, true)
	require.NoError(t, err, "opening asks for no key")
	assert.Nil(t, l.Key())
	assert.Empty(t, keys.stored)

	_, err = l.Load()
	assert.ErrorContains(t, err, "guardian unreachable")
	assert.False(t, errors.Is(err, fs.ErrNotExist))
	assert.ErrorContains(t, l.Save([]byte("image")), "guardian unreachable")
	assert.Equal(t, []bool{false, false}, keys.stored, "no record yet")

	keys.down = nil
	require.NoError(t, l.Save([]byte("image")), "the next use asks again")
	assert.NotNil(t, l.Key())
	image, err := l.Load()
	require.NoError(t, err)
	assert.Equal(t, "image", string(image))
	assert.Len(t, keys.stored, 3, "a key once given is kept")
	require.NoError(t, l.Unlock())

	l, err = OpenLockable(context.Background(), openDir(dir), keys, "vm1", nil, false)
	require.NoError(t, err)
	image, err = l.Load()
	require.NoError(t, err)
	assert.Equal(t, "image", string(image))
	assert.Equal(t, []bool{false, false, false, true}, keys.stored, "the record exists now")
	require.NoError(t, l.Unlock())
}
