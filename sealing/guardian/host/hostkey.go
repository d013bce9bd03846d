package host

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"

	"github.com/vtpmd/vtpmd/internal/safefile"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// HostKey proves a host's identity, not its health, with an ECDSA P-256
// key in a file of mode 0600 that is created on first use: for hosts
// without a TPM.
type HostKey struct {
	Path string
}

// maxHostKeyFile bounds the key file; a PEM P-256 key is about 240 bytes.
const maxHostKeyFile = 4096

// Identity is the host key's public key.
func (h *HostKey) Identity() (*guardian.HostIdentity, error) {
	k, err := h.key()
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("encode host key %s: %w", h.Path, err)
	}
	return &guardian.HostIdentity{Mode: guardian.ModeHostKey, HostKey: der}, nil
}

// Evidence signs the SHA-256 of AttestationDigest(nonce, transportKey).
func (h *HostKey) Evidence(nonce, transportKey []byte) (*guardian.AttestRequest, error) {
	k, err := h.key()
	if err != nil {
		return nil, err
	}
	digest := sha256.Sum256(guardian.AttestationDigest(nonce, transportKey))
	sig, err := ecdsa.SignASN1(rand.Reader, k, digest[:])
	if err != nil {
		return nil, fmt.Errorf("sign with host key %s: %w", h.Path, err)
	}
	return &guardian.AttestRequest{Nonce: nonce, TransportKey: transportKey, HostKey: &guardian.HostKeyEvidence{Signature: sig}}, nil
}

// key reads the host key, creating it if there is none.
func (h *HostKey) key() (*ecdsa.PrivateKey, error) {
	k, err := h.read()
	if !errors.Is(err, fs.ErrNotExist) {
		return k, err
	}
	k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create host key %s: %w", h.Path, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("create host key %s: %w", h.Path, err)
	}
	err = safefile.Create(h.Path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	if errors.Is(err, fs.ErrExist) {
		return h.read() // a concurrent start created it first
	}
	if err != nil {
		return nil, fmt.Errorf("create host key: %w", err)
	}
	return k, nil
}

func (h *HostKey) read() (*ecdsa.PrivateKey, error) {
	b, err := safefile.Load(h.Path, maxHostKeyFile, true)
	if err != nil {
		return nil, fmt.Errorf("read host key: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("read host key %s: not a PEM PRIVATE KEY", h.Path)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("read host key %s: %w", h.Path, err)
	}
	k, ok := parsed.(*ecdsa.PrivateKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, fmt.Errorf("read host key %s: not an ECDSA P-256 key", h.Path)
	}
	return k, nil
}
