package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"

	"github.com/cockroachdb/pebble"
	dto "github.com/prometheus/client_model/go"
)

// ErrNotFound means the store has no record for the VM; it wraps
// fs.ErrNotExist.
var ErrNotFound = fmt.Errorf("no state record: %w", fs.ErrNotExist)

// ErrLocked means another process has the store open.
var ErrLocked = errors.New("state store is in use by another process")

// Store is a pebble database of state records.
type Store struct {
	dir      string
	db       *pebble.DB
	cache    *pebble.Cache
	readOnly bool
}

// Options configures Open.
type Options struct {
	// ReadOnly opens the store for reading only.
	ReadOnly bool
	// MemTableSize is pebble's memtable size; 0 is 1 MiB, enough for one
	// VM. A store shared by many VMs (`vtpmd serve`) wants more.
	MemTableSize uint64
}

const recordPrefix = "vm/"

// Open opens (creating if needed, with mode 0700) the store in dir.
func Open(dir string, o Options) (*Store, error) {
	if !o.ReadOnly {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("open state store: %w", err)
		}
	}
	// A TPM's state is small: keep the caches small, since every VM's
	// worker may hold a store.
	cache := pebble.NewCache(1 << 20)
	if o.MemTableSize == 0 {
		o.MemTableSize = 1 << 20
	}
	db, err := pebble.Open(dir, &pebble.Options{
		Cache:        cache,
		MemTableSize: o.MemTableSize,
		ReadOnly:     o.ReadOnly,
		Logger:       quietLogger{},
	})
	if err != nil {
		cache.Unref()
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) || strings.Contains(err.Error(), "resource temporarily unavailable") || strings.Contains(err.Error(), "lock held") {
			return nil, fmt.Errorf("open state store %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("open state store %s: %w", dir, err)
	}
	return &Store{dir: dir, db: db, cache: cache, readOnly: o.ReadOnly}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Close closes the store, releasing its lock. A writable store flushes
// its memtable first, so that the next open has no log to replay: an open
// writes what it replays into a table, with its syncs, before the TPM can
// answer.
func (s *Store) Close() error {
	var err error
	if !s.readOnly {
		err = s.db.Flush()
	}
	err = errors.Join(err, s.db.Close())
	s.cache.Unref()
	if err != nil {
		return fmt.Errorf("close state store %s: %w", s.dir, err)
	}
	return nil
}

// Get returns the VM's record. A record that does not parse gives an error
// wrapping ErrCorrupt and is left as it is.
func (s *Store) Get(vmID string) (*Record, error) {
	v, closer, err := s.db.Get([]byte(recordPrefix + vmID))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("VM %q: %w", vmID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read state of VM %q: %w", vmID, err)
	}
	defer closer.Close()
	r, err := ParseRecord(v)
	if err != nil {
		return nil, fmt.Errorf("state of VM %q: %w", vmID, err)
	}
	return r, nil
}

// Put stores the record under its VM id, durably: the batch is committed
// with Sync, sharing its fsync with concurrent Puts.
func (s *Store) Put(r *Record) error {
	v, err := r.MarshalBinary()
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if err := b.Set([]byte(recordPrefix+r.VMID), v, nil); err != nil {
		return fmt.Errorf("store state of VM %q: %w", r.VMID, err)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("store state of VM %q: %w", r.VMID, err)
	}
	return nil
}

// WALSyncs is how many times the store has synced its write-ahead log
// since it was opened: concurrent Puts (and PutVMs) share one. It is
// read from pebble's metrics, so not for a hot path.
func (s *Store) WALSyncs() uint64 {
	h := s.db.Metrics().LogWriter.FsyncLatency
	if h == nil {
		return 0
	}
	var m dto.Metric
	if h.Write(&m) != nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

// Entry is a record as listed: its key's VM id and its raw size, and the
// parse error if it does not parse.
type Entry struct {
	VMID string
	Size int
	Err  error
}

// List lists every record, corrupt ones included.
func (s *Store) List() ([]Entry, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(recordPrefix), UpperBound: []byte("vm0")})
	if err != nil {
		return nil, fmt.Errorf("list state records: %w", err)
	}
	var out []Entry
	for it.First(); it.Valid(); it.Next() {
		e := Entry{VMID: strings.TrimPrefix(string(it.Key()), recordPrefix), Size: len(it.Value())}
		_, e.Err = ParseRecord(it.Value())
		out = append(out, e)
	}
	return out, errors.Join(it.Error(), it.Close())
}

// quietLogger drops pebble's informational logs; fatal errors still stop
// the process, as pebble requires.
type quietLogger struct{}

func (quietLogger) Infof(string, ...interface{}) {}

func (quietLogger) Fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "pebble: "+format+"\n", args...)
	os.Exit(1)
}
