// Package vmstate keeps one VM's TPM state sealed under the VM's key as a
// record in a state store: the vtpm.Store of a Device. It joins sealing,
// which owns the keys, and state, which stores sealed bytes. A durable
// write stores only what changed (a delta) where the store keeps deltas.
package vmstate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
	"github.com/vtpmd/vtpmd/vtpm"
)

// Records is where a Sealed keeps its records: a *state.Store, or, in a
// worker of `vtpmd serve`, the supervisor that holds the store.
type Records interface {
	// Get returns the VM's record, or an error wrapping state.ErrNotFound.
	Get(vmID string) (*state.Record, error)
	// Put stores the record durably.
	Put(r *state.Record) error
}

// Sealed is one VM's sealed, stored TPM state. It implements vtpm.Store.
//
// Where the store keeps deltas, a write stores only the bytes that changed
// since the write before, sealed as a delta of the next generation; every
// maxDeltas writes, or once the deltas add up to a quarter of the image,
// the whole image is stored again and the deltas are dropped with it.
type Sealed struct {
	// Store holds the records.
	Store Records
	// Key is the VM's state key; nil until StartKey gave it.
	Key *sealing.Key
	// StartKey, if set, obtains the key at the first Load or Save (from a
	// KeyAtStart source), told whether the VM has a record. A failure
	// fails that Load or Save, and the next one asks again.
	StartKey func(stored bool) (*sealing.Key, error)
	// VMID names the VM; it is bound into every sealed image.
	VMID string
	// SoleVM says the store is this VM's alone (socket mode): a record of
	// another VM in it is an error, never a reason to make a new TPM.
	SoleVM bool
	// Witness, if set, refuses records older than the newest stored.
	Witness *Witness

	// known says the fields below hold the state last loaded or stored.
	known      bool
	generation uint64    // its generation
	created    time.Time // when the VM's TPM was first stored
	image      []byte    // its image, the base of the next delta
	deltas     int       // deltas stored since the last whole image
	deltaBytes int       // and their sealed size
}

// DeltaRecords is a Records whose Put takes deltas (records with Delta set)
// and whose Get returns them with the record they follow.
type DeltaRecords interface {
	Records
	KeepsDeltas() bool
}

// maxDeltas bounds the deltas between two whole images, and so the work of
// a Load.
const maxDeltas = 64

// Load opens the VM's record and applies its deltas. Every failure names
// the VM and the reason, and leaves the record as it is.
func (s *Sealed) Load() ([]byte, error) {
	if err := s.startKey(); err != nil {
		return nil, err
	}
	rec, err := s.get()
	if err != nil {
		return nil, err
	}
	switch {
	case rec.VMID != s.VMID:
		return nil, fmt.Errorf("the state stored for VM %q belongs to VM %q", s.VMID, rec.VMID)
	case s.known && rec.Newest() < s.generation:
		return nil, fmt.Errorf("state of VM %q: generation %d is older than %d, already seen", s.VMID, rec.Newest(), s.generation)
	}
	if s.Witness != nil {
		if err := s.Witness.Check(rec); err != nil {
			return nil, err
		}
	}
	image, err := sealing.Open(s.Key, s.VMID, sealing.KindTPMState, rec.Generation, rec.Sealed)
	if err != nil {
		return nil, fmt.Errorf("state of VM %q (generation %d) does not open: %w", s.VMID, rec.Generation, err)
	}
	deltaBytes := 0
	for i, sealed := range rec.Deltas {
		gen := rec.Generation + uint64(i) + 1
		delta, err := sealing.Open(s.Key, s.VMID, sealing.KindTPMDelta, gen, sealed)
		if err == nil {
			image, err = ApplyDelta(image, delta)
		}
		if err != nil {
			return nil, fmt.Errorf("state of VM %q: the change of generation %d does not apply: %w", s.VMID, gen, err)
		}
		deltaBytes += len(sealed)
	}
	s.remember(rec.Newest(), rec.Created, image, len(rec.Deltas), deltaBytes)
	return image, nil
}

// remember notes the state just loaded or stored.
func (s *Sealed) remember(generation uint64, created time.Time, image []byte, deltas, deltaBytes int) {
	s.known, s.generation, s.created = true, generation, created
	s.image, s.deltas, s.deltaBytes = append(s.image[:0], image...), deltas, deltaBytes
}

