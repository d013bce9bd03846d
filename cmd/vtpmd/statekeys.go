package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/sealing"
)

// The rules `vtpmd socket` and `vtpmd setup` share, so that a state dir
// provisioned by one opens in the other: which VM a state dir holds, which
// key seals it, and where the generation witnesses live.

// vmIDFor names the VM whose state is in stateDir (an absolute path): the
// directory itself, which for libvirt holds the VM's UUID. A state directory
// copied to another VM's place does not open there.
func vmIDFor(stateDir string) string { return stateDir }

// hostKeyPath is where the host-local key lives: $VTPMD_HOST_KEY, or
// host.key in vtpmd's state root. The generation witnesses live beside it.
func hostKeyPath() (string, error) {
	path := os.Getenv("VTPMD_HOST_KEY")
	if path == "" {
		root, _ := defaultDirs()
		path = filepath.Join(root, "host.key")
	}
	return filepath.Abs(path)
}

// stateKeys is the key source that seals the state in stateDir: the key
// given the swtpm way (--key, or swtpm_setup's --pwdfile/--keyfile), or
// else the host-local key, which must lie outside the state dir.
func stateKeys(stateDir string, key *sealing.SwtpmKey) (sealing.KeySource, error) {
	if key != nil {
		return key, nil
	}
	path, err := hostKeyPath()
	if err != nil {
		return nil, err
	}
	if rel, err := filepath.Rel(stateDir, path); err == nil && !strings.HasPrefix(rel, "..") {
		return nil, fmt.Errorf("the host key %s lies inside the state dir %s: keep it elsewhere (VTPMD_HOST_KEY)", path, stateDir)
	}
	return &sealing.HostKey{Path: path}, nil
}

// openVMState opens the sealed state in stateDir, with the generation
// witnesses beside the host key, taking the storage lock now if lock is set.
func openVMState(ctx context.Context, stateDir string, keys sealing.KeySource, lock bool) (*vmstate.Lockable, error) {
	hostKey, err := hostKeyPath()
	if err != nil {
		return nil, err
	}
	witness := &vmstate.Witness{Dir: filepath.Join(filepath.Dir(hostKey), "generations")}
	return vmstate.OpenLockable(ctx, stateDir, keys, vmIDFor(stateDir), witness, lock)
}
