package serve

import (
	"fmt"

	"github.com/vtpmd/vtpmd/state"
)

// Vsock CIDs and ports that no VM may use.
const (
	vsockCIDHypervisor = 0          // VMADDR_CID_HYPERVISOR: reserved
	vsockAny           = 0xffffffff // VMADDR_CID_ANY and VMADDR_PORT_ANY
)

// validateVsock checks a create request's vsock settings: a port needs the
// guest's CID (the only peer let in), ports are 1 to 4294967294, and the
// control and data ports differ.
func validateVsock(req CreateRequest) error {
	if req.VsockCtrlPort == 0 && req.VsockDataPort == 0 {
		if req.VsockCID != 0 {
			return fmt.Errorf("%w: VM %q: a vsock CID without a vsock port: give --vsock-ctrl-port or --vsock-data-port", ErrBadRequest, req.Name)
		}
		return nil
	}
	if req.VsockCID == vsockCIDHypervisor || req.VsockCID == vsockAny {
		return fmt.Errorf("%w: VM %q: vsock ports need the guest's CID (--vsock-cid, as QEMU's guest-cid), not %d: only that peer is let in", ErrBadRequest, req.Name, req.VsockCID)
	}
	for _, p := range []uint32{req.VsockCtrlPort, req.VsockDataPort} {
		if p == vsockAny {
			return fmt.Errorf("%w: VM %q: vsock port %d is VMADDR_PORT_ANY: use 1 to %d", ErrBadRequest, req.Name, p, uint32(vsockAny-1))
		}
	}
	if req.VsockCtrlPort == req.VsockDataPort {
		return fmt.Errorf("%w: VM %q: the vsock control and data ports are both %d: use two ports", ErrBadRequest, req.Name, req.VsockCtrlPort)
	}
	return nil
}

// vsockPorts are the VM's vsock ports in use.
func vsockPorts(vm *state.VM) []uint32 {
	var ps []uint32
	for _, p := range []uint32{vm.VsockCtrl, vm.VsockData} {
		if p != 0 {
			ps = append(ps, p)
		}
	}
	return ps
}

// vsockClash reports the registered VM, other than name, that has one of
// the ports, as an ErrConflict.
func vsockClash(entries []state.VMEntry, name string, ports []uint32) error {
	for _, e := range entries {
		if e.VM == nil || e.Name == name {
			continue
		}
		for _, p := range vsockPorts(e.VM) {
			for _, q := range ports {
				if p == q {
					return fmt.Errorf("%w: vsock port %d is VM %q's", ErrConflict, p, e.Name)
				}
			}
		}
	}
	return nil
}
