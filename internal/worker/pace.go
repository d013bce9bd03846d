package worker

import (
	"runtime"
	"time"
)

// A durable write makes the worker's only busy goroutine wait twice, in a
// system call or in C: for the supervisor's fsync and for the next command.
// Go's sysmon handles such waits in one of two ways, each costly in its own
// case:
//
//   - With one P, it takes the P of a goroutine waiting 20 us, wakes another
//     thread to find no work, sleeps, and is woken again when the wait ends:
//     a few context switches per wait.
//   - With a second P idle, it leaves the waiting P alone for 10 ms. But
//     once it has taken a P after such a wait, the next system call wakes it
//     and it polls every 20 us for a millisecond or more: dozens of context
//     switches. It also takes the P of a goroutine that has not been
//     scheduled for 10 ms, and the direct loop's goroutine never is.
//
// So a worker runs with two Ps while its TPM stores state more often than
// every few milliseconds (measured: 64 busy VMs do 1.5 times the durable
// writes they do with one P), yielding now and then, and with one P
// otherwise (256 busy VMs, each waiting longer than 10 ms, do 1.6 to 2 times
// more with one).
const (
	// twoPsBelow and onePAbove are the mean gaps between durable writes under
	// which the worker takes a second P and over which it gives it back.
	twoPsBelow = 5 * time.Millisecond
	onePAbove  = 10 * time.Millisecond
	// switchEvery bounds how often the Ps change: each change stops the
	// world for a moment.
	switchEvery = 100 * time.Millisecond
	// yieldEvery keeps the goroutine scheduled at least that often with
	// two Ps.
	yieldEvery = 4 * time.Millisecond
)

// pacer sets the worker's Ps by the gaps between its durable writes. It is
// called by the goroutine that runs the TPM, at each write.
type pacer struct {
	last, switched, yielded time.Time
	meanGap                 time.Duration // moving average, 1/8 weight to the newest
	procs                   int
	setProcs                func(int) int // runtime.GOMAXPROCS
}

// newPacer starts from the sparse side: a few writes in quick succession
// do not take a second P.
func newPacer() *pacer {
	return &pacer{procs: runtime.GOMAXPROCS(0), meanGap: onePAbove, setProcs: runtime.GOMAXPROCS}
}

// write notes a durable write at now.
func (p *pacer) write(now time.Time) {
	if !p.last.IsZero() {
		p.meanGap += (now.Sub(p.last) - p.meanGap) / 8
	}
	p.last = now
	want := p.procs
	switch {
	case p.procs == 1 && p.meanGap < twoPsBelow:
		want = 2
	case p.procs == 2 && p.meanGap > onePAbove:
		want = 1
	}
	if want != p.procs && now.Sub(p.switched) >= switchEvery {
		p.setProcs(want)
		p.procs, p.switched, p.yielded = want, now, now
		return
	}
	if p.procs == 2 && now.Sub(p.yielded) >= yieldEvery {
		runtime.Gosched()
		p.yielded = now
	}
}
