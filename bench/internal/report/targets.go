package report

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// The bench issue's targets, as ratios against the baseline in the same
// run.
const (
	// p50Bound is how far above its floor an operation's median latency
	// at one VM may be.
	p50Bound = 1.3
	// startupBound and pssBound: no slower to start, no more memory.
	startupBound = 1.0
	pssBound     = 1.0
)

// throughputTarget is a throughput goal for an operation at a number of
// VMs; an empty op is the geometric mean over every operation. echoBound
// says the echo floor bounds it; durable writes beyond one VM are bound by
// the disk and the CPUs instead.
type throughputTarget struct {
	op        string
	vms       int
	goal      float64
	echoBound bool
}

var throughputTargets = []throughputTarget{
	{"getrandom", 1, 1.2, true}, {"pcrextend", 1, 2, true}, {"nvwrite", 1, 2, true},
	{"", 16, 1.5, false}, {"getrandom", 16, 1.5, true}, {"pcrextend", 16, 1.5, true}, {"pcrread", 16, 1.5, true},
	{"", 64, 1.5, false}, {"getrandom", 64, 1.5, true}, {"pcrextend", 64, 1.5, true}, {"pcrread", 64, 1.5, true},
	{"nvincrement", 64, 3, false},
}

// contenders are the daemons held to the targets: all but the baseline
// (the echo floor is not a daemon of the run).
func (r *Report) contenders() []string {
	var ds []string
	for _, d := range r.Daemons {
		if d != Baseline {
			ds = append(ds, d)
		}
	}
	return ds
}

// engineFloor is the engine's in-process time for op with the disk's floor
// for a durable write (the image written in place and fdatasynced), or
// without a store if that was not measured, and the commands op sends (at
// least one); a zero time if neither was measured.
func (r *Report) engineFloor(op string) (time.Duration, float64) {
	for _, store := range []string{"sync", "memory"} {
		if c, ok := r.EngineCell(op, store); ok && c.Error == "" && c.Mean > 0 {
			return c.Mean, max(c.Commands, 1)
		}
	}
	return 0, 1
}

// ceiling is the highest rate of op at vms VMs that the echo floor of the
// run allows: the echo's rate, and at one VM, where each round trip waits
// for the last, an echo round trip per command plus the engine's time per
// operation. It is 0 where the run has no echo.
func (r *Report) ceiling(op string, vms int) float64 {
	echo, ok := r.Cell(Echo, "echo", vms)
	if !ok || echo.OpsPerSec <= 0 {
		return 0
	}
	if vms != 1 {
		return echo.OpsPerSec
	}
	engine, commands := r.engineFloor(op)
	roundTrips := commands * float64(time.Second) / echo.OpsPerSec
	return float64(time.Second) / (roundTrips + float64(engine))
}

// latencyFloor is op's floor at one VM: the echo's median round trip per
// command plus the engine's time.
func (r *Report) latencyFloor(op string) time.Duration {
	echo, ok := r.Cell(Echo, "echo", 1)
	if !ok || echo.P50 <= 0 {
		return 0
	}
	engine, commands := r.engineFloor(op)
	return time.Duration(commands*float64(echo.P50)) + engine
}

// count is "1 thing" or "n things".
func count(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}

func vmsText(n int) string { return count(n, "VM") }

func metText(met bool) string {
	if met {
		return "yes"
	}
	return "no"
}

// targetsTable holds each daemon to the bench issue's targets, with the
// best ratio this machine's floors allow where the run measured them.
func (r *Report) targetsTable() table {
	t := table{
		title:  fmt.Sprintf("Targets: each daemon against %s in this run", Baseline),
		header: []string{"target", "daemon", "goal", "measured", "floor's ceiling", "met"},
	}
	t.notes = append(t.notes,
		fmt.Sprintf("floor's ceiling: the ratio to %s of the highest rate the echo floor allows, a daemon that answered in no time over the same socket to the same client: the echo's rate, and at one VM an echo round trip per command plus the engine's time for the operation (in-place fdatasync for a durable write). A goal above it cannot be met on this machine; at one VM the echo measures how soon an idle CPU wakes, so a daemon can land above it.", Baseline),
		fmt.Sprintf("latency floor: the echo's median round trip at one VM per command of the operation plus the engine's time for it; the worst operation is shown. Start-up and memory have no floor; the daemon's worst ratio is shown (memory: over the VM counts; %s's start-up: its admin API's start request, against a %s process's start).", r.serveDaemon(), Baseline))
	for _, d := range r.contenders() {
		t.rows = append(t.rows, r.throughputRows(d)...)
		if row, ok := r.latencyRow(d); ok {
			t.rows = append(t.rows, row)
		}
		if row, ok := r.startupRow(d); ok {
			t.rows = append(t.rows, row)
		}
		if row, ok := r.memoryRow(d); ok {
			t.rows = append(t.rows, row)
		}
	}
	return t
}

