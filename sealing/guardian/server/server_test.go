package server

import (
	"context"
	"errors"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

var ctx = context.Background()

func recordBaseline(t *testing.T, f *fabric, group string, log []byte) guardian.Baseline {
	t.Helper()
	var b guardian.Baseline
	require.NoError(t, f.admin.Call(ctx, http.MethodPost, guardian.PathAdminBaselines, &guardian.BaselineRequest{Group: group, EventLog: log}, &b))
	return b
}

func newProtector(t *testing.T, vmID string, owner guardian.Recipient) (*guardian.Protector, []byte) {
	t.Helper()
	key, err := guardian.NewStateKey()
	require.NoError(t, err)
	p, err := guardian.NewProtector(vmID, key, owner)
	require.NoError(t, err)
	return p, key
}

func release(f *fabric, cert, vmID string, p *guardian.Protector, transport *guardian.EncryptionKey) ([]byte, string, error) {
	resp, err := f.client.Release(ctx, &guardian.ReleaseRequest{VMID: vmID, Protector: p, Certificate: cert})
	if err != nil {
		return nil, "", err
	}
	key, err := transport.OpenRelease(vmID, resp.Wrapped)
	return key, resp.Role, err
}

// hasAudit finds an audit entry of op for host with code.
func hasAudit(entries []guardian.AuditEntry, op, host string, code guardian.Code) bool {
	for _, e := range entries {
		if e.Op == op && e.Host == host && e.Code == code && e.Replica != "" && !e.Time.IsZero() {
			return true
		}
	}
	return false
}

func TestTPMHostAttestsAndGetsItsVMKey(t *testing.T) {
	f := newFabric(t, "fabric-a")
	boot := measuredboot.TypicalBoot("fw 1.0")
	tpm, log := bootedHost(t, boot)
	f.register(t, "host-1", "rack-1", tpm)
	b := recordBaseline(t, f, "rack-1", log)
	assert.Equal(t, measuredboot.PCRs(boot, guardian.DefaultBaselinePCRs), b.Values, "the baseline is the log's replay")

	cert, transport, err := f.attest(ctx, "host-1", tpm)
	require.NoError(t, err)
	c, err := guardian.ParseHealthCertificate(cert, [][]byte{f.keys.Signing.Public()}, time.Now())
	require.NoError(t, err)
	assert.Equal(t, "host-1", c.Host)
	assert.Equal(t, "rack-1", c.Group)
	assert.WithinDuration(t, f.clock.Now().Add(guardian.DefaultCertificateLifetime), c.NotAfter, 2*time.Second)

	p, want := newProtector(t, "vm-1", f.recipient(t))
	got, role, err := release(f, cert, "vm-1", p, transport)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	assert.Equal(t, guardian.RoleOwner, role)

	audit := f.audit(t)
	assert.True(t, hasAudit(audit, "attest", "host-1", ""), "attestation audited: %+v", audit)
	assert.True(t, hasAudit(audit, "release", "host-1", ""), "release audited: %+v", audit)
	for _, e := range audit {
		assert.NotContains(t, e.Message, string(want), "no key in the audit log")
	}
}

func TestTPMHostWithAnotherBootIsRefusedNamingThePCR(t *testing.T) {
	f := newFabric(t, "fabric-a")
	boot := measuredboot.TypicalBoot("fw 1.0")
	tpm, log := bootedHost(t, boot)
	f.register(t, "host-1", "rack-1", tpm)

	_, _, err := f.attest(ctx, "host-1", tpm)
	assert.Equal(t, guardian.CodeNoBaseline, guardian.CodeOf(err), "%v", err)

	// The group's known-good boot loads another boot loader than this host.
	good, err := measuredboot.Encode(measuredboot.Tampered(boot))
	require.NoError(t, err)
	recordBaseline(t, f, "rack-1", good)
	_, _, err = f.attest(ctx, "host-1", tpm)
	require.Equal(t, guardian.CodeBaselineMismatch, guardian.CodeOf(err), "%v", err)
	assert.Contains(t, err.Error(), "PCR 4 (event 3, EV_EFI_BOOT_SERVICES_APPLICATION, differs)")
	assert.NotContains(t, err.Error(), "PCR 0")

	// A baseline of PCR values only names the PCR.
	var b guardian.Baseline
	values := measuredboot.PCRs(boot, []int{0, 7})
	values[0] = make([]byte, 32)
	require.NoError(t, f.admin.Call(ctx, http.MethodPost, guardian.PathAdminBaselines, &guardian.BaselineRequest{Group: "rack-1", Values: values}, &b))
	_, _, err = f.attest(ctx, "host-1", tpm)
	require.Equal(t, guardian.CodeBaselineMismatch, guardian.CodeOf(err), "%v", err)
	assert.Contains(t, err.Error(), "PCR 0")
	assert.NotContains(t, err.Error(), "PCR 7")

	recordBaseline(t, f, "rack-1", log)
	_, _, err = f.attest(ctx, "host-1", tpm)
	require.NoError(t, err)
	assert.True(t, hasAudit(f.audit(t), "attest", "host-1", guardian.CodeBaselineMismatch))

	// Evidence whose event log does not explain the quoted PCRs.
	transport, _ := guardian.NewEncryptionKey()
	req, err := f.evidence(ctx, "host-1", tpm, transport)
	require.NoError(t, err)
	req.TPM.EventLog = good
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeNotAttested, guardian.CodeOf(err), "%v", err)
	assert.ErrorContains(t, err, "does not replay")
}

