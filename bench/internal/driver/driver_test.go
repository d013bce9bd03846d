package driver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

		for _, store := range []string{"memory", "file", "vtpmd"} {
			e, ok := rep.EngineCell(op.Name, store)
			require.True(t, ok, "engine %s %s", store, op.Name)
			assert.Empty(t, e.Error, "engine %s %s", store, op.Name)
			assert.Positive(t, e.Ops, "engine %s %s", store, op.Name)
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
