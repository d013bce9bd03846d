package etcdstore

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
	"github.com/vtpmd/vtpmd/sealing/guardian/server"
	"github.com/vtpmd/vtpmd/sealing/guardian/server/storetest"
)

func freeURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return "http://" + l.Addr().String()
}

// member starts a one-member cluster and connects a store to it.
func member(t *testing.T, prefix string) *Store {
	t.Helper()
	peer, client := freeURL(t), freeURL(t)
	e, err := StartMember(Member{Name: "m1", Dir: filepath.Join(t.TempDir(), "etcd"), PeerURLs: []string{peer}, ClientURLs: []string{client}, InitialCluster: "m1=" + peer})
	require.NoError(t, err)
	t.Cleanup(e.Close)
	st, err := Dial([]string{client}, prefix)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	return st
}

func TestStoreContract(t *testing.T) {
	st := member(t, DefaultPrefix)
	storetest.Run(t, st)

	// Keys are scoped to the prefix: another prefix sees none of them.
	other := New(st.cli, "/other/")
	kvs, err := other.List(context.Background(), "audit/", 0)
	require.NoError(t, err)
	assert.Empty(t, kvs)
}

func TestAGuardianOnEtcdKeepsNoPrivateKeyInTheClear(t *testing.T) {
	ctx := context.Background()
	st := member(t, DefaultPrefix)
	keys, token, err := server.NewKeys("fabric-a")
	require.NoError(t, err)
	kek, err := server.LoadKEK(filepath.Join(t.TempDir(), "kek"), true)
	require.NoError(t, err)
	sealed, err := server.SealKeys(keys, kek)
	require.NoError(t, err)
	require.NoError(t, st.Create(ctx, server.KeysKey, sealed, 0))

	// Two replicas on the one cluster: what one registers, the other serves.
	var urls []string
	for i := range 2 {
		srv, err := server.New(server.Config{Name: fmt.Sprintf("r%d", i+1), Keys: keys, Store: st, Log: slog.New(slog.DiscardHandler)})
		require.NoError(t, err)
		ts := httptest.NewServer(srv)
		t.Cleanup(ts.Close)
		urls = append(urls, ts.URL)
	}
	admin := &guardian.Client{URLs: urls[:1], Token: token}
	hk := &host.HostKey{Path: filepath.Join(t.TempDir(), "host-key.pem")}
	id, err := hk.Identity()
	require.NoError(t, err)
	require.NoError(t, admin.Call(ctx, http.MethodPost, guardian.PathAdminHosts, &guardian.AddHostRequest{Name: "h1", Group: "g", Identity: *id}, &guardian.Host{}))

	c := &guardian.Client{URLs: urls[1:], AttemptTimeout: 10 * time.Second}
	transport, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	n, err := c.Nonce(ctx, "h1")
	require.NoError(t, err)
	req, err := hk.Evidence(n.Nonce, transport.Public())
	require.NoError(t, err)
	req.Host = "h1"
	att, err := c.Attest(ctx, req)
	require.NoError(t, err, "a host registered through one replica attests at another")
	_, err = (&guardian.Client{URLs: urls[:1]}).Attest(ctx, req)
	assert.Equal(t, guardian.CodeNonceReplayed, guardian.CodeOf(err), "the nonce is spent at every replica: %v", err)

	stateKey, err := guardian.NewStateKey()
	require.NoError(t, err)
	p, err := guardian.NewProtector("vm-1", stateKey, guardian.Recipient{Name: "fabric-a", Public: keys.Encryption.Public()})
	require.NoError(t, err)
	rel, err := c.Release(ctx, &guardian.ReleaseRequest{VMID: "vm-1", Protector: p, Certificate: att.Certificate})
	require.NoError(t, err)
	got, err := transport.OpenRelease("vm-1", rel.Wrapped)
	require.NoError(t, err)
	assert.Equal(t, stateKey, got)

	var audit guardian.AuditList
	require.NoError(t, admin.Call(ctx, http.MethodGet, guardian.PathAdminAudit, nil, &audit))
	replicas := map[string]bool{}
	for _, e := range audit.Entries {
		replicas[e.Replica] = true
	}
	assert.Equal(t, map[string]bool{"r1": true, "r2": true}, replicas, "one audit log for both replicas")

	// Every value in etcd, the sealed bundle included.
	kvs, err := st.cli.Get(ctx, "", clientv3.WithPrefix())
	require.NoError(t, err)
	require.NotEmpty(t, kvs.Kvs)
	signing, err := keys.Signing.Bytes()
	require.NoError(t, err)
	for _, kv := range kvs.Kvs {
		for name, secret := range map[string][]byte{"encryption key": keys.Encryption.Bytes(), "signing key": signing, "admin token": []byte(token), "state key": stateKey} {
			assert.False(t, bytes.Contains(kv.Value, secret), "%s in etcd at %s", name, kv.Key)
		}
	}
}
