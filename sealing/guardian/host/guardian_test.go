package host_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
)

// attests counts the guardian's successful attestations.
func attests(t *testing.T, g *guardiantest.Guardian) int {
	t.Helper()
	n := 0
	for _, e := range g.Audit(t) {
		if e.Op == "attest" && e.Code == "" {
			n++
		}
	}
	return n
}

func register(t *testing.T, g *guardiantest.Guardian, name, group string, p host.Prover) {
	t.Helper()
	id, err := p.Identity()
	require.NoError(t, err)
	g.Register(t, name, group, id)
}

type simTPM struct{ *simulator.Simulator }

func (simTPM) Close() error { return nil }

// boot resets the simulator (a host reboot: PCRs at zero, the same AK) and
// replays boot into it, writing its event log to logPath.
func boot(t *testing.T, sim *simulator.Simulator, events []measuredboot.Event, logPath string) {
	t.Helper()
	require.NoError(t, sim.Reset())
	require.NoError(t, measuredboot.Replay(sim, events))
	log, err := measuredboot.Encode(events)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(logPath, log, 0o644))
}

func keySource(t *testing.T, c *host.Config, p host.Prover, protector string) *host.KeySource {
	t.Helper()
	s, err := host.NewKeySource(c, "", func(string) string { return protector }, nil)
	require.NoError(t, err)
	s.Prover = p
	return s
}

// A TPM-mode host whose boot matches its group's baseline gets a new VM's
// key, and the same key at its next start (another process: a new
// KeySource); after a tampered boot the guardian refuses with "baseline
// mismatch"; a protector copied to another VM is "wrong VM".
func TestKeySourceWithARealGuardian(t *testing.T) {
	g := guardiantest.Start(t)
	sim, err := simulator.Get()
	require.NoError(t, err)
	defer sim.Close()
	dir := t.TempDir()
	logPath := filepath.Join(dir, "binary_bios_measurements")
	good := measuredboot.TypicalBoot("fw 1.0")
	boot(t, sim, good, logPath)
	tpm := &host.TPM{Open: func() (io.ReadWriteCloser, error) { return simTPM{sim}, nil }, EventLog: logPath}
	register(t, g, "host1", "rack1", tpm)
	g.Baseline(t, "rack1", good)

	config := g.Config(t, "host1", "")
	protector := filepath.Join(dir, "vm1", "key-protector.json")
	ctx := context.Background()
	s := keySource(t, config, tpm, protector)
	assert.Equal(t, "guardian host1 ("+g.URL+")", s.Protection())
	key, err := s.StartKey(ctx, "vm1", false)
	require.NoError(t, err)
	fi, err := os.Stat(protector)
	require.NoError(t, err, "the protector is stored")
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.Equal(t, 1, attests(t, g))

	again, err := keySource(t, config, tpm, protector).StartKey(ctx, "vm1", true)
	require.NoError(t, err)
	assert.Equal(t, key.Secret(), again.Secret(), "the protector gives the same key")
	assert.Equal(t, key.ID, again.ID)
	_, err = s.StateKey(ctx, "vm1")
	require.NoError(t, err)
	assert.Equal(t, 2, attests(t, g), "a KeySource attests once while its certificate lasts")

	other := filepath.Join(dir, "vm2", "key-protector.json")
	require.NoError(t, os.MkdirAll(filepath.Dir(other), 0o700))
	b, err := os.ReadFile(protector)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(other, b, 0o600))
	_, err = keySource(t, config, tpm, other).StartKey(ctx, "vm2", true)
	assert.ErrorContains(t, err, "wrong VM")
	assert.ErrorContains(t, err, `VM "vm2"`)

	boot(t, sim, measuredboot.Tampered(good), logPath)
	_, err = keySource(t, config, tpm, protector).StartKey(ctx, "vm1", true)
	assert.ErrorContains(t, err, "baseline mismatch")
	assert.Equal(t, guardian.CodeBaselineMismatch, guardian.CodeOf(err))
}

// A host-key host that is not registered is refused as an unknown host,
// and makes no protector for a new VM that it could not open.
func TestKeySourceOfAnUnknownHost(t *testing.T) {
	g := guardiantest.Start(t)
	dir := t.TempDir()
	config := g.Config(t, "stranger", `,"mode":"hostkey","host_key_file":"`+filepath.Join(dir, "host.key")+`"`)
	s, err := host.NewKeySource(config, "", func(string) string { return filepath.Join(dir, "key-protector.json") }, nil)
	require.NoError(t, err)
	_, err = s.StartKey(context.Background(), "vm1", false)
	assert.ErrorContains(t, err, "unknown host")

	register(t, g, "stranger", "hostkeys", config.Prover(""))
	key, err := s.StartKey(context.Background(), "vm1", false)
	require.NoError(t, err, "registered, the host-key host is trusted without a baseline")
	assert.NotNil(t, key)
}
