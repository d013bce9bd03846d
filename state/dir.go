package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// FileName is the name of the state image inside a state directory.
const FileName = "vtpmd.state"

// lockName is the lock file swtpm also uses, so tools that look for it work.
const lockName = ".lock"

// Dir is the state of one TPM in a directory.
type Dir struct {
	// Path is the directory. It is created with mode 0700 if missing.
	Path string
	// Mode is the mode of the files written; 0 means 0600.
	Mode os.FileMode

	lock *os.File
}

func (d *Dir) mode() os.FileMode {
	if d.Mode == 0 {
		return 0o600
	}
	return d.Mode
}

// Load returns the stored image, or an error wrapping fs.ErrNotExist.
func (d *Dir) Load() ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(d.Path, FileName))
	if err != nil {
		return nil, fmt.Errorf("read state in %s: %w", d.Path, err)
	}
	return b, nil
}

// Save replaces the stored image atomically and durably.
func (d *Dir) Save(image []byte) error {
	if err := os.MkdirAll(d.Path, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	tmp, err := os.CreateTemp(d.Path, ".tmp-"+FileName+"-")
	if err != nil {
		return fmt.Errorf("save state in %s: %w", d.Path, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	err = errors.Join(tmp.Chmod(d.mode()), write(tmp, image), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(d.Path, FileName))
	}
	if err == nil {
		err = syncDir(d.Path)
	}
	if err != nil {
		return fmt.Errorf("save state in %s: %w", d.Path, err)
	}
	return nil
}

func write(f *os.File, b []byte) error {
	if _, err := f.Write(b); err != nil {
		return err
	}
	return f.Sync()
}

func syncDir(path string) error {
	dir, err := os.Open(path)
	if err != nil {
		return err
	}
	return errors.Join(dir.Sync(), dir.Close())
}

// Size returns the size of the stored image, or an error wrapping
// fs.ErrNotExist.
func (d *Dir) Size() (int64, error) {
	fi, err := os.Stat(filepath.Join(d.Path, FileName))
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// ErrLocked means another process holds the state's lock.
var ErrLocked = errors.New("state is locked by another process")

// Lock takes the state's lock if this Dir does not hold it yet. The lock
// file stays open exactly while the lock is held.
func (d *Dir) Lock() error {
	if d.lock != nil {
		return nil
	}
	if err := os.MkdirAll(d.Path, 0o700); err != nil {
		return fmt.Errorf("lock state: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(d.Path, lockName), os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o660)
	if err != nil {
		return fmt.Errorf("lock state in %s: %w", d.Path, err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
		f.Close()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return fmt.Errorf("lock state in %s: %w", d.Path, ErrLocked)
		}
		return fmt.Errorf("lock state in %s: %w", d.Path, err)
	}
	d.lock = f
	return nil
}

// Unlock releases the lock if held.
func (d *Dir) Unlock() error {
	if d.lock == nil {
		return nil
	}
	err := d.lock.Close()
	d.lock = nil
	return err
}

// Exists reports whether the directory holds a state image.
func (d *Dir) Exists() bool {
	_, err := d.Size()
	return !errors.Is(err, fs.ErrNotExist)
}
