package serve

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// The supervisor keeps one P while commits come one at a time, for
// aloneFor, and takes all its Ps at the first two that overlap.
func TestCommitPacerFollowsOverlap(t *testing.T) {
	var set []int
	now := time.Unix(1000, 0)
	p := &commitPacer{all: 4, procs: 4, setProcs: func(n int) int { set = append(set, n); return 0 }}
	p.lastMet.Store(now.UnixNano())
	commit := func(at time.Duration) {
		now = now.Add(at)
		p.begin(now)
		p.end()
	}

	for range 9 {
		commit(100 * time.Millisecond)
	}
	assert.Empty(t, set, "alone for less than aloneFor")
	commit(200 * time.Millisecond)
	assert.Equal(t, []int{1}, set, "alone for aloneFor: one P")

	now = now.Add(150 * time.Millisecond)
	p.begin(now) // two at once
	p.begin(now)
	p.end()
	p.end()
	assert.Equal(t, []int{1, 4}, set, "overlapping commits take all the Ps back")
	commit(10 * time.Millisecond)
	assert.Equal(t, []int{1, 4}, set, "and keep them")
}

// With GOMAXPROCS set by the environment, the operator's choice stands.
func TestCommitPacerLeavesTheEnvironmentsChoice(t *testing.T) {
	t.Setenv("GOMAXPROCS", "3")
	assert.Zero(t, newCommitPacer().all)
}