// A host that quotes only a PCR without measurements cannot pass off a
// known-good boot's values for the PCRs it did not quote (go-attestation's
// Verify refuses values the quote does not cover).
func TestUnquotedPCRValuesAreRefused(t *testing.T) {
	f := newFabric(t, "fabric-a")
	good := measuredboot.TypicalBoot("fw 1.0")
	tpm, _ := bootedHost(t, measuredboot.Tampered(good))
	f.register(t, "host-1", "rack-1", tpm)
	goodLog, err := measuredboot.Encode(good)
	require.NoError(t, err)
	recordBaseline(t, f, "rack-1", goodLog)

	tpm.PCRs = []int{8}
	transport, _ := guardian.NewEncryptionKey()
	req, err := f.evidence(ctx, "host-1", tpm, transport)
	require.NoError(t, err)
	maps.Copy(req.TPM.PCRs, measuredboot.PCRs(good, host.DefaultPCRs))
	req.TPM.EventLog = goodLog
	_, err = f.client.Attest(ctx, req)
	require.Equal(t, guardian.CodeNotAttested, guardian.CodeOf(err), "%v", err)
	assert.ErrorContains(t, err, "was not included in quote")
}

func TestHostKeyHostAndEveryRefusal(t *testing.T) {
	f := newFabric(t, "fabric-a")
	hk := hostKeyHost(t)
	f.register(t, "host-1", "keyed", hk)
	cert, transport, err := f.attest(ctx, "host-1", hk)
	require.NoError(t, err, "host-key mode needs no baseline")
	p, want := newProtector(t, "vm-1", f.recipient(t))
	got, _, err := release(f, cert, "vm-1", p, transport)
	require.NoError(t, err)
	assert.Equal(t, want, got)

	// An unregistered host.
	_, _, err = f.attest(ctx, "host-2", hostKeyHost(t))
	assert.Equal(t, guardian.CodeUnknownHost, guardian.CodeOf(err), "%v", err)

	// Another key than the registered one.
	req, err := f.evidence(ctx, "host-1", hostKeyHost(t), transport)
	require.NoError(t, err)
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeNotAttested, guardian.CodeOf(err), "%v", err)

	// A replayed nonce, even with good evidence.
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeNonceReplayed, guardian.CodeOf(err), "%v", err)

	// A nonce issued to another host, an unknown one, and an expired one.
	f.register(t, "host-3", "keyed", hostKeyHost(t))
	req, err = f.evidence(ctx, "host-3", hk, transport)
	require.NoError(t, err)
	req.Host = "host-1"
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeBadNonce, guardian.CodeOf(err), "%v", err)
	req.Nonce = make([]byte, guardian.NonceSize)
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeBadNonce, guardian.CodeOf(err), "%v", err)
	req, err = f.evidence(ctx, "host-1", hk, transport)
	require.NoError(t, err)
	f.clock.Advance(DefaultNonceTTL + time.Second)
	_, err = f.client.Attest(ctx, req)
	assert.Equal(t, guardian.CodeBadNonce, guardian.CodeOf(err), "%v", err)
	assert.ErrorContains(t, err, "expired")

	// The protector copied to another VM, and one of another fabric.
	_, _, err = release(f, cert, "vm-2", p, transport)
	assert.Equal(t, guardian.CodeWrongVM, guardian.CodeOf(err), "%v", err)
	other := newFabric(t, "fabric-b")
	foreign, _ := newProtector(t, "vm-1", other.recipient(t))
	_, _, err = release(f, cert, "vm-1", foreign, transport)
	assert.Equal(t, guardian.CodeNotGranted, guardian.CodeOf(err), "%v", err)

	// A certificate forged by another signer, and an expired one.
	forged, _, err := other.keys.Signing.Issue(guardian.HealthCertificate{Host: "host-1", Group: "keyed", Mode: guardian.ModeHostKey, TransportKey: transport.Public()}, time.Now(), time.Hour)
	require.NoError(t, err)
	_, _, err = release(f, forged, "vm-1", p, transport)
	assert.Equal(t, guardian.CodeCertInvalid, guardian.CodeOf(err), "%v", err)
	f.clock.Advance(guardian.DefaultCertificateLifetime)
	_, _, err = release(f, cert, "vm-1", p, transport)
	assert.Equal(t, guardian.CodeCertExpired, guardian.CodeOf(err), "%v", err)

	// A host removed after it attested.
	cert, transport, err = f.attest(ctx, "host-1", hk)
	require.NoError(t, err)
	require.NoError(t, f.admin.Call(ctx, http.MethodDelete, guardian.PathAdminHosts+"/host-1", nil, &struct{}{}))
	_, _, err = release(f, cert, "vm-1", p, transport)
	assert.Equal(t, guardian.CodeUnknownHost, guardian.CodeOf(err), "%v", err)

	// The admin endpoints want the token.
	for _, c := range []*guardian.Client{
		{URLs: f.admin.URLs, HTTP: f.admin.HTTP},
		{URLs: f.admin.URLs, HTTP: f.admin.HTTP, Token: strings.Repeat("0", 64)},
	} {
		var l guardian.HostList
		err = c.Call(ctx, http.MethodGet, guardian.PathAdminHosts, nil, &l)
		assert.Equal(t, guardian.CodeUnauthorized, guardian.CodeOf(err), "%v", err)
	}

	audit := f.audit(t)
	for _, want := range []struct {
		op, host string
		code     guardian.Code
	}{
		{"nonce", "host-2", guardian.CodeUnknownHost},
		{"attest", "host-1", guardian.CodeNotAttested},
		{"attest", "host-1", guardian.CodeNonceReplayed},
		{"attest", "host-1", guardian.CodeBadNonce},
		{"release", "host-1", guardian.CodeWrongVM},
		{"release", "host-1", guardian.CodeNotGranted},
		{"release", "", guardian.CodeCertInvalid},
		{"release", "", guardian.CodeCertExpired},
		{"release", "host-1", guardian.CodeUnknownHost},
		{"host list", "", guardian.CodeUnauthorized},
		{"host remove", "host-1", ""},
	} {
		assert.True(t, hasAudit(audit, want.op, want.host, want.code), "audit entry %+v", want)
	}
}

