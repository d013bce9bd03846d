package guardian

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newRecipient(t *testing.T, name string) (*EncryptionKey, Recipient) {
	t.Helper()
	k, err := NewEncryptionKey()
	require.NoError(t, err)
	return k, Recipient{Name: name, Public: k.Public()}
}

func TestProtectorReleasesOnlyForItsVMAndItsGuardians(t *testing.T) {
	owner, ownerR := newRecipient(t, "owner")
	fabric, fabricR := newRecipient(t, "fabric-b")
	stranger, _ := newRecipient(t, "stranger")
	key, err := NewStateKey()
	require.NoError(t, err)

	p, err := NewProtector("vm-1", key, ownerR)
	require.NoError(t, err)
	stored, err := p.Marshal()
	require.NoError(t, err)
	p, err = ParseProtector(stored)
	require.NoError(t, err)

	got, role, err := p.Unwrap(owner, "vm-1")
	require.NoError(t, err)
	assert.Equal(t, key, got)
	assert.Equal(t, RoleOwner, role)

	_, _, err = p.Unwrap(fabric, "vm-1")
	assert.Equal(t, CodeNotGranted, CodeOf(err))
	_, _, err = p.Unwrap(owner, "vm-2")
	assert.Equal(t, CodeWrongVM, CodeOf(err), "a protector copied to another VM")

	relabelled := *p
	relabelled.VMID = "vm-2"
	_, _, err = relabelled.Unwrap(owner, "vm-2")
	assert.Equal(t, CodeWrongVM, CodeOf(err), "a protector relabelled for another VM")

	require.NoError(t, p.Grant(got, fabricR))
	got, role, err = p.Unwrap(fabric, "vm-1")
	require.NoError(t, err)
	assert.Equal(t, key, got)
	assert.Equal(t, RoleGranted, role)
	_, _, err = p.Unwrap(stranger, "vm-1")
	assert.Equal(t, CodeNotGranted, CodeOf(err))
}

func TestParseProtectorRefusesMalformed(t *testing.T) {
	_, ownerR := newRecipient(t, "owner")
	key, _ := NewStateKey()
	p, err := NewProtector("vm-1", key, ownerR)
	require.NoError(t, err)
	good, err := p.Marshal()
	require.NoError(t, err)

	for name, b := range map[string]string{
		"empty":         "",
		"not json":      "protector",
		"unknown field": strings.Replace(string(good), `"version"`, `"extra":1,"version"`, 1),
		"trailing":      string(good) + "{}",
		"version 2":     strings.Replace(string(good), `"version":1`, `"version":2`, 1),
		"no vm":         strings.Replace(string(good), `"vm_id":"vm-1"`, `"vm_id":""`, 1),
		"no owner":      strings.Replace(string(good), `"role":"owner"`, `"role":"granted"`, 1),
		"bad role":      strings.Replace(string(good), `"role":"owner"`, `"role":"root"`, 1),
		"no wraps":      `{"version":1,"vm_id":"vm-1","wraps":[]}`,
		"huge":          strings.Repeat(" ", maxProtectorSize+1),
	} {
		_, err := ParseProtector([]byte(b))
		assert.Equal(t, CodeBadProtector, CodeOf(err), name)
	}
}

func TestHealthCertificate(t *testing.T) {
	signer, err := NewSigningKey()
	require.NoError(t, err)
	other, err := NewSigningKey()
	require.NoError(t, err)
	transport, err := NewEncryptionKey()
	require.NoError(t, err)
	now := time.Now()

	encoded, issued, err := signer.Issue(HealthCertificate{Host: "h1", Group: "g", Mode: ModeTPM, TransportKey: transport.Public()}, now, time.Hour)
	require.NoError(t, err)
	c, err := ParseHealthCertificate(encoded, [][]byte{other.Public(), signer.Public()}, now)
	require.NoError(t, err)
	assert.Equal(t, issued, c)
	assert.Equal(t, "h1", c.Host)
	assert.Equal(t, transport.Public(), c.TransportKey)

	_, err = ParseHealthCertificate(encoded, [][]byte{signer.Public()}, now.Add(time.Hour+time.Second))
	assert.Equal(t, CodeCertExpired, CodeOf(err))
	_, err = ParseHealthCertificate(encoded, [][]byte{other.Public()}, now)
	assert.Equal(t, CodeCertInvalid, CodeOf(err), "signed by another guardian")

	// A forged payload (another host) under the genuine signature.
	payload, sig, _ := strings.Cut(encoded, ".")
	forged, _, err := other.Issue(HealthCertificate{Host: "h2", Mode: ModeTPM, TransportKey: transport.Public()}, now, time.Hour)
	require.NoError(t, err)
	forgedPayload, _, _ := strings.Cut(forged, ".")
	require.NotEqual(t, payload, forgedPayload)
	_, err = ParseHealthCertificate(forgedPayload+"."+sig, [][]byte{signer.Public()}, now)
	assert.Equal(t, CodeCertInvalid, CodeOf(err))
	_, err = ParseHealthCertificate("garbage", [][]byte{signer.Public()}, now)
	assert.Equal(t, CodeCertInvalid, CodeOf(err))
}

