package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"

	"github.com/cockroachdb/pebble"
	"github.com/cockroachdb/pebble/vfs"
	dto "github.com/prometheus/client_model/go"

	"github.com/vtpmd/vtpmd/internal/wire"
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
	// LogZeroFill is how far ahead of the writes a write-ahead log is
	// zero-filled (see logFS); 0 is 64 KiB. A store with many writers wants
	// more.
	LogZeroFill int64
}

const (
	recordPrefix = "vm/"
	deltaPrefix  = "vd/"
)

// deltaKeys is the key prefix of the VM's deltas, each key that prefix and
// the delta's generation (big-endian, so they sort in order). The VM id's
// length comes first, so that no VM's prefix is another VM's.
func deltaKeys(vmID string) []byte {
	return wire.AppendString([]byte(deltaPrefix), vmID)
}

func deltaKey(vmID string, generation uint64) []byte {
	return binary.BigEndian.AppendUint64(deltaKeys(vmID), generation)
}

// prefixEnd is the first key after every key that starts with prefix.
func prefixEnd(prefix []byte) []byte {
	end := append([]byte(nil), prefix...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i]++; end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

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
	if o.LogZeroFill == 0 {
		o.LogZeroFill = logZeroFill
	}
	db, err := pebble.Open(dir, &pebble.Options{
		Cache:        cache,
		MemTableSize: o.MemTableSize,
		ReadOnly:     o.ReadOnly,
		Logger:       quietLogger{},
		FS:           logFS{FS: vfs.Default, zeroFill: o.LogZeroFill},
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

// Get returns the VM's record with the deltas stored since it. A record or
// delta that does not parse, or a gap in the deltas' generations, gives an
// error wrapping ErrCorrupt, and all is left as it is.
func (s *Store) Get(vmID string) (*Record, error) {
	snap := s.db.NewSnapshot() // the record and its deltas as of one moment
	defer snap.Close()
	v, closer, err := snap.Get([]byte(recordPrefix + vmID))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("VM %q: %w", vmID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read state of VM %q: %w", vmID, err)
	}
	r, err := ParseRecord(v)
	closer.Close()
	if err == nil && (r.Delta || len(r.Deltas) > 0) {
		err = fmt.Errorf("%w: a delta stored as a whole record", ErrCorrupt)
	}
	if err == nil {
		r.Deltas, err = s.deltas(snap, r)
	}
	if err != nil {
		return nil, fmt.Errorf("state of VM %q: %w", vmID, err)
	}
	return r, nil
}

// deltas reads the sealed deltas stored since base, which must follow it
// generation by generation.
func (s *Store) deltas(snap *pebble.Snapshot, base *Record) ([][]byte, error) {
	prefix := deltaKeys(base.VMID)
	it, err := snap.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return nil, fmt.Errorf("read deltas: %w", err)
	}
	var out [][]byte
	for it.First(); it.Valid() && err == nil; it.Next() {
		var d *Record
		d, err = ParseRecord(it.Value())
		switch {
		case err != nil:
			err = fmt.Errorf("delta: %w", err)
		case !d.Delta || d.VMID != base.VMID || len(d.Deltas) > 0:
			err = fmt.Errorf("%w: a whole record stored as a delta", ErrCorrupt)
		case d.Generation != base.Generation+uint64(len(out))+1:
			err = fmt.Errorf("%w: delta of generation %d follows generation %d", ErrCorrupt, d.Generation, base.Generation+uint64(len(out)))
		case len(out) == MaxDeltas:
			err = fmt.Errorf("%w: more than %d deltas", ErrCorrupt, MaxDeltas)
		default:
			out = append(out, d.Sealed)
		}
	}
	return out, errors.Join(err, it.Error(), it.Close())
}

// Put stores the record under its VM id, durably: the batch is committed
// with Sync, sharing its fsync with concurrent Puts. A whole record
// replaces the VM's record and its deltas; a delta is kept beside them.
func (s *Store) Put(r *Record) error {
	if len(r.Deltas) > 0 {
		return fmt.Errorf("store state of VM %q: a record to store carries no deltas", r.VMID)
	}
	v, err := r.MarshalBinary()
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if r.Delta {
		err = b.Set(deltaKey(r.VMID, r.Generation), v, nil)
	} else {
		err = errors.Join(b.Set([]byte(recordPrefix+r.VMID), v, nil), s.deleteDeltas(b, r.VMID))
	}
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	if err != nil {
		return fmt.Errorf("store state of VM %q: %w", r.VMID, err)
	}
	return nil
}

// KeepsDeltas says that Put takes deltas.
func (s *Store) KeepsDeltas() bool { return true }

// deleteDeltas adds the removal of the VM's deltas to the batch.
func (s *Store) deleteDeltas(b *pebble.Batch, vmID string) error {
	prefix := deltaKeys(vmID)
	return b.DeleteRange(prefix, prefixEnd(prefix), nil)
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

// logZeroFill is how far ahead of pebble's writes a write-ahead log is
// written with zeros, unless Options.LogZeroFill says otherwise: the first
// ~180 durable writes of a VM after a start, without a cost at start that
// could be measured here (bench/RESULTS.md).
const logZeroFill = 64 << 10

// logFS is the file system pebble runs on, with its new write-ahead logs
// zero-filled ahead of pebble's writes: a log then overwrites blocks it
// already has, and the fdatasync after each durable write flushes the data
// alone, where a growing file also has its size (its inode) written, a
// synchronous write more per commit. Pebble reuses a log only once its
// memtable is flushed, and never one of an earlier process, so without this
// every commit to a new log would grow it. A zeroed tail reads as the end
// of the log, as for pebble's own preallocated and recycled logs.
type logFS struct {
	vfs.FS
	zeroFill int64
}

// Create creates the file, zero-filling it ahead of the writes if it is a
// write-ahead log.
func (fs logFS) Create(name string) (vfs.File, error) {
	f, err := fs.FS.Create(name)
	if err != nil || !strings.HasSuffix(name, ".log") {
		return f, err
	}
	z := &zeroAheadFile{File: f, name: name, chunk: fs.zeroFill}
	if err := z.zeroTo(0); err != nil {
		return nil, errors.Join(err, f.Close())
	}
	return z, nil
}

// zeroAheadFile is a write-ahead log that pebble writes in order: it keeps
// zeros written up to a chunk ahead of the end of pebble's writes.
type zeroAheadFile struct {
	vfs.File
	name          string
	chunk         int64
	written, zero int64 // the end of pebble's writes; of the zeros
}

// zeroTo writes zeros from z.zero on, if end is within half a chunk of it,
// so that a chunk lies ahead of end.
func (z *zeroAheadFile) zeroTo(end int64) error {
	if end+z.chunk/2 <= z.zero {
		return nil
	}
	n := end + z.chunk - z.zero
	if _, err := z.File.WriteAt(make([]byte, n), z.zero); err != nil {
		return fmt.Errorf("zero-fill write-ahead log %s: %w", z.name, err)
	}
	z.zero += n
	return nil
}

func (z *zeroAheadFile) Write(p []byte) (int, error) {
	if err := z.zeroTo(z.written + int64(len(p))); err != nil {
		return 0, err
	}
	n, err := z.File.Write(p)
	z.written += int64(n)
	return n, err
}

// quietLogger drops pebble's informational logs; fatal errors still stop
// the process, as pebble requires.
type quietLogger struct{}

func (quietLogger) Infof(string, ...interface{}) {}

func (quietLogger) Fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "pebble: "+format+"\n", args...)
	os.Exit(1)
}
