package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
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

// stateKeys is the key source that seals the state at stateDir (a state
// dir, or a state file if file): the guardian's when a guardian config is
// found (see guardianConfig), the key given the swtpm way (--key, or
// swtpm_setup's --pwdfile/--keyfile), or else the host-local key, which
// must lie outside the state dir. A guardian and a key given the swtpm way
// are refused together: state has one key source.
func stateKeys(stateDir string, file bool, key *sealing.SwtpmKey, guardianFlag string, log *slog.Logger) (sealing.KeySource, error) {
	configPath, err := guardianConfig(guardianFlag)
	if err != nil {
		return nil, err
	}
	if configPath != "" {
		if key != nil {
			return nil, fmt.Errorf("a guardian is configured (%s) and a state key is given (--key, --keyfile or --pwdfile): give one key source, not both", configPath)
		}
		return guardianKeys(configPath, stateDir, file, log)
	}
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

// defaultGuardianConfig is read when it exists and nothing else is named.
const defaultGuardianConfig = "/etc/vtpmd/guardian.json"

// guardianConfig is the guardian config to use: the one the flag names,
// else $VTPMD_GUARDIAN_CONFIG, else /etc/vtpmd/guardian.json if it exists,
// else none (""). libvirt's command line needs no change.
func guardianConfig(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if env := os.Getenv("VTPMD_GUARDIAN_CONFIG"); env != "" {
		return env, nil
	}
	_, err := os.Stat(defaultGuardianConfig)
	switch {
	case err == nil:
		return defaultGuardianConfig, nil
	case errors.Is(err, fs.ErrNotExist):
		return "", nil
	default:
		return "", fmt.Errorf("guardian config: %w", err)
	}
}

// guardianHostKeyPath is the default host key of host-key mode, beside the
// host-local key.
func guardianHostKeyPath() (string, error) {
	hostKey, err := hostKeyPath()
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(hostKey), "guardian-host.key"), nil
}

// guardianKeys obtains the state's key from the guardian. The key protector
// lives beside the state, so that it moves with it: key-protector.json in a
// state dir, <file>.protector.json beside a state file.
func guardianKeys(configPath, stateDir string, file bool, log *slog.Logger) (*host.KeySource, error) {
	config, err := host.LoadConfig(configPath)
	if err != nil {
		return nil, err
	}
	protector := filepath.Join(stateDir, "key-protector.json")
	if file {
		if fi, err := os.Stat(stateDir); err == nil && fi.Mode()&os.ModeDevice != 0 {
			return nil, fmt.Errorf("state on the block device %s cannot be protected by the guardian: its key protector needs a file beside the state (use a state dir or a regular state file)", stateDir)
		}
		protector = stateDir + ".protector.json"
	}
	hostKey, err := guardianHostKeyPath()
	if err != nil {
		return nil, err
	}
	return host.NewKeySource(config, hostKey, func(string) string { return protector }, log)
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
