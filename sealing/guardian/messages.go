package guardian

import (
	"crypto/ecdh"
	"crypto/sha256"
	"io"
	"time"
)

// The host-facing endpoints of a guardian. Each takes a POST of the request
// type named beside it and answers with the response type, or an Error.
const (
	PathNonce   = "/v1/attest/nonce" // NonceRequest -> NonceResponse
	PathAttest  = "/v1/attest"       // AttestRequest -> AttestResponse
	PathRelease = "/v1/release"      // ReleaseRequest -> ReleaseResponse
	PathKeys    = "/v1/keys"         // GET -> KeysResponse
	PathHealth  = "/v1/health"       // GET -> 200 when the replica can serve
)

// Attestation modes.
const (
	ModeTPM     = "tpm"     // TPM quote and measured-boot event log
	ModeHostKey = "hostkey" // signature by a registered host key
)

// NonceSize is the size of an attestation nonce.
const NonceSize = 32

// Limits on evidence.
const (
	maxQuoteSize     = 1024
	maxSignatureSize = 1024
	maxPublicSize    = 1024
	maxPCRIndex      = 23
	maxEventLogSize  = MaxRequestSize - 64<<10
)

// NonceRequest asks for a fresh attestation nonce.
type NonceRequest struct {
	Host string `json:"host"`
}

// NonceResponse carries the nonce, which expires and can be used once.
type NonceResponse struct {
	Nonce   []byte    `json:"nonce"`
	Expires time.Time `json:"expires"`
}

// AttestRequest is a host's evidence. Exactly one of TPM and HostKey is set.
type AttestRequest struct {
	Host  string `json:"host"`
	Nonce []byte `json:"nonce"`
	// TransportKey is the public key the health certificate is issued for.
	TransportKey []byte `json:"transport_key"`
	// TPM is the evidence of a host in TPM mode.
	TPM *TPMEvidence `json:"tpm,omitempty"`
	// HostKey is the evidence of a host in host-key mode.
	HostKey *HostKeyEvidence `json:"host_key,omitempty"`
}

// TPMEvidence is a quote by the host's registered attestation key, whose
// qualifying data is AttestationDigest(nonce, transport key), with the
// quoted SHA-256 PCR values and the event log that explains them.
type TPMEvidence struct {
	// Quote is the TPMS_ATTEST structure the TPM signed.
	Quote []byte `json:"quote"`
	// Signature is the TPMT_SIGNATURE over Quote.
	Signature []byte `json:"signature"`
	// PCRs are the SHA-256 bank's values, by PCR index.
	PCRs map[int][]byte `json:"pcrs_sha256"`
	// EventLog is the TCG measured-boot event log (crypto-agile format).
	EventLog []byte `json:"event_log"`
}

// HostKeyEvidence is the host key's ECDSA (ASN.1) signature over the SHA-256
// of AttestationDigest(nonce, transport key).
type HostKeyEvidence struct {
	Signature []byte `json:"signature"`
}

// AttestResponse carries the health certificate.
type AttestResponse struct {
	Certificate string    `json:"certificate"`
	NotAfter    time.Time `json:"not_after"`
}

// ReleaseRequest asks for a VM's state key.
type ReleaseRequest struct {
	VMID        string     `json:"vm_id"`
	Protector   *Protector `json:"protector"`
	Certificate string     `json:"certificate"`
}

// ReleaseResponse carries the state key wrapped to the certificate's
// transport key (see OpenRelease).
type ReleaseResponse struct {
	Wrapped []byte `json:"wrapped"`
	// Role says whether the guardian released as the owner or as a granted
	// fabric.
	Role string `json:"role"`
}

// KeysResponse names a guardian and its public encryption key, which new
// protectors are wrapped to.
type KeysResponse struct {
	Name       string `json:"name"`
	Encryption []byte `json:"encryption"`
}

// HostIdentity is what a host registers: its TPM's keys in TPM mode, or its
// host key in host-key mode.
type HostIdentity struct {
	Mode string `json:"mode"`
	// EKPublic and AKPublic are TPMT_PUBLIC structures (TPM mode).
	EKPublic []byte `json:"ek_public,omitempty"`
	AKPublic []byte `json:"ak_public,omitempty"`
	// HostKey is a PKIX DER ECDSA P-256 public key (host-key mode).
	HostKey []byte `json:"host_key,omitempty"`
}