// forget drops what is known of the stored state, so that the next Save
// reads the stored generation and writes a whole image.
func (s *Sealed) forget() {
	s.known, s.image, s.deltas, s.deltaBytes = false, nil, 0, 0
}

// get reads the VM's record. In a store of its own, another VM's record and
// none of this VM's is an error, not a missing record.
func (s *Sealed) get() (*state.Record, error) {
	rec, err := s.Store.Get(s.VMID)
	store, isStore := s.Store.(*state.Store)
	if errors.Is(err, state.ErrNotFound) && s.SoleVM && isStore {
		others, lerr := store.List()
		if lerr != nil {
			return nil, lerr
		}
		if len(others) > 0 {
			return nil, fmt.Errorf("state store %s holds the state of VM %q, not of VM %q: refusing to make a new TPM over it", store.Dir(), others[0].VMID, s.VMID)
		}
	}
	return rec, err
}

// startKey obtains the key from StartKey if it is yet to be.
func (s *Sealed) startKey() error {
	if s.Key != nil {
		return nil
	}
	_, err := s.get()
	key, err := s.StartKey(!errors.Is(err, state.ErrNotFound))
	if err != nil {
		// Flattened: a key not obtained must never read as state that does
		// not exist (fs.ErrNotExist), which would make a new TPM.
		return errors.New(err.Error())
	}
	s.Key = key
	return nil
}

// Save seals the image as the next generation and stores it durably: as a
// delta where the store keeps deltas and the chain is short, else whole.
func (s *Sealed) Save(image []byte) error {
	if err := s.startKey(); err != nil {
		return err
	}
	if !s.known {
		// Nothing loaded yet (a new TPM, or one set by SET_STATEBLOB): go
		// on from the stored generation, but never over a corrupt record.
		rec, err := s.get()
		switch {
		case errors.Is(err, state.ErrNotFound):
			s.generation, s.created = 0, time.Now().UTC()
		case err != nil:
			return fmt.Errorf("not overwriting the stored state: %w", err)
		default:
			s.generation, s.created = rec.Newest(), rec.Created
		}
		s.known = true
	}
	next := &state.Record{VMID: s.VMID, Generation: s.generation + 1, Created: s.created, Engine: vtpm.EngineVersion}
	sealed, err := s.sealDelta(next.Generation, image)
	if err != nil {
		return err
	}
	next.Delta = sealed != nil
	if !next.Delta {
		if sealed, err = sealing.Seal(s.Key, s.VMID, sealing.KindTPMState, next.Generation, image); err != nil {
			return fmt.Errorf("seal state of VM %q: %w", s.VMID, err)
		}
	}
	next.Sealed = sealed
	if err := s.Store.Put(next); err != nil {
		return err
	}
	if next.Delta {
		s.remember(next.Generation, s.created, image, s.deltas+1, s.deltaBytes+len(sealed))
	} else {
		s.remember(next.Generation, s.created, image, 0, 0)
	}
	if s.Witness != nil {
		return s.Witness.Record(s.VMID, next.Generation)
	}
	return nil
}

// sealDelta seals the change from the last image to image as generation
// gen, or returns nil where a whole image is due.
func (s *Sealed) sealDelta(gen uint64, image []byte) ([]byte, error) {
	store, ok := s.Store.(DeltaRecords)
	if !ok || !store.KeepsDeltas() || s.image == nil || len(s.image) != len(image) || s.deltas >= maxDeltas {
		return nil, nil
	}
	sealed, err := sealing.Seal(s.Key, s.VMID, sealing.KindTPMDelta, gen, EncodeDelta(s.image, image))
	if err != nil {
		return nil, fmt.Errorf("seal state change of VM %q: %w", s.VMID, err)
	}
	if s.deltaBytes+len(sealed) > len(image)/4 {
		return nil, nil
	}
	return sealed, nil
}

