package worker

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// The worker takes a second P once its durable writes come every few
// milliseconds, gives it back when they thin out, and changes at most once
// per switchEvery.
func TestPacerFollowsTheWriteRate(t *testing.T) {
	var set []int
	p := &pacer{procs: 1, meanGap: onePAbove, setProcs: func(n int) int { set = append(set, n); return 0 }}
	now := time.Unix(1000, 0)
	write := func(gap time.Duration, n int) {
		for range n {
			now = now.Add(gap)
			p.write(now)
		}
	}

	write(20*time.Millisecond, 20)
	assert.Empty(t, set, "sparse writes keep one P")
	write(time.Millisecond, 4)
	assert.Empty(t, set, "a few quick writes are not yet a rate")
	write(time.Millisecond, 10)
	assert.Equal(t, []int{2}, set, "quick writes take a second P")
	assert.Equal(t, 2, p.procs)

	write(50*time.Millisecond, 1)
	assert.Equal(t, []int{2}, set, "no change within switchEvery of the last")
	write(50*time.Millisecond, 2)
	assert.Equal(t, []int{2, 1}, set, "sparse writes give it back")
	assert.Equal(t, 1, p.procs)
}
