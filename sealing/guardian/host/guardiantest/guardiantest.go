// Package guardiantest runs guardians for the tests of hosts (the host
// package's and vtpmd's end-to-end tests) and for the benchmark: a replica
// in process (sealing/guardian/server on a local store) over HTTPS, which
// can go down and come back on the same address; or real processes, the
// vtpmd-guardian binary's replicas on its local store or on a cluster of
// Debian's etcd, with a vtpmd instance as a host's TPM.
package guardiantest

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
	"github.com/vtpmd/vtpmd/sealing/guardian/server"
)

// Guardian is one replica of the fabric "fabric1", serving until the test
// ends.
type Guardian struct {
	// URL is where it serves (https://127.0.0.1:port).
	URL string
	// CAFile is the guardian CA, which hosts trust.
	CAFile string
	// Admin is a client with the admin token.
	Admin *guardian.Client

	handler http.Handler
	tls     *tls.Config
	addr    string
	http    *http.Server
}

// Start serves a new guardian.
func Start(t testing.TB) *Guardian {
	t.Helper()
	keys, token, err := server.NewKeys("fabric1")
	require.NoError(t, err)
	store, err := server.OpenLocalStore(filepath.Join(t.TempDir(), "guardian"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	handler, err := server.New(server.Config{Name: "r1", Keys: keys, Store: store, Log: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	cert, err := keys.ServerCertificate([]string{"127.0.0.1"}, time.Hour)
	require.NoError(t, err)
	g := &Guardian{handler: handler, tls: &tls.Config{Certificates: []tls.Certificate{cert}}}
	g.CAFile = filepath.Join(t.TempDir(), "guardian-ca.pem")
	require.NoError(t, os.WriteFile(g.CAFile, keys.CAPEM(), 0o644))
	g.Up(t)
	t.Cleanup(func() { g.Down(t) })
	g.Admin, err = g.Config(t, "admin", "").Client()
	require.NoError(t, err)
	g.Admin.Token = token
	return g
}

// Up serves the guardian, on the address it had before if it had one.
func (g *Guardian) Up(t testing.TB) {
	t.Helper()
	addr := g.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	g.addr, g.URL = l.Addr().String(), "https://"+l.Addr().String()
	g.http = &http.Server{Handler: g.handler, TLSConfig: g.tls}
	go func() { _ = g.http.ServeTLS(l, "", "") }()
}

// Down stops serving: connections are refused.
func (g *Guardian) Down(t testing.TB) {
	t.Helper()
	if g.http != nil {
		require.NoError(t, g.http.Close())
		g.http = nil
	}
}

// ConfigJSON is a host's guardian config for this guardian: the host name,
// a 3 s start deadline, 1 s attempts, and more fields (",..." or "").
func (g *Guardian) ConfigJSON(name, more string) string {
	return hostConfig([]string{g.URL}, g.CAFile, name, 3*time.Second, more)
}

// Config is ConfigJSON parsed.
func (g *Guardian) Config(t testing.TB, name, more string) *host.Config {
	t.Helper()
	c, err := host.ParseConfig([]byte(g.ConfigJSON(name, more)), "/")
	require.NoError(t, err)
	return c
}

// ConfigFile writes ConfigJSON to a file and returns its path.
func (g *Guardian) ConfigFile(t testing.TB, name, more string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+"-guardian.json")
	require.NoError(t, os.WriteFile(path, []byte(g.ConfigJSON(name, more)), 0o644))
	return path
}

// Register adds a host with its identity to group.
func (g *Guardian) Register(t testing.TB, name, group string, id *guardian.HostIdentity) {
	t.Helper()
	var h guardian.Host
	require.NoError(t, g.Admin.Call(context.Background(), http.MethodPost, guardian.PathAdminHosts,
		&guardian.AddHostRequest{Name: name, Group: group, Identity: *id}, &h))
}

// Baseline records the group's baseline from boot's event log.
func (g *Guardian) Baseline(t testing.TB, group string, boot []measuredboot.Event) {
	t.Helper()
	log, err := measuredboot.Encode(boot)
	require.NoError(t, err)
	var b guardian.Baseline
	require.NoError(t, g.Admin.Call(context.Background(), http.MethodPost, guardian.PathAdminBaselines,
		&guardian.BaselineRequest{Group: group, EventLog: log}, &b))
}

// Audit reads the audit log.
func (g *Guardian) Audit(t testing.TB) []guardian.AuditEntry {
	t.Helper()
	var l guardian.AuditList
	require.NoError(t, g.Admin.Call(context.Background(), http.MethodGet, guardian.PathAdminAudit, nil, &l))
	return l.Entries
}
