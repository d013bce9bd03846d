package report

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestKeyReleaseTable(t *testing.T) {
	r := sample()
	r.KeyRelease = &KeyRelease{Method: "CMD_INIT of an existing VM", Notes: []string{"3 replicas: skipped"}, Setups: []KeyReleaseSetup{
		NewKeyReleaseSetup("no guardian", ms(10, 12, 11, 10, 15)),
		NewKeyReleaseSetup("1 replica (local store)", ms(60, 70, 65, 61, 90)),
	}}
	var md, text, js bytes.Buffer
	require.NoError(t, r.Markdown(&md, ""))
	require.NoError(t, r.Text(&text))
	require.NoError(t, r.JSON(&js))
	assert.Contains(t, md.String(), "| no guardian | 11.0ms | 15.0ms |  |  |")
	assert.Contains(t, md.String(), "| 1 replica (local store) | 65.0ms | 90.0ms | 54.0ms | 75.0ms |")
	assert.Contains(t, text.String(), "CMD_INIT of an existing VM")
	assert.Contains(t, text.String(), "3 replicas: skipped")
	var back Report
	require.NoError(t, json.Unmarshal(js.Bytes(), &back))
	assert.Equal(t, r.KeyRelease, back.KeyRelease)
}
