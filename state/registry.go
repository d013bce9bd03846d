package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cockroachdb/pebble"

	"github.com/vtpmd/vtpmd/internal/wire"
)

// VM is one VM TPM in the registry of `vtpmd serve`, kept in the same store
// as the VMs' state records, under its own key prefix.
type VM struct {
	// Name is the VM's name in the admin API.
	Name string
	// ID is the VM id its state record is stored and sealed under. It is
	// new for every create, so that a VM deleted and created again under
	// the same name starts afresh.
	ID string
	// Created is when the VM was created.
	Created time.Time
	// Ctrl is the path of the VM's control socket.
	Ctrl string
	// Data is the path of the VM's data socket, "" for none.
	Data string
	// Running is the desired state: the VM's TPM is to be served. A
	// restarted supervisor starts every VM that has it.
	Running bool
	// StartupClear powers the TPM on and sends TPM2_Startup(CLEAR) whenever
	// a worker starts, as swtpm's --flags not-need-init,startup-clear, for
	// clients that do neither (tpm2-tools on the data socket).
	StartupClear bool
	// VsockCID is the guest CID the VM's vsock sockets let in; VsockCtrl
	// and VsockData are their host ports, 0 for none.
	VsockCID, VsockCtrl, VsockData uint32
}

const (
	vmPrefix       = "reg/"
	vmMagic        = "VTVM"
	vmVersion      = 1
	vmFlagRunning  = 1
	vmFlagStartup  = 2
	vmFlagVsock    = 4 // the CID and the two ports follow the flags
	vmFlagsKnown   = vmFlagRunning | vmFlagStartup | vmFlagVsock
	maxVMFieldSize = 4096
)

// MarshalBinary encodes the registry entry.
func (v *VM) MarshalBinary() ([]byte, error) {
	for _, s := range []string{v.Name, v.ID, v.Ctrl, v.Data} {
		if len(s) > maxVMFieldSize {
			return nil, fmt.Errorf("encode VM %q: a field is longer than %d bytes", v.Name, maxVMFieldSize)
		}
	}
	b := append([]byte(vmMagic), vmVersion)
	b = wire.AppendString(b, v.Name)
	b = wire.AppendString(b, v.ID)
	b = appendTime(b, v.Created)
	b = wire.AppendString(b, v.Ctrl)
	b = wire.AppendString(b, v.Data)
	var flags byte
	if v.Running {
		flags |= vmFlagRunning
	}
	if v.StartupClear {
		flags |= vmFlagStartup
	}
	if v.VsockCtrl != 0 || v.VsockData != 0 {
		b = append(b, flags|vmFlagVsock)
		b = binary.BigEndian.AppendUint32(b, v.VsockCID)
		b = binary.BigEndian.AppendUint32(b, v.VsockCtrl)
		return binary.BigEndian.AppendUint32(b, v.VsockData), nil
	}
	return append(b, flags), nil
}

func appendTime(b []byte, t time.Time) []byte {
	return binary.BigEndian.AppendUint64(b, uint64(t.UnixNano()))
}

// ParseVM decodes a registry entry. Every error wraps ErrCorrupt.
func ParseVM(b []byte) (*VM, error) {
	d := wire.NewFields(b)
	if string(d.Take(4)) != vmMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrCorrupt, vmMagic)
	}
	if v := d.Take(1); len(v) == 1 && v[0] != vmVersion {
		return nil, fmt.Errorf("%w: VM entry version %d, this build reads %d", ErrCorrupt, v[0], vmVersion)
	}
	v := &VM{}
	v.Name = d.Str()
	v.ID = d.Str()
	v.Created = time.Unix(0, int64(d.U64())).UTC()
	v.Ctrl = d.Str()
	v.Data = d.Str()
	flags := d.Take(1)
	if len(flags) == 1 && flags[0]&vmFlagVsock != 0 {
		v.VsockCID, v.VsockCtrl, v.VsockData = d.U32(), d.U32(), d.U32()
	}
	switch {
	case d.Short():
		return nil, fmt.Errorf("%w: VM entry truncated at %d bytes", ErrCorrupt, len(b))
	case d.Left() != 0:
		return nil, fmt.Errorf("%w: %d bytes after the VM entry", ErrCorrupt, d.Left())
	case flags[0]&^vmFlagsKnown != 0:
		return nil, fmt.Errorf("%w: unknown VM flags %#x", ErrCorrupt, flags[0])
	case flags[0]&vmFlagVsock != 0 && v.VsockCtrl == 0 && v.VsockData == 0:
		return nil, fmt.Errorf("%w: VM entry with vsock but no vsock port", ErrCorrupt)
	}
	for _, s := range []string{v.Name, v.ID, v.Ctrl, v.Data} {
		if len(s) > maxVMFieldSize {
			return nil, fmt.Errorf("%w: a VM field is longer than %d bytes", ErrCorrupt, maxVMFieldSize)
		}
	}
	v.Running = flags[0]&vmFlagRunning != 0
	v.StartupClear = flags[0]&vmFlagStartup != 0
	return v, nil
}

// ErrNoVM means the registry has no VM of that name; it wraps ErrNotFound.
var ErrNoVM = fmt.Errorf("no such VM: %w", ErrNotFound)

// GetVM returns the registry entry of the VM named name.
func (s *Store) GetVM(name string) (*VM, error) {
	v, closer, err := s.db.Get([]byte(vmPrefix + name))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("VM %q: %w", name, ErrNoVM)
	}
	if err != nil {
		return nil, fmt.Errorf("read VM %q: %w", name, err)
	}
	defer closer.Close()
	vm, err := ParseVM(v)
	if err != nil {
		return nil, fmt.Errorf("VM %q: %w", name, err)
	}
	return vm, nil
}

// PutVM stores the registry entry under its name, durably.
func (s *Store) PutVM(v *VM) error {
	b, err := v.MarshalBinary()
	if err != nil {
		return err
	}
	if err := s.db.Set([]byte(vmPrefix+v.Name), b, pebble.Sync); err != nil {
		return fmt.Errorf("store VM %q: %w", v.Name, err)
	}
	return nil
}

// DeleteVM removes the registry entry, the VM's state record with its
// deltas, and its key protector together, durably.
func (s *Store) DeleteVM(v *VM) error {
	b := s.db.NewBatch()
	defer b.Close()
	err := errors.Join(b.Delete([]byte(vmPrefix+v.Name), nil), b.Delete([]byte(recordPrefix+v.ID), nil),
		s.deleteDeltas(b, v.ID), b.Delete([]byte(protectorPrefix+v.ID), nil))
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	if err != nil {
		return fmt.Errorf("delete VM %q: %w", v.Name, err)
	}
	return nil
}

// VMEntry is a registry entry as listed: its name, and the entry or why it
// does not parse.
type VMEntry struct {
	Name string
	VM   *VM
	Err  error
}

// ListVMs lists the registry by name, corrupt entries included.
func (s *Store) ListVMs() ([]VMEntry, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(vmPrefix), UpperBound: []byte("reg0")})
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	var out []VMEntry
	for it.First(); it.Valid(); it.Next() {
		e := VMEntry{Name: strings.TrimPrefix(string(it.Key()), vmPrefix)}
		e.VM, e.Err = ParseVM(it.Value())
		out = append(out, e)
	}
	return out, errors.Join(it.Error(), it.Close())
}
