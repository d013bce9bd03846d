package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
	"github.com/vtpmd/vtpmd/state"
)

// vm is the client of one VM of a serve, on its control and data
// sockets.
func (s *serveTPM) vm(name string) *vmClient {
	return &vmClient{name: name, ctrl: filepath.Join(s.run, name+".ctrl"), data: filepath.Join(s.run, name+".data")}
}

// guardianCalls is the VM's vtpmd_guardian_calls_total of op and result.
func (s *serveTPM) guardianCalls(t *testing.T, vm, op, result string) float64 {
	t.Helper()
	v, _ := metricValue(metricFamilies(t, s.ctlOK(t, "metrics")), "vtpmd_guardian_calls_total",
		map[string]string{"vm": vm, "op": op, "result": result})
	return v
}

// vtpmd serve with a guardian (TPM mode, the host TPM a vtpmd with a
// replayed boot): two VMs' workers obtain their keys and answer; a killed
// worker is back with its state, its key released again; with the guardian
// down a new VM's TPM start fails within the deadline, naming the URL in
// its status and the log, while a running VM keeps answering, and once the
// guardian is back it starts without a restart of serve; every VM's key
// protector is in the state store, and a copy of the store served at an
// unregistered host does not open ("unknown host").
func TestServeGuardian(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	g := guardiantest.Start(t)
	good := measuredboot.TypicalBoot("firmware 1.0")
	config := g.ConfigFile(t, "host1", bootedHostTPM(t, good))
	register(t, g, "host1", "rack1", config)
	g.Baseline(t, "rack1", good)

	dir := sockDir(t)
	s := startServe(t, dir, "--guardian-config", config)
	s.ctlOK(t, "create", "--data", "vm1", "vm2")
	s.ctlOK(t, "start", "vm1", "vm2")
	clients := map[string]*vmClient{}
	for _, name := range []string{"vm1", "vm2"} {
		c := s.vm(name)
		require.NoError(t, c.connect(), "%s\n%s", name, s.stderr.String())
		require.NoError(t, c.setup())
		require.NoError(t, c.round())
		clients[name] = c
		assert.Equal(t, "state key released by the guardian", s.status(t, name).Guardian)
		assert.Equal(t, 1.0, s.guardianCalls(t, name, "release", "ok"), name)
		assert.Equal(t, 1.0, s.guardianCalls(t, name, "keys", "ok"), "%s: a new VM's key is wrapped to the guardian's", name)
	}
	assert.Contains(t, s.stderr.String(), "guardian released the state key")

	// A killed worker: the next one obtains the key again at CMD_INIT and
	// has the state; the other VM notices nothing.
	pid := s.status(t, "vm1").PID
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		st := s.status(t, "vm1")
		return st.State == "running" && st.PID != pid
	}, 20*time.Second, 20*time.Millisecond)
	require.NoError(t, clients["vm1"].recover(), s.stderr.String())
	assert.Equal(t, uint64(1), clients["vm1"].acked)
	require.NoError(t, clients["vm1"].round())
	assert.Equal(t, 1.0, s.guardianCalls(t, "vm1", "release", "ok"), "the new worker's release")
	assert.Zero(t, s.guardianCalls(t, "vm1", "keys", "ok"), "the protector is kept, not made again")
	require.NoError(t, clients["vm2"].round())

	// The guardian down: a new VM's TPM start fails within the deadline
	// (3 s; the bound here is loose), naming the URL; vm2 keeps answering.
	g.Down(t)
	s.ctlOK(t, "create", "--data", "vm3")
	s.ctlOK(t, "start", "vm3")
	start := time.Now()
	err := ctrlInit(dialUnix, s.vm("vm3").ctrl)
	assert.Error(t, err, "CMD_INIT with the guardian down")
	assert.Less(t, time.Since(start), 25*time.Second, "bounded by the start deadline")
	st := s.status(t, "vm3")
	assert.Contains(t, st.Guardian, "guardian unreachable")
	assert.Contains(t, st.Guardian, g.URL)
	assert.Contains(t, s.stderr.String(), g.URL)
	assert.Equal(t, "running", st.State, "the worker serves, its TPM waits")
	assert.Positive(t, s.guardianCalls(t, "vm3", "keys", "unreachable"))
	require.NoError(t, clients["vm2"].round(), "a running VM needs no guardian")
	// A startup_clear VM's TPM starts with its worker: the start fails,
	// naming the URL, and the supervisor keeps trying.
	s.ctlOK(t, "create", "--data", "--startup-clear", "vm4")
	_, stderr, err := s.ctl(t, "start", "vm4")
	require.Error(t, err, "start of a startup_clear VM with the guardian down")
	assert.Contains(t, stderr, "guardian unreachable")
	assert.Contains(t, stderr, g.URL)

	// Back up: the next CMD_INIT works, with no restart of serve.
	g.Up(t)
	vm3 := s.vm("vm3")
	require.NoError(t, vm3.connect(), s.stderr.String())
	require.NoError(t, vm3.setup())
	require.NoError(t, vm3.round())
	assert.Equal(t, "state key released by the guardian", s.status(t, "vm3").Guardian)
	require.Eventually(t, func() bool { return s.status(t, "vm4").State == "running" }, 30*time.Second, 50*time.Millisecond,
		"the startup_clear VM once the guardian is back")
	conn, err := dialUnix(s.vm("vm4").data)
	require.NoError(t, err)
	_, err = tpm2.GetRandom{BytesRequested: 8}.Execute(connTPM{conn})
	require.NoError(t, err, "the startup_clear VM's TPM answers without CMD_INIT")
	require.NoError(t, conn.Close())
	for _, c := range []*vmClient{clients["vm1"], clients["vm2"], vm3} {
		require.NoError(t, c.conn.Close())
	}
	ids := map[string]string{}
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		ids[name] = s.status(t, name).ID
	}
	s.stop(t)

	// Each VM's key protector is in the store, beside its state, and
	// wraps its key for this VM only.
	store, err := state.Open(s.state, state.Options{ReadOnly: true})
	require.NoError(t, err)
	for name, id := range ids {
		b, err := store.GetProtector(id)
		require.NoError(t, err, name)
		p, err := guardian.ParseProtector(b)
		require.NoError(t, err, name)
		assert.Equal(t, id, p.VMID)
		_, err = store.Get(id)
		require.NoError(t, err, "%s has state", name)
	}
	require.NoError(t, store.Close())

	// A copy of the state dir at a host the guardian does not know: the
	// VMs' workers run, their TPMs do not start.
	copyDir := sockDir(t)
	out, err := exec.Command("cp", "-a", s.state, filepath.Join(copyDir, "state")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	stranger := g.ConfigFile(t, "stranger", fmt.Sprintf(`,"mode":"hostkey","host_key_file":%q`, filepath.Join(t.TempDir(), "stranger.key")))
	s2 := startServe(t, copyDir, "--guardian-config", stranger)
	require.Eventually(t, func() bool { return s2.status(t, "vm1").State == "running" }, 20*time.Second, 20*time.Millisecond)
	// The registry keeps the sockets' paths: the copy serves the same.
	err = ctrlInit(dialUnix, s2.status(t, "vm1").Ctrl)
	require.Error(t, err, "CMD_INIT at an unregistered host")
	assert.Contains(t, err.Error(), "CMD_INIT: result")
	assert.Contains(t, s2.status(t, "vm1").Guardian, "unknown host")
	assert.Contains(t, s2.stderr.String(), "unknown host")
	assert.Equal(t, 1.0, s2.guardianCalls(t, "vm1", "nonce", "unknown_host"))
}

