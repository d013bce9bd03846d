package host

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/safefile"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// KeySource obtains VM state keys from the guardian. A VM's key is wrapped
// in a protector beside its state; to open it the host attests, obtains a
// health certificate for a fresh transport key, and asks for the key's
// release. The key exists only in this process's memory.
type KeySource struct {
	// Client reaches the guardian's replicas, with failover and backoff.
	Client *guardian.Client
	// Host is this host's registered name.
	Host string
	// Prover makes the host's evidence.
	Prover Prover
	// ProtectorPath names the file holding a VM's protector, unless
	// Protectors is set.
	ProtectorPath func(vmID string) string
	// Protectors, if set, keeps the protectors instead of files (the
	// state store of `vtpmd serve`, through its supervisor).
	Protectors Protectors
	// StartDeadline bounds one VM's key (DefaultStartDeadline when zero).
	StartDeadline time.Duration
	// Log, if set, receives one line per attestation, release and new
	// protector; it names the VM (one KeySource serves one VM's process).
	Log *slog.Logger
	// Observe, if set, is told of every call to the guardian: its op
	// ("nonce", "attest", "release" or "keys") and its error (nil: ok).
	Observe func(op string, err error)

	mu   sync.Mutex
	cert *certificate // the cached health certificate, if any
}

// Protectors keeps the VMs' key protectors. A protector is no secret
// (worthless without the guardian).
type Protectors interface {
	// ReadProtector returns the VM's protector, or an error wrapping
	// fs.ErrNotExist if it has none.
	ReadProtector(vmID string) ([]byte, error)
	// CreateProtector stores the VM's protector durably, only if it has
	// none (else an error wrapping fs.ErrExist).
	CreateProtector(vmID string, p []byte) error
	// Where says where the VM's protector is kept, for messages.
	Where(vmID string) string
}

// protectorFiles keeps each protector in a file of its own.
type protectorFiles func(vmID string) string

func (f protectorFiles) ReadProtector(vmID string) ([]byte, error) {
	return safefile.Load(f(vmID), maxProtectorSize, false)
}

func (f protectorFiles) CreateProtector(vmID string, p []byte) error {
	return safefile.Create(f(vmID), p, 0o600)
}

func (f protectorFiles) Where(vmID string) string { return f(vmID) }

// maxProtectorSize bounds a protector read.
const maxProtectorSize = 64 << 10

// certificate is a health certificate and the transport key it was issued
// for.
type certificate struct {
	encoded   string
	notAfter  time.Time
	transport *guardian.EncryptionKey
}

// certMargin is how long before its end a cached certificate is renewed,
// so that it does not expire between Attest and Release.
const certMargin = 5 * time.Minute

// NewKeySource is the KeySource the configuration describes.
func NewKeySource(c *Config, defaultHostKey string, protectorPath func(vmID string) string, log *slog.Logger) (*KeySource, error) {
	client, err := c.Client()
	if err != nil {
		return nil, err
	}
	return &KeySource{
		Client:        client,
		Host:          c.Host,
		Prover:        c.Prover(defaultHostKey),
		ProtectorPath: protectorPath,
		StartDeadline: time.Duration(c.StartDeadline),
		Log:           log,
	}, nil
}

// Protection implements sealing.KeySource.
func (s *KeySource) Protection() string {
	return "guardian " + s.Host + " (" + strings.Join(s.Client.URLs, ", ") + ")"
}

// StateKey implements sealing.KeySource for a VM whose state may exist: it
// opens an existing protector and never makes a new one. A new VM's key
// comes from StartKey.
func (s *KeySource) StateKey(ctx context.Context, vmID string) (*sealing.Key, error) {
	return s.StartKey(ctx, vmID, true)
}

// StartKey returns the VM's state key when its TPM starts. stored says
// whether the VM has state already: a VM without state and without a
// protector gets a fresh key and protector; one with state but no
// protector is refused, since a new key would never open that state.
func (s *KeySource) StartKey(ctx context.Context, vmID string, stored bool) (*sealing.Key, error) {
	ctx, cancel := context.WithTimeout(ctx, orDefault(s.StartDeadline, DefaultStartDeadline))
	defer cancel()
	key, err := s.startKey(ctx, vmID, stored)
	if err != nil {
		return nil, fmt.Errorf("obtain the state key of VM %q from the guardian: %w", vmID, describe(err))
	}
	return key, nil
}

