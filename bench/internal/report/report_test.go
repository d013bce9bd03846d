package report

import (
	"bytes"
	"encoding/xml"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func sample() *Report {
	r := &Report{
		Daemons:  []string{"vtpmd", "swtpm"},
		Ops:      []Op{{Name: "getrandom", Title: "GetRandom(32)"}, {Name: "signecc", Title: "Sign(ECC)"}},
		Settings: Settings{VMs: []int{1, 4}, Duration: time.Second},
	}
	add := func(d, op string, vms int, rate, cpu float64) {
		r.Cells = append(r.Cells, Cell{Daemon: d, Op: op, VMs: vms, Ops: int64(rate), OpsPerSec: rate,
			P50: time.Millisecond, P99: 2 * time.Millisecond, Max: 3 * time.Millisecond, CPUPer1000: cpu})
	}
	add("vtpmd", "getrandom", 1, 200, 0.02)
	add("swtpm", "getrandom", 1, 100, 0.01)
	add("vtpmd", "signecc", 1, 50, 0.5)
	add("swtpm", "signecc", 1, 100, 0.5)
	add("vtpmd", "getrandom", 4, 400, 0.02)
	add("swtpm", "getrandom", 4, 400, 0.04)
	return r
}

func TestHeadlineIsGeometricMean(t *testing.T) {
	r := sample()
	q, n := r.Headline(1)
	assert.Equal(t, 2, n)
	assert.InDelta(t, 1.0, q, 1e-9, "sqrt(2 × 0.5)")
	q, n = r.Headline(0)
	assert.Equal(t, 3, n)
	assert.InDelta(t, 1.0, q, 1e-9)
	c, _ := r.CPUHeadline(4)
	assert.InDelta(t, 0.5, c, 1e-9)
	_, n = r.Headline(16)
	assert.Zero(t, n)
}

func TestRenderings(t *testing.T) {
	r := sample()
	var md, text, svg bytes.Buffer
	require.NoError(t, r.Markdown(&md, "results.svg"))
	require.NoError(t, r.Text(&text))
	require.NoError(t, r.SVG(&svg))
	assert.Contains(t, md.String(), "| getrandom | 1 | 200 | 100 | 2.00× |")
	assert.Contains(t, md.String(), "![Throughput against the number of VMs](results.svg)")
	assert.Contains(t, text.String(), "signecc")
	// A cell without a baseline shows dashes, not a ratio.
	assert.True(t, strings.Contains(md.String(), "| signecc | 1 |"))
	var doc struct{ XMLName xml.Name }
	require.NoError(t, xml.Unmarshal(svg.Bytes(), &doc), "the SVG is well-formed XML")
	assert.Equal(t, "svg", doc.XMLName.Local)
	assert.Equal(t, 4, strings.Count(svg.String(), "<polyline"), "a line per daemon and operation")
}

func TestFormats(t *testing.T) {
	assert.Equal(t, "31.2µs", fmtDur(31234*time.Nanosecond))
	assert.Equal(t, "1.22ms", fmtDur(1220*time.Microsecond))
	assert.Equal(t, "–", fmtDur(0))
	assert.Equal(t, "12345", fmtRate(12345.4))
	assert.Equal(t, "0.45×", fmtRatio(0.4512))
	assert.Equal(t, "–", fmtRatio(math.NaN()))
	top, step := niceScale(87000)
	assert.Equal(t, 25000.0, step)
	assert.Equal(t, 100000.0, top)
}
