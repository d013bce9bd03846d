package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/google/go-attestation/attest"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// nonceRecord is an issued nonce, as stored.
type nonceRecord struct {
	Host    string    `json:"host"`
	Expires time.Time `json:"expires"`
	Used    bool      `json:"used,omitempty"`
}

// nonceRetention is how many nonce lifetimes a nonce stays in the store,
// so that its replay is named as one rather than as an unknown nonce.
const nonceRetention = 10

func (s *Server) host(ctx context.Context, name string) (*guardian.Host, error) {
	var h guardian.Host
	err := s.getJSON(ctx, hostPrefix+name, &h)
	if errors.Is(err, ErrNotFound) {
		return nil, guardian.Errorf(guardian.CodeUnknownHost, "host %q is not registered with fabric %q", name, s.cfg.Keys.Fabric)
	}
	if err != nil {
		return nil, err
	}
	return &h, nil
}

func (s *Server) nonce(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeNonceRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	o.host = req.Host
	if _, err := s.host(r.Context(), req.Host); err != nil {
		return nil, err
	}
	n := make([]byte, guardian.NonceSize)
	_, _ = rand.Read(n) // crypto/rand does not fail
	rec := nonceRecord{Host: req.Host, Expires: s.cfg.Now().UTC().Add(s.cfg.NonceTTL)}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if err := s.cfg.Store.Create(r.Context(), noncePrefix+hex.EncodeToString(n), b, nonceRetention*s.cfg.NonceTTL); err != nil {
		return nil, stored(err)
	}
	return guardian.NonceResponse{Nonce: n, Expires: rec.Expires}, nil
}

// consumeNonce checks that the nonce was issued to host, is unexpired and
// unused, and marks it used: of two requests with one nonce, at any
// replicas, one gets through.
func (s *Server) consumeNonce(ctx context.Context, nonce []byte, host string) error {
	key := noncePrefix + hex.EncodeToString(nonce)
	b, err := s.cfg.Store.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return guardian.Errorf(guardian.CodeBadNonce, "the nonce was not issued by fabric %q, or expired long ago", s.cfg.Keys.Fabric)
	}
	if err != nil {
		return stored(err)
	}
	var rec nonceRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return fmt.Errorf("stored nonce: %w", err)
	}
	switch {
	case rec.Host != host:
		return guardian.Errorf(guardian.CodeBadNonce, "the nonce was issued to host %q, not to host %q", rec.Host, host)
	case rec.Used:
		return guardian.Errorf(guardian.CodeNonceReplayed, "the nonce was used already")
	case !s.cfg.Now().Before(rec.Expires):
		return guardian.Errorf(guardian.CodeBadNonce, "the nonce expired at %s", rec.Expires.Format(time.RFC3339))
	}
	rec.Used = true
	used, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	switch err := s.cfg.Store.Swap(ctx, key, b, used); {
	case errors.Is(err, ErrChanged):
		return guardian.Errorf(guardian.CodeNonceReplayed, "the nonce was used meanwhile by another request")
	case errors.Is(err, ErrNotFound):
		return guardian.Errorf(guardian.CodeBadNonce, "the nonce expired")
	default:
		return stored(err)
	}
}

func (s *Server) attest(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeAttestRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	o.host = req.Host
	h, err := s.host(r.Context(), req.Host)
	if err != nil {
		return nil, err
	}
	if err := s.consumeNonce(r.Context(), req.Nonce, req.Host); err != nil {
		return nil, err
	}
	digest := guardian.AttestationDigest(req.Nonce, req.TransportKey)
	switch h.Identity.Mode {
	case guardian.ModeTPM:
		if req.TPM == nil {
			return nil, guardian.Errorf(guardian.CodeNotAttested, "host %q is registered in TPM mode: send a TPM quote", h.Name)
		}
		err = s.verifyTPM(r.Context(), h, req.TPM, digest)
	case guardian.ModeHostKey:
		if req.HostKey == nil {
			return nil, guardian.Errorf(guardian.CodeNotAttested, "host %q is registered in host-key mode: send a host key signature", h.Name)
		}
		err = verifyHostKey(h, req.HostKey, digest)
	default:
		err = fmt.Errorf("host %q registered in mode %q", h.Name, h.Identity.Mode)
	}
	if err != nil {
		return nil, err
	}
	cert, issued, err := s.cfg.Keys.Signing.Issue(guardian.HealthCertificate{
		Host: h.Name, Group: h.Group, Mode: h.Identity.Mode, TransportKey: req.TransportKey,
	}, s.cfg.Now(), s.cfg.CertLifetime)
	if err != nil {
		return nil, err
	}
	o.detail = fmt.Sprintf("attested host (%s mode, group %s): health certificate %s until %s",
		h.Identity.Mode, h.Group, issued.Serial, issued.NotAfter.Format(time.RFC3339))
	return guardian.AttestResponse{Certificate: cert, NotAfter: issued.NotAfter}, nil
}

func verifyHostKey(h *guardian.Host, ev *guardian.HostKeyEvidence, digest []byte) error {
	pub, err := parseHostKey(h.Identity.HostKey)
	if err != nil {
		return fmt.Errorf("registered key of host %q: %w", h.Name, err)
	}
	sum := sha256.Sum256(digest)
	if !ecdsa.VerifyASN1(pub, sum[:], ev.Signature) {
		return guardian.Errorf(guardian.CodeNotAttested, "the signature does not verify against host %q's registered host key", h.Name)
	}
	return nil
}

// parseHostKey reads a registered host key: PKIX DER, ECDSA P-256.
func parseHostKey(der []byte) (*ecdsa.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, err
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve.Params().Name != "P-256" {
		return nil, fmt.Errorf("a %T, want an ECDSA P-256 key", pub)
	}
	return ec, nil
}