func TestANonceIsUsedOnceUnderConcurrency(t *testing.T) {
	f := newFabric(t, "fabric-a")
	hk := hostKeyHost(t)
	f.register(t, "host-1", "keyed", hk)
	transport, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	req, err := f.evidence(ctx, "host-1", hk, transport)
	require.NoError(t, err)

	var wg sync.WaitGroup
	codes := make([]guardian.Code, 8)
	for i := range codes {
		wg.Go(func() {
			_, err := f.client.Attest(ctx, req)
			codes[i] = guardian.CodeOf(err)
			if err == nil {
				codes[i] = "ok"
			}
		})
	}
	wg.Wait()
	ok := 0
	for _, c := range codes {
		if c == "ok" {
			ok++
		} else {
			assert.Equal(t, guardian.CodeNonceReplayed, c)
		}
	}
	assert.Equal(t, 1, ok, "exactly one attestation per nonce: %v", codes)
}

func TestGrantLetsAnotherFabricRelease(t *testing.T) {
	a, b, c := newFabric(t, "fabric-a"), newFabric(t, "fabric-b"), newFabric(t, "fabric-c")
	hk := hostKeyHost(t)
	for _, f := range []*fabric{b, c} {
		f.register(t, "host-1", "keyed", hk)
	}
	p, want := newProtector(t, "vm-1", a.recipient(t))

	certB, transportB, err := b.attest(ctx, "host-1", hk)
	require.NoError(t, err)
	_, _, err = release(b, certB, "vm-1", p, transportB)
	assert.Equal(t, guardian.CodeNotGranted, guardian.CodeOf(err), "not granted yet: %v", err)

	var granted guardian.GrantResponse
	require.NoError(t, a.admin.Call(ctx, http.MethodPost, guardian.PathAdminGrants, &guardian.GrantRequest{Protector: p, Fabric: b.recipient(t)}, &granted))
	got, role, err := release(b, certB, "vm-1", granted.Protector, transportB)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	assert.Equal(t, guardian.RoleGranted, role)

	certC, transportC, err := c.attest(ctx, "host-1", hk)
	require.NoError(t, err)
	_, _, err = release(c, certC, "vm-1", granted.Protector, transportC)
	assert.Equal(t, guardian.CodeNotGranted, guardian.CodeOf(err), "an ungranted fabric: %v", err)

	// Only the owner grants: fabric B cannot pass the VM on to C.
	err = b.admin.Call(ctx, http.MethodPost, guardian.PathAdminGrants, &guardian.GrantRequest{Protector: granted.Protector, Fabric: c.recipient(t)}, &granted)
	assert.Equal(t, guardian.CodeNotGranted, guardian.CodeOf(err), "%v", err)

	var grants guardian.GrantList
	require.NoError(t, a.admin.Call(ctx, http.MethodGet, guardian.PathAdminGrants, nil, &grants))
	require.Len(t, grants.Grants, 1)
	assert.Equal(t, "fabric-b", grants.Grants[0].Fabric)
	assert.Equal(t, "vm-1", grants.Grants[0].VMID)
	assert.True(t, hasAudit(a.audit(t), "grant", "", ""))
	assert.True(t, hasAudit(b.audit(t), "release", "host-1", ""))
	assert.True(t, hasAudit(c.audit(t), "release", "host-1", guardian.CodeNotGranted))
}

