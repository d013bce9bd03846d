package host

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

func TestConfigDefaultsAndPaths(t *testing.T) {
	c, err := ParseConfig([]byte(`{"urls":["https://g1:8443","https://g2:8443"],"ca_file":"ca.pem","host":"h1"}`), "/etc/vtpmd")
	require.NoError(t, err)
	assert.Equal(t, guardian.ModeTPM, c.Mode)
	assert.Equal(t, "/etc/vtpmd/ca.pem", c.CAFile, "relative to the config file")
	assert.Equal(t, DefaultHostTPM, c.HostTPM)
	assert.Equal(t, DefaultEventLog, c.EventLog)
	assert.Equal(t, DefaultPCRs, c.PCRs)
	assert.Equal(t, DefaultAttemptTimeout, time.Duration(c.AttemptTimeout))
	assert.Equal(t, DefaultStartDeadline, time.Duration(c.StartDeadline))
	assert.IsType(t, &TPM{}, c.Prover("/var/lib/vtpmd/guardian-host.key"))

	c, err = ParseConfig([]byte(`{"urls":["https://g1"],"ca_file":"/ca.pem","host":"h2","mode":"hostkey","start_deadline":"2s","attempt_timeout":"500ms"}`), "/x")
	require.NoError(t, err)
	assert.Equal(t, 2*time.Second, time.Duration(c.StartDeadline))
	assert.Equal(t, 500*time.Millisecond, time.Duration(c.AttemptTimeout))
	assert.Equal(t, &HostKey{Path: "/default.key"}, c.Prover("/default.key"))

	// What it reads back is what it wrote.
	b, err := json.Marshal(c)
	require.NoError(t, err)
	again, err := ParseConfig(b, "/x")
	require.NoError(t, err)
	assert.Equal(t, c, again)
}

func TestConfigErrorsNameTheField(t *testing.T) {
	for config, want := range map[string]string{
		`{}`:                                     "urls",
		`{"urls":["http://g1"],"ca_file":"/ca"}`: `url "http://g1"`,
		`{"urls":["https://g1"]}`:                "ca_file",
		`{"urls":["https://g1"],"ca_file":"/ca","mode":"magic"}`:         `mode "magic"`,
		`{"urls":["https://g1"],"ca_file":"/ca","host":"a b"}`:           `host name "a b"`,
		`{"urls":["https://g1"],"ca_file":"/ca","pcrs":[24]}`:            "PCR 24",
		`{"urls":["https://g1"],"ca_file":"/ca","start_deadline":"-1s"}`: `duration "-1s"`,
		`{"urls":["https://g1"],"ca_file":"/ca","start_deadline":5}`:     "duration: give a string",
		`{"urls":["https://g1"],"ca_file":"/ca","colour":"red"}`:         `unknown field "colour"`,
		`{"urls":["https://g1"],"ca_file":"/ca"} {}`:                     "data after",
	} {
		_, err := ParseConfig([]byte(config), "/")
		assert.ErrorContains(t, err, want, config)
		assert.ErrorContains(t, err, "guardian config", config)
	}
	_, err := LoadConfig(filepath.Join(t.TempDir(), "none.json"))
	assert.ErrorContains(t, err, "read guardian config")
}

func TestConfigClientTrustsOnlyTheCA(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "guardian.json")
	require.NoError(t, os.WriteFile(path, []byte(`{"urls":["https://g1"],"ca_file":"ca.pem","host":"h1"}`), 0o644))
	c, err := LoadConfig(path)
	require.NoError(t, err)
	_, err = c.Client()
	assert.ErrorContains(t, err, "read guardian CA")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca.pem"), []byte("not PEM"), 0o644))
	_, err = c.Client()
	assert.ErrorContains(t, err, "holds no PEM certificate")
}