// verifyTPM checks, in order: the quote's signature by the host's AK, its
// qualifying data (the attestation digest) and PCR digest; the event log's
// replay to the quoted PCRs; the quoted PCRs against the group's baseline.
func (s *Server) verifyTPM(ctx context.Context, h *guardian.Host, ev *guardian.TPMEvidence, digest []byte) error {
	ak, err := attest.ParseAKPublic(h.Identity.AKPublic)
	if err != nil {
		return fmt.Errorf("registered AK of host %q: %w", h.Name, err)
	}
	var pcrs []attest.PCR
	for _, i := range slices.Sorted(maps.Keys(ev.PCRs)) {
		pcrs = append(pcrs, attest.PCR{Index: i, Digest: ev.PCRs[i], DigestAlg: crypto.SHA256})
	}
	if err := ak.Verify(attest.Quote{Quote: ev.Quote, Signature: ev.Signature}, pcrs, digest); err != nil {
		return guardian.Errorf(guardian.CodeNotAttested, "the quote of host %q does not verify against its registered AK (signature, nonce and transport key, or PCR digest): %v", h.Name, err)
	}
	log, err := attest.ParseEventLog(ev.EventLog)
	if err != nil {
		return guardian.Errorf(guardian.CodeNotAttested, "the event log of host %q: %v", h.Name, err)
	}
	if _, err := log.Verify(pcrs); err != nil {
		return guardian.Errorf(guardian.CodeNotAttested, "the event log of host %q does not replay to its quoted PCRs: %v", h.Name, err)
	}
	var b guardian.Baseline
	err = s.getJSON(ctx, baselinePrefix+h.Group, &b)
	if errors.Is(err, ErrNotFound) {
		return guardian.Errorf(guardian.CodeNoBaseline, "group %q of host %q has no baseline: record one (vtpmd-guardian baseline record)", h.Group, h.Name)
	}
	if err != nil {
		return err
	}
	return matchBaseline(h, &b, ev.PCRs, log)
}

// matchBaseline compares the quoted PCRs, which the event log explains,
// with the baseline's, naming each PCR that differs and, where the
// baseline has its events, the first event that differs.
func matchBaseline(h *guardian.Host, b *guardian.Baseline, quoted map[int][]byte, log *attest.EventLog) error {
	var differ []string
	var events map[int][]attest.Event
	for _, i := range slices.Sorted(maps.Keys(b.Values)) {
		got, ok := quoted[i]
		switch {
		case !ok:
			differ = append(differ, fmt.Sprintf("PCR %d (not quoted)", i))
		case !bytes.Equal(got, b.Values[i]):
			if events == nil {
				events = pcrEvents(log)
			}
			differ = append(differ, fmt.Sprintf("PCR %d%s", i, firstDifference(b.Events[i], events[i])))
		}
	}
	if len(differ) > 0 {
		return guardian.Errorf(guardian.CodeBaselineMismatch, "the measurements of host %q differ from the baseline of group %q: %s",
			h.Name, h.Group, strings.Join(differ, ", "))
	}
	return nil
}

// firstDifference names the first of a PCR's events that differs from the
// baseline's, or nothing if the baseline has no events.
func firstDifference(want [][]byte, got []attest.Event) string {
	if want == nil {
		return ""
	}
	for k, e := range got {
		if k >= len(want) {
			return fmt.Sprintf(" (event %d, %s, is not in the baseline)", k+1, e.Type)
		}
		if !bytes.Equal(e.Digest, want[k]) {
			return fmt.Sprintf(" (event %d, %s, differs)", k+1, e.Type)
		}
	}
	return fmt.Sprintf(" (the log ends after %d events; the baseline has %d)", len(got), len(want))
}

// evNoAction events are not measured.
const evNoAction = 0x3

// pcrEvents are the log's measured events with their SHA-256 digests, by
// PCR, in order.
func pcrEvents(log *attest.EventLog) map[int][]attest.Event {
	out := map[int][]attest.Event{}
	for _, e := range log.Events(attest.HashSHA256) {
		if e.Type != evNoAction {
			out[e.Index] = append(out[e.Index], e)
		}
	}
	return out
}

// replay computes the SHA-256 PCR values an event log leads to, and each
// PCR's event digests.
func replay(log *attest.EventLog, pcrs []int) (values map[int][]byte, digests map[int][][]byte, err error) {
	events := pcrEvents(log)
	values, digests = map[int][]byte{}, map[int][][]byte{}
	for _, i := range pcrs {
		pcr := make([]byte, sha256.Size)
		digests[i] = [][]byte{}
		for k, e := range events[i] {
			if len(e.Digest) != sha256.Size {
				return nil, nil, fmt.Errorf("event %d of PCR %d has no SHA-256 digest", k+1, i)
			}
			sum := sha256.Sum256(append(pcr, e.Digest...))
			pcr = sum[:]
			digests[i] = append(digests[i], e.Digest)
		}
		values[i] = pcr
	}
	return values, digests, nil
}

func (s *Server) release(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeReleaseRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	o.vmID = req.VMID
	c, err := guardian.ParseHealthCertificate(req.Certificate, [][]byte{s.cfg.Keys.Signing.Public()}, s.cfg.Now())
	if err != nil {
		return nil, err
	}
	o.host = c.Host
	if _, err := s.host(r.Context(), c.Host); err != nil {
		return nil, err
	}
	key, role, err := req.Protector.Unwrap(s.cfg.Keys.Encryption, req.VMID)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	wrapped, err := guardian.WrapRelease(c.TransportKey, req.VMID, key)
	if err != nil {
		return nil, err
	}
	o.detail = "released the VM's key as " + role + " to certificate " + c.Serial
	return guardian.ReleaseResponse{Wrapped: wrapped, Role: role}, nil
}
