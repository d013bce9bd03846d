package keyrelease

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
)

// TestRunEverySetup starts a VM twice without a guardian, with one replica
// and, if etcd is installed, with three on etcd, and checks the report.
func TestRunEverySetup(t *testing.T) {
	if testing.Short() {
		t.Skip("builds vtpmd and vtpmd-guardian and starts guardians")
	}
	dir := t.TempDir()
	cfg := Config{Vtpmd: filepath.Join(dir, "vtpmd"), Guardian: filepath.Join(dir, "vtpmd-guardian"), Etcd: guardiantest.EtcdBinary, Runs: 2}
	for bin, pkg := range map[string]string{cfg.Vtpmd: "cmd/vtpmd", cfg.Guardian: "cmd/vtpmd-guardian"} {
		out, err := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/"+pkg).CombinedOutput()
		require.NoError(t, err, "build %s:\n%s", pkg, out)
	}
	cfg.Dir = filepath.Join(dir, "work")
	require.NoError(t, os.Mkdir(cfg.Dir, 0o700))
	k, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	want := []string{"no guardian", "1 replica (local store)", "3 replicas (3-member etcd)"}
	if _, err := os.Stat(cfg.Etcd); err != nil {
		want = want[:2]
		assert.Contains(t, k.Notes[0], "3 replicas on etcd: skipped")
	}
	require.Len(t, k.Setups, len(want))
	for i, s := range k.Setups {
		assert.Equal(t, want[i], s.Name)
		assert.Len(t, s.Samples, 2, s.Name)
		assert.Positive(t, s.Median, s.Name)
	}
	entries, err := os.ReadDir(cfg.Dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "the state, guardians and etcd are removed")
}
