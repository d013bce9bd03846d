package state

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func fileRecord(gen uint64, size int) *Record {
	return &Record{VMID: "vm1", Generation: gen, Created: time.Unix(1700000000, 0).UTC(), Engine: "e", Sealed: bytes.Repeat([]byte{byte(gen)}, size)}
}

func openFile(t *testing.T, path string) *FileStore {
	t.Helper()
	s, err := OpenFile(path, FileOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// putAll stores generations 1..n and closes the store.
func putAll(t *testing.T, path string, n uint64) {
	t.Helper()
	s := openFile(t, path)
	for g := uint64(1); g <= n; g++ {
		require.NoError(t, s.Put(fileRecord(g, 1000)))
	}
	require.NoError(t, s.Close())
}

// reopen opens the file again and returns the generation it loads.
func reopen(t *testing.T, path string) (uint64, error) {
	t.Helper()
	s := openFile(t, path)
	defer s.Close()
	r, err := s.Get("vm1")
	if err != nil {
		return 0, err
	}
	return r.Generation, nil
}

// damage overwrites n bytes at off with 0xff.
func damage(t *testing.T, path string, off int64, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt(bytes.Repeat([]byte{0xff}, n), off)
	require.NoError(t, errors.Join(err, f.Close()))
}

// slotOffset is where slot i of the file begins.
func slotOffset(t *testing.T, path string, i int) int64 {
	t.Helper()
	s, err := OpenFile(path, FileOptions{ReadOnly: true})
	require.NoError(t, err)
	defer s.Close()
	return slotsStart + int64(i)*s.layout.slotCap
}

func TestFileStoreRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.state")
	s := openFile(t, path)
	_, err := s.Get("vm1")
	assert.ErrorIs(t, err, ErrNotFound)
	list, err := s.List()
	require.NoError(t, err)
	assert.Empty(t, list, "a new file has no record")

	want := fileRecord(1, 17000)
	require.NoError(t, s.Put(want))
	got, err := s.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, want, got)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	_, err = s.Get("vm2")
	assert.ErrorContains(t, err, `holds the state of VM "vm1", not of VM "vm2"`)
	assert.NotErrorIs(t, err, ErrNotFound, "another VM's record is not a missing one")
	require.NoError(t, s.Close())

	gen, err := reopen(t, path)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), gen)
}

// A state file keeps whole images: a delta is refused, and what the file
// holds is left as it is.
func TestFileStoreRefusesDeltas(t *testing.T) {
	s := openFile(t, filepath.Join(t.TempDir(), "tpm.state"))
	defer s.Close()
	whole := fileRecord(1, 100)
	require.NoError(t, s.Put(whole))
	delta := fileRecord(2, 10)
	delta.Delta = true
	assert.ErrorContains(t, s.Put(delta), "a state file keeps whole images, not deltas")
	withDeltas := fileRecord(2, 10)
	withDeltas.Deltas = [][]byte{{1}}
	assert.ErrorContains(t, s.Put(withDeltas), "not deltas")
	got, err := s.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, whole, got)
}

// Writes alternate between the slots; the newest valid one wins.
func TestFileStoreGenerations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.state")
	s := openFile(t, path)
	for g := uint64(1); g <= 5; g++ {
		require.NoError(t, s.Put(fileRecord(g, 100)))
		assert.Equal(t, int(1-g%2), s.layout.slot, "generation %d", g)
		assert.Equal(t, g, s.layout.slotSeq)
	}
	require.NoError(t, s.Close())
	gen, err := reopen(t, path)
	require.NoError(t, err)
	assert.Equal(t, uint64(5), gen)
}

