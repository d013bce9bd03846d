package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

// The rules `vtpmd socket` and `vtpmd setup` share, so that a state dir or
// file provisioned by one opens in the other: how its backend URI reads,
// which VM it holds, which key seals it, and where the generation witnesses
// live.

// vmIDFor names the VM whose state is in stateDir (an absolute path): the
// directory itself, which for libvirt holds the VM's UUID, or the state
// file's path (for a block device, a name that must not change between
// boots; like swtpm, vtpmd does not follow a symbolic link there). State
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

// parseBackendURI reads a state backend URI as swtpm and swtpm_setup do:
// dir://<dir> names a state dir, file://<path> a state file (a regular file
// or a block device). The rest of the URI is the path, relative to the
// current directory unless it starts with a slash (file:///dev/sdb is
// /dev/sdb); it is returned absolute.
func parseBackendURI(option, uri string) (path string, file bool, err error) {
	rest, file := strings.CutPrefix(uri, "file://")
	if !file {
		var dir bool
		if rest, dir = strings.CutPrefix(uri, "dir://"); !dir {
			return "", false, fmt.Errorf("%s: backend URI %q: give dir://<dir> or file://<file or block device>", option, uri)
		}
	}
	if rest == "" {
		return "", false, fmt.Errorf("%s: backend URI %q names no path", option, uri)
	}
	path, err = filepath.Abs(rest)
	return path, file, err
}

// openVMState opens the sealed state in the state dir or state file at
// path, with the generation witnesses beside the host key, taking the
// storage lock now if lock is set.
func openVMState(ctx context.Context, path string, file bool, keys sealing.KeySource, lock bool) (*vmstate.Lockable, error) {
	hostKey, err := hostKeyPath()
	if err != nil {
		return nil, err
	}
	witness := &vmstate.Witness{Dir: filepath.Join(filepath.Dir(hostKey), "generations")}
	open := func() (vmstate.LockedStore, error) {
		if file {
			return nonNil(state.OpenFile(path, state.FileOptions{}))
		}
		return nonNil(state.Open(path, state.Options{}))
	}
	return vmstate.OpenLockable(ctx, open, keys, vmIDFor(path), witness, lock)
}

// nonNil keeps a failed open from becoming a non-nil interface.
func nonNil[S vmstate.LockedStore](s S, err error) (vmstate.LockedStore, error) {
	if err != nil {
		return nil, err
	}
	return s, nil
}
