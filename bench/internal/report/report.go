// Package report holds a benchmark run's results and writes them as a
// terminal table, a markdown document, an SVG chart and JSON.
package report

import (
	"math"
	"time"
)

// Baseline names the daemon the others are compared with.
const Baseline = "swtpm"

// Names of the floors.
const (
	Echo   = "echo"
	Engine = "engine"
)

// Report is one run.
type Report struct {
	Machine  Machine
	Started  time.Time
	Elapsed  time.Duration
	Settings Settings
	// Daemons are the daemons measured, the one under test first.
	Daemons []string
	// Ops are the operations, in order, with what they send.
	Ops []Op
	// Cells are the load results of the daemons and of the echo floor.
	Cells []Cell
	// Engine is the in-process floor, one cell per operation and store.
	Engine  []EngineCell
	Memory  []Memory
	Startup []Startup
	// Provisioning compares the provisioning of a new TPM, if measured.
	Provisioning *Provisioning `json:",omitempty"`
	// KeyRelease is the guardian's share of a VM's start, if measured.
	KeyRelease *KeyRelease `json:",omitempty"`
	// Notes are remarks made during the run (skipped measurements).
	Notes []string
}

// Machine describes where the run ran.
type Machine struct {
	NProc     int
	CPU       string
	Kernel    string
	GoVersion string
	// StateFS is the file system type of the state directories.
	StateFS string
	// LoadBefore and LoadAfter are /proc/loadavg's 1, 5 and 15 minute
	// load averages at the start and the end of the run.
	LoadBefore, LoadAfter string
	// Tree is the source tree's commit, "+dirty" with uncommitted changes.
	Tree string `json:",omitempty"`
	// Versions are the daemons' --version lines.
	Versions map[string]string
}

// Settings are the run's parameters.
type Settings struct {
	VMs      []int
	Duration time.Duration
	Warmup   time.Duration
	Starts   int
	// Rounds is the number of runs of each cell; the best is reported.
	Rounds int
}

// Op is an operation.
type Op struct {
	Name, Title string
}

// Cell is one daemon running one operation on a number of VMs at once.
type Cell struct {
	Daemon string
	Op     string
	VMs    int
	// Ops is the number completed in the measured window of Seconds.
	Ops       int64
	Seconds   float64
	OpsPerSec float64
	P50       time.Duration
	P99       time.Duration
	Max       time.Duration
	// CPUPer1000 is the daemons' CPU seconds (user+system) per 1000 ops.
	CPUPer1000 float64
	// SwitchesPerOp is the daemons' context switches (all threads,
	// voluntary and not) per operation.
	SwitchesPerOp float64
	// DriverCPUPer1000 is the benchmark's own CPU seconds per 1000 ops.
	DriverCPUPer1000 float64
	// Errors counts failed operations (a non-zero response code, a broken
	// connection); a VM stops at its first.
	Errors     int64
	FirstError string `json:",omitempty"`
}

// EngineCell is the engine's in-process time for one operation.
type EngineCell struct {
	Op string
	// Store is "memory" (no persistence), "sync" (the image written in
	// place and fdatasynced: the disk's floor), "file" (an atomic, fsynced
	// file per change) or "vtpmd" (vtpmd's own store).
	Store string
	Ops   int64
	// Commands is the number of TPM commands one operation sends (0 in
	// the results of runs that did not count them: one).
	Commands float64 `json:",omitempty"`
	Mean     time.Duration
	P50      time.Duration
	P99      time.Duration
	Error    string `json:",omitempty"`
}

// Memory is the median memory of idle instances of a daemon while VMs of
// them run.
type Memory struct {
	Daemon string
	VMs    int
	RSSKiB int64
	PSSKiB int64
	// SupervisorPSSKiB is, for a daemon that serves its VMs from workers
	// of one supervisor (vtpmd serve), the supervisor's PSS divided by the
	// VMs; RSSKiB is then a worker's (median) and PSSKiB the workers' sum
	// divided by the VMs.
	SupervisorPSSKiB int64 `json:",omitempty"`
}

// PSSPerVMKiB is the PSS an idle VM costs: its process's, or for a
// supervisor's workers, theirs and its share of the supervisor's.
func (m Memory) PSSPerVMKiB() int64 { return m.PSSKiB + m.SupervisorPSSKiB }

// Startup is the time from process start to the first answered command.
type Startup struct {
	Daemon string
	// State is "new" (an empty state directory: the TPM is manufactured)
	// or "existing".
	State   string
	Samples []time.Duration
	Median  time.Duration
}

// Cell returns the cell of daemon, op and vms, if there is one.
func (r *Report) Cell(daemon, op string, vms int) (Cell, bool) {
	for _, c := range r.Cells {
		if c.Daemon == daemon && c.Op == op && c.VMs == vms {
			return c, true
		}
	}
	return Cell{}, false
}

// EngineCell returns the engine cell of op with store, if there is one.
func (r *Report) EngineCell(op, store string) (EngineCell, bool) {
	for _, c := range r.Engine {
		if c.Op == op && c.Store == store {
			return c, true
		}
	}
	return EngineCell{}, false
}

// MemoryOf returns the memory of daemon at vms, if measured.
func (r *Report) MemoryOf(daemon string, vms int) (Memory, bool) {
	for _, m := range r.Memory {
		if m.Daemon == daemon && m.VMs == vms {
			return m, true
		}
	}
	return Memory{}, false
}

// StartupOf returns the start-up time of daemon with state, if measured.
func (r *Report) StartupOf(daemon, state string) (Startup, bool) {
	for _, s := range r.Startup {
		if s.Daemon == daemon && s.State == state {
			return s, true
		}
	}
	return Startup{}, false
}

// ratio returns a/b, or NaN when either is missing or b is 0.
func ratio(a, b float64) float64 {
	// Zero is a value not measured (the CPU of a TPM the run did not start).
	if a == 0 || b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

// Subject is the daemon under test: the first that is not the baseline.
func (r *Report) Subject() string {
	for _, d := range r.Daemons {
		if d != Baseline {
			return d
		}
	}
	return ""
}

// HasBaseline reports whether the baseline daemon ran.
func (r *Report) HasBaseline() bool {
	for _, d := range r.Daemons {
		if d == Baseline {
			return true
		}
	}
	return false
}
