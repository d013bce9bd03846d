package etcdstore

import (
	"context"
	"fmt"
	"math"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vtpmd/vtpmd/sealing/guardian/server"
)

// DefaultPrefix is where a guardian's keys live in etcd.
const DefaultPrefix = "/vtpmd-guardian/"

// DefaultOpTimeout bounds one store operation, so that a replica that lost
// its quorum answers "unavailable" while the host can still try another.
const DefaultOpTimeout = 3 * time.Second

// Store is a server.Store on etcd.
type Store struct {
	cli       *clientv3.Client
	prefix    string
	opTimeout time.Duration
}

// New uses cli (which Close closes) with keys under prefix.
func New(cli *clientv3.Client, prefix string) *Store {
	return &Store{cli: cli, prefix: prefix, opTimeout: DefaultOpTimeout}
}

// Dial connects to the etcd endpoints.
func Dial(endpoints []string, prefix string) (*Store, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %v: %w", endpoints, err)
	}
	return New(cli, prefix), nil
}

func (s *Store) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.opTimeout)
}

func (s *Store) wrap(what, key string, err error) error {
	return fmt.Errorf("etcd: %s %s: %w", what, key, err)
}

// Get implements server.Store.
func (s *Store) Get(ctx context.Context, key string) ([]byte, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.prefix+key)
	if err != nil {
		return nil, s.wrap("get", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, server.ErrNotFound
	}
	return resp.Kvs[0].Value, nil
}

// Put implements server.Store.
func (s *Store) Put(ctx context.Context, key string, value []byte) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	if _, err := s.cli.Put(ctx, s.prefix+key, string(value)); err != nil {
		return s.wrap("put", key, err)
	}
	return nil
}

// Create implements server.Store: a transaction that puts only if the key
// has no revision, under a lease of ttl when ttl > 0.
func (s *Store) Create(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	var opts []clientv3.OpOption
	if ttl > 0 {
		lease, err := s.cli.Grant(ctx, int64(math.Ceil(ttl.Seconds())))
		if err != nil {
			return s.wrap("lease for", key, err)
		}
		opts = append(opts, clientv3.WithLease(lease.ID))
	}
	k := s.prefix + key
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, string(value), opts...)).
		Commit()
	if err != nil {
		return s.wrap("create", key, err)
	}
	if !resp.Succeeded {
		return server.ErrExists
	}
	return nil
}

// Swap implements server.Store: one transaction compares and puts, keeping
// the key's lease.
func (s *Store) Swap(ctx context.Context, key string, old, value []byte) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	k := s.prefix + key
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.Value(k), "=", string(old))).
		Then(clientv3.OpPut(k, string(value), clientv3.WithIgnoreLease())).
		Else(clientv3.OpGet(k, clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		return s.wrap("swap", key, err)
	}
	if resp.Succeeded {
		return nil
	}
	if resp.Responses[0].GetResponseRange().Count == 0 {
		return server.ErrNotFound
	}
	return server.ErrChanged
}

// Delete implements server.Store.
func (s *Store) Delete(ctx context.Context, key string) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Delete(ctx, s.prefix+key)
	if err != nil {
		return s.wrap("delete", key, err)
	}
	if resp.Deleted == 0 {
		return server.ErrNotFound
	}
	return nil
}

// List implements server.Store.
func (s *Store) List(ctx context.Context, prefix string, last int) ([]server.KeyValue, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend)}
	if last > 0 {
		opts = append(opts, clientv3.WithLimit(int64(last)))
	}
	resp, err := s.cli.Get(ctx, s.prefix+prefix, opts...)
	if err != nil {
		return nil, s.wrap("list", prefix, err)
	}
	out := make([]server.KeyValue, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, server.KeyValue{Key: string(kv.Key[len(s.prefix):]), Value: kv.Value})
	}
	slices.Reverse(out)
	return out, nil
}

// Ping implements server.Store: a linearizable read, which needs the
// cluster's quorum.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	if _, err := s.cli.Get(ctx, s.prefix+"ping", clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	return nil
}

// Close implements server.Store.
func (s *Store) Close() error { return s.cli.Close() }
