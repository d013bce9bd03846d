package main

import (
	"bytes"
	"crypto/rand"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/state"
)

// writeMarkers puts marker into an NV index and, as sealed data, into a
// persistent object, through tpm2-tools.
func writeMarkers(t *testing.T, tt *toolsTPM, marker []byte) {
	t.Helper()
	tt.write(t, "marker.bin", marker)
	tt.run(t, "tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite")
	tt.run(t, "tpm2_nvwrite", "0x1500016", "-C", "o", "-i", "marker.bin")
	tt.run(t, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", "prim.ctx", "-Q")
	tt.flush(t)
	tt.run(t, "tpm2_create", "-C", "prim.ctx", "-i", "marker.bin", "-u", "seal.pub", "-r", "seal.priv", "-Q")
	tt.flush(t)
	tt.run(t, "tpm2_load", "-C", "prim.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx", "-Q")
	tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "seal.ctx", "0x81000005")
	tt.flush(t)
	assert.Equal(t, marker, []byte(tt.run(t, "tpm2_unseal", "-c", "0x81000005")))
}

// scanFor lists the files under dir that contain marker.
func scanFor(t *testing.T, dir string, marker []byte) []string {
	t.Helper()
	var found []string
	require.NoError(t, filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if bytes.Contains(b, marker) {
			found = append(found, path)
		}
		return nil
	}))
	return found
}

// No byte of TPM state is on disk in plaintext: a marker written into NV and
// into a persistent key appears nowhere under the state dir or in the state
// file, though the decrypted state, as swtpm_ioctl --save fetches it, holds
// it.
func TestNoPlaintextAtRest(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm keeps its state in plaintext unless given --key")
	}
	forEachBackend(t, testNoPlaintextAtRest)
}

func testNoPlaintextAtRest(t *testing.T, b stateBackend) {
	marker := make([]byte, 32)
	_, err := rand.Read(marker)
	require.NoError(t, err)
	tt := startToolsTPMOn(t, b, "", "")
	writeMarkers(t, tt, marker)

	saved := filepath.Join(tt.work, "permanent.blob")
	runIoctl(t, tt.sock+".ctrl", nil, "--save", "permanent", saved)
	blob, err := os.ReadFile(saved)
	require.NoError(t, err)
	require.True(t, bytes.Contains(blob, marker), "the marker is in the TPM's state")

	require.NoError(t, tt.cmd.Process.Signal(syscall.SIGTERM))
	tt.waitExit(t, 5*time.Second)
	require.FileExists(t, b.storedFile(tt.stateDir), "the state is where the scan looks")
	assert.Empty(t, scanFor(t, tt.stateDir, marker), "the marker in plaintext under the state dir")
	assert.Empty(t, scanFor(t, filepath.Dir(os.Getenv("VTPMD_HOST_KEY")), marker))

	// The state still opens and holds the marker.
	tt2 := startToolsTPMOn(t, b, tt.stateDir, "")
	tt2.work = tt.work
	assert.Equal(t, marker, []byte(tt2.run(t, "tpm2_unseal", "-c", "0x81000005")))
	assert.Equal(t, marker, []byte(tt2.run(t, "tpm2_nvread", "0x1500016", "-C", "o", "-s", "32")))
}

// copyDir copies a state dir's regular files.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(to, 0o700))
	entries, err := os.ReadDir(from)
	require.NoError(t, err)
	for _, e := range entries {
		if !e.Type().IsRegular() || e.Name() == "LOCK" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(to, e.Name()), b, 0o600))
	}
}

// A state dir or file copied to another VM's place, or opened with another
// host's key, is refused with an error naming the VM and the reason, and is
// left as it is.
func TestStateBinding(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm's state is not bound to a VM")
	}
	forEachBackend(t, testStateBinding)
}