func (s *KeySource) startKey(ctx context.Context, vmID string, stored bool) (*sealing.Key, error) {
	store := s.protectors()
	protector, err := readProtector(store, vmID)
	switch {
	case errors.Is(err, fs.ErrNotExist) && stored:
		return nil, fmt.Errorf("the VM has state but its key protector %s is missing: restore it (a new key would not open the state)", store.Where(vmID))
	case errors.Is(err, fs.ErrNotExist):
		if protector, err = s.newProtector(ctx, vmID, store); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	cert, err := s.certificate(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := s.Client.Release(ctx, &guardian.ReleaseRequest{VMID: vmID, Protector: protector, Certificate: cert.encoded})
	s.observe("release", err)
	if code := guardian.CodeOf(err); code == guardian.CodeCertExpired || code == guardian.CodeCertInvalid {
		s.forget(cert) // the next start attests again
	}
	if err != nil {
		return nil, fmt.Errorf("release: %w", err)
	}
	secret, err := cert.transport.OpenRelease(vmID, resp.Wrapped)
	if err != nil {
		return nil, err
	}
	defer clear(secret)
	s.logInfo("guardian released the state key", "role", resp.Role)
	return sealing.NewKey(keyID(protector), secret)
}

// newProtector wraps a fresh key to the guardian and stores the protector
// durably before the key is used: a key whose protector could be lost
// would seal state that nothing can open.
func (s *KeySource) newProtector(ctx context.Context, vmID string, store Protectors) (*guardian.Protector, error) {
	keys, err := s.Client.Keys(ctx)
	s.observe("keys", err)
	if err != nil {
		return nil, fmt.Errorf("fetch the guardian's public key: %w", err)
	}
	secret, err := guardian.NewStateKey()
	if err != nil {
		return nil, err
	}
	defer clear(secret)
	p, err := guardian.NewProtector(vmID, secret, guardian.Recipient{Name: keys.Name, Public: keys.Encryption})
	if err != nil {
		return nil, err
	}
	b, err := p.Marshal()
	if err != nil {
		return nil, err
	}
	if err := store.CreateProtector(vmID, b); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Another start made one first: use it, never ours.
			return readProtector(store, vmID)
		}
		return nil, fmt.Errorf("store the key protector: %w", err)
	}
	s.logInfo("new key protector", "stored", store.Where(vmID), "guardian", keys.Name)
	return p, nil
}

// certificate is the cached health certificate, or a new one: the host
// attests with evidence bound to a fresh transport key.
func (s *KeySource) certificate(ctx context.Context) (*certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.cert; c != nil && time.Now().Add(certMargin).Before(c.notAfter) {
		return c, nil
	}
	s.cert = nil
	transport, err := guardian.NewEncryptionKey()
	if err != nil {
		return nil, err
	}
	nonce, err := s.Client.Nonce(ctx, s.Host)
	s.observe("nonce", err)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	req, err := s.Prover.Evidence(nonce.Nonce, transport.Public())
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	req.Host = s.Host
	resp, err := s.Client.Attest(ctx, req)
	s.observe("attest", err)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	s.cert = &certificate{encoded: resp.Certificate, notAfter: resp.NotAfter, transport: transport}
	s.logInfo("attested to the guardian", "host", s.Host, "not_after", resp.NotAfter)
	return s.cert, nil
}

// forget drops the cached certificate if it is still c.
func (s *KeySource) forget(c *certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert == c {
		s.cert = nil
	}
}

func (s *KeySource) observe(op string, err error) {
	if s.Observe != nil {
		s.Observe(op, err)
	}
}

// protectors is where the protectors are kept.
func (s *KeySource) protectors() Protectors {
	if s.Protectors != nil {
		return s.Protectors
	}
	return protectorFiles(s.ProtectorPath)
}

func (s *KeySource) logInfo(msg string, args ...any) {
	if s.Log != nil {
		s.Log.Info(msg, args...)
	}
}

// refusalReasons are the words a log names a guardian's refusal by.
var refusalReasons = map[guardian.Code]string{
	guardian.CodeUnknownHost:      "unknown host (not registered with the guardian)",
	guardian.CodeBadNonce:         "not attested (nonce refused)",
	guardian.CodeNonceReplayed:    "not attested (nonce replayed)",
	guardian.CodeNotAttested:      "not attested",
	guardian.CodeBaselineMismatch: "baseline mismatch",
	guardian.CodeNoBaseline:       "not attested (no baseline recorded for the host's group)",
	guardian.CodeCertExpired:      "not attested (health certificate expired)",
	guardian.CodeCertInvalid:      "not attested (health certificate invalid)",
	guardian.CodeWrongVM:          "wrong VM",
	guardian.CodeNotGranted:       "not granted (the protector holds no key of this guardian)",
	guardian.CodeBadProtector:     "bad protector",
}

// describe puts the reason first: "baseline mismatch: ...".
func describe(err error) error {
	if reason, ok := refusalReasons[guardian.CodeOf(err)]; ok {
		return fmt.Errorf("%s: %w", reason, err)
	}
	return err
}

// readProtector reads a VM's protector. It is no secret (worthless without
// the guardian), so a file's mode is not checked.
func readProtector(store Protectors, vmID string) (*guardian.Protector, error) {
	b, err := store.ReadProtector(vmID)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("read key protector: %w", err)
	}
	p, err := guardian.ParseProtector(b)
	if err != nil {
		return nil, fmt.Errorf("read key protector %s: %w", store.Where(vmID), err)
	}
	return p, nil
}

// keyID names a protector's key in envelopes: the owner's wrap, which
// grants leave alone, identifies the key without revealing it.
func keyID(p *guardian.Protector) string {
	for _, w := range p.Wraps {
		if w.Role == guardian.RoleOwner {
			return "guardian:" + guardian.KeyID(w.Wrapped)
		}
	}
	return "guardian" // a parsed protector has exactly one owner
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
