package guardian

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
)

// DefaultCertificateLifetime is how long a health certificate lasts unless
// the guardian is configured otherwise.
const DefaultCertificateLifetime = 8 * time.Hour

// HealthCertificate says that a guardian found a host healthy, for a while,
// and names the transport key that released keys are wrapped to.
type HealthCertificate struct {
	Serial       string    `json:"serial"`
	Host         string    `json:"host"`
	Group        string    `json:"group"`
	Mode         string    `json:"mode"` // ModeTPM or ModeHostKey
	TransportKey []byte    `json:"transport_key"`
	IssuedAt     time.Time `json:"issued_at"`
	NotAfter     time.Time `json:"not_after"`
	// Issuer is the KeyID of the signing key's public key.
	Issuer string `json:"issuer"`
}

// SigningKey is the guardian's key for health certificates: ECDSA P-256.
type SigningKey struct {
	private *ecdsa.PrivateKey
}

// NewSigningKey draws a fresh signing key.
func NewSigningKey() (*SigningKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate signing key: %w", err)
	}
	return &SigningKey{private: k}, nil
}

// ParseSigningKey reads a key made by (*SigningKey).Bytes.
func ParseSigningKey(b []byte) (*SigningKey, error) {
	k, err := x509.ParseECPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("parse signing key: %w", err)
	}
	return &SigningKey{private: k}, nil
}

// Bytes is the private key in SEC 1 DER. Never log it.
func (k *SigningKey) Bytes() ([]byte, error) { return x509.MarshalECPrivateKey(k.private) }

// Public is the public key in PKIX DER.
func (k *SigningKey) Public() []byte {
	b, _ := x509.MarshalPKIXPublicKey(&k.private.PublicKey) // cannot fail for P-256
	return b
}

// String never shows the private key.
func (k *SigningKey) String() string { return "signing key " + KeyID(k.Public()) }

// Issue signs a certificate for a transport key, valid from now for
// lifetime. The certificate's encoding is base64url(JSON) "." base64url(sig).
func (k *SigningKey) Issue(c HealthCertificate, now time.Time, lifetime time.Duration) (string, *HealthCertificate, error) {
	serial := make([]byte, 16)
	if _, err := rand.Read(serial); err != nil {
		return "", nil, fmt.Errorf("issue health certificate: %w", err)
	}
	c.Serial = hex.EncodeToString(serial)
	c.IssuedAt = now.UTC().Truncate(time.Second)
	c.NotAfter = c.IssuedAt.Add(lifetime)
	c.Issuer = KeyID(k.Public())
	payload, err := marshal(c)
	if err != nil {
		return "", nil, err
	}
	digest := sha256.Sum256(payload)
	sig, err := ecdsa.SignASN1(rand.Reader, k.private, digest[:])
	if err != nil {
		return "", nil, fmt.Errorf("sign health certificate: %w", err)
	}
	enc := base64.RawURLEncoding
	return enc.EncodeToString(payload) + "." + enc.EncodeToString(sig), &c, nil
}

// maxCertificateSize bounds an encoded certificate.
const maxCertificateSize = 8 << 10

// ParseHealthCertificate checks a certificate's signature against any of the
// guardian's signing keys (given in PKIX DER) and its validity at now. A bad
// signature or encoding is CodeCertInvalid; an expired one CodeCertExpired.
func ParseHealthCertificate(encoded string, signers [][]byte, now time.Time) (*HealthCertificate, error) {
	invalid := func(format string, args ...any) error {
		return Errorf(CodeCertInvalid, "health certificate: "+format, args...)
	}
	if len(encoded) > maxCertificateSize {
		return nil, invalid("%d bytes exceeds %d", len(encoded), maxCertificateSize)
	}
	payloadPart, sigPart, ok := strings.Cut(encoded, ".")
	if !ok {
		return nil, invalid("not payload.signature")
	}
	enc := base64.RawURLEncoding
	payload, err := enc.DecodeString(payloadPart)
	if err != nil {
		return nil, invalid("payload: %v", err)
	}
	sig, err := enc.DecodeString(sigPart)
	if err != nil {
		return nil, invalid("signature: %v", err)
	}
	var c HealthCertificate
	if err := unmarshalStrict(payload, &c); err != nil {
		return nil, invalid("payload: %v", err)
	}
	digest := sha256.Sum256(payload)
	verified := false
	for _, der := range signers {
		pub, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("guardian signing key: %w", err)
		}
		if ecPub, ok := pub.(*ecdsa.PublicKey); ok && KeyID(der) == c.Issuer && ecdsa.VerifyASN1(ecPub, digest[:], sig) {
			verified = true
			break
		}
	}
	switch {
	case !verified:
		return nil, invalid("signature does not verify against the guardian's signing keys")
	case now.Before(c.IssuedAt.Add(-time.Minute)): // allow for clock skew between replicas
		return nil, invalid("issued in the future (%s)", c.IssuedAt.Format(time.RFC3339))
	case !now.Before(c.NotAfter):
		return nil, Errorf(CodeCertExpired, "health certificate %s of host %q expired at %s", c.Serial, c.Host, c.NotAfter.Format(time.RFC3339))
	}
	return &c, nil
}
