package serve

import (
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// The supervisor's Ps follow its commits. While they come one at a time
// (one VM writing), every commit is a relay between goroutines (the VM's,
// pebble's log writer and back), and with an idle P each hand-off wakes
// another thread: one P is faster (measured at 1 VM: 3.1-3.2k durable
// writes/s against 2.5-2.6k). Once commits meet, the Ps share the work: at
// 4 VMs one P did 5.2-5.7k against 6.5-6.8k.
const (
	// aloneFor is how long commits must have come one at a time before
	// the supervisor gives up its other Ps.
	aloneFor = time.Second
	// switchEvery bounds how often the Ps change: each change stops the
	// world for a moment.
	switchEvery = 100 * time.Millisecond
)

// commitPacer sets the supervisor's Ps by whether its commits overlap:
// one P after aloneFor without two at once, all of them again at the first
// overlap. It does nothing when the environment sets GOMAXPROCS (the
// operator's choice) or there is one CPU.
type commitPacer struct {
	all      int // the Ps for overlapping commits; 0: no pacing
	inflight atomic.Int32
	lastMet  atomic.Int64 // when two commits last overlapped, in Unix ns

	mu       sync.Mutex // one change at a time
	procs    int
	switched time.Time
	setProcs func(int) int // runtime.GOMAXPROCS
}

func newCommitPacer() *commitPacer {
	p := &commitPacer{procs: runtime.GOMAXPROCS(0), setProcs: runtime.GOMAXPROCS}
	if os.Getenv("GOMAXPROCS") == "" && p.procs > 1 {
		p.all = p.procs
	}
	p.lastMet.Store(time.Now().UnixNano())
	return p
}

// begin notes a commit that starts at now.
func (p *commitPacer) begin(now time.Time) {
	if p.inflight.Add(1) > 1 {
		p.lastMet.Store(now.UnixNano())
	}
	p.pace(now)
}

// end notes the end of a commit.
func (p *commitPacer) end() { p.inflight.Add(-1) }

func (p *commitPacer) pace(now time.Time) {
	if p.all == 0 || !p.mu.TryLock() {
		return
	}
	defer p.mu.Unlock()
	want := 1
	if now.UnixNano()-p.lastMet.Load() < int64(aloneFor) {
		want = p.all
	}
	if want != p.procs && now.Sub(p.switched) >= switchEvery {
		p.setProcs(want)
		p.procs, p.switched = want, now
	}
}
