package server

import (
	"context"
	"errors"
	"time"
)

// Errors a Store returns; any other error means the store is unreachable
// and is answered with CodeUnavailable, so hosts try another replica.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrChanged  = errors.New("changed meanwhile")
)

// Store is the replicas' shared state: keys to values. Keys are paths such
// as "hosts/h1"; values are opaque.
type Store interface {
	// Get returns the value at key, or ErrNotFound.
	Get(ctx context.Context, key string) ([]byte, error)
	// Put sets key to value.
	Put(ctx context.Context, key string, value []byte) error
	// Create sets key to value if key is absent, else fails with
	// ErrExists. With ttl > 0 the key may vanish once ttl has passed.
	Create(ctx context.Context, key string, value []byte, ttl time.Duration) error
	// Swap sets key to value if it holds old, atomically across replicas:
	// ErrNotFound if absent, ErrChanged if it holds something else. A key
	// created with a ttl keeps it.
	Swap(ctx context.Context, key string, old, value []byte) error
	// Delete removes key, or fails with ErrNotFound.
	Delete(ctx context.Context, key string) error
	// List returns the keys under prefix in key order with their values:
	// all of them, or the last `last` when last > 0.
	List(ctx context.Context, prefix string, last int) ([]KeyValue, error)
	// Ping checks that the store can serve.
	Ping(ctx context.Context) error
	// Close releases the store.
	Close() error
}

// KeyValue is one listed key.
type KeyValue struct {
	Key   string
	Value []byte
}