func TestAdminHostsAndBaselines(t *testing.T) {
	f := newFabric(t, "fabric-a")
	hk := hostKeyHost(t)
	f.register(t, "host-1", "g1", hk)
	id, err := hk.Identity()
	require.NoError(t, err)
	err = f.admin.Call(ctx, http.MethodPost, guardian.PathAdminHosts, &guardian.AddHostRequest{Name: "host-1", Group: "g2", Identity: *id}, &guardian.Host{})
	assert.Equal(t, guardian.CodeConflict, guardian.CodeOf(err), "%v", err)
	bad := *id
	bad.HostKey = []byte("not a key")
	err = f.admin.Call(ctx, http.MethodPost, guardian.PathAdminHosts, &guardian.AddHostRequest{Name: "host-2", Group: "g2", Identity: bad}, &guardian.Host{})
	assert.Equal(t, guardian.CodeBadRequest, guardian.CodeOf(err), "%v", err)

	var hosts guardian.HostList
	require.NoError(t, f.admin.Call(ctx, http.MethodGet, guardian.PathAdminHosts, nil, &hosts))
	require.Len(t, hosts.Hosts, 1)
	assert.Equal(t, "g1", hosts.Hosts[0].Group)
	assert.Equal(t, *id, hosts.Hosts[0].Identity)

	log, err := measuredboot.Encode(measuredboot.TypicalBoot("fw"))
	require.NoError(t, err)
	var b guardian.Baseline
	require.NoError(t, f.admin.Call(ctx, http.MethodPost, guardian.PathAdminBaselines, &guardian.BaselineRequest{Group: "g1", EventLog: log, PCRs: []int{4}}, &b))
	assert.Len(t, b.Values, 1)
	err = f.admin.Call(ctx, http.MethodPost, guardian.PathAdminBaselines, &guardian.BaselineRequest{Group: "g1", EventLog: []byte("junk")}, &b)
	assert.Equal(t, guardian.CodeBadRequest, guardian.CodeOf(err), "%v", err)
	var baselines guardian.BaselineList
	require.NoError(t, f.admin.Call(ctx, http.MethodGet, guardian.PathAdminBaselines, nil, &baselines))
	require.Len(t, baselines.Baselines, 1)
	require.NoError(t, f.admin.Call(ctx, http.MethodDelete, guardian.PathAdminBaselines+"/g1", nil, &struct{}{}))
	err = f.admin.Call(ctx, http.MethodDelete, guardian.PathAdminBaselines+"/g1", nil, &struct{}{})
	assert.Equal(t, guardian.CodeNotFound, guardian.CodeOf(err), "%v", err)

	var audit guardian.AuditList
	require.NoError(t, f.admin.Call(ctx, http.MethodGet, guardian.PathAdminAudit+"?last=2", nil, &audit))
	require.Len(t, audit.Entries, 2)
	assert.Equal(t, "baseline remove", audit.Entries[1].Op, "newest last")
	assert.Equal(t, guardian.CodeNotFound, audit.Entries[1].Code)
}

