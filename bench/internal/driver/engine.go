package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/bench/internal/report"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/vtpm"
)

// engineRT runs commands on an in-process Device, counting them.
type engineRT struct {
	dev  *vtpm.Device
	sent int64
}

func (e *engineRT) RoundTrip(cmd []byte) ([]byte, error) {
	e.sent++
	return e.dev.Execute(context.Background(), cmd), nil
}

// memStore keeps the state image in memory: the engine without persistence.
type memStore struct {
	mu  sync.Mutex
	img []byte
}

func (m *memStore) Load() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.img == nil {
		return nil, fs.ErrNotExist
	}
	return m.img, nil
}

func (m *memStore) Save(img []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.img = append(m.img[:0], img...)
	return nil
}

// fileStore keeps the image in one file, replaced atomically and durably on
// every change: a temporary file written and fsynced, renamed over the old
// one, and the directory fsynced. It is the least a durable store does per
// change, whatever vtpmd's own store adds, so the engine floor does not
// depend on how vtpmd keeps its state.
type fileStore struct{ dir string }

func (f fileStore) path() string { return filepath.Join(f.dir, "image") }

func (f fileStore) Load() ([]byte, error) { return os.ReadFile(f.path()) }

func (f fileStore) Save(img []byte) error {
	if err := os.MkdirAll(f.dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(f.dir, ".image-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(img)
	err = errors.Join(err, tmp.Sync(), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), f.path())
	}
	if err != nil {
		return err
	}
	d, err := os.Open(f.dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// syncStore writes the image in place at the start of one file and
// fdatasyncs it: a torn write could lose the state, so it is less than any
// crash-safe store must do. It is the disk's floor for a durable write: a
// store that keeps its promise costs at least this per change.
type syncStore struct {
	dir string
	f   *os.File
}

func (s *syncStore) Load() ([]byte, error) { return nil, fs.ErrNotExist }

func (s *syncStore) Save(img []byte) error {
	if s.f == nil {
		if err := os.MkdirAll(s.dir, 0o700); err != nil {
			return err
		}
		f, err := os.OpenFile(filepath.Join(s.dir, "image"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		s.f = f
	}
	if _, err := s.f.WriteAt(img, 0); err != nil {
		return err
	}
	return unix.Fdatasync(int(s.f.Fd()))
}

func (s *syncStore) close() {
	if s.f != nil {
		s.f.Close()
	}
}

// startupClear is TPM2_Startup(SU_CLEAR).
var startupClear = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}

// Engine-floor stores.
const (
	storeMemory = "memory" // nothing kept
	storeFile   = "file"   // fileStore
	storeSync   = "sync"   // syncStore
	storeVtpmd  = "vtpmd"  // vtpmd's own: sealed records in a state store
)

// openStore opens the named store in dir.
func openStore(ctx context.Context, name, dir string) (vtpm.Store, func(), error) {
	switch name {
	case storeFile:
		return fileStore{dir: dir}, func() {}, nil
	case storeSync:
		s := &syncStore{dir: dir}
		return s, s.close, nil
	case storeVtpmd:
		// As `vtpmd socket` keeps a VM's state: sealed under a key
		// derived from a host key, the VM named by its state directory.
		keys := &sealing.HostKey{Path: dir + ".host.key"}
		s, err := vmstate.Open(ctx, dir, keys, dir)
		if err != nil {
			return nil, nil, err
		}
		return s, func() { s.Close() }, nil
	}
	return &memStore{}, func() {}, nil
}

// engineFloor times each operation on the engine in this process with the
// named store in dir. The engine is one per process: it is opened here and
// closed before returning.
func engineFloor(ctx context.Context, ops []workload.Op, storeName, dir string, d time.Duration, progress func(string)) ([]report.EngineCell, error) {
	store, closeStore, err := openStore(ctx, storeName, dir)
	if err != nil {
		return nil, err
	}
	defer closeStore()
	dev, err := vtpm.Open(vtpm.Config{Store: store})
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	if err := dev.Init(false); err != nil {
		return nil, err
	}
	rt := &engineRT{dev: dev}
	if resp, _ := rt.RoundTrip(startupClear); len(resp) < 10 || resp[9] != 0 || resp[8] != 0 {
		return nil, fmt.Errorf("engine: TPM2_Startup failed: % x", resp)
	}
	tpm, err := workload.Setup(rt, ops)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	var cells []report.EngineCell
	for _, op := range ops {
		if err := ctx.Err(); err != nil {
			return cells, err
		}
		progress(fmt.Sprintf("engine floor (%s store): %s", storeName, op.Name))
		cell := report.EngineCell{Op: op.Name, Store: storeName}
		phase, err := tpm.Prepare(rt, op)
		if err != nil {
			cell.Error = err.Error()
			cells = append(cells, cell)
			continue
		}
		var lat []time.Duration
		sent := rt.sent
		start := time.Now()
		end := start.Add(d)
		for t0 := start; t0.Before(end) && ctx.Err() == nil; {
			if err := phase.Run(rt); err != nil {
				cell.Error = err.Error()
				break
			}
			t1 := time.Now()
			lat = append(lat, t1.Sub(t0))
			t0 = t1
		}
		elapsed := time.Since(start)
		sent = rt.sent - sent // before Close's own commands
		if err := phase.Close(rt); err != nil && cell.Error == "" {
			cell.Error = err.Error()
		}
		if n := len(lat); n > 0 {
			slices.Sort(lat)
			cell.Ops = int64(n)
			cell.Commands = float64(sent) / float64(n)
			cell.Mean = elapsed / time.Duration(n)
			cell.P50 = lat[n/2]
			cell.P99 = lat[min(n-1, n*99/100)]
		}
		cells = append(cells, cell)
	}
	return cells, nil
}
