package guardian

import (
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// The one HPKE suite of protocol version 1: DHKEM(P-256, HKDF-SHA256),
// HKDF-SHA256, AES-256-GCM.
var (
	kdf  = hpke.HKDFSHA256()
	aead = hpke.AES256GCM()
)

// HPKE info strings, one per use, so a ciphertext made for one purpose never
// opens as another.
const (
	protectorInfo = "vtpmd key protector v1\x00"
	releaseInfo   = "vtpmd key release v1\x00"
)

// StateKeySize is the size of a VM state key.
const StateKeySize = 32

// EncryptionKey is an HPKE recipient key pair: a guardian's, or a host's
// transport key.
type EncryptionKey struct {
	private *ecdh.PrivateKey
}

// NewEncryptionKey draws a fresh P-256 key pair.
func NewEncryptionKey() (*EncryptionKey, error) {
	k, err := ecdh.P256().GenerateKey(nil)
	if err != nil {
		return nil, fmt.Errorf("generate encryption key: %w", err)
	}
	return &EncryptionKey{private: k}, nil
}

// ParseEncryptionKey reads a private key made by (*EncryptionKey).Bytes.
func ParseEncryptionKey(b []byte) (*EncryptionKey, error) {
	k, err := ecdh.P256().NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("parse encryption key: %w", err)
	}
	return &EncryptionKey{private: k}, nil
}

// Bytes is the private key's encoding. Never log it.
func (k *EncryptionKey) Bytes() []byte { return k.private.Bytes() }

// Public is the public key's encoding (an uncompressed P-256 point).
func (k *EncryptionKey) Public() []byte { return k.private.PublicKey().Bytes() }

// String never shows the private key.
func (k *EncryptionKey) String() string { return "encryption key " + KeyID(k.Public()) }

// KeyID names a public key: the first 8 bytes of its SHA-256, in hex.
func KeyID(public []byte) string {
	sum := sha256.Sum256(public)
	return hex.EncodeToString(sum[:8])
}

// seal wraps plaintext to a public key for the given info.
func seal(public []byte, info string, plaintext []byte) ([]byte, error) {
	pub, err := ecdh.P256().NewPublicKey(public)
	if err != nil {
		return nil, fmt.Errorf("recipient public key: %w", err)
	}
	pk, err := hpke.NewDHKEMPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("recipient public key: %w", err)
	}
	return hpke.Seal(pk, kdf, aead, []byte(info), plaintext)
}

// open unwraps a ciphertext made by seal for the same info.
func (k *EncryptionKey) open(info string, ciphertext []byte) ([]byte, error) {
	sk, err := hpke.NewDHKEMPrivateKey(k.private)
	if err != nil {
		return nil, err
	}
	return hpke.Open(sk, kdf, aead, []byte(info), ciphertext)
}

// WrapRelease wraps a released state key to a host's transport key, bound to
// the VM. The guardian calls it.
func WrapRelease(transportKey []byte, vmID string, stateKey []byte) ([]byte, error) {
	wrapped, err := seal(transportKey, releaseInfo+vmID, stateKey)
	if err != nil {
		return nil, fmt.Errorf("wrap key of VM %q for release: %w", vmID, err)
	}
	return wrapped, nil
}

// OpenRelease opens a released state key with the transport key the health
// certificate was issued for. The host calls it.
func (k *EncryptionKey) OpenRelease(vmID string, wrapped []byte) ([]byte, error) {
	key, err := k.open(releaseInfo+vmID, wrapped)
	if err != nil {
		return nil, fmt.Errorf("open the key released for VM %q: %w", vmID, err)
	}
	if len(key) != StateKeySize {
		return nil, fmt.Errorf("the key released for VM %q has %d bytes, want %d", vmID, len(key), StateKeySize)
	}
	return key, nil
}
