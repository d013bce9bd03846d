package report

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// vtpmd serve's memory per idle VM (workers plus the supervisor's share)
// and its ctl-start-to-first-answer stand beside swtpm's.
func TestServeTables(t *testing.T) {
	r := sample()
	r.Daemons = append(r.Daemons, "vtpmd-serve")
	r.Memory = []Memory{
		{Daemon: "swtpm", VMs: 4, RSSKiB: 8192, PSSKiB: 4096},
		{Daemon: "vtpmd-serve", VMs: 4, RSSKiB: 6144, PSSKiB: 1024, SupervisorPSSKiB: 1024},
	}
	r.Startup = []Startup{
		{Daemon: "swtpm", State: "new", Median: 40 * time.Millisecond},
		{Daemon: "vtpmd-serve", State: "new", Median: 20 * time.Millisecond},
	}
	var md bytes.Buffer
	require.NoError(t, r.Markdown(&md, "results.svg"))
	assert.Contains(t, md.String(), "vtpmd-serve: memory per idle VM")
	assert.Contains(t, md.String(), "| 4 | 6.0 MiB | 1.0 MiB | 1.0 MiB | 2.0 MiB | 4.0 MiB | 0.50× |")
	assert.Contains(t, md.String(), "| new | 20.0ms | 40.0ms | 0.50× |")

	r.Memory = r.Memory[:1]
	md.Reset()
	require.NoError(t, r.Markdown(&md, "results.svg"))
	assert.NotContains(t, md.String(), "memory per idle VM", "no serve tables without serve's memory")
}
