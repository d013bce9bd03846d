package driver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/report"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
)

// echoEnv makes the test binary serve the echo floor instead of testing.
const echoEnv = "VTPMBENCH_TEST_ECHO"

func TestMain(m *testing.M) {
	if os.Getenv(echoEnv) != "" {
		if err := ServeEcho(os.Args[len(os.Args)-1]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	os.Exit(m.Run())
}

// buildVtpmd builds vtpmd from this tree.
func buildVtpmd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "vtpmd")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/cmd/vtpmd")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "build vtpmd:\n%s", out)
	return bin
}

// TestDriverAgainstVtpmd runs every operation on one vtpmd VM for about
// 200 ms and checks that the results are sane.
func TestDriverAgainstVtpmd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs vtpmd")
	}
	self, err := os.Executable()
	require.NoError(t, err)
	var progress []string
	bin := buildVtpmd(t)
	cfg := Config{
		Daemons:        []Daemon{{Name: "vtpmd", Path: bin}, {Name: "vtpmd-serve", Path: bin, Serve: true}},
		EchoArgv:       []string{"/usr/bin/env", echoEnv + "=1", self},
		Engine:         true,
		VMs:            []int{1},
		Ops:            workload.All(),
		Duration:       200 * time.Millisecond,
		Warmup:         20 * time.Millisecond,
		EngineDuration: 20 * time.Millisecond,
		Starts:         1,
		StateDir:       t.TempDir(),
		Progress:       func(s string) { progress = append(progress, s) },
	}
	rep, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	assert.Zero(t, fleet.Live(), "processes left running")
	assert.NotEmpty(t, progress)

	for _, op := range workload.All() {
		for _, d := range []string{"vtpmd", "vtpmd-serve"} {
			c, ok := rep.Cell(d, op.Name, 1)
			require.True(t, ok, "%s %s", d, op.Name)
			assert.Zero(t, c.Errors, "%s %s: %s", d, op.Name, c.FirstError)
			assert.Positive(t, c.Ops, "%s %s", d, op.Name)
			assert.Positive(t, c.OpsPerSec, "%s %s", d, op.Name)
			assert.True(t, c.P50 > 0 && c.P50 <= c.P99 && c.P99 <= c.Max, "%s %s: p50 %v p99 %v max %v", d, op.Name, c.P50, c.P99, c.Max)
			assert.GreaterOrEqual(t, c.CPUPer1000, 0.0, "%s %s", d, op.Name)
		}

		commands := map[string]float64{"createprimary": 2, "createload": 3}[op.Name]
		for _, store := range []string{"memory", "file", "vtpmd"} {
			e, ok := rep.EngineCell(op.Name, store)
			require.True(t, ok, "engine %s %s", store, op.Name)
			assert.Empty(t, e.Error, "engine %s %s", store, op.Name)
			assert.Positive(t, e.Ops, "engine %s %s", store, op.Name)
			assert.Equal(t, max(commands, 1), e.Commands, "engine %s %s: commands per operation", store, op.Name)
		}
	}
	echo, ok := rep.Cell(report.Echo, "echo", 1)
	require.True(t, ok)
	assert.Zero(t, echo.Errors, echo.FirstError)
	assert.Positive(t, echo.Ops)

	m, ok := rep.MemoryOf("vtpmd", 1)
	require.True(t, ok)
	assert.Positive(t, m.RSSKiB)
	assert.Positive(t, m.PSSKiB)
	for _, state := range []string{"new", "existing"} {
		for _, d := range []string{"vtpmd", "vtpmd-serve"} {
			s, ok := rep.StartupOf(d, state)
			require.True(t, ok, "%s %s", d, state)
			assert.Positive(t, s.Median, "%s %s", d, state)
		}
	}

	var text, md, svg bytes.Buffer
	require.NoError(t, rep.Text(&text))
	require.NoError(t, rep.Markdown(&md, "results.svg"))
	require.NoError(t, rep.SVG(&svg))
	assert.Contains(t, text.String(), "getrandom")
	assert.Contains(t, md.String(), "| getrandom | 1 |")
	assert.Contains(t, md.String(), "vtpmd-serve ops/s")
	assert.True(t, strings.HasPrefix(svg.String(), "<svg"), "SVG starts with <svg")
}

// TestDriverConnectsToExistingTPMs drives two TPMs the run did not start,
// at their data sockets, beside a vtpmd it starts: the existing ones are
// measured, left running, and have no CPU, memory or start-up entries.
func TestDriverConnectsToExistingTPMs(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs vtpmd")
	}
	bin := buildVtpmd(t)
	t.Setenv("VTPMD_HOST_KEY", filepath.Join(t.TempDir(), "host.key"))
	var endpoints []string
	var running []*exec.Cmd
	for i := range 2 {
		dir := filepath.Join(t.TempDir(), fmt.Sprint(i))
		require.NoError(t, os.MkdirAll(dir, 0o700))
		argv := fleet.Daemon("running", bin, nil).Argv(dir)
		cmd := exec.Command(argv[0], argv[1:]...)
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		running = append(running, cmd)
		endpoints = append(endpoints, filepath.Join(dir, "data"))
		require.Eventually(t, func() bool { _, err := os.Stat(endpoints[i]); return err == nil }, 20*time.Second, 10*time.Millisecond)
	}
	cfg := Config{
		Daemons:  []Daemon{{Name: "vtpmd", Path: bin}, {Name: "existing", Endpoints: endpoints}},
		VMs:      []int{1, 2},
		Ops:      []workload.Op{workload.All()[0]},
		Duration: 100 * time.Millisecond,
		Starts:   1,
		StateDir: t.TempDir(),
	}
	rep, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	assert.Zero(t, fleet.Live(), "the run's own processes are stopped")
	for _, cmd := range running {
		assert.NoError(t, cmd.Process.Signal(syscall.Signal(0)), "an existing TPM is left running")
	}
	for _, n := range []int{1, 2} {
		c, ok := rep.Cell("existing", cfg.Ops[0].Name, n)
		require.True(t, ok, "%d VMs", n)
		assert.Zero(t, c.Errors, c.FirstError)
		assert.Positive(t, c.OpsPerSec)
		assert.Zero(t, c.CPUPer1000, "their processes are not known")
		_, ok = rep.MemoryOf("existing", n)
		assert.False(t, ok)
	}
	_, ok := rep.StartupOf("existing", "new")
	assert.False(t, ok)

	cfg.VMs = []int{3}
	_, err = Run(context.Background(), cfg)
	assert.ErrorContains(t, err, "existing: 2 endpoints for up to 3 VMs")
}