// A torn write of the newest slot costs that slot only: the other still
// holds the previous record, and the next write goes over the torn one.
func TestFileStoreTornSlot(t *testing.T) {
	for _, torn := range []struct {
		name string
		off  int64 // from the slot's start
	}{
		{"header", 10},
		{"payload", frameOverhead + 500},
		{"tail", frameOverhead + 1000},
	} {
		t.Run(torn.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tpm.state")
			putAll(t, path, 3) // generation 3 is in slot 0
			damage(t, path, slotOffset(t, path, 0)+torn.off, 8)
			gen, err := reopen(t, path)
			require.NoError(t, err)
			assert.Equal(t, uint64(2), gen, "the previous record")

			s := openFile(t, path)
			require.NoError(t, s.Put(fileRecord(4, 1000)))
			assert.Equal(t, 0, s.layout.slot, "written over the torn slot")
			require.NoError(t, s.Close())
			gen, err = reopen(t, path)
			require.NoError(t, err)
			assert.Equal(t, uint64(4), gen)
		})
	}
}

// When neither slot, or neither header copy, is valid, the file is corrupt:
// the error names it, and it is left exactly as it is.
func TestFileStoreCorruptIsKept(t *testing.T) {
	for _, c := range []struct {
		name   string
		spoil  func(t *testing.T, path string)
		reason string
	}{
		{"both slots", func(t *testing.T, path string) {
			damage(t, path, slotOffset(t, path, 0)+30, 1)
			damage(t, path, slotOffset(t, path, 1)+30, 1)
		}, "neither copy of the record is valid"},
		{"both header copies", func(t *testing.T, path string) {
			damage(t, path, 20, 1)
			damage(t, path, headerCopySize+20, 1)
		}, "header is damaged"},
		{"not a state file", func(t *testing.T, path string) {
			require.NoError(t, os.WriteFile(path, []byte("some other data"), 0o600))
		}, "not a vtpmd state file"},
		{"a file system", func(t *testing.T, path string) {
			// ext4's superblock lies at 1024, after zeros.
			require.NoError(t, os.WriteFile(path, append(make([]byte, 1024), 0x53, 0xef), 0o600))
		}, "not a vtpmd state file"},
		{"swtpm's format", func(t *testing.T, path string) {
			require.NoError(t, os.WriteFile(path, append([]byte("nilmptws\x01\x00"), make([]byte, 200)...), 0o600))
		}, "swtpm's own state format"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tpm.state")
			putAll(t, path, 2)
			c.spoil(t, path)
			before, err := os.ReadFile(path)
			require.NoError(t, err)

			s := openFile(t, path)
			_, err = s.Get("vm1")
			assert.ErrorIs(t, err, ErrCorrupt)
			assert.ErrorContains(t, err, c.reason)
			assert.ErrorContains(t, err, path)
			err = s.Put(fileRecord(3, 1000))
			assert.ErrorIs(t, err, ErrCorrupt)
			assert.ErrorContains(t, err, "not overwriting "+path)
			list, err := s.List()
			require.NoError(t, err)
			require.Len(t, list, 1, "listed, so that it is not taken for a missing TPM")
			assert.ErrorIs(t, list[0].Err, ErrCorrupt)
			require.NoError(t, s.Close())

			after, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(before, after), "the file is left as it was")
		})
	}
}

// A file of zeros (a new block device) is blank, not corrupt.
func TestFileStoreZeroFileIsBlank(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.state")
	require.NoError(t, os.WriteFile(path, make([]byte, 8192), 0o600))
	s := openFile(t, path)
	_, err := s.Get("vm1")
	assert.ErrorIs(t, err, ErrNotFound)
	require.NoError(t, s.Put(fileRecord(1, 10)))
	require.NoError(t, s.Close())
	gen, err := reopen(t, path)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), gen)
}

