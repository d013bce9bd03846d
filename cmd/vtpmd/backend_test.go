package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// stateBackend is where a test daemon keeps its state, given the directory
// that also holds its sockets: the directory itself (--tpmstate dir=), or a
// state file in it (--tpmstate backend-uri=file://).
type stateBackend string

const (
	dirBackend  stateBackend = "dir"
	fileBackend stateBackend = "file"
)

// backends are the backends the state tests run on.
var backends = []stateBackend{dirBackend, fileBackend}

// statePath is the state dir or state file of a daemon whose sockets are in
// dir.
func (b stateBackend) statePath(dir string) string {
	if b == fileBackend {
		return filepath.Join(dir, "tpm.state")
	}
	return dir
}

// storedFile is a file that exists once the state of a daemon whose
// sockets are in dir is stored.
func (b stateBackend) storedFile(dir string) string {
	if b == fileBackend {
		return b.statePath(dir)
	}
	return stateFile(dir)
}

// tpmstate is the --tpmstate value for the state of a daemon whose sockets
// are in dir.
func (b stateBackend) tpmstate(dir string) string {
	if b == fileBackend {
		return "backend-uri=file://" + b.statePath(dir)
	}
	return "dir=" + dir
}

// copyState copies the state of the daemon whose sockets are in from to
// the same place under to.
func (b stateBackend) copyState(t *testing.T, from, to string) {
	t.Helper()
	if b == dirBackend {
		copyDir(t, from, to)
		return
	}
	data, err := os.ReadFile(b.statePath(from))
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(to, 0o700))
	require.NoError(t, os.WriteFile(b.statePath(to), data, 0o600))
}

// forEachBackend runs test as a subtest on every backend.
func forEachBackend(t *testing.T, test func(t *testing.T, b stateBackend)) {
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) { test(t, b) })
	}
}

// Backend URIs read as swtpm reads them: the rest of the URI is the path,
// relative to the current directory unless it starts with a slash.
func TestParseBackendURI(t *testing.T) {
	cwd, err := os.Getwd()
	require.NoError(t, err)
	for _, tc := range []struct {
		uri  string
		path string
		file bool
	}{
		{"dir:///var/lib/vtpmd/vm1", "/var/lib/vtpmd/vm1", false},
		{"dir://vm1", filepath.Join(cwd, "vm1"), false},
		{"file:///dev/sdb", "/dev/sdb", true},
		{"file:///var/lib/vtpmd/vm1.state", "/var/lib/vtpmd/vm1.state", true},
		{"file://vm1.state", filepath.Join(cwd, "vm1.state"), true},
		{"file://localhost/x", filepath.Join(cwd, "localhost/x"), true},
	} {
		path, file, err := parseBackendURI("--tpmstate", tc.uri)
		require.NoError(t, err, tc.uri)
		require.Equal(t, tc.path, path, tc.uri)
		require.Equal(t, tc.file, file, tc.uri)
	}
	for _, bad := range []string{"nbd://x", "/var/lib/vtpmd", "file://", "dir://", "FILE:///x"} {
		_, _, err := parseBackendURI("--tpmstate", bad)
		require.ErrorContains(t, err, "--tpmstate: backend URI", bad)
	}
}