func testStateBinding(t *testing.T, b stateBackend) {
	tt := startToolsTPMOn(t, b, "", "")
	tt.run(t, "tpm2_getrandom", "8")
	ioctlOK(t, tt.sock+".ctrl", "-s")
	tt.waitExit(t, 5*time.Second)

	refused := func(dir, hostKey, want string) {
		t.Helper()
		before := snapshot(t, b, dir)
		args := []string{"socket", "--tpm2", "--tpmstate", b.tpmstate(dir), "--ctrl", "type=unixio,path=" + filepath.Join(dir, "ctrl"), "--flags", "not-need-init"}
		env := os.Environ()
		if hostKey != "" {
			env = append(env, "VTPMD_HOST_KEY="+hostKey)
		}
		out, code := runDaemonCmdEnv(t, env, args...)
		assert.NotEqual(t, 0, code, out)
		assert.Contains(t, out, want)
		assert.True(t, reflect.DeepEqual(before, snapshot(t, b, dir)), "the refused state is left as it was")
	}
	otherVM := filepath.Join(sockDir(t), "other-vm")
	b.copyState(t, tt.stateDir, otherVM)
	refused(otherVM, "", `holds the state of VM "`+b.statePath(tt.stateDir)+`", not of VM "`+b.statePath(otherVM)+`"`)

	otherHost := filepath.Join(sockDir(t), "host.key")
	refused(tt.stateDir, otherHost, `state of VM "`+b.statePath(tt.stateDir)+`" (generation`)
	refused(tt.stateDir, otherHost, "sealed with another key")
}

// snapshot returns what must not change of the state on backend b in dir:
// a state file's bytes, or the encoded records of a state dir's store
// (pebble itself rewrites its manifest and log files on every open).
func snapshot(t *testing.T, b stateBackend, dir string) map[string]string {
	t.Helper()
	if b == fileBackend {
		data, err := os.ReadFile(b.statePath(dir))
		require.NoError(t, err)
		require.NotEmpty(t, data)
		return map[string]string{"file": string(data)}
	}
	store, err := state.Open(dir, state.Options{ReadOnly: true})
	require.NoError(t, err)
	defer store.Close()
	entries, err := store.List()
	require.NoError(t, err)
	out := map[string]string{}
	for _, e := range entries {
		rec, err := store.Get(e.VMID)
		require.NoError(t, err)
		b, err := rec.MarshalBinary()
		require.NoError(t, err)
		out[e.VMID] = string(b)
	}
	require.NotEmpty(t, out)
	return out
}

// A backup of the state dir or file put back after newer writes is refused.
func TestOldStatePutBack(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm does not detect an old state")
	}
	forEachBackend(t, testOldStatePutBack)
}

func testOldStatePutBack(t *testing.T, b stateBackend) {
	tt := startToolsTPMOn(t, b, "", "")
	tt.run(t, "tpm2_nvdefine", "0x1500017", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
	ioctlOK(t, tt.sock+".ctrl", "-s")
	tt.waitExit(t, 5*time.Second)
	backup := filepath.Join(sockDir(t), "backup")
	b.copyState(t, tt.stateDir, backup)

	tt = startToolsTPMOn(t, b, tt.stateDir, "")
	tt.write(t, "v", []byte("newvalue"))
	tt.run(t, "tpm2_nvwrite", "0x1500017", "-C", "o", "-i", "v")
	ioctlOK(t, tt.sock+".ctrl", "-s")
	tt.waitExit(t, 5*time.Second)

	if b == dirBackend {
		entries, err := os.ReadDir(tt.stateDir)
		require.NoError(t, err)
		for _, e := range entries {
			if e.Type().IsRegular() && e.Name() != "LOCK" {
				require.NoError(t, os.Remove(filepath.Join(tt.stateDir, e.Name())))
			}
		}
	}
	b.copyState(t, backup, tt.stateDir)
	out, code := runDaemonCmd(t, "socket", "--tpm2", "--tpmstate", b.tpmstate(tt.stateDir),
		"--ctrl", "type=unixio,path="+filepath.Join(tt.stateDir, "x.ctrl"), "--flags", "not-need-init")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, out, "the newest stored: an old state was put back")
}
