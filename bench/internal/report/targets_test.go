package report

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func targetsSample() *Report {
	r := &Report{
		Daemons:  []string{"vtpmd", "swtpm"},
		Ops:      []Op{{Name: "getrandom"}, {Name: "nvwrite"}, {Name: "createprimary"}},
		Settings: Settings{VMs: []int{1, 16}},
		Engine: []EngineCell{
			{Op: "getrandom", Store: "sync", Mean: 2 * time.Microsecond},
			{Op: "nvwrite", Store: "memory", Mean: 3 * time.Microsecond},
			{Op: "nvwrite", Store: "sync", Mean: 140 * time.Microsecond},
			{Op: "createprimary", Store: "sync", Commands: 2, Mean: 400 * time.Microsecond},
		},
		Startup: []Startup{
			{Daemon: "vtpmd", State: "new", Median: 10 * time.Millisecond},
			{Daemon: "swtpm", State: "new", Median: 5 * time.Millisecond},
			{Daemon: "vtpmd", State: "existing", Median: 4 * time.Millisecond},
			{Daemon: "swtpm", State: "existing", Median: 5 * time.Millisecond},
		},
		Memory: []Memory{
			{Daemon: "vtpmd", VMs: 1, PSSKiB: 4096}, {Daemon: "swtpm", VMs: 1, PSSKiB: 2048},
			{Daemon: "vtpmd", VMs: 16, PSSKiB: 3072}, {Daemon: "swtpm", VMs: 16, PSSKiB: 1024},
		},
	}
	add := func(d, op string, vms int, rate float64, p50 time.Duration) {
		r.Cells = append(r.Cells, Cell{Daemon: d, Op: op, VMs: vms, OpsPerSec: rate, P50: p50})
	}
	add(Echo, "echo", 1, 25000, 10*time.Microsecond)
	add(Echo, "echo", 16, 200000, 6*time.Microsecond)
	add("vtpmd", "getrandom", 1, 30000, 13*time.Microsecond)
	add("swtpm", "getrandom", 1, 25000, 12*time.Microsecond)
	add("vtpmd", "nvwrite", 1, 5000, 180*time.Microsecond)
	add("swtpm", "nvwrite", 1, 7000, 140*time.Microsecond)
	// Two commands: two round trips of the echo (10 us each) and the
	// engine's 400 us.
	add("vtpmd", "createprimary", 1, 1900, 540*time.Microsecond)
	add("vtpmd", "getrandom", 16, 150000, 20*time.Microsecond)
	add("swtpm", "getrandom", 16, 100000, 20*time.Microsecond)
	return r
}

func TestTargetsTable(t *testing.T) {
	tab := targetsSample().targetsTable()
	assert.Equal(t, [][]string{
		// The ceiling at one VM: a round trip of the echo (40 us at 25k/s)
		// plus the engine, 2 us: 23.8k/s against swtpm's 25k.
		{"throughput, getrandom, 1 VM", "vtpmd", "≥ 1.20×", "1.20×", "0.95×", "yes"},
		// 40 + 140 us (the in-place fdatasync, not the memory store).
		{"throughput, nvwrite, 1 VM", "vtpmd", "≥ 2.00×", "0.71×", "0.79×", "no"},
		{"throughput, geometric mean of 1 operation, 16 VMs", "vtpmd", "≥ 1.50×", "1.50×", "–", "yes"},
		// Beyond one VM the echo's rate alone.
		{"throughput, getrandom, 16 VMs", "vtpmd", "≥ 1.50×", "1.50×", "2.00×", "yes"},
		// getrandom 13 us against 10 + 2; nvwrite 180 against 10 + 140;
		// createprimary 540 against 2 × 10 + 400 (1.32× with one round
		// trip counted).
		{"p50 latency against its floor, 1 VM, every operation", "vtpmd", "≤ 1.30×", "1.29× (createprimary)", "–", "yes"},
		{"start-up to the first answer", "vtpmd", "≤ 1.00×", "new 2.00×, existing 0.80×", "–", "no"},
		{"PSS per idle VM", "vtpmd", "≤ 1.00×", "2.00× (1 VM) to 3.00× (16 VMs)", "–", "no"},
	}, tab.rows)
}

func TestTargetsCountTheSupervisor(t *testing.T) {
	r := targetsSample()
	r.Daemons = append(r.Daemons, "vtpmd-serve")
	r.Memory = append(r.Memory, Memory{Daemon: "vtpmd-serve", VMs: 16, PSSKiB: 512, SupervisorPSSKiB: 512})
	rows := r.targetsTable().rows
	assert.Equal(t, []string{"PSS per idle VM", "vtpmd-serve", "≤ 1.00×", "1.00× (16 VMs)", "–", "yes"}, rows[len(rows)-1],
		"the workers' PSS and the supervisor's share, against one swtpm per VM")
}