// Open opens the store in dir for the sole VM vmID, whose key comes from
// keys. Close releases the store.
func Open(ctx context.Context, dir string, keys sealing.KeySource, vmID string) (*Sealed, error) {
	key, err := keys.StateKey(ctx, vmID)
	if err != nil {
		return nil, err
	}
	store, err := state.Open(dir, state.Options{})
	if err != nil {
		return nil, err
	}
	return &Sealed{Store: store, Key: key, VMID: vmID, SoleVM: true}, nil
}

// Close closes the store, if it can be closed.
func (s *Sealed) Close() error {
	if c, ok := s.Store.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// Lockable is one VM's sealed state in a store of its own (socket mode),
// held open only while it holds the storage lock, as swtpm holds its .lock:
// a migration on shared storage hands the lock to the destination. Loading
// or saving takes the lock if it is not held.
type Lockable struct {
	mu     sync.Mutex
	sealed Sealed      // its Store is nil while the lock is not held
	store  LockedStore // the same store, nil while the lock is not held
	open   Opener
}

// KeyAtStart is a KeySource asked for the key when the TPM starts (the
// state's first Load or Save), not when the state is opened: the
// guardian's. stored says whether the VM has a record already. A failure
// fails that Load or Save, and the next one asks again.
type KeyAtStart interface {
	sealing.KeySource
	StartKey(ctx context.Context, vmID string, stored bool) (*sealing.Key, error)
}

// LockedStore is a VM's own store, which holds the storage lock while open:
// a *state.Store (a state dir) or a *state.FileStore (a state file).
type LockedStore interface {
	Records
	io.Closer
}

// Opener opens a LockedStore, failing with an error wrapping state.ErrLocked
// while another process holds it.
type Opener func() (LockedStore, error)

// lockRetryInterval is the pause between attempts to take the lock.
const lockRetryInterval = 10 * time.Millisecond

// OpenLockable prepares the VM's state in the store open opens, taking the
// storage lock now if lock is set (else at first use, as for an incoming
// migration).
func OpenLockable(ctx context.Context, open Opener, keys sealing.KeySource, vmID string, witness *Witness, lock bool) (*Lockable, error) {
	l := &Lockable{sealed: Sealed{VMID: vmID, SoleVM: true, Witness: witness}, open: open}
	if late, ok := keys.(KeyAtStart); ok {
		l.sealed.StartKey = func(stored bool) (*sealing.Key, error) { return late.StartKey(ctx, vmID, stored) }
	} else {
		key, err := keys.StateKey(ctx, vmID)
		if err != nil {
			return nil, err
		}
		l.sealed.Key = key
	}
	if lock {
		if err := l.Lock(0); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// Key is the VM's state key, nil until a KeyAtStart source gave it.
func (l *Lockable) Key() *sealing.Key {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sealed.Key
}

// Lock takes the storage lock, trying again every 10 ms up to retries times
// while another process holds it. Holding it already is success.
func (l *Lockable) Lock(retries int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lockLocked(retries)
}

func (l *Lockable) lockLocked(retries int) error {
	for attempt := 0; l.store == nil; attempt++ {
		store, err := l.open()
		if err == nil {
			l.sealed.Store, l.store = store, store
			// Another process may have stored newer generations while the
			// lock was away (a migration handed over and back): the next
			// write goes on from what is stored, as a whole image.
			l.sealed.forget()
			break
		}
		if !errors.Is(err, state.ErrLocked) || attempt >= retries {
			return fmt.Errorf("take the storage lock of VM %q: %w", l.sealed.VMID, err)
		}
		time.Sleep(lockRetryInterval)
	}
	return nil
}

// Unlock releases the storage lock if it is held, making the generation
// witness durable first.
func (l *Lockable) Unlock() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.store == nil {
		return nil
	}
	var err error
	if w := l.sealed.Witness; w != nil && l.sealed.known {
		err = w.Sync(l.sealed.VMID, l.sealed.generation)
	}
	err = errors.Join(err, l.store.Close())
	l.sealed.Store, l.store = nil, nil
	return err
}

// Load implements vtpm.Store, taking the lock first.
func (l *Lockable) Load() ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.lockLocked(0); err != nil {
		return nil, err
	}
	return l.sealed.Load()
}

// Save implements vtpm.Store, taking the lock first.
func (l *Lockable) Save(image []byte) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.lockLocked(0); err != nil {
		return err
	}
	return l.sealed.Save(image)
}
