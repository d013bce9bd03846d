package report

import (
	"fmt"
	"time"
)

// KeyRelease is the time a VM's start spends in the guardian: attestation
// and key release, with each guardian setup, beside the same start
// without a guardian.
type KeyRelease struct {
	// Method says what was measured.
	Method string
	// Setups are "no guardian" first, then each guardian setup.
	Setups []KeyReleaseSetup
	// Notes are remarks (a setup skipped, and why).
	Notes []string `json:",omitempty"`
}

// KeyReleaseSetup is one setup's starts.
type KeyReleaseSetup struct {
	// Name is e.g. "no guardian", "1 replica (local store)".
	Name string
	// Samples are the CMD_INIT times.
	Samples []time.Duration
	Median  time.Duration
	P90     time.Duration
}

// NewKeyReleaseSetup summarises the samples.
func NewKeyReleaseSetup(name string, samples []time.Duration) KeyReleaseSetup {
	return KeyReleaseSetup{Name: name, Samples: samples, Median: Quantile(samples, 0.5), P90: Quantile(samples, 0.9)}
}

func (r *Report) keyReleaseTable() table {
	k := r.KeyRelease
	t := table{title: fmt.Sprintf("Guardian: a VM start's attestation and key release (%d starts each)", len(k.Setups[0].Samples))}
	t.header = []string{"setup", "CMD_INIT median", "p90", "guardian's share (median)", "guardian's share (p90)"}
	plain := k.Setups[0]
	for i, s := range k.Setups {
		row := []string{s.Name, fmtDur(s.Median), fmtDur(s.P90), "", ""}
		if i > 0 {
			row[3], row[4] = fmtDur(s.Median-plain.Median), fmtDur(s.P90-plain.P90)
		}
		t.rows = append(t.rows, row)
	}
	t.notes = append(t.notes, k.Method)
	t.notes = append(t.notes, k.Notes...)
	return t
}
