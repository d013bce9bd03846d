package report

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Provisioning is the time to provision a new VM's TPM with the options
// libvirt gives swtpm_setup, for each tool, measured in the same run.
type Provisioning struct {
	// Args are the options given to every tool.
	Args []string
	// Tools are the tools measured, the one under test first.
	Tools []ProvisioningTool
	// Target is the wanted ratio of the baseline's median to the
	// subject's.
	Target float64
}

// ProvisioningTool is one tool's provisioning runs.
type ProvisioningTool struct {
	// Name is e.g. "vtpmd setup" or "swtpm_setup".
	Name    string
	Version string
	// Command is how it was run (the program and the options that are
	// not libvirt's).
	Command string
	// Samples are the wall times of the runs, process start to exit;
	// CPU the user+system CPU of each (with the processes it waited for).
	Samples []time.Duration
	CPU     []time.Duration
	Median  time.Duration
	P90     time.Duration
	// CPUMedian is the median of CPU.
	CPUMedian time.Duration
}

// NewProvisioningTool summarises the samples.
func NewProvisioningTool(name, version, command string, samples, cpu []time.Duration) ProvisioningTool {
	return ProvisioningTool{Name: name, Version: version, Command: command, Samples: samples, CPU: cpu,
		Median: Quantile(samples, 0.5), P90: Quantile(samples, 0.9), CPUMedian: Quantile(cpu, 0.5)}
}

// Quantile is the nearest-rank q-quantile of the samples (0 if none).
func Quantile(samples []time.Duration, q float64) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(i, 0)]
}

// Ratio is the baseline's median over the subject's (the first tool's):
// how many times faster the subject provisions; NaN without both.
func (p *Provisioning) Ratio() float64 {
	if p == nil || len(p.Tools) < 2 {
		return math.NaN()
	}
	return durRatio(p.Tools[1].Median, p.Tools[0].Median)
}

func (r *Report) provisioningTable() table {
	p := r.Provisioning
	t := table{title: fmt.Sprintf("Provisioning: a new VM's TPM with libvirt's swtpm_setup options (%d runs each)", len(p.Tools[0].Samples))}
	t.header = []string{""}
	for _, tool := range p.Tools {
		t.header = append(t.header, tool.Name)
	}
	if len(p.Tools) > 1 {
		t.header = append(t.header, fmt.Sprintf("ratio (%s / %s)", p.Tools[1].Name, p.Tools[0].Name))
	}
	row := func(label string, v func(ProvisioningTool) time.Duration) {
		cells := []string{label}
		for _, tool := range p.Tools {
			cells = append(cells, fmtDur(v(tool)))
		}
		if len(p.Tools) > 1 {
			cells = append(cells, fmtRatio(durRatio(v(p.Tools[1]), v(p.Tools[0]))))
		}
		t.rows = append(t.rows, cells)
	}
	row("median", func(p ProvisioningTool) time.Duration { return p.Median })
	row("p90", func(p ProvisioningTool) time.Duration { return p.P90 })
	row("best", func(p ProvisioningTool) time.Duration { return Quantile(p.Samples, 0) })
	row("CPU (median)", func(p ProvisioningTool) time.Duration { return p.CPUMedian })
	t.notes = append(t.notes, "options: "+strings.Join(p.Args, " ")+
		" (the EKs, their certificates and the platform certificate from a local CA, NV write-locked); every run on a new state directory, the tools taking turns; wall time from process start to exit; CPU is user+system of the tool and the processes it waited for.")
	for _, tool := range p.Tools {
		t.notes = append(t.notes, fmt.Sprintf("%s: %s (%s)", tool.Name, tool.Command, tool.Version))
	}
	if q := p.Ratio(); !math.IsNaN(q) && p.Target > 0 {
		verdict := "met"
		if q < p.Target {
			verdict = "missed"
		}
		t.notes = append(t.notes, fmt.Sprintf("target: %s at least %s faster (median): %s at %s.",
			p.Tools[0].Name, strconv.FormatFloat(p.Target, 'f', -1, 64)+"×", verdict, fmtRatio(q)))
	}
	return t
}
