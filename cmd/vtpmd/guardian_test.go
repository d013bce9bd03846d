package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
)

// register adds the host that config describes, with the identity that
// `vtpmd host identity` prints.
func register(t *testing.T, g *guardiantest.Guardian, name, group, config string) {
	t.Helper()
	g.Register(t, name, group, hostIdentity(t, config))
}

// hostIdentity is what `vtpmd host identity` prints for config.
func hostIdentity(t *testing.T, config string) *guardian.HostIdentity {
	t.Helper()
	out, err := exec.Command(daemonPath, "host", "identity", "--config", config).Output()
	require.NoError(t, err, "vtpmd host identity")
	id, err := guardian.DecodeHostIdentity(bytes.NewReader(out))
	require.NoError(t, err, "%s", out)
	return id
}

// bootedHostTPM is a host's TPM: a vtpmd instance (started, as a host's
// firmware leaves it) into whose PCRs boot is replayed, and boot's event
// log. It returns the host_tpm and event_log config fields.
func bootedHostTPM(t *testing.T, boot []measuredboot.Event) string {
	t.Helper()
	tpm, err := guardiantest.StartHostTPM(daemonPath, sockDir(t), nil, boot)
	require.NoError(t, err)
	t.Cleanup(tpm.Stop)
	return tpm.ConfigFields()
}

// guardedVM is a VM's `vtpmd socket` with a guardian config, as libvirt
// starts it plus --guardian-config, logging to a file.
type guardedVM struct {
	*daemon
	dir, ctrl, data, log string
}

func startGuardedVM(t *testing.T, dir, config string) *guardedVM {
	t.Helper()
	return startGuardedVMOn(t, dirBackend, dir, config)
}

func startGuardedVMOn(t *testing.T, b stateBackend, dir, config string) *guardedVM {
	t.Helper()
	if dir == "" {
		dir = sockDir(t)
	}
	vm := &guardedVM{dir: dir, ctrl: filepath.Join(dir, "ctrl"), data: filepath.Join(dir, "data"), log: filepath.Join(dir, "vtpmd.log")}
	vm.daemon = startDaemon(t, []string{"socket", "--tpm2", "--tpmstate", b.tpmstate(dir),
		"--ctrl", "type=unixio,path=" + vm.ctrl, "--server", "type=unixio,path=" + vm.data,
		"--log", "file=" + vm.log, "--guardian-config", config}, vm.ctrl, vm.data)
	return vm
}

// init sends CMD_INIT and reports whether the TPM started.
func (vm *guardedVM) init(t *testing.T) bool {
	t.Helper()
	return runIoctl(t, vm.ctrl, nil, "-i").code == 0
}

func (vm *guardedVM) logText(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(vm.log)
	require.NoError(t, err)
	return string(b)
}

// The guardian in a VM's start, end to end: an attested host starts the
// TPM; a host whose boot differs from the baseline does not, and the log
// says "baseline mismatch"; with the guardian down CMD_INIT fails within
// the start deadline naming the URL, and once it is back the next CMD_INIT
// succeeds in the same vtpmd; the state dir at another, unregistered, host
// does not open.
func TestGuardianGatesTheTPMStart(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	g := guardiantest.Start(t)
	good := measuredboot.TypicalBoot("firmware 1.0")
	host1 := g.ConfigFile(t, "host1", bootedHostTPM(t, good))
	register(t, g, "host1", "rack1", host1)
	g.Baseline(t, "rack1", good)
	host2 := g.ConfigFile(t, "host2", bootedHostTPM(t, measuredboot.Tampered(good)))
	register(t, g, "host2", "rack1", host2)

	// An attested host: the TPM starts, and answers.
	vm := startGuardedVM(t, "", host1)
	require.True(t, vm.init(t), "CMD_INIT on an attested host\n%s", vm.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, vm.data, tpmStartupClear))
	assert.FileExists(t, filepath.Join(vm.dir, "key-protector.json"))
	assert.Contains(t, vm.logText(t), "guardian released the state key")
	vm.stop(t)

	// The same VM again (a restart): the protector gives the same key, which
	// opens the state stored at the first start.
	vm = startGuardedVM(t, vm.dir, host1)
	require.True(t, vm.init(t), "CMD_INIT at the VM's next start\n%s", vm.logText(t))
	vm.stop(t)

	// libvirt's swtpm_setup (vtpmd setup), the guardian from the
	// environment, into a state file: the protector lies beside the file,
	// and vtpmd socket opens the TPM that setup made.
	env, _ := setupEnv(t)
	dir := sockDir(t)
	file := fileBackend.statePath(dir)
	out, code := runSetupEnv(t, append(env, "VTPMD_GUARDIAN_CONFIG="+host1),
		libvirtSetupArgs("file://"+file, "vm-guarded", filepath.Join(t.TempDir(), "setup.log"))...)
	require.Equal(t, 0, code, out)
	assert.FileExists(t, file+".protector.json")
	provisioned := startGuardedVMOn(t, fileBackend, dir, host1)
	require.True(t, provisioned.init(t), "CMD_INIT of the TPM setup made\n%s", provisioned.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, provisioned.data, tpmStartupClear))
	provisioned.stop(t)

	// A host whose boot was tampered with.
	tampered := startGuardedVM(t, "", host2)
	assert.False(t, tampered.init(t), "CMD_INIT on a host with a tampered boot")
	assert.Contains(t, tampered.logText(t), "baseline mismatch")
	assert.NotEqual(t, tpmRspSuccess, tpmRoundTrip(t, tampered.data, tpmStartupClear), "the TPM did not start")

	// The guardian down: CMD_INIT fails within the deadline (3 s; the bound
	// here is loose) and names the URL; back up, the next CMD_INIT works.
	down := startGuardedVM(t, "", host1)
	g.Down(t)
	start := time.Now()
	assert.False(t, down.init(t), "CMD_INIT with the guardian down")
	assert.Less(t, time.Since(start), 25*time.Second, "bounded by the start deadline")
	text := down.logText(t)
	assert.Contains(t, text, "guardian unreachable")
	assert.Contains(t, text, g.URL)
	g.Up(t)
	require.True(t, down.init(t), "CMD_INIT once the guardian is back, same vtpmd\n%s", down.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, down.data, tpmStartupClear))

	// The state dir at an unregistered host (the same path: the same VM).
	stranger := g.ConfigFile(t, "stranger", fmt.Sprintf(`,"mode":"hostkey","host_key_file":%q`, filepath.Join(t.TempDir(), "stranger.key")))
	vm = startGuardedVM(t, vm.dir, stranger)
	assert.False(t, vm.init(t), "CMD_INIT at an unregistered host")
	assert.Contains(t, vm.logText(t), "unknown host")
}

// Key sources do not mix: --key with a guardian config is refused.
func TestGuardianAndKeyRefusedTogether(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	dir := sockDir(t)
	config := filepath.Join(dir, "guardian.json")
	require.NoError(t, os.WriteFile(config, []byte(`{"urls":["https://127.0.0.1:1"],"ca_file":"/nonexistent"}`), 0o644))
	keyFile := filepath.Join(dir, "key")
	require.NoError(t, os.WriteFile(keyFile, []byte("00112233445566778899aabbccddeeff"), 0o600))
	cmd := exec.Command(daemonPath, "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl"), "--key", "file="+keyFile, "--guardian-config", config)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	require.True(t, errors.As(err, &exit), "%v: %s", err, out)
	assert.Contains(t, string(out), "give one key source, not both")
}
