package vmstate

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

func open(t *testing.T, dir, hostKey, vmID string) *Sealed {
	t.Helper()
	s, err := Open(context.Background(), dir, &sealing.HostKey{Path: hostKey}, vmID)
	require.NoError(t, err)
	return s
}

func TestSaveLoad(t *testing.T) {
	root := t.TempDir()
	dir, key := filepath.Join(root, "vm1"), filepath.Join(root, "host.key")
	s := open(t, dir, key, "vm1")
	_, err := s.Load()
	assert.ErrorIs(t, err, state.ErrNotFound)
	require.NoError(t, s.Save([]byte("image 1")))
	require.NoError(t, s.Save([]byte("image 2")))
	rec, err := s.Store.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(2), rec.Generation)
	assert.NotContains(t, string(rec.Sealed), "image")
	require.NoError(t, s.Close())

	s = open(t, dir, key, "vm1")
	defer s.Close()
	image, err := s.Load()
	require.NoError(t, err)
	assert.Equal(t, "image 2", string(image))
	require.NoError(t, s.Save([]byte("image 3")))
	rec, err = s.Store.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(3), rec.Generation, "generations go on after a restart")
}

func TestBinding(t *testing.T) {
	root := t.TempDir()
	dir, key := filepath.Join(root, "vm1"), filepath.Join(root, "host.key")
	s := open(t, dir, key, "vm1")
	require.NoError(t, s.Save([]byte("image")))
	old, err := s.Store.Get("vm1")
	require.NoError(t, err)
	require.NoError(t, s.Save([]byte("newer")))

	// The record moved under another VM's name.
	moved := *old
	moved.VMID = "vm2"
	require.NoError(t, s.Store.Put(&moved))
	other := &Sealed{Store: s.Store, Key: s.Key, VMID: "vm2"}
	_, err = other.Load()
	assert.ErrorIs(t, err, sealing.ErrAuth, "vm1's record opened as vm2's")

	// An older generation put back in place, seen by a running TPM.
	_, err = s.Load()
	require.NoError(t, err)
	require.NoError(t, s.Store.Put(old))
	_, err = s.Load()
	assert.ErrorContains(t, err, "generation 1 is older than 2")
	require.NoError(t, s.Close())

	// The whole store opened as another VM's.
	s2 := open(t, dir, key, "vm3")
	defer s2.Close()
	_, err = s2.Load()
	assert.ErrorContains(t, err, `not of VM "vm3": refusing to make a new TPM over it`)
	assert.ErrorContains(t, s2.Save([]byte("x")), "not overwriting the stored state", "nor is a second VM's state added")
}

func TestWrongHostKey(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "vm1")
	s := open(t, dir, filepath.Join(root, "host.key"), "vm1")
	require.NoError(t, s.Save([]byte("image")))
	require.NoError(t, s.Close())
	s = open(t, dir, filepath.Join(root, "other-host.key"), "vm1")
	defer s.Close()
	_, err := s.Load()
	assert.ErrorIs(t, err, sealing.ErrWrongKey)
	assert.ErrorContains(t, err, `state of VM "vm1" (generation 1) does not open`)
}

// A corrupted record is refused with the VM and the reason, and kept.
func TestCorruptRecord(t *testing.T) {
	root := t.TempDir()
	s := open(t, filepath.Join(root, "vm1"), filepath.Join(root, "host.key"), "vm1")
	defer s.Close()
	require.NoError(t, s.Save([]byte("image")))
	rec, err := s.Store.Get("vm1")
	require.NoError(t, err)
	rec.Sealed[len(rec.Sealed)-1] ^= 1
	require.NoError(t, s.Store.Put(rec))

	fresh := &Sealed{Store: s.Store, Key: s.Key, VMID: "vm1", SoleVM: true}
	_, err = fresh.Load()
	assert.ErrorIs(t, err, sealing.ErrAuth)
	assert.ErrorContains(t, err, `state of VM "vm1" (generation 1) does not open`)
	kept, err := s.Store.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, rec, kept)
}

// With a witness, an older state put back in place is refused even by a
// new process, which has seen no generation yet.
func TestWitnessRefusesRollback(t *testing.T) {
	root := t.TempDir()
	dir, key := filepath.Join(root, "vm1"), filepath.Join(root, "host.key")
	witness := &Witness{Dir: filepath.Join(root, "generations")}
	l, err := OpenLockable(context.Background(), openDir(dir), &sealing.HostKey{Path: key}, "vm1", witness, true)
	require.NoError(t, err)
	require.NoError(t, l.Save([]byte("image 1")))
	old, err := l.sealed.Store.Get("vm1")
	require.NoError(t, err)
	require.NoError(t, l.Save([]byte("image 2")))
	require.NoError(t, l.sealed.Store.Put(old))
	require.NoError(t, l.Unlock())
	gen, err := witness.Generation("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(2), gen)

	l, err = OpenLockable(context.Background(), openDir(dir), &sealing.HostKey{Path: key}, "vm1", witness, false)
	require.NoError(t, err)
	defer l.Unlock()
	_, err = l.Load()
	assert.ErrorContains(t, err, "generation 1 is older than 2, the newest stored: an old state was put back")
}

func openDir(dir string) Opener {
	return func() (LockedStore, error) {
		s, err := state.Open(dir, state.Options{})
		if err != nil {
			return nil, err
		}
		return s, nil
	}
}

// A state file holds one VM's state: another VM neither loads it nor makes
// a new TPM over it, and the file's lock is the storage lock.
func TestLockableStateFile(t *testing.T) {
	root := t.TempDir()
	path, key := filepath.Join(root, "vm1.state"), &sealing.HostKey{Path: filepath.Join(root, "host.key")}
	openFile := func() (LockedStore, error) {
		s, err := state.OpenFile(path, state.FileOptions{})
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	l, err := OpenLockable(context.Background(), openFile, key, "vm1", nil, true)
	require.NoError(t, err)
	require.NoError(t, l.Save([]byte("image 1")))
	other, err := OpenLockable(context.Background(), openFile, key, "vm2", nil, false)
	require.NoError(t, err)
	assert.ErrorIs(t, other.Lock(0), state.ErrLocked, "vm1 holds the file")
	require.NoError(t, l.Unlock())
	before, err := os.ReadFile(path)
	require.NoError(t, err)

	_, err = other.Load()
	assert.ErrorContains(t, err, `holds the state of VM "vm1", not of VM "vm2"`)
	assert.ErrorContains(t, other.Save([]byte("image of vm2")), "not overwriting the stored state")
	require.NoError(t, other.Unlock())
	after, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, before, after)

	l, err = OpenLockable(context.Background(), openFile, key, "vm1", nil, false)
	require.NoError(t, err)
	defer l.Unlock()
	image, err := l.Load()
	require.NoError(t, err)
	assert.Equal(t, []byte("image 1"), image)
}
