package report

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// table is a titled table, rendered as text or markdown.
type table struct {
	title  string
	header []string
	rows   [][]string
	notes  []string
}

// fmtRate formats operations per second.
func fmtRate(v float64) string {
	switch {
	case v == 0 || math.IsNaN(v):
		return "–"
	case v >= 100:
		return strconv.FormatFloat(math.Round(v), 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// fmtDur formats a duration with three significant digits.
func fmtDur(d time.Duration) string {
	if d <= 0 {
		return "–"
	}
	f := float64(d)
	unit, div := "ns", 1.0
	switch {
	case d >= time.Second:
		unit, div = "s", 1e9
	case d >= time.Millisecond:
		unit, div = "ms", 1e6
	case d >= time.Microsecond:
		unit, div = "µs", 1e3
	}
	v := f / div
	prec := 0
	switch {
	case v < 10:
		prec = 2
	case v < 100:
		prec = 1
	}
	return strconv.FormatFloat(v, 'f', prec, 64) + unit
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	if v >= 10 {
		return strconv.FormatFloat(v, 'f', 1, 64) + "×"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + "×"
}

func fmtCPU(v float64) string {
	if v == 0 || math.IsNaN(v) {
		return "–"
	}
	if v >= 1 {
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

func fmtSwitches(v float64) string {
	if v == 0 || math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func fmtMiB(kib int64) string {
	if kib <= 0 {
		return "–"
	}
	return strconv.FormatFloat(float64(kib)/1024, 'f', 1, 64) + " MiB"
}

func durRatio(a, b time.Duration) float64 {
	if a <= 0 || b <= 0 {
		return math.NaN()
	}
	return float64(a) / float64(b)
}

// pair returns the subject's and the baseline's cell.
func (r *Report) pair(op string, vms int) (s, b Cell, okS, okB bool) {
	s, okS = r.Cell(r.Subject(), op, vms)
	b, okB = r.Cell(Baseline, op, vms)
	return
}

func (r *Report) loadTable() table {
	sub := r.Subject()
	cmp := r.HasBaseline() && sub != ""
	t := table{title: "Load: throughput, latency and daemon CPU per operation and number of VMs"}
	if cmp {
		t.header = []string{"op", "VMs",
			sub + " ops/s", Baseline + " ops/s", "ops/s ratio",
			sub + " p50", Baseline + " p50", sub + " p99", Baseline + " p99", sub + " max", Baseline + " max",
			sub + " CPU s/1k ops", Baseline + " CPU s/1k ops", "CPU ratio",
			sub + " cs/op", Baseline + " cs/op", "errors"}
		t.notes = append(t.notes, fmt.Sprintf("ratio = %s / %s in the same run: ops/s above 1× means %s is faster; CPU below 1× means it uses less CPU per operation.", sub, Baseline, sub))
	} else {
		for _, d := range r.Daemons {
			sub = d
		}
		t.header = []string{"op", "VMs", sub + " ops/s", sub + " p50", sub + " p99", sub + " max", sub + " CPU s/1k ops", sub + " cs/op", "errors"}
	}
	t.notes = append(t.notes, "CPU s/1k ops: user+system CPU seconds of the daemon processes (from /proc/<pid>/stat) per 1000 operations; cs/op: their threads' context switches per operation; latency is per operation, as the VM sees it.")
	for _, op := range r.Ops {
		for _, n := range r.Settings.VMs {
			s, b, okS, okB := r.pair(op.Name, n)
			if !cmp {
				s, okS = r.Cell(sub, op.Name, n)
			}
			if !okS && !okB {
				continue
			}
			errs := s.Errors + b.Errors
			errText := strconv.FormatInt(errs, 10)
			if errs > 0 {
				first := s.FirstError
				if first == "" {
					first = b.FirstError
				}
				errText += " (" + first + ")"
			}
			if cmp {
				t.rows = append(t.rows, []string{op.Name, strconv.Itoa(n),
					fmtRate(s.OpsPerSec), fmtRate(b.OpsPerSec), fmtRatio(ratio(s.OpsPerSec, b.OpsPerSec)),
					fmtDur(s.P50), fmtDur(b.P50), fmtDur(s.P99), fmtDur(b.P99), fmtDur(s.Max), fmtDur(b.Max),
					fmtCPU(s.CPUPer1000), fmtCPU(b.CPUPer1000), fmtRatio(ratio(s.CPUPer1000, b.CPUPer1000)),
					fmtSwitches(s.SwitchesPerOp), fmtSwitches(b.SwitchesPerOp), errText})
			} else {
				t.rows = append(t.rows, []string{op.Name, strconv.Itoa(n),
					fmtRate(s.OpsPerSec), fmtDur(s.P50), fmtDur(s.P99), fmtDur(s.Max), fmtCPU(s.CPUPer1000), fmtSwitches(s.SwitchesPerOp), errText})
			}
		}
	}
	return t
}

// Headline is the geometric mean of the throughput ratios of every
// operation at vms VMs (0: over all cells), and the number of ratios.
func (r *Report) Headline(vms int) (float64, int) {
	return r.geomean(r.Subject(), vms, func(c Cell) float64 { return c.OpsPerSec })
}

// CPUHeadline is the geometric mean of the CPU-per-operation ratios.
func (r *Report) CPUHeadline(vms int) (float64, int) {
	return r.geomean(r.Subject(), vms, func(c Cell) float64 { return c.CPUPer1000 })
}

// geomean is the geometric mean of daemon's ratios to the baseline of
// metric, at vms VMs (0: over all cells), and the number of ratios.
func (r *Report) geomean(daemon string, vms int, metric func(Cell) float64) (float64, int) {
	sum, n := 0.0, 0
	for _, op := range r.Ops {
		for _, v := range r.Settings.VMs {
			if vms != 0 && v != vms {
				continue
			}
			s, okS := r.Cell(daemon, op.Name, v)
			b, okB := r.Cell(Baseline, op.Name, v)
			if q := ratio(metric(s), metric(b)); okS && okB && !math.IsNaN(q) && q > 0 {
				sum += math.Log(q)
				n++
			}
		}
	}
	if n == 0 {
		return math.NaN(), 0
	}
	return math.Exp(sum / float64(n)), n
}

func (r *Report) headlineTable() table {
	sub := r.Subject()
	t := table{
		title:  fmt.Sprintf("Headline: %s/%s ratios, geometric mean over the operations", sub, Baseline),
		header: []string{"VMs", "ops/s ratio (>1: " + sub + " faster)", "CPU per op ratio (<1: " + sub + " cheaper)"},
	}
	row := func(label string, vms int) {
		q, k := r.Headline(vms)
		c, _ := r.CPUHeadline(vms)
		if k > 0 {
			t.rows = append(t.rows, []string{label, fmtRatio(q), fmtRatio(c)})
		}
	}
	for _, n := range r.Settings.VMs {
		row(strconv.Itoa(n), n)
	}
	row("all", 0)
	return t
}

func (r *Report) floorTable() table {
	sub := r.Subject()
	n := r.Settings.VMs[0]
	t := table{
		title: fmt.Sprintf("Floors: the engine in process and the daemons' median latency at %d VM(s)", n),
		header: []string{"op", "commands", "engine, memory store", "engine, in-place fdatasync", "engine, fsynced file", "engine, vtpmd's store",
			fmt.Sprintf("%s p50 @%d", sub, n)},
	}
	if r.HasBaseline() {
		t.header = append(t.header, fmt.Sprintf("%s p50 @%d", Baseline, n))
	}
	t.header = append(t.header, fmt.Sprintf("echo p50 @%d", n))
	t.notes = append(t.notes,
		"commands: the TPM commands one operation sends, each a round trip. engine: mean time of vtpm.Device.Execute of the same command bytes in this process (one engine per process); the memory store keeps nothing; in-place fdatasync writes the image over itself in one file and fdatasyncs it, which a torn write could lose, so it is below what any crash-safe store must do: the disk's floor for a durable write; the fsynced file is replaced atomically and fsynced with its directory on every change; vtpmd's store is the one `vtpmd socket` uses (internal/vmstate: sealed records and deltas in the state store).",
		"echo: the round trip of a trivial echo server (a C loop of poll, read and write, with no command run between) over the same unix stream socket type, one process per VM: the transport's floor; the daemon's latency minus the engine's and an echo round trip per command is its own overhead. At one VM both CPUs idle between round trips, and the echo's median can then sit above the daemons' (it measures how soon an idle CPU wakes, which varies from run to run on a virtual machine): the daemons' own medians are the better floor there.")
	echo, _ := r.Cell(Echo, "echo", n)
	for _, op := range r.Ops {
		mem, _ := r.EngineCell(op.Name, "memory")
		sync, _ := r.EngineCell(op.Name, "sync")
		file, _ := r.EngineCell(op.Name, "file")
		own, _ := r.EngineCell(op.Name, "vtpmd")
		s, _ := r.Cell(sub, op.Name, n)
		_, commands := r.engineFloor(op.Name)
		row := []string{op.Name, strconv.FormatFloat(commands, 'f', -1, 64), engineText(mem), engineText(sync), engineText(file), engineText(own), fmtDur(s.P50)}
		if r.HasBaseline() {
			b, _ := r.Cell(Baseline, op.Name, n)
			row = append(row, fmtDur(b.P50))
		}
		row = append(row, fmtDur(echo.P50))
		t.rows = append(t.rows, row)
	}
	return t
}

func engineText(c EngineCell) string {
	if c.Error != "" {
		return "error: " + c.Error
	}
	return fmtDur(c.Mean)
}

func (r *Report) echoTable() table {
	t := table{title: "Echo floor: unix stream socket round trip to a trivial C echo server, one process and connection per VM",
		header: []string{"VMs", "ops/s", "p50", "p99", "max", "echo CPU s/1k ops"}}
	for _, n := range r.Settings.VMs {
		if c, ok := r.Cell(Echo, "echo", n); ok {
			t.rows = append(t.rows, []string{strconv.Itoa(n), fmtRate(c.OpsPerSec), fmtDur(c.P50), fmtDur(c.P99), fmtDur(c.Max), fmtCPU(c.CPUPer1000)})
		}
	}
	return t
}

func (r *Report) memoryTable() table {
	sub := r.Subject()
	t := table{title: "Memory per idle instance (median, /proc/<pid>/smaps_rollup, after set-up)"}
	t.notes = append(t.notes, "PSS divides shared pages among the processes sharing them, so it falls as more instances run.")
	if !r.HasBaseline() {
		t.header = []string{"VMs", sub + " RSS", sub + " PSS"}
		for _, n := range r.Settings.VMs {
			if m, ok := r.MemoryOf(sub, n); ok {
				t.rows = append(t.rows, []string{strconv.Itoa(n), fmtMiB(m.RSSKiB), fmtMiB(m.PSSKiB)})
			}
		}
		return t
	}
	t.header = []string{"VMs", sub + " RSS", Baseline + " RSS", "RSS ratio", sub + " PSS", Baseline + " PSS", "PSS ratio"}
	for _, n := range r.Settings.VMs {
		s, okS := r.MemoryOf(sub, n)
		b, okB := r.MemoryOf(Baseline, n)
		if !okS || !okB {
			continue
		}
		t.rows = append(t.rows, []string{strconv.Itoa(n), fmtMiB(s.RSSKiB), fmtMiB(b.RSSKiB), fmtRatio(ratio(float64(s.RSSKiB), float64(b.RSSKiB))),
			fmtMiB(s.PSSKiB), fmtMiB(b.PSSKiB), fmtRatio(ratio(float64(s.PSSKiB), float64(b.PSSKiB)))})
	}
	return t
}

func (r *Report) startupTable() table {
	sub := r.Subject()
	t := table{title: fmt.Sprintf("Start-up: process start to the first answered command (median of %d)", r.Settings.Starts)}
	t.notes = append(t.notes, "new: an empty state directory, so the TPM is manufactured first; existing: a state directory from an earlier start.")
	if !r.HasBaseline() {
		t.header = []string{"state", sub}
		for _, st := range []string{"new", "existing"} {
			if s, ok := r.StartupOf(sub, st); ok {
				t.rows = append(t.rows, []string{st, fmtDur(s.Median)})
			}
		}
		return t
	}
	t.header = []string{"state", sub, Baseline, "ratio"}
	for _, st := range []string{"new", "existing"} {
		s, okS := r.StartupOf(sub, st)
		b, okB := r.StartupOf(Baseline, st)
		if okS && okB {
			t.rows = append(t.rows, []string{st, fmtDur(s.Median), fmtDur(b.Median), fmtRatio(durRatio(s.Median, b.Median))})
		}
	}
	return t
}

// daemonsTable puts every daemon side by side, for runs that measure more
// than the subject and the baseline (e.g. vtpmd-serve).
func (r *Report) daemonsTable() table {
	t := table{title: "Every daemon: throughput, latency and daemon CPU per operation and number of VMs"}
	first := r.Daemons[0]
	t.header = []string{"op", "VMs"}
	for _, d := range r.Daemons {
		t.header = append(t.header, d+" ops/s")
	}
	for _, d := range r.Daemons[1:] {
		t.header = append(t.header, d+" / "+first)
	}
	for _, d := range r.Daemons {
		t.header = append(t.header, d+" p50", d+" p99")
	}
	for _, d := range r.Daemons {
		t.header = append(t.header, d+" CPU s/1k ops")
	}
	t.header = append(t.header, "errors")
	t.notes = append(t.notes, fmt.Sprintf("ratio = daemon / %s ops/s in the same run; CPU of a daemon is that of all its processes (for vtpmd-serve: the supervisor and its workers).", first))
	for _, op := range r.Ops {
		for _, n := range r.Settings.VMs {
			cells := make([]Cell, len(r.Daemons))
			found := false
			var errs int64
			firstErr := ""
			for i, d := range r.Daemons {
				c, ok := r.Cell(d, op.Name, n)
				found = found || ok
				cells[i] = c
				errs += c.Errors
				if firstErr == "" {
					firstErr = c.FirstError
				}
			}
			if !found {
				continue
			}
			row := []string{op.Name, strconv.Itoa(n)}
			for _, c := range cells {
				row = append(row, fmtRate(c.OpsPerSec))
			}
			for _, c := range cells[1:] {
				row = append(row, fmtRatio(ratio(c.OpsPerSec, cells[0].OpsPerSec)))
			}
			for _, c := range cells {
				row = append(row, fmtDur(c.P50), fmtDur(c.P99))
			}
			for _, c := range cells {
				row = append(row, fmtCPU(c.CPUPer1000))
			}
			errText := strconv.FormatInt(errs, 10)
			if errs > 0 {
				errText += " (" + firstErr + ")"
			}
			t.rows = append(t.rows, append(row, errText))
		}
	}
	return t
}

func (r *Report) opsTable() table {
	t := table{title: "Operations (command bytes marshalled once; each response code must be 0)", header: []string{"op", "commands"}}
	for _, op := range r.Ops {
		t.rows = append(t.rows, []string{op.Name, op.Title})
	}
	return t
}

// tables lists the report's tables in order.
func (r *Report) tables() []table {
	var ts []table
	if r.HasBaseline() && r.Subject() != "" {
		ts = append(ts, r.headlineTable())
		if t := r.targetsTable(); len(t.rows) > 0 {
			ts = append(ts, t)
		}
	}
	ts = append(ts, r.loadTable())
	if len(r.Daemons) > 2 || (len(r.Daemons) == 2 && !r.HasBaseline()) {
		ts = append(ts, r.daemonsTable())
	}
	if len(r.Engine) > 0 || r.hasEcho() {
		ts = append(ts, r.floorTable())
	}
	if r.hasEcho() {
		ts = append(ts, r.echoTable())
	}
	for _, t := range []table{r.memoryTable(), r.startupTable()} {
		if len(t.rows) > 0 { // none for TPMs the run connected to
			ts = append(ts, t)
		}
	}
	ts = append(ts, r.serveTables()...)
	if r.Provisioning != nil && len(r.Provisioning.Tools) > 0 {
		ts = append(ts, r.provisioningTable())
	}
	if r.KeyRelease != nil && len(r.KeyRelease.Setups) > 0 {
		ts = append(ts, r.keyReleaseTable())
	}
	ts = append(ts, r.opsTable())
	return ts
}

func (r *Report) hasEcho() bool {
	for _, c := range r.Cells {
		if c.Daemon == Echo {
			return true
		}
	}
	return false
}

func (r *Report) settingsLine() string {
	var vms []string
	for _, n := range r.Settings.VMs {
		vms = append(vms, strconv.Itoa(n))
	}
	rounds := ""
	if r.Settings.Rounds > 1 {
		rounds = fmt.Sprintf(", best of %d rounds (the daemons take turns)", r.Settings.Rounds)
	}
	return fmt.Sprintf("VMs %s; %v measured per cell after a %v warm-up%s; one persistent data connection per VM; run took %v",
		strings.Join(vms, ","), r.Settings.Duration, r.Settings.Warmup, rounds, r.Elapsed.Round(time.Second))
}

func (r *Report) machineLines() []string {
	m := r.Machine
	lines := []string{
		fmt.Sprintf("%d CPUs (nproc), %s; kernel %s; %s; state directories on %s", m.NProc, m.CPU, m.Kernel, m.GoVersion, m.StateFS),
		fmt.Sprintf("load average (1, 5, 15 min) %s at the start, %s at the end", m.LoadBefore, m.LoadAfter),
	}
	for _, d := range r.Daemons {
		line := fmt.Sprintf("%s: %s", d, m.Versions[d])
		if d == r.Subject() && m.Tree != "" {
			line += ", built from " + m.Tree
		}
		lines = append(lines, line)
	}
	return lines
}
