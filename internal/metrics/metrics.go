package metrics

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/workerproto"
)

// Buckets are the upper bounds of the TPM command latency histograms, in
// seconds: from a GetRandom's tens of microseconds to an RSA key
// generation's seconds.
var Buckets = []float64{25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5, 10}

// Bounds are Buckets as durations.
var Bounds = func() []time.Duration {
	d := make([]time.Duration, len(Buckets))
	for i, s := range Buckets {
		d[i] = time.Duration(s * float64(time.Second))
	}
	return d
}()

// Other is the code under which a Commands counts every command code that
// is not a TPM 2.0 command (and a command too short to have one).
const Other = 0

// Commands counts a worker's TPM commands by command code, with their
// latency. The zero value is ready.
type Commands struct {
	mu     sync.Mutex
	byCode map[uint32]*workerproto.CommandStats
}

// CommandCode is the command code of a TPM command, or Other.
func CommandCode(cmd []byte) uint32 {
	if len(cmd) < 10 {
		return Other
	}
	return known(binary.BigEndian.Uint32(cmd[6:10]))
}

// known is code if it is a TPM 2.0 command code, else Other.
func known(code uint32) uint32 {
	if _, ok := commandNames[tpm2.TPMCC(code)]; !ok {
		return Other
	}
	return code
}

// Observe counts one command of the code (see CommandCode) that took d.
func (c *Commands) Observe(code uint32, d time.Duration) {
	i, _ := slices.BinarySearch(Bounds, d)
	c.mu.Lock()
	s := c.byCode[code]
	if s == nil {
		if c.byCode == nil {
			c.byCode = map[uint32]*workerproto.CommandStats{}
		}
		s = &workerproto.CommandStats{Code: code, Buckets: make([]uint64, len(Bounds))}
		c.byCode[code] = s
	}
	s.Count++
	s.Nanos += uint64(d)
	if i < len(s.Buckets) {
		s.Buckets[i]++
	}
	c.mu.Unlock()
}

// Stats is a snapshot of the counts, by code, with more added: counts kept
// elsewhere (the direct data loop's) with Bounds' buckets, whose codes need
// not be known.
func (c *Commands) Stats(more ...workerproto.CommandStats) workerproto.Stats {
	c.mu.Lock()
	byCode := make(map[uint32]workerproto.CommandStats, len(c.byCode)+len(more))
	for code, s := range c.byCode {
		cp := *s
		cp.Buckets = slices.Clone(s.Buckets)
		byCode[code] = cp
	}
	c.mu.Unlock()
	for _, m := range more {
		code := known(m.Code)
		s, ok := byCode[code]
		if !ok {
			s = workerproto.CommandStats{Code: code, Buckets: make([]uint64, len(Bounds))}
		}
		s.Count += m.Count
		s.Nanos += m.Nanos
		for i := range min(len(s.Buckets), len(m.Buckets)) {
			s.Buckets[i] += m.Buckets[i]
		}
		byCode[code] = s
	}
	out := workerproto.Stats{Commands: slices.Collect(maps.Values(byCode))}
	slices.SortFunc(out.Commands, func(a, b workerproto.CommandStats) int { return int(int64(a.Code) - int64(b.Code)) })
	return out
}

// CommandName is the command label of a code.
func CommandName(code uint32) string {
	if n, ok := commandNames[tpm2.TPMCC(code)]; ok {
		return n
	}
	return "other"
}

// Cumulative turns a CommandStats' bucket counts into the cumulative
// counts of a Prometheus histogram, keyed by upper bound. It fails if the
// worker's buckets are not Buckets or add up to more than Count.
func Cumulative(s workerproto.CommandStats) (map[float64]uint64, error) {
	if len(s.Buckets) != len(Buckets) {
		return nil, fmt.Errorf("command %#x: %d latency buckets, want %d", s.Code, len(s.Buckets), len(Buckets))
	}
	out := make(map[float64]uint64, len(Buckets))
	var sum uint64
	for i, n := range s.Buckets {
		sum += n
		out[Buckets[i]] = sum
	}
	if sum > s.Count {
		return nil, fmt.Errorf("command %#x: %d in the buckets, %d counted", s.Code, sum, s.Count)
	}
	return out, nil
}