// flakyStore is a store that can be made unreachable.
type flakyStore struct {
	Store
	mu   sync.Mutex
	down bool
}

var errDown = errors.New("store unreachable")

func (s *flakyStore) err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return errDown
	}
	return nil
}

func (s *flakyStore) Get(ctx context.Context, key string) ([]byte, error) {
	if err := s.err(); err != nil {
		return nil, err
	}
	return s.Store.Get(ctx, key)
}

func (s *flakyStore) Ping(ctx context.Context) error { return s.err() }

func TestAReplicaWithoutItsStoreSends503AndHostsFailOver(t *testing.T) {
	f := newFabric(t, "fabric-a")
	hk := hostKeyHost(t)
	f.register(t, "host-1", "keyed", hk)
	flaky := &flakyStore{Store: f.store, down: true}
	broken := newReplica(t, f.keys, "", flaky, "r2")

	resp, err := broken.client.HTTP.Get(broken.url + guardian.PathHealth)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err = broken.client.Nonce(short, "host-1")
	var unreachable *guardian.UnreachableError
	assert.ErrorAs(t, err, &unreachable)

	resp, err = f.client.HTTP.Get(f.url + guardian.PathHealth)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)

	both := &guardian.Client{URLs: []string{broken.url, f.url}, HTTP: f.client.HTTP}
	f.client = both
	_, _, err = f.attest(ctx, "host-1", hk)
	require.NoError(t, err, "the host fails over to the replica that can serve")
}
