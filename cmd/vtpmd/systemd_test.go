package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The systemd unit of `vtpmd serve` in contrib/systemd passes
// systemd-analyze verify without a warning (with ExecStart on the vtpmd
// under test, since verify wants the binary), and its sysusers file
// parses.
func TestSystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skipf("systemd-analyze not installed (%v): the unit is not verified", err)
	}
	unit, err := os.ReadFile("../../contrib/systemd/vtpmd.service")
	require.NoError(t, err)
	require.Contains(t, string(unit), "ExecStart=/usr/local/bin/vtpmd serve ")
	path := filepath.Join(t.TempDir(), "vtpmd.service")
	require.NoError(t, os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/vtpmd", daemonPath)), 0o644))
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Empty(t, strings.TrimSpace(string(out)), "systemd-analyze verify has warnings")

	if sysusers, err := exec.LookPath("systemd-sysusers"); err == nil && os.Geteuid() == 0 {
		conf, err := filepath.Abs("../../contrib/systemd/vtpmd.sysusers.conf")
		require.NoError(t, err)
		out, err := exec.Command(sysusers, "--dry-run", conf).CombinedOutput()
		require.NoError(t, err, "%s", out)
		assert.Contains(t, string(out), "vtpmd-worker")
		assert.NotContains(t, string(out), "rror")
	}
}
