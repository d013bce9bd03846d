package report

import (
	"bytes"
	"encoding/json"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func ms(v ...int) []time.Duration {
	var out []time.Duration
	for _, n := range v {
		out = append(out, time.Duration(n)*time.Millisecond)
	}
	return out
}

func TestQuantile(t *testing.T) {
	s := ms(50, 10, 40, 20, 30)
	assert.Equal(t, 30*time.Millisecond, Quantile(s, 0.5))
	assert.Equal(t, 50*time.Millisecond, Quantile(s, 0.9))
	assert.Equal(t, 10*time.Millisecond, Quantile(s, 0))
	assert.Equal(t, ms(50, 10, 40, 20, 30), s, "the samples keep their order")
	assert.Zero(t, Quantile(nil, 0.5))
}

func TestProvisioningTable(t *testing.T) {
	r := sample()
	r.Provisioning = &Provisioning{Args: []string{"--tpm2", "--createek"}, Target: 10, Tools: []ProvisioningTool{
		NewProvisioningTool("vtpmd setup", "v1", "vtpmd setup", ms(40, 50, 45, 41, 60), ms(40, 40, 40, 40, 40)),
		NewProvisioningTool("swtpm_setup", "0.7.1", "swtpm_setup", ms(600, 620, 640, 610, 700), ms(60, 60, 60, 60, 60)),
	}}
	assert.InDelta(t, 620.0/45, r.Provisioning.Ratio(), 1e-9)
	var md, text, js bytes.Buffer
	require.NoError(t, r.Markdown(&md, ""))
	require.NoError(t, r.Text(&text))
	require.NoError(t, r.JSON(&js))
	assert.Contains(t, md.String(), "| median | 45.0ms | 620ms | 13.8× |")
	assert.Contains(t, md.String(), "| p90 | 60.0ms | 700ms | 11.7× |")
	assert.Contains(t, text.String(), "target: vtpmd setup at least 10× faster (median): met at 13.8×.")
	var back Report
	require.NoError(t, json.Unmarshal(js.Bytes(), &back))
	assert.Equal(t, r.Provisioning, back.Provisioning)

	// Alone, without the baseline: no ratio, no verdict.
	r.Provisioning.Tools = r.Provisioning.Tools[:1]
	assert.True(t, math.IsNaN(r.Provisioning.Ratio()))
	md.Reset()
	require.NoError(t, r.Markdown(&md, ""))
	assert.Contains(t, md.String(), "| median | 45.0ms |\n")
	assert.NotContains(t, md.String(), "target:")
}
