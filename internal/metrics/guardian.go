package metrics

import (
	"cmp"
	"errors"
	"slices"
	"sync"

	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// GuardianOps are the op labels of the guardian calls.
var GuardianOps = []string{"nonce", "attest", "release", "keys"}

// Result labels of a guardian call other than a refusal code.
const (
	ResultOK          = "ok"
	ResultUnreachable = "unreachable"
	ResultOther       = "other" // neither an answer nor unreachable, or an unknown code
)

// refusalCodes are the codes a result label may be: a guardian sending
// made-up codes cannot make the series grow.
var refusalCodes = func() map[string]bool {
	m := map[string]bool{}
	for _, c := range []guardian.Code{guardian.CodeBadRequest, guardian.CodeUnknownHost, guardian.CodeBadNonce,
		guardian.CodeNonceReplayed, guardian.CodeNotAttested, guardian.CodeBaselineMismatch, guardian.CodeNoBaseline,
		guardian.CodeCertExpired, guardian.CodeCertInvalid, guardian.CodeWrongVM, guardian.CodeNotGranted,
		guardian.CodeBadProtector, guardian.CodeUnauthorized, guardian.CodeNotFound, guardian.CodeConflict,
		guardian.CodeUnavailable, guardian.CodeInternal} {
		m[string(c)] = true
	}
	return m
}()

// GuardianResult is the result label of a guardian call that ended with
// err: "ok", the refusal's code, or "unreachable" (no replica answered).
func GuardianResult(err error) string {
	var unreachable *guardian.UnreachableError
	switch code := string(guardian.CodeOf(err)); {
	case err == nil:
		return ResultOK
	case refusalCodes[code]:
		return code
	case errors.As(err, &unreachable):
		return ResultUnreachable
	}
	return ResultOther
}

// ValidGuardianCall says whether op and result are labels a worker may
// report, so that a worker cannot make the series grow either.
func ValidGuardianCall(op, result string) bool {
	return slices.Contains(GuardianOps, op) &&
		(refusalCodes[result] || result == ResultOK || result == ResultUnreachable || result == ResultOther)
}

// GuardianCalls counts a worker's calls to the guardian by op and result.
// The zero value is ready.
type GuardianCalls struct {
	mu sync.Mutex
	n  map[[2]string]uint64
}

// Observe counts one call of op that ended with err; it is a
// host.KeySource's Observe.
func (g *GuardianCalls) Observe(op string, err error) {
	key := [2]string{op, GuardianResult(err)}
	g.mu.Lock()
	if g.n == nil {
		g.n = map[[2]string]uint64{}
	}
	g.n[key]++
	g.mu.Unlock()
}

// Stats is a snapshot of the counts, by op and result.
func (g *GuardianCalls) Stats() []workerproto.GuardianCalls {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []workerproto.GuardianCalls
	for k, n := range g.n {
		out = append(out, workerproto.GuardianCalls{Op: k[0], Result: k[1], Count: n})
	}
	slices.SortFunc(out, func(a, b workerproto.GuardianCalls) int {
		return cmp.Or(cmp.Compare(a.Op, b.Op), cmp.Compare(a.Result, b.Result))
	})
	return out
}
