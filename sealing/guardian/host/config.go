package host

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// Config is a host's guardian configuration, read from a JSON file
// (/etc/vtpmd/guardian.json).
type Config struct {
	// URLs are the guardian replicas' base URLs (https://...).
	URLs []string `json:"urls"`
	// CAFile is the guardian CA certificate (PEM) that the replicas' TLS
	// certificates chain to.
	CAFile string `json:"ca_file"`
	// Host is this host's registered name (default: the host name).
	Host string `json:"host,omitempty"`
	// Mode is guardian.ModeTPM (default) or guardian.ModeHostKey.
	Mode string `json:"mode,omitempty"`
	// HostTPM is the host TPM in TPM mode: a device (default /dev/tpmrm0)
	// or unix:PATH, the data socket of a vtpmd or swtpm instance.
	HostTPM string `json:"host_tpm,omitempty"`
	// EventLog is the measured-boot event log in TPM mode (default
	// /sys/kernel/security/tpm0/binary_bios_measurements).
	EventLog string `json:"event_log,omitempty"`
	// PCRs are the quoted SHA-256 PCRs in TPM mode (default 0-7).
	PCRs []int `json:"pcrs,omitempty"`
	// HostKeyFile is the host key in host-key mode (default given by the
	// daemon: guardian-host.key in its state root).
	HostKeyFile string `json:"host_key_file,omitempty"`
	// AttemptTimeout bounds one request to one replica (default 5s).
	AttemptTimeout Duration `json:"attempt_timeout,omitzero"`
	// StartDeadline bounds obtaining a VM's key at its start, failover
	// included (default 30s).
	StartDeadline Duration `json:"start_deadline,omitzero"`
}

// Defaults of Config.
const (
	DefaultHostTPM        = "/dev/tpmrm0"
	DefaultEventLog       = "/sys/kernel/security/tpm0/binary_bios_measurements"
	DefaultAttemptTimeout = 5 * time.Second
	DefaultStartDeadline  = 30 * time.Second
	maxConfigSize         = 64 << 10
)

// Duration is a time.Duration written as a Go duration string ("5s").
type Duration time.Duration

// UnmarshalJSON reads "5s", "1m30s"...
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration: give a string such as \"5s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil || v <= 0 {
		return fmt.Errorf("duration %q: give a positive duration such as \"5s\"", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// ParseConfig reads a guardian configuration strictly (no unknown fields),
// fills in the defaults, and checks it. Relative paths are taken relative
// to dir (the configuration file's directory).
func ParseConfig(b []byte, dir string) (*Config, error) {
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("guardian config: %d bytes exceeds %d", len(b), maxConfigSize)
	}
	var c Config
	if err := guardian.StrictJSON(b, &c); err != nil {
		return nil, fmt.Errorf("guardian config: %w", err)
	}
	if err := c.complete(dir); err != nil {
		return nil, fmt.Errorf("guardian config: %w", err)
	}
	return &c, nil
}

// LoadConfig reads the configuration file at path.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read guardian config: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("read guardian config: %w", err)
	}
	c, err := ParseConfig(b, filepath.Dir(abs))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func (c *Config) complete(dir string) error {
	if len(c.URLs) == 0 {
		return fmt.Errorf("urls: give the guardian replicas' URLs")
	}
	for _, u := range c.URLs {
		parsed, err := url.Parse(u)
		if err != nil || parsed.Scheme != "https" || parsed.Host == "" {
			return fmt.Errorf("url %q: give https://host[:port]", u)
		}
	}
	if c.CAFile == "" {
		return fmt.Errorf("ca_file: give the guardian CA certificate")
	}
	if c.Host == "" {
		name, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("host: no name given and the host name is unknown: %w", err)
		}
		c.Host = name
	}
	if err := guardian.ValidName("host", c.Host); err != nil {
		return err
	}
	switch c.Mode {
	case "":
		c.Mode = guardian.ModeTPM
	case guardian.ModeTPM, guardian.ModeHostKey:
	default:
		return fmt.Errorf("mode %q: use %q or %q", c.Mode, guardian.ModeTPM, guardian.ModeHostKey)
	}
	if c.Mode == guardian.ModeTPM {
		c.HostTPM = cmpOr(c.HostTPM, DefaultHostTPM)
		c.EventLog = cmpOr(c.EventLog, DefaultEventLog)
		if len(c.PCRs) == 0 {
			c.PCRs = slices.Clone(DefaultPCRs)
		}
		for _, p := range c.PCRs {
			if p < 0 || p > 23 {
				return fmt.Errorf("pcrs: PCR %d out of 0..23", p)
			}
		}
	}
	if c.AttemptTimeout == 0 {
		c.AttemptTimeout = Duration(DefaultAttemptTimeout)
	}
	if c.StartDeadline == 0 {
		c.StartDeadline = Duration(DefaultStartDeadline)
	}
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	abs(&c.CAFile)
	abs(&c.EventLog)
	abs(&c.HostKeyFile)
	if c.HostTPM != "" && c.HostTPM[0] != '/' && !hasUnixPrefix(c.HostTPM) {
		abs(&c.HostTPM)
	}
	return nil
}

func hasUnixPrefix(s string) bool { return len(s) > 5 && s[:5] == "unix:" }

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Prover is the evidence the configuration names. In host-key mode with no
// host_key_file, defaultHostKey is used.
func (c *Config) Prover(defaultHostKey string) Prover {
	if c.Mode == guardian.ModeHostKey {
		return &HostKey{Path: cmpOr(c.HostKeyFile, defaultHostKey)}
	}
	return &TPM{Open: OpenTPM(c.HostTPM), EventLog: c.EventLog, PCRs: c.PCRs}
}

// Client is a guardian client for the configured replicas, trusting only
// the guardian CA.
func (c *Config) Client() (*guardian.Client, error) {
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("read guardian CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("guardian CA %s holds no PEM certificate", c.CAFile)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	transport.Proxy = nil // a guardian is reached directly
	return &guardian.Client{
		URLs:           slices.Clone(c.URLs),
		HTTP:           &http.Client{Transport: transport},
		AttemptTimeout: time.Duration(c.AttemptTimeout),
	}, nil
}
