package main

import (
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPersist makes persistent objects and NV data with tpm2-tools, restarts
// the daemon on the same state directory or file (once after CMD_SHUTDOWN
// from swtpm_ioctl -s, once after SIGTERM) and checks that everything is
// still there, byte for byte.
func TestPersist(t *testing.T) {
	forEachBackend(t, testPersist)
}

func testPersist(t *testing.T, b stateBackend) {
	stateDir := sockDir(t)
	tt := startToolsTPMOn(t, b, stateDir, "")
	work := tt.work

	const (
		srkHandle = "0x81000001"
		ekHandle  = "0x81010001"
		nvIndex   = "0x1500030"
	)
	nvData := []byte("persistent NV data of vtpmd e2e!")
	require.Len(t, nvData, 32)

	tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "srk.ctx", "-Q")
	require.Equal(t, "persistent-handle: "+srkHandle+"\naction: persisted\n",
		tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", srkHandle))
	tt.flush(t)
	tt.run(t, "tpm2_readpublic", "-c", srkHandle, "-o", "srk.pub", "-Q")

	tt.run(t, "tpm2_createek", "-c", ekHandle, "-G", "rsa", "-u", "ek.pub")
	tt.run(t, "tpm2_readpublic", "-c", ekHandle, "-o", "ek.persisted.pub", "-Q")
	require.Equal(t, tt.read(t, "ek.pub"), tt.read(t, "ek.persisted.pub"))

	tt.run(t, "tpm2_nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite", nvIndex)
	tt.write(t, "nv.in", nvData)
	tt.run(t, "tpm2_nvwrite", "-C", "o", "-i", "nv.in", nvIndex)

	// A key under the persistent SRK, loadable again after the restarts.
	tt.run(t, "tpm2_create", "-C", srkHandle, "-G", "ecc256", "-u", "key.pub", "-r", "key.priv", "-Q")
	tt.flush(t)
	tt.requireNoTransient(t)

	check := func(t *testing.T, tt *toolsTPM) {
		t.Helper()
		require.Equal(t, "- "+srkHandle+"\n- "+ekHandle+"\n", tt.run(t, "tpm2_getcap", "handles-persistent"))
		require.Equal(t, "- "+nvIndex+"\n", tt.run(t, "tpm2_getcap", "handles-nv-index"))
		require.Equal(t, string(nvData), tt.run(t, "tpm2_nvread", "-C", "o", "-s", "32", nvIndex))

		tt.run(t, "tpm2_readpublic", "-c", srkHandle, "-o", "srk.after.pub", "-Q")
		require.Equal(t, tt.read(t, "srk.pub"), tt.read(t, "srk.after.pub"))
		tt.run(t, "tpm2_readpublic", "-c", ekHandle, "-o", "ek.after.pub", "-Q")
		require.Equal(t, tt.read(t, "ek.pub"), tt.read(t, "ek.after.pub"))
		// Re-deriving the EK gives the same public area too.
		tt.run(t, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.again.pub")
		tt.flush(t)
		require.Equal(t, tt.read(t, "ek.pub"), tt.read(t, "ek.again.pub"))

		tt.run(t, "tpm2_load", "-C", srkHandle, "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx", "-Q")
		tt.flush(t)
		tt.requireNoTransient(t)
	}
	check(t, tt)

	// restart starts a new daemon on the same state directory, with the
	// tools' work files carried over.
	restart := func(t *testing.T) *toolsTPM {
		t.Helper()
		require.FileExists(t, b.storedFile(stateDir))
		next := startToolsTPMOn(t, b, stateDir, "")
		next.work = work
		return next
	}

	// Stop with CMD_SHUTDOWN, as libvirt does.
	r := runIoctl(t, tt.sock+".ctrl", nil, "-s")
	require.Equal(t, 0, r.code, r.stderr)
	tt.waitExit(t, 5*time.Second)
	require.NoError(t, tt.err)
	require.NoFileExists(t, tt.dataListen)
	require.NoFileExists(t, tt.ctrlListen)
	tt = restart(t)
	check(t, tt)

	// Stop with SIGTERM.
	require.NoError(t, tt.cmd.Process.Signal(syscall.SIGTERM))
	tt.waitExit(t, 5*time.Second)
	require.NoError(t, tt.err, "exit status after SIGTERM")
	tt = restart(t)
	check(t, tt)
	if testingPeer() && b == dirBackend {
		data, err := os.ReadFile(stateFile(stateDir))
		require.NoError(t, err)
		// swtpm's state file envelope: version 2, min version 1, header
		// size 10.
		require.Equal(t, []byte{2, 1, 0, 10}, data[:4])
	}
}
