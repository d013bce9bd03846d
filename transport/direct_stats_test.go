package transport

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// directCounts are a DirectStats' counts by code.
type directCounts struct {
	count, nanos uint64
	buckets      []uint64
}

func readDirectStats(s *DirectStats) map[uint32]directCounts {
	out := map[uint32]directCounts{}
	s.Each(func(code uint32, count, nanos uint64, buckets []uint64) {
		out[code] = directCounts{count, nanos, buckets}
	})
	return out
}

// The direct loop counts each command it runs, by command code, in the
// bucket of its duration, before the response goes: a client that has the
// response finds it counted. Commands of Go's path (a connection's first,
// odd ones) are not counted there: they reach Execute.
func TestDirectStats(t *testing.T) {
	stats, err := NewDirectStats([]time.Duration{time.Nanosecond, time.Hour})
	require.NoError(t, err)
	_, _, data := serveData(t, asDevice, nil, func(s *Server) { s.DirectStats = stats })
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))
	assert.Empty(t, readDirectStats(stats), "the first command went through Go's path")

	for range 3 {
		assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
	}
	got := readDirectStats(stats)
	require.Contains(t, got, uint32(0x17b))
	assert.Equal(t, uint64(3), got[0x17b].count)
	assert.Positive(t, got[0x17b].nanos)
	assert.Equal(t, []uint64{0, 3}, got[0x17b].buckets, "every GetRandom over 1 ns and within an hour")

	assert.Equal(t, "80010000000a00000142", exchange(t, data, "8001000000040000017b"), "a size below the header's: Go's path")
	// A vendor command code, answered by the engine with an error.
	assert.Equal(t, "8001", exchange(t, data, "800100000012200000000000000000000000")[:4])
	assert.Equal(t, "80010000000a00000000", exchange(t, data, shutdownSt), "Shutdown(STATE), held until stored")
	got = readDirectStats(stats)
	assert.Equal(t, map[uint32]directCounts{
		0x17b: {3, got[0x17b].nanos, []uint64{0, 3}},
		0:     {1, got[0].nanos, []uint64{0, 1}},
		0x145: {1, got[0x145].nanos, []uint64{0, 1}},
	}, got)
}

// A command beyond the last bound is counted in no bucket, as
// metrics.Commands.Observe does.
func TestDirectStatsBeyondTheLastBucket(t *testing.T) {
	stats, err := NewDirectStats([]time.Duration{time.Nanosecond})
	require.NoError(t, err)
	_, _, data := serveData(t, asDevice, nil, func(s *Server) { s.DirectStats = stats })
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))
	assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
	got := readDirectStats(stats)
	assert.Equal(t, uint64(1), got[0x17b].count)
	assert.Equal(t, []uint64{0}, got[0x17b].buckets)

	_, err = NewDirectStats(make([]time.Duration, 25))
	assert.ErrorContains(t, err, "25 latency buckets")
}
