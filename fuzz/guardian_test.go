package fuzz

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// guardianFixture is a guardian key, a signer and a protector made for the
// fuzz VM, generated once per run (the keys are random, the shapes fixed).
type guardianFixture struct {
	key       *guardian.EncryptionKey
	signer    *guardian.SigningKey
	protector []byte
	stateKey  []byte
	cert      string
}

func newGuardianFixture(tb testing.TB) *guardianFixture {
	key, err := guardian.NewEncryptionKey()
	if err != nil {
		tb.Fatal(err)
	}
	signer, err := guardian.NewSigningKey()
	if err != nil {
		tb.Fatal(err)
	}
	stateKey, err := guardian.NewStateKey()
	if err != nil {
		tb.Fatal(err)
	}
	p, err := guardian.NewProtector(fuzzVM, stateKey, guardian.Recipient{Name: "owner", Public: key.Public()})
	if err != nil {
		tb.Fatal(err)
	}
	stored, err := p.Marshal()
	if err != nil {
		tb.Fatal(err)
	}
	cert, _, err := signer.Issue(guardian.HealthCertificate{Host: "h1", Group: "g", Mode: guardian.ModeTPM, TransportKey: key.Public()}, time.Now(), time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	return &guardianFixture{key: key, signer: signer, protector: stored, stateKey: stateKey, cert: cert}
}

// FuzzGuardianRequest: each guardian request decoder either refuses with
// CodeBadRequest (or CodeBadProtector) or returns a request that encodes and
// decodes back to itself. The first byte picks the decoder.
func FuzzGuardianRequest(f *testing.F) {
	fx := newGuardianFixture(f)
	p, err := guardian.ParseProtector(fx.protector)
	if err != nil {
		f.Fatal(err)
	}
	for i, req := range []any{
		guardian.NonceRequest{Host: "host-1.example"},
		guardian.AttestRequest{Host: "h1", Nonce: make([]byte, guardian.NonceSize), TransportKey: fx.key.Public(),
			TPM: &guardian.TPMEvidence{Quote: []byte("quote"), Signature: []byte("sig"), EventLog: []byte("log"), PCRs: map[int][]byte{0: make([]byte, 32), 7: make([]byte, 32)}}},
		guardian.ReleaseRequest{VMID: fuzzVM, Protector: p, Certificate: fx.cert},
		guardian.HostIdentity{Mode: guardian.ModeHostKey, HostKey: fx.signer.Public()},
		guardian.AddHostRequest{Name: "h1", Group: "g", Identity: guardian.HostIdentity{Mode: guardian.ModeHostKey, HostKey: fx.signer.Public()}},
		guardian.BaselineRequest{Group: "g", Values: map[int][]byte{0: make([]byte, 32)}},
		guardian.GrantRequest{Protector: p, Fabric: guardian.Recipient{Name: "fabric-b", Public: fx.key.Public()}},
	} {
		b, err := json.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append([]byte{byte(i)}, b...))
	}
	decoders := []func([]byte) (any, error){
		func(b []byte) (any, error) { return guardian.DecodeNonceRequest(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeAttestRequest(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeReleaseRequest(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeHostIdentity(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeAddHostRequest(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeBaselineRequest(bytes.NewReader(b)) },
		func(b []byte) (any, error) { return guardian.DecodeGrantRequest(bytes.NewReader(b)) },
	}
	for _, s := range recordedGuardianRequests(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		decodeAs := decoders[int(b[0])%len(decoders)]
		req, err := decodeAs(b[1:])
		if err != nil {
			if c := guardian.CodeOf(err); c != guardian.CodeBadRequest && c != guardian.CodeBadProtector {
				t.Fatalf("refused with %q: %v", c, err)
			}
			return
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		back, err := decodeAs(again)
		if err != nil || !reflect.DeepEqual(req, back) {
			t.Fatalf("accepted %q but its encoding %q decodes to %+v, %v", b[1:], again, back, err)
		}
	})
}

// guardianSeedDecoders maps the requests recorded in testdata/guardian by
// the guardian server's tests (VTPMD_CAPTURE=1 go test
// ./sealing/guardian/server), named by their path, to the index of their
// decoder in FuzzGuardianRequest.
var guardianSeedDecoders = map[string]byte{
	"v1_attest_nonce.json":    0,
	"v1_attest.json":          1,
	"v1_release.json":         2,
	"v1_admin_hosts.json":     4,
	"v1_admin_baselines.json": 5,
	"v1_admin_grants.json":    6,
}

// recordedGuardianRequests are the recorded requests, each behind its
// decoder's index.
func recordedGuardianRequests(tb testing.TB) [][]byte {
	var out [][]byte
	for name, decoder := range guardianSeedDecoders {
		b, err := os.ReadFile(filepath.Join("testdata", "guardian", name))
		if err != nil {
			tb.Fatalf("recorded guardian request: %v", err)
		}
		out = append(out, append([]byte{decoder}, b...))
	}
	return out
}

// FuzzProtector: ParseProtector refuses with CodeBadProtector or returns a
// protector that marshals; Unwrap with the owner's key yields the state key
// only for the fuzz VM, and never some other key.
func FuzzProtector(f *testing.F) {
	fx := newGuardianFixture(f)
	f.Add(fx.protector)
	f.Add([]byte(`{"version":1,"vm_id":"x","wraps":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := guardian.ParseProtector(b)
		if err != nil {
			if guardian.CodeOf(err) != guardian.CodeBadProtector {
				t.Fatalf("refused with %v", err)
			}
			return
		}
		if _, err := p.Marshal(); err != nil {
			t.Fatalf("parsed protector does not marshal: %v", err)
		}
		key, _, err := p.Unwrap(fx.key, fuzzVM)
		if err == nil && !bytes.Equal(key, fx.stateKey) {
			t.Fatalf("unwrapped a key that is not the VM's")
		}
		if _, _, err := p.Unwrap(fx.key, fuzzVM+"-other"); err == nil {
			t.Fatalf("unwrapped for another VM")
		}
	})
}

// FuzzHealthCertificate: ParseHealthCertificate accepts only what the
// guardian's signer issued, refusing all else with a certificate code.
func FuzzHealthCertificate(f *testing.F) {
	fx := newGuardianFixture(f)
	f.Add(fx.cert)
	f.Add("e30.")
	signers := [][]byte{fx.signer.Public()}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := guardian.ParseHealthCertificate(s, signers, time.Now())
		if err != nil {
			if code := guardian.CodeOf(err); code != guardian.CodeCertInvalid && code != guardian.CodeCertExpired {
				t.Fatalf("refused with %v", err)
			}
			return
		}
		if s != fx.cert || c.Host != "h1" {
			t.Fatalf("accepted a certificate the guardian did not issue: %q", s)
		}
	})
}

// FuzzGuardianKeys: the private key parsers the guardian opens its key
// bundle with refuse or return a key whose encoding is the input's.
func FuzzGuardianKeys(f *testing.F) {
	fx := newGuardianFixture(f)
	signing, err := fx.signer.Bytes()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(fx.key.Bytes())
	f.Add(signing)
	f.Fuzz(func(t *testing.T, b []byte) {
		if k, err := guardian.ParseEncryptionKey(b); err == nil && !bytes.Equal(k.Bytes(), b) {
			t.Fatalf("encryption key %x encodes as %x", b, k.Bytes())
		}
		if k, err := guardian.ParseSigningKey(b); err == nil {
			if _, err := k.Bytes(); err != nil {
				t.Fatalf("parsed signing key does not encode: %v", err)
			}
		}
	})
}
