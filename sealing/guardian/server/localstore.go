package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble"
)

// LocalStore is the Store of a single guardian: a pebble database in a
// directory, every write synced before it returns. One process holds it.
type LocalStore struct {
	dir string
	db  *pebble.DB
	// mu makes Create and Swap atomic: a read and a write in one step.
	mu sync.Mutex
}

// OpenLocalStore opens (creating with mode 0700) the store in dir.
func OpenLocalStore(dir string, log *slog.Logger) (*LocalStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open guardian store: %w", err)
	}
	if log == nil {
		log = slog.Default()
	}
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{log}})
	if err != nil {
		return nil, fmt.Errorf("open guardian store %s: %w", dir, err)
	}
	return &LocalStore{dir: dir, db: db}, nil
}

// A stored value is its expiry (Unix nanoseconds, 0 for none), then the
// value.
const expirySize = 8

func encodeValue(value []byte, ttl time.Duration) []byte {
	var expiry int64
	if ttl > 0 {
		expiry = time.Now().Add(ttl).UnixNano()
	}
	return append(binary.BigEndian.AppendUint64(nil, uint64(expiry)), value...)
}

// decodeValue returns the value, or ok false if it expired or is malformed.
func decodeValue(b []byte, now time.Time) (value []byte, ok bool) {
	if len(b) < expirySize {
		return nil, false
	}
	expiry := int64(binary.BigEndian.Uint64(b))
	if expiry != 0 && now.UnixNano() >= expiry {
		return nil, false
	}
	return b[expirySize:], true
}

func (s *LocalStore) get(key string) (stored, value []byte, err error) {
	b, closer, err := s.db.Get([]byte(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil, ErrNotFound
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", key, err)
	}
	stored = bytes.Clone(b)
	closer.Close()
	value, ok := decodeValue(stored, time.Now())
	if !ok {
		return nil, nil, ErrNotFound
	}
	return stored, value, nil
}

// Get implements Store.
func (s *LocalStore) Get(_ context.Context, key string) ([]byte, error) {
	_, v, err := s.get(key)
	return v, err
}

func (s *LocalStore) set(key string, stored []byte) error {
	if err := s.db.Set([]byte(key), stored, pebble.Sync); err != nil {
		return fmt.Errorf("write %s: %w", key, err)
	}
	return nil
}

// Put implements Store.
func (s *LocalStore) Put(_ context.Context, key string, value []byte) error {
	return s.set(key, encodeValue(value, 0))
}

// Create implements Store. Creating a key with a ttl also drops the expired
// keys beside it, so nonces do not pile up.
func (s *LocalStore) Create(_ context.Context, key string, value []byte, ttl time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, _, err := s.get(key); err == nil {
		return ErrExists
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	if ttl > 0 {
		if err := s.dropExpired(path.Dir(key) + "/"); err != nil {
			return err
		}
	}
	return s.set(key, encodeValue(value, ttl))
}

func (s *LocalStore) dropExpired(prefix string) error {
	it, err := s.db.NewIter(prefixBounds(prefix))
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	b := s.db.NewBatch()
	defer b.Close()
	now := time.Now()
	for it.First(); it.Valid(); it.Next() {
		if _, ok := decodeValue(it.Value(), now); !ok {
			if err := b.Delete(bytes.Clone(it.Key()), nil); err != nil {
				it.Close()
				return err
			}
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	if b.Empty() {
		return nil
	}
	return b.Commit(pebble.NoSync) // the next synced write carries it
}

// Swap implements Store.
func (s *LocalStore) Swap(_ context.Context, key string, old, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	stored, current, err := s.get(key)
	if err != nil {
		return err
	}
	if !bytes.Equal(current, old) {
		return ErrChanged
	}
	return s.set(key, append(stored[:expirySize:expirySize], value...))
}

// Delete implements Store.
func (s *LocalStore) Delete(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, _, err := s.get(key); err != nil {
		return err
	}
	if err := s.db.Delete([]byte(key), pebble.Sync); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// List implements Store.
func (s *LocalStore) List(_ context.Context, prefix string, last int) ([]KeyValue, error) {
	it, err := s.db.NewIter(prefixBounds(prefix))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	var out []KeyValue
	now := time.Now()
	for valid := it.Last(); valid && (last <= 0 || len(out) < last); valid = it.Prev() {
		if v, ok := decodeValue(it.Value(), now); ok {
			out = append(out, KeyValue{Key: string(it.Key()), Value: bytes.Clone(v)})
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	slices.Reverse(out)
	return out, nil
}

// prefixBounds are the iterator bounds of the keys under prefix.
func prefixBounds(prefix string) *pebble.IterOptions {
	upper := []byte(prefix)
	upper[len(upper)-1]++ // prefixes end in '/', which is not 0xff
	return &pebble.IterOptions{LowerBound: []byte(prefix), UpperBound: upper}
}

// Ping implements Store: a local store is reachable while it is open.
func (s *LocalStore) Ping(context.Context) error { return nil }

// Close implements Store.
func (s *LocalStore) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close guardian store %s: %w", s.dir, err)
	}
	return nil
}

// pebbleLogger sends pebble's messages to the guardian's log.
type pebbleLogger struct{ log *slog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) {
	l.log.Debug("pebble: " + fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Fatalf(format string, args ...any) {
	l.log.Error("pebble: " + fmt.Sprintf(format, args...))
	os.Exit(1)
}
