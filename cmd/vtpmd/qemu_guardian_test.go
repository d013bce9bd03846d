package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
)

// The QEMU boot with the guardian in the path: the VM's vtpmd socket (as
// libvirt starts it, plus --guardian-config) obtains its state key from a
// real vtpmd-guardian (one replica on its local store) when QEMU sends
// CMD_INIT, and the guest sees its TPM. On a host whose measured boot
// differs from the baseline the guardian refuses, the TPM does not start,
// and QEMU, whose TPM fails to start, does not run the guest.
func TestQEMUBootWithGuardian(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	qemu, kernel, initrd := prepareGuest(t)
	dir := t.TempDir()
	fabric, err := guardiantest.Init(guardianPath, dir, nil)
	require.NoError(t, err)
	t.Cleanup(fabric.Stop)
	r, err := fabric.StartReplica("r1")
	require.NoError(t, err)
	urls := []string{r.URL}
	config := func(name, tpm string) string {
		path := filepath.Join(dir, name+"-guardian.json")
		require.NoError(t, os.WriteFile(path, []byte(fabric.HostConfig(urls, name, guardianStartDeadline, tpm)), 0o644))
		require.NoError(t, fabric.Register(urls, name, "rack1", hostIdentity(t, path)))
		return path
	}
	good := measuredboot.TypicalBoot("firmware 1.0")
	attested := config("host1", bootedHostTPM(t, good))
	require.NoError(t, fabric.Baseline(urls, "rack1", good))
	tampered := config("host2", bootedHostTPM(t, measuredboot.Tampered(good)))

	machine := func(config string) *guestMachine {
		g := &guestMachine{qemu: qemu, kernel: kernel.vmlinuz, initrd: initrd, iface: "tpm-crb", fw: guestFirmwares[0],
			dir: t.TempDir(), daemonArgs: []string{"--guardian-config", config}}
		require.NoError(t, os.MkdirAll(filepath.Join(g.dir, "state"), 0o700))
		return g
	}
	logText := func(g *guestMachine) string {
		b, err := os.ReadFile(filepath.Join(g.dir, "log"))
		require.NoError(t, err)
		return string(b)
	}

	g := machine(attested)
	d := g.startDaemon(t)
	vm := g.startQEMU(t)
	g.check(t, vm, "boot on an attested host")
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	d.waitExit(t, exitTimeout)
	assert.Contains(t, logText(g), "guardian released the state key")
	assert.FileExists(t, filepath.Join(g.dir, "state", "key-protector.json"))

	g = machine(tampered)
	d = g.startDaemon(t)
	vm = g.startQEMU(t)
	select {
	case <-vm.done:
		assert.Error(t, vm.err, "QEMU's exit status without its TPM\n%s", vm.tail())
		assert.Contains(t, vm.tail(), "CMD_INIT", "QEMU names its TPM's failed start")
	case r := <-vm.reports:
		t.Fatalf("the guest booted with a TPM that the guardian refused: %s", r)
	case <-time.After(bootTimeout):
		t.Fatalf("QEMU still runs %v after its TPM was refused\n%s", bootTimeout, vm.tail())
	}
	d.waitExit(t, exitTimeout)
	assert.Contains(t, logText(g), "baseline mismatch")
	assert.NotContains(t, logText(g), "guardian released the state key")
}
