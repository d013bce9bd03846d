package metrics

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

func command(cc uint32) []byte {
	return []byte{0x80, 0x01, 0, 0, 0, 0x0c, byte(cc >> 24), byte(cc >> 16), byte(cc >> 8), byte(cc), 0, 8}
}

// Commands are counted by code, made-up codes together as "other", with
// their latency in the right bucket.
func TestCommands(t *testing.T) {
	var c Commands
	assert.Empty(t, c.Stats().Commands)
	c.Observe(CommandCode(command(uint32(tpm2.TPMCCGetRandom))), 30*time.Microsecond)
	c.Observe(CommandCode(command(uint32(tpm2.TPMCCGetRandom))), 25*time.Microsecond)
	c.Observe(CommandCode(command(uint32(tpm2.TPMCCNVWrite))), 3*time.Second)
	c.Observe(CommandCode(command(0xdeadbeef)), time.Minute)
	c.Observe(CommandCode([]byte{0x80}), time.Millisecond)

	st := c.Stats()
	require.Len(t, st.Commands, 3)
	other, nvWrite, getRandom := st.Commands[0], st.Commands[1], st.Commands[2]
	assert.Equal(t, "other", CommandName(other.Code))
	assert.Equal(t, uint64(2), other.Count)
	assert.Equal(t, "NVWrite", CommandName(nvWrite.Code))
	assert.Equal(t, "GetRandom", CommandName(getRandom.Code))
	assert.Equal(t, uint64(55*time.Microsecond), getRandom.Nanos)

	b, err := Cumulative(getRandom)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), b[25e-6], "25 µs is in the 25 µs bucket")
	assert.Equal(t, uint64(2), b[50e-6])
	assert.Equal(t, uint64(2), b[10])
	b, err = Cumulative(other)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), b[10], "a minute is beyond the last bucket")

	// A snapshot is a copy.
	c.Observe(getRandom.Code, time.Microsecond)
	assert.Equal(t, uint64(2), getRandom.Count)
	assert.Equal(t, uint64(1), getRandom.Buckets[0])
}

// Counts kept elsewhere (the direct loop's) add to those observed, by code,
// codes that are no TPM 2.0 command's as "other"; the snapshot leaves the
// counts as they were.
func TestCommandsStatsWithMore(t *testing.T) {
	var c Commands
	c.Observe(uint32(tpm2.TPMCCGetRandom), 30*time.Microsecond)
	c.Observe(uint32(tpm2.TPMCCStartup), 30*time.Microsecond)
	buckets := func(i int, n uint64) []uint64 {
		b := make([]uint64, len(Buckets))
		b[i] = n
		return b
	}
	st := c.Stats(
		workerproto.CommandStats{Code: uint32(tpm2.TPMCCGetRandom), Count: 3, Nanos: 60000, Buckets: buckets(1, 3)},
		workerproto.CommandStats{Code: uint32(tpm2.TPMCCNVWrite), Count: 2, Nanos: 2000000, Buckets: buckets(5, 2)},
		workerproto.CommandStats{Code: 0x1ff, Count: 1, Nanos: 1, Buckets: buckets(0, 1)},
		workerproto.CommandStats{Code: Other, Count: 2, Nanos: 1, Buckets: buckets(0, 1)},
	)
	assert.Equal(t, []workerproto.CommandStats{
		{Code: Other, Count: 3, Nanos: 2, Buckets: buckets(0, 2)},
		{Code: uint32(tpm2.TPMCCNVWrite), Count: 2, Nanos: 2000000, Buckets: buckets(5, 2)},
		{Code: uint32(tpm2.TPMCCStartup), Count: 1, Nanos: 30000, Buckets: buckets(1, 1)},
		{Code: uint32(tpm2.TPMCCGetRandom), Count: 4, Nanos: 90000, Buckets: buckets(1, 4)},
	}, st.Commands)
	assert.Equal(t, []workerproto.CommandStats{
		{Code: uint32(tpm2.TPMCCStartup), Count: 1, Nanos: 30000, Buckets: buckets(1, 1)},
		{Code: uint32(tpm2.TPMCCGetRandom), Count: 1, Nanos: 30000, Buckets: buckets(1, 1)},
	}, c.Stats().Commands)
}

// A worker's counts that do not fit the buckets are refused.
func TestCumulativeRefuses(t *testing.T) {
	_, err := Cumulative(workerproto.CommandStats{Code: 1, Count: 1, Buckets: []uint64{1}})
	assert.ErrorContains(t, err, "latency buckets")
	bad := workerproto.CommandStats{Code: 1, Count: 1, Buckets: make([]uint64, len(Buckets))}
	bad.Buckets[0], bad.Buckets[1] = 1, 1
	_, err = Cumulative(bad)
	assert.ErrorContains(t, err, "2 in the buckets, 1 counted")
}

// The cost a TPM command pays for being counted.
func BenchmarkObserve(b *testing.B) {
	var c Commands
	cmd := command(uint32(tpm2.TPMCCNVWrite))
	for b.Loop() {
		start := time.Now()
		c.Observe(CommandCode(cmd), time.Since(start))
	}
}

// Guardian calls are counted by op and result: ok, the refusal's code, or
// unreachable; anything else is "other".
func TestGuardianCalls(t *testing.T) {
	var g GuardianCalls
	assert.Empty(t, g.Stats())
	g.Observe("nonce", nil)
	g.Observe("release", nil)
	g.Observe("release", nil)
	g.Observe("attest", fmt.Errorf("attest: %w", guardian.Errorf(guardian.CodeBaselineMismatch, "PCR 0")))
	g.Observe("release", &guardian.UnreachableError{Op: "POST /v1/release"})
	g.Observe("keys", &guardian.Error{Code: "made_up"})
	g.Observe("keys", errors.New("marshal"))
	assert.Equal(t, []workerproto.GuardianCalls{
		{Op: "attest", Result: "baseline_mismatch", Count: 1},
		{Op: "keys", Result: "other", Count: 2},
		{Op: "nonce", Result: "ok", Count: 1},
		{Op: "release", Result: "ok", Count: 2},
		{Op: "release", Result: "unreachable", Count: 1},
	}, g.Stats())
	assert.True(t, ValidGuardianCall("release", "wrong_vm"))
	assert.False(t, ValidGuardianCall("release", "made_up"))
	assert.False(t, ValidGuardianCall("dance", "ok"))
}
