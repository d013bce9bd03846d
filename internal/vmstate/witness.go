package vmstate

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/vtpmd/vtpmd/state"
)

// Witness records, outside every state dir, the newest generation stored
// for each VM, so that an older state put back in place is refused. It is
// written after the record, so a crash between the two leaves the record
// ahead of the witness, which is accepted. Writes are not fsynced one by
// one: the kernel writes them back within seconds, and Sync makes them
// durable when a VM stops.
type Witness struct {
	// Dir holds one small file per VM.
	Dir string

	mu    sync.Mutex
	files map[string]*os.File // kept open: every durable write records
}

// Path is the witness file of the VM.
func (w *Witness) Path(vmID string) string {
	sum := sha256.Sum256([]byte(vmID))
	return filepath.Join(w.Dir, hex.EncodeToString(sum[:16]))
}

// Generation returns the newest generation recorded for the VM, 0 if none.
func (w *Witness) Generation(vmID string) (uint64, error) {
	b, err := os.ReadFile(w.Path(vmID))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("read generation witness: %w", err)
	case len(b) != 8:
		return 0, fmt.Errorf("generation witness %s has %d bytes, want 8", w.Path(vmID), len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

// Check refuses a record older than the newest generation recorded for its
// VM: an old state put back in place.
func (w *Witness) Check(rec *state.Record) error {
	newest, err := w.Generation(rec.VMID)
	if err != nil {
		return err
	}
	if rec.Newest() < newest {
		return fmt.Errorf("state of VM %q: generation %d is older than %d, the newest stored: an old state was put back (if on purpose, remove %s)",
			rec.VMID, rec.Newest(), newest, w.Path(rec.VMID))
	}
	return nil
}

// Remove forgets the VM's generation, when the VM is deleted.
func (w *Witness) Remove(vmID string) error {
	w.mu.Lock()
	if f := w.files[vmID]; f != nil {
		f.Close()
		delete(w.files, vmID)
	}
	w.mu.Unlock()
	if err := os.Remove(w.Path(vmID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove generation witness: %w", err)
	}
	return nil
}

// Record notes gen as the VM's newest generation. An 8-byte write at
// offset 0 replaces the old value whole.
func (w *Witness) Record(vmID string, gen uint64) error {
	return w.write(vmID, gen, false)
}

// Sync makes the VM's recorded generation durable.
func (w *Witness) Sync(vmID string, gen uint64) error {
	return w.write(vmID, gen, true)
}

func (w *Witness) write(vmID string, gen uint64, durable bool) error {
	f, err := w.file(vmID)
	if err != nil {
		return fmt.Errorf("record generation: %w", err)
	}
	_, err = f.WriteAt(binary.BigEndian.AppendUint64(nil, gen), 0)
	if err == nil && durable {
		err = f.Sync()
	}
	if err != nil {
		return fmt.Errorf("record generation in %s: %w", w.Path(vmID), err)
	}
	return nil
}

// file returns the VM's witness file, opened (and made) at its first write.
func (w *Witness) file(vmID string) (*os.File, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if f := w.files[vmID]; f != nil {
		return f, nil
	}
	f, err := os.OpenFile(w.Path(vmID), os.O_RDWR|os.O_CREATE, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(w.Dir, 0o700); err == nil {
			f, err = os.OpenFile(w.Path(vmID), os.O_RDWR|os.O_CREATE, 0o600)
		}
	}
	if err != nil {
		return nil, err
	}
	if w.files == nil {
		w.files = map[string]*os.File{}
	}
	w.files[vmID] = f
	return f, nil
}