func TestReleaseWrapOpensOnlyWithTheTransportKeyForTheVM(t *testing.T) {
	transport, err := NewEncryptionKey()
	require.NoError(t, err)
	thief, err := NewEncryptionKey()
	require.NoError(t, err)
	key, _ := NewStateKey()
	wrapped, err := WrapRelease(transport.Public(), "vm-1", key)
	require.NoError(t, err)

	got, err := transport.OpenRelease("vm-1", wrapped)
	require.NoError(t, err)
	assert.Equal(t, key, got)
	_, err = thief.OpenRelease("vm-1", wrapped)
	assert.Error(t, err)
	_, err = transport.OpenRelease("vm-2", wrapped)
	assert.Error(t, err)
}

func TestDecodeAttestRequest(t *testing.T) {
	transport, _ := NewEncryptionKey()
	good := AttestRequest{Host: "h1", Nonce: make([]byte, NonceSize), TransportKey: transport.Public(), HostKey: &HostKeyEvidence{Signature: []byte{1}}}
	b, _ := json.Marshal(good)
	got, err := DecodeAttestRequest(strings.NewReader(string(b)))
	require.NoError(t, err)
	assert.Equal(t, &good, got)

	bad := func(mut func(r *AttestRequest)) string {
		r := good
		mut(&r)
		b, _ := json.Marshal(r)
		return string(b)
	}
	for name, body := range map[string]string{
		"bad host":      bad(func(r *AttestRequest) { r.Host = "h 1" }),
		"short nonce":   bad(func(r *AttestRequest) { r.Nonce = r.Nonce[:8] }),
		"bad transport": bad(func(r *AttestRequest) { r.TransportKey = []byte{4, 1, 2} }),
		"no evidence":   bad(func(r *AttestRequest) { r.HostKey = nil }),
		"both":          bad(func(r *AttestRequest) { r.TPM = &TPMEvidence{} }),
		"bad pcr": bad(func(r *AttestRequest) {
			r.HostKey = nil
			r.TPM = &TPMEvidence{Quote: []byte{1}, Signature: []byte{1}, EventLog: []byte{1}, PCRs: map[int][]byte{24: make([]byte, 32)}}
		}),
		"unknown field": strings.Replace(string(b), `"host"`, `"admin":true,"host"`, 1),
		"not json":      "{",
	} {
		_, err := DecodeAttestRequest(strings.NewReader(body))
		assert.Equal(t, CodeBadRequest, CodeOf(err), name)
	}
}

func TestClientFailsOverAndReturnsRefusals(t *testing.T) {
	var downHits, upHits atomic.Int32
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downHits.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(Errorf(CodeUnavailable, "store down"))
	}))
	defer down.Close()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		upHits.Add(1)
		if r.URL.Path == PathRelease {
			w.WriteHeader(CodeWrongVM.Status())
			json.NewEncoder(w).Encode(Errorf(CodeWrongVM, "no"))
			return
		}
		json.NewEncoder(w).Encode(KeysResponse{Name: "g"})
	}))
	defer up.Close()
	dead := "http://127.0.0.1:1" // nothing listens there

	c := &Client{URLs: []string{dead, down.URL, up.URL}, AttemptTimeout: time.Second}
	keys, err := c.Keys(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "g", keys.Name)
	assert.Equal(t, int32(1), downHits.Load())

	// The replica that answered is tried first next time; a refusal is final.
	_, err = c.Release(context.Background(), &ReleaseRequest{})
	assert.Equal(t, CodeWrongVM, CodeOf(err))
	assert.Equal(t, int32(1), downHits.Load())
	assert.Equal(t, int32(2), upHits.Load())

	// With every replica down, the error names each URL once the context ends.
	c = &Client{URLs: []string{dead, down.URL}, AttemptTimeout: time.Second, MinBackoff: 10 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = c.Keys(ctx)
	var unreachable *UnreachableError
	require.ErrorAs(t, err, &unreachable)
	assert.Contains(t, err.Error(), dead)
	assert.Contains(t, err.Error(), down.URL)
	assert.Greater(t, downHits.Load(), int32(2), "tried again after backing off")
}
