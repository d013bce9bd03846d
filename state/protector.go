package state

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/cockroachdb/pebble"
)

// protectorPrefix keys the VMs' key protectors (the guardian's wraps of
// their state keys), by VM id, beside their state records: a copy of the
// store carries them along, and DeleteVM removes them with the VM.
const protectorPrefix = "kp/"

// maxProtectorSize bounds a stored key protector.
const maxProtectorSize = 64 << 10

// ErrProtectorExists means the VM has a key protector already; it wraps
// fs.ErrExist.
var ErrProtectorExists = fmt.Errorf("key protector exists: %w", fs.ErrExist)

// GetProtector returns the VM's key protector as stored, or an error
// wrapping ErrNotFound. The store does not read it.
func (s *Store) GetProtector(vmID string) ([]byte, error) {
	v, closer, err := s.db.Get([]byte(protectorPrefix + vmID))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("key protector of VM %q: %w", vmID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read the key protector of VM %q: %w", vmID, err)
	}
	defer closer.Close()
	return append([]byte(nil), v...), nil
}

// CreateProtector stores the VM's key protector durably, only if it has
// none (else ErrProtectorExists): a protector is never replaced, since the
// state sealed under its key would open no more. The caller serialises the
// creates of one VM (the supervisor talks to one worker per VM at a time).
func (s *Store) CreateProtector(vmID string, p []byte) error {
	if len(p) == 0 || len(p) > maxProtectorSize {
		return fmt.Errorf("store the key protector of VM %q: %d bytes (1 to %d)", vmID, len(p), maxProtectorSize)
	}
	switch _, err := s.GetProtector(vmID); {
	case err == nil:
		return fmt.Errorf("VM %q: %w", vmID, ErrProtectorExists)
	case !errors.Is(err, ErrNotFound):
		return err
	}
	if err := s.db.Set([]byte(protectorPrefix+vmID), p, pebble.Sync); err != nil {
		return fmt.Errorf("store the key protector of VM %q: %w", vmID, err)
	}
	return nil
}
