package server

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/internal/measuredboot/measuredboottest"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

// clock is a settable test clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fabric is one guardian (one replica) on a local store, with a host client
// and an admin client.
type fabric struct {
	keys   *Keys
	store  Store
	clock  *clock
	url    string
	client *guardian.Client // the hosts' client
	admin  *guardian.Client // with the admin token
}

func newFabric(t *testing.T, name string) *fabric {
	t.Helper()
	keys, token, err := NewKeys(name)
	require.NoError(t, err)
	st, err := OpenLocalStore(filepath.Join(t.TempDir(), "store"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	return newReplica(t, keys, token, st, "r1")
}

// newReplica serves keys and st as one more replica.
func newReplica(t *testing.T, keys *Keys, token string, st Store, name string) *fabric {
	t.Helper()
	f := &fabric{keys: keys, store: st, clock: &clock{now: time.Now()}}
	srv, err := New(Config{Name: name, Keys: keys, Store: st, Now: f.clock.Now, Observe: recordSeed, Log: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	f.url = ts.URL
	f.client = &guardian.Client{URLs: []string{ts.URL}, HTTP: ts.Client(), AttemptTimeout: 10 * time.Second}
	f.admin = &guardian.Client{URLs: []string{ts.URL}, HTTP: ts.Client(), AttemptTimeout: 10 * time.Second, Token: token}
	return f
}

func (f *fabric) recipient(t *testing.T) guardian.Recipient {
	t.Helper()
	k, err := f.client.Keys(context.Background())
	require.NoError(t, err)
	return guardian.Recipient{Name: k.Name, Public: k.Encryption}
}

// register adds a host through the admin API.
func (f *fabric) register(t *testing.T, name, group string, p host.Prover) {
	t.Helper()
	id, err := p.Identity()
	require.NoError(t, err)
	var h guardian.Host
	require.NoError(t, f.admin.Call(context.Background(), http.MethodPost, guardian.PathAdminHosts,
		&guardian.AddHostRequest{Name: name, Group: group, Identity: *id}, &h))
}

// attest runs a host's attestation: nonce, evidence, certificate.
func (f *fabric) attest(ctx context.Context, name string, p host.Prover) (string, *guardian.EncryptionKey, error) {
	transport, err := guardian.NewEncryptionKey()
	if err != nil {
		return "", nil, err
	}
	req, err := f.evidence(ctx, name, p, transport)
	if err != nil {
		return "", nil, err
	}
	resp, err := f.client.Attest(ctx, req)
	if err != nil {
		return "", nil, err
	}
	return resp.Certificate, transport, nil
}

// evidence asks a nonce for the host name and has p answer it, for
// transport.
func (f *fabric) evidence(ctx context.Context, name string, p host.Prover, transport *guardian.EncryptionKey) (*guardian.AttestRequest, error) {
	n, err := f.client.Nonce(ctx, name)
	if err != nil {
		return nil, err
	}
	req, err := p.Evidence(n.Nonce, transport.Public())
	if err != nil {
		return nil, err
	}
	req.Host = name
	return req, nil
}

// audit reads the audit log.
func (f *fabric) audit(t *testing.T) []guardian.AuditEntry {
	t.Helper()
	var l guardian.AuditList
	require.NoError(t, f.admin.Call(context.Background(), http.MethodGet, guardian.PathAdminAudit, nil, &l))
	return l.Entries
}

// bootedHost is a TPM-mode host: the simulator after boot, and boot's
// event log.
func bootedHost(t *testing.T, boot []measuredboot.Event) (*host.TPM, []byte) {
	t.Helper()
	open, eventLog := measuredboottest.Booted(t, boot)
	log, err := os.ReadFile(eventLog)
	require.NoError(t, err)
	return &host.TPM{Open: open, EventLog: eventLog}, log
}

func hostKeyHost(t *testing.T) *host.HostKey {
	return &host.HostKey{Path: filepath.Join(t.TempDir(), "host-key.pem")}
}