// The guardian config comes from the environment as in `vtpmd socket`
// (libvirt's command line does not change), and a bad one stops serve
// at its start, naming the file.
func TestServeGuardianConfigErrors(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	config := filepath.Join(t.TempDir(), "guardian.json")
	require.NoError(t, os.WriteFile(config, []byte(`{"urls":["http://127.0.0.1:1"],"ca_file":"/ca"}`), 0o644))
	out, code := runDaemonCmdEnv(t, append(os.Environ(), "VTPMD_GUARDIAN_CONFIG="+config),
		"serve", "--state-dir", t.TempDir(), "--run-dir", sockDir(t))
	assert.Equal(t, 1, code)
	assert.Contains(t, out, config)
	assert.Contains(t, out, "give https://host[:port]")
	assert.False(t, strings.Contains(out, "panic"), out)
}

// A VM with state but no key protector (its state sealed under the host
// key, before the guardian was configured) is refused: a new key would not
// open its state, and its state is left as it was.
func TestServeGuardianRefusesStateWithoutProtector(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	dir := sockDir(t)
	s := startServe(t, dir)
	s.ctlOK(t, "create", "--data", "vm1")
	s.ctlOK(t, "start", "vm1")
	c := s.vm("vm1")
	require.NoError(t, c.connect())
	require.NoError(t, c.setup())
	require.NoError(t, c.round())
	require.NoError(t, c.conn.Close())
	s.stop(t)

	g := guardiantest.Start(t)
	config := g.ConfigFile(t, "host1", fmt.Sprintf(`,"mode":"hostkey","host_key_file":%q`, filepath.Join(t.TempDir(), "host1.key")))
	register(t, g, "host1", "rack1", config)
	s = startServe(t, dir, "--guardian-config", config)
	require.Eventually(t, func() bool { return s.status(t, "vm1").State == "running" }, 20*time.Second, 20*time.Millisecond)
	require.Error(t, ctrlInit(dialUnix, c.ctrl))
	assert.Contains(t, s.status(t, "vm1").Guardian, "the VM has state but its key protector in the state store of vtpmd serve is missing")
	s.stop(t)

	// Without the guardian, the state opens as before.
	s = startServe(t, dir)
	require.Eventually(t, func() bool { return s.status(t, "vm1").State == "running" }, 20*time.Second, 20*time.Millisecond)
	require.NoError(t, c.connect())
	got, err := readNV64(c.tpm, serveNVIndex)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), got)
	require.NoError(t, c.conn.Close())
}