func (r *Report) throughputRows(d string) [][]string {
	var rows [][]string
	for _, tg := range throughputTargets {
		goal := "≥ " + fmtRatio(tg.goal)
		if tg.op == "" {
			q, n := r.geomean(d, tg.vms, func(c Cell) float64 { return c.OpsPerSec })
			if n == 0 {
				continue
			}
			rows = append(rows, []string{fmt.Sprintf("throughput, geometric mean of %s, %s", count(n, "operation"), vmsText(tg.vms)),
				d, goal, fmtRatio(q), "–", metText(q >= tg.goal)})
			continue
		}
		s, okS := r.Cell(d, tg.op, tg.vms)
		b, okB := r.Cell(Baseline, tg.op, tg.vms)
		if !okS || !okB {
			continue
		}
		q := ratio(s.OpsPerSec, b.OpsPerSec)
		ceil := "–"
		if c := r.ceiling(tg.op, tg.vms); c > 0 && tg.echoBound {
			ceil = fmtRatio(ratio(c, b.OpsPerSec))
		}
		rows = append(rows, []string{fmt.Sprintf("throughput, %s, %s", tg.op, vmsText(tg.vms)),
			d, goal, fmtRatio(q), ceil, metText(q >= tg.goal)})
	}
	return rows
}

func (r *Report) latencyRow(d string) ([]string, bool) {
	worst, worstOp := 0.0, ""
	for _, op := range r.Ops {
		c, ok := r.Cell(d, op.Name, 1)
		floor := r.latencyFloor(op.Name)
		if !ok || floor <= 0 || c.P50 <= 0 {
			continue
		}
		if q := durRatio(c.P50, floor); q > worst {
			worst, worstOp = q, op.Name
		}
	}
	if worstOp == "" {
		return nil, false
	}
	return []string{"p50 latency against its floor, 1 VM, every operation", d, "≤ " + fmtRatio(p50Bound),
		fmt.Sprintf("%s (%s)", fmtRatio(worst), worstOp), "–", metText(worst <= p50Bound)}, true
}

func (r *Report) startupRow(d string) ([]string, bool) {
	var parts []string
	worst := 0.0
	for _, st := range []string{"new", "existing"} {
		s, okS := r.StartupOf(d, st)
		b, okB := r.StartupOf(Baseline, st)
		if !okS || !okB {
			continue
		}
		q := durRatio(s.Median, b.Median)
		parts = append(parts, fmt.Sprintf("%s %s", st, fmtRatio(q)))
		worst = math.Max(worst, q)
	}
	if len(parts) == 0 {
		return nil, false
	}
	return []string{"start-up to the first answer", d, "≤ " + fmtRatio(startupBound),
		strings.Join(parts, ", "), "–", metText(worst <= startupBound)}, true
}

func (r *Report) memoryRow(d string) ([]string, bool) {
	lo, hi := math.Inf(1), 0.0
	var loVMs, hiVMs int
	for _, n := range r.Settings.VMs {
		s, okS := r.MemoryOf(d, n)
		b, okB := r.MemoryOf(Baseline, n)
		if !okS || !okB {
			continue
		}
		q := ratio(float64(s.PSSPerVMKiB()), float64(b.PSSKiB))
		if math.IsNaN(q) {
			continue
		}
		if q < lo {
			lo, loVMs = q, n
		}
		if q > hi {
			hi, hiVMs = q, n
		}
	}
	if hi == 0 {
		return nil, false
	}
	measured := fmt.Sprintf("%s (%s) to %s (%s)", fmtRatio(lo), vmsText(loVMs), fmtRatio(hi), vmsText(hiVMs))
	if loVMs == hiVMs {
		measured = fmt.Sprintf("%s (%s)", fmtRatio(hi), vmsText(hiVMs))
	}
	return []string{"PSS per idle VM", d, "≤ " + fmtRatio(pssBound), measured, "–", metText(hi <= pssBound)}, true
}