// AttestationDigest is what the evidence signs: it binds the guardian's
// nonce and the host's transport key, so that neither can be swapped.
func AttestationDigest(nonce, transportKey []byte) []byte {
	h := sha256.New()
	h.Write([]byte("vtpmd attest v1\x00"))
	h.Write(nonce)
	h.Write(transportKey)
	return h.Sum(nil)
}

// DecodeNonceRequest reads and checks a NonceRequest.
func DecodeNonceRequest(r io.Reader) (*NonceRequest, error) { return decode[NonceRequest](r) }

// DecodeAttestRequest reads and checks an AttestRequest.
func DecodeAttestRequest(r io.Reader) (*AttestRequest, error) { return decode[AttestRequest](r) }

// DecodeReleaseRequest reads and checks a ReleaseRequest.
func DecodeReleaseRequest(r io.Reader) (*ReleaseRequest, error) { return decode[ReleaseRequest](r) }

// DecodeHostIdentity reads and checks a HostIdentity.
func DecodeHostIdentity(r io.Reader) (*HostIdentity, error) { return decode[HostIdentity](r) }

func badRequest(format string, args ...any) error { return Errorf(CodeBadRequest, format, args...) }

// ValidName checks a host, group or guardian name: 1 to 253 characters of
// letters, digits, '.', '-' and '_'.
func ValidName(what, name string) error {
	if name == "" || len(name) > maxNameLen {
		return badRequest("%s name of %d characters: give 1 to %d", what, len(name), maxNameLen)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return badRequest("%s name %q: use letters, digits, '.', '-' and '_'", what, name)
		}
	}
	return nil
}

// ValidTransportKey checks that b is an uncompressed P-256 public key.
func ValidTransportKey(b []byte) error {
	if _, err := ecdh.P256().NewPublicKey(b); err != nil {
		return badRequest("transport key: %v", err)
	}
	return nil
}

func (r *NonceRequest) validate() error { return ValidName("host", r.Host) }

func (r *AttestRequest) validate() error {
	if err := ValidName("host", r.Host); err != nil {
		return err
	}
	if len(r.Nonce) != NonceSize {
		return badRequest("nonce of %d bytes, want %d", len(r.Nonce), NonceSize)
	}
	if err := ValidTransportKey(r.TransportKey); err != nil {
		return err
	}
	switch {
	case (r.TPM == nil) == (r.HostKey == nil):
		return badRequest("give exactly one of tpm and host_key evidence")
	case r.HostKey != nil:
		if n := len(r.HostKey.Signature); n == 0 || n > maxSignatureSize {
			return badRequest("host key signature of %d bytes", n)
		}
		return nil
	}
	t := r.TPM
	switch {
	case len(t.Quote) == 0 || len(t.Quote) > maxQuoteSize:
		return badRequest("quote of %d bytes", len(t.Quote))
	case len(t.Signature) == 0 || len(t.Signature) > maxSignatureSize:
		return badRequest("quote signature of %d bytes", len(t.Signature))
	case len(t.PCRs) == 0:
		return badRequest("no PCR values")
	case len(t.EventLog) == 0 || len(t.EventLog) > maxEventLogSize:
		return badRequest("event log of %d bytes", len(t.EventLog))
	}
	for i, v := range t.PCRs {
		if i < 0 || i > maxPCRIndex || len(v) != sha256.Size {
			return badRequest("PCR %d: %d bytes (want indices 0..%d, %d bytes)", i, len(v), maxPCRIndex, sha256.Size)
		}
	}
	return nil
}

func (r *ReleaseRequest) validate() error {
	switch {
	case r.VMID == "" || len(r.VMID) > maxVMIDLen:
		return badRequest("VM id of %d bytes", len(r.VMID))
	case r.Protector == nil:
		return badRequest("no protector")
	case r.Certificate == "":
		return badRequest("no health certificate")
	}
	return r.Protector.validate()
}

func (h *HostIdentity) validate() error {
	switch h.Mode {
	case ModeTPM:
		if n, m := len(h.EKPublic), len(h.AKPublic); n == 0 || m == 0 || n > maxPublicSize || m > maxPublicSize || len(h.HostKey) != 0 {
			return badRequest("tpm identity: give ek_public and ak_public (at most %d bytes each) and no host_key", maxPublicSize)
		}
	case ModeHostKey:
		if n := len(h.HostKey); n == 0 || n > maxPublicSize || len(h.EKPublic)+len(h.AKPublic) != 0 {
			return badRequest("hostkey identity: give host_key (at most %d bytes) only", maxPublicSize)
		}
	default:
		return badRequest("mode %q: use %q or %q", h.Mode, ModeTPM, ModeHostKey)
	}
	return nil
}