// A record larger than a slot grows a regular file. The new header is
// written last: if its write is torn, the old header and the old record
// remain.
func TestFileStoreGrows(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.state")
	s := openFile(t, path)
	require.NoError(t, s.Put(fileRecord(1, 100)))
	small := s.layout.slotCap
	require.NoError(t, s.Put(fileRecord(2, 100)))
	require.NoError(t, s.Put(fileRecord(3, 50000)))
	assert.Greater(t, s.layout.slotCap, small)
	require.NoError(t, s.Put(fileRecord(4, 60000)))
	require.NoError(t, s.Close())
	gen, err := reopen(t, path)
	require.NoError(t, err)
	assert.Equal(t, uint64(4), gen)

	// Again, and tear the new header copy (copy 1) after the growth.
	path = filepath.Join(t.TempDir(), "tpm.state")
	putAll(t, path, 2)
	s = openFile(t, path)
	require.NoError(t, s.Put(fileRecord(3, 50000)))
	require.Equal(t, 1, s.layout.hdrCopy)
	require.NoError(t, s.Close())
	damage(t, path, headerCopySize+30, 1)
	gen, err = reopen(t, path)
	require.NoError(t, err)
	assert.Equal(t, uint64(2), gen, "the record before the growth")
}

func TestFileStoreLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.state")
	s := openFile(t, path)
	require.NoError(t, s.Put(fileRecord(1, 10)))
	_, err := OpenFile(path, FileOptions{})
	assert.ErrorIs(t, err, ErrLocked, "a second opener while the first holds the file")
	assert.ErrorContains(t, err, path)

	ro, err := OpenFile(path, FileOptions{ReadOnly: true})
	require.NoError(t, err, "reading needs no lock")
	list, err := ro.List()
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.Equal(t, "vm1", list[0].VMID)
	require.NoError(t, ro.Close())

	require.NoError(t, s.Close())
	s2, err := OpenFile(path, FileOptions{})
	require.NoError(t, err, "the lock is released on Close")
	require.NoError(t, s2.Close())

	// swtpm's lock (lock=true) is a traditional fcntl lock; it excludes
	// vtpmd's too.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, unix.FcntlFlock(f.Fd(), unix.F_SETLK, &unix.Flock_t{Type: unix.F_WRLCK}))
	_, err = OpenFile(path, FileOptions{})
	assert.ErrorIs(t, err, ErrLocked, "while swtpm holds the file")
}

func TestFileStoreRefusesSymlinksAndMissing(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	putAll(t, target, 1)
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink(target, link))
	_, err := OpenFile(link, FileOptions{})
	assert.ErrorContains(t, err, "open state file "+link)

	_, err = OpenFile(filepath.Join(dir, "none"), FileOptions{ReadOnly: true})
	assert.ErrorIs(t, err, os.ErrNotExist, "reading does not create")
	_, err = OpenFile(filepath.Join(dir, "no-dir", "f"), FileOptions{})
	assert.ErrorIs(t, err, os.ErrNotExist, "the directory is not created")
}

// loopDevice attaches a loop device of size bytes, or skips the test.
func loopDevice(t *testing.T, size int64) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("block device test skipped: losetup needs root")
	}
	backing := filepath.Join(t.TempDir(), "backing")
	require.NoError(t, os.WriteFile(backing, nil, 0o600))
	require.NoError(t, os.Truncate(backing, size))
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Skipf("block device test skipped: losetup does not work here: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "--detach", dev).Run() })
	return dev
}

func TestFileStoreBlockDevice(t *testing.T) {
	dev := loopDevice(t, 1<<20)
	s, err := OpenFile(dev, FileOptions{})
	require.NoError(t, err)
	_, err = s.Get("vm1")
	assert.ErrorIs(t, err, ErrNotFound, "a zeroed device is blank")
	for g := uint64(1); g <= 3; g++ {
		require.NoError(t, s.Put(fileRecord(g, 17000)))
	}
	err = s.Put(fileRecord(4, 600<<10))
	assert.ErrorContains(t, err, "more than a slot of the block device holds")
	require.NoError(t, s.Close())
	s, err = OpenFile(dev, FileOptions{})
	require.NoError(t, err)
	r, err := s.Get("vm1")
	require.NoError(t, err)
	assert.Equal(t, uint64(3), r.Generation)
	require.NoError(t, s.Close())

	small := loopDevice(t, 64<<10)
	_, err = OpenFile(small, FileOptions{})
	assert.ErrorContains(t, err, "open state file "+small+": the block device has 65536 bytes, too few")
}
