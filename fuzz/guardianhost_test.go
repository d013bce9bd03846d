package fuzz

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

// FuzzGuardianHostConfig: host.ParseConfig never panics; an error names the
// guardian config; what it accepts is complete (URLs, CA, a host name, a
// mode, a start deadline) and reads back the same from its own encoding.
// Each input is also tried as a duration.
func FuzzGuardianHostConfig(f *testing.F) {
	for _, s := range []string{
		`{"urls":["https://g1.example:8443","https://g2.example:8443"],"ca_file":"/etc/vtpmd/guardian-ca.pem","host":"host1"}`,
		`{"urls":["https://g1"],"ca_file":"ca.pem","host":"h2","mode":"hostkey","host_key_file":"k.pem","start_deadline":"2s","attempt_timeout":"500ms"}`,
		`{"urls":["https://[::1]:8443"],"ca_file":"/ca","host":"h.3","mode":"tpm","host_tpm":"unix:/run/host-tpm.sock","event_log":"/log","pcrs":[0,7,23]}`,
		`{"urls":["http://g1"],"ca_file":"/ca"}`,
		`{"urls":[],"start_deadline":"1h"}`,
		`"5s"`, `"-1s"`, `5`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var d host.Duration
		if err := d.UnmarshalJSON(b); err == nil && d <= 0 {
			t.Fatalf("duration %q read as %v", b, d)
		}
		c, err := host.ParseConfig(b, "/etc/vtpmd")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "guardian config: ") {
				t.Fatalf("error %q does not name the guardian config", err)
			}
			return
		}
		if len(c.URLs) == 0 || c.CAFile == "" || c.Host == "" || c.Mode == "" || c.StartDeadline <= 0 || c.AttemptTimeout <= 0 {
			t.Fatalf("accepted an incomplete config: %+v", c)
		}
		enc, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		again, err := host.ParseConfig(enc, "/elsewhere")
		if err != nil || !reflect.DeepEqual(c, again) {
			t.Fatalf("config %+v reads back as %+v (%v)", c, again, err)
		}
	})
}
