package provisioning

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRunBothTools provisions twice with vtpmd setup and, if installed,
// with Debian's swtpm_setup, and checks what the report holds.
func TestRunBothTools(t *testing.T) {
	if testing.Short() {
		t.Skip("builds vtpmd and provisions TPMs")
	}
	bin := filepath.Join(t.TempDir(), "vtpmd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/cmd/vtpmd").CombinedOutput()
	require.NoError(t, err, "build vtpmd:\n%s", out)
	cfg := Config{Vtpmd: bin, Swtpm: "/usr/bin/swtpm", LocalCA: "/usr/bin/swtpm_localca", Runs: 2, Dir: t.TempDir()}
	if _, err := os.Stat("/usr/bin/swtpm_setup"); err == nil {
		cfg.SwtpmSetup = "/usr/bin/swtpm_setup"
	}
	var progress []string
	cfg.Progress = func(s string) { progress = append(progress, s) }
	p, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	assert.Equal(t, LibvirtArgs, p.Args)
	assert.Contains(t, progress, "provisioning: vtpmd setup 2/2")
	require.NotEmpty(t, p.Tools)
	assert.Equal(t, "vtpmd setup", p.Tools[0].Name)
	assert.Contains(t, p.Tools[0].Version, "(vtpmd)")
	for _, tool := range p.Tools {
		require.Len(t, tool.Samples, 2, tool.Name)
		require.Len(t, tool.CPU, 2, tool.Name)
		assert.Positive(t, tool.Median, tool.Name)
		assert.GreaterOrEqual(t, tool.P90, tool.Median, tool.Name)
	}
	if cfg.SwtpmSetup != "" {
		require.Len(t, p.Tools, 2)
		assert.Contains(t, p.Tools[1].Version, "TPM emulator setup tool")
		assert.Contains(t, p.Tools[1].Command, `--tpm "/usr/bin/swtpm socket"`)
	}
	entries, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "the state directories and CAs are removed")

	// A tool that fails is reported with its output.
	cfg.Vtpmd, cfg.SwtpmSetup = "/bin/false", ""
	_, err = Run(context.Background(), cfg)
	assert.ErrorContains(t, err, "/bin/false setup --create-config-files root")
}
