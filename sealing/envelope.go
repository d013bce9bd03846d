package sealing

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
)

// Kind is the kind of sealed blob; it is bound into the associated data.
type Kind uint8

// Kinds of sealed blobs.
const (
	// KindTPMState is a TPM's state image.
	KindTPMState Kind = 1
	// KindGuardianKeys is a guardian's key bundle, sealed under its KEK.
	KindGuardianKeys Kind = 2
	// KindTPMDelta is a change to a TPM's state image: the bytes that
	// changed since the generation before.
	KindTPMDelta Kind = 3
)

// Errors of Open.
var (
	// ErrMalformed: the envelope cannot be parsed.
	ErrMalformed = errors.New("malformed sealed envelope")
	// ErrWrongKey: the envelope names another key than the one given.
	ErrWrongKey = errors.New("sealed with another key")
	// ErrAuth: the envelope does not open under this key, VM id, kind and
	// generation: it was altered, or belongs to another VM or generation.
	ErrAuth = errors.New("sealed envelope does not authenticate (altered, another VM's, or another generation's)")
)

const (
	envelopeMagic   = "VTSE"
	envelopeVersion = 1
	nonceSize       = 12
	// header: magic, version, kind, key id length, key id, generation, nonce
	fixedHeader = 4 + 1 + 1 + 1
)

// Envelope is a parsed sealed blob.
type Envelope struct {
	Kind       Kind
	KeyID      string
	Generation uint64
	nonce      []byte
	header     []byte
	ciphertext []byte
}

// Seal encrypts plaintext for the VM under key, binding the VM id, kind and
// generation.
func Seal(key *Key, vmID string, kind Kind, generation uint64, plaintext []byte) ([]byte, error) {
	if key.aead == nil {
		return nil, errors.New("seal: the key was not made by NewKey")
	}
	aead := key.aead
	if len(key.ID) > 255 {
		return nil, fmt.Errorf("seal: key id of %d bytes is too long", len(key.ID))
	}
	out := make([]byte, 0, fixedHeader+len(key.ID)+8+nonceSize+len(plaintext)+aead.Overhead())
	out = append(out, envelopeMagic...)
	out = append(out, envelopeVersion, byte(kind), byte(len(key.ID)))
	out = append(out, key.ID...)
	out = binary.BigEndian.AppendUint64(out, generation)
	nonce := make([]byte, nonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("seal: nonce: %w", err)
	}
	out = append(out, nonce...)
	return aead.Seal(out, nonce, plaintext, associatedData(out, vmID)), nil
}

// associatedData is the header followed by the VM id.
func associatedData(header []byte, vmID string) []byte {
	return append(append([]byte(nil), header...), vmID...)
}

// Parse reads an envelope's header without opening it.
func Parse(b []byte) (*Envelope, error) {
	if len(b) < fixedHeader || string(b[:4]) != envelopeMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrMalformed, envelopeMagic)
	}
	if b[4] != envelopeVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrMalformed, b[4], envelopeVersion)
	}
	idLen := int(b[6])
	headerLen := fixedHeader + idLen + 8 + nonceSize
	if len(b) < headerLen+16 {
		return nil, fmt.Errorf("%w: %d bytes is too short", ErrMalformed, len(b))
	}
	return &Envelope{
		Kind:       Kind(b[5]),
		KeyID:      string(b[fixedHeader : fixedHeader+idLen]),
		Generation: binary.BigEndian.Uint64(b[fixedHeader+idLen:]),
		nonce:      b[headerLen-nonceSize : headerLen],
		header:     b[:headerLen],
		ciphertext: b[headerLen:],
	}, nil
}

// Open decrypts a sealed blob for the VM, checking that it is of kind and
// generation, under key.
func Open(key *Key, vmID string, kind Kind, generation uint64, sealed []byte) ([]byte, error) {
	env, err := Parse(sealed)
	if err != nil {
		return nil, err
	}
	switch {
	case env.KeyID != key.ID:
		return nil, fmt.Errorf("%w: sealed with key %q, have key %q", ErrWrongKey, env.KeyID, key.ID)
	case env.Kind != kind:
		return nil, fmt.Errorf("%w: kind %d, want %d", ErrAuth, env.Kind, kind)
	case env.Generation != generation:
		return nil, fmt.Errorf("%w: generation %d, want %d", ErrAuth, env.Generation, generation)
	}
	if key.aead == nil {
		return nil, errors.New("open: the key was not made by NewKey")
	}
	plain, err := key.aead.Open(nil, env.nonce, env.ciphertext, associatedData(env.header, vmID))
	if err != nil {
		return nil, ErrAuth
	}
	return plain, nil
}

// Key is a state key: 256 bits for AES-256-GCM, named by an id that is not
// secret.
type Key struct {
	ID     string
	secret []byte
	aead   cipher.AEAD // made once: AES's key schedule costs more than a small seal
}

// NewKey makes a key from 32 secret bytes; the id names it in envelopes.
func NewKey(id string, secret []byte) (*Key, error) {
	if len(secret) != 32 {
		return nil, fmt.Errorf("state key must be 32 bytes, not %d", len(secret))
	}
	block, err := aes.NewCipher(secret)
	if err != nil {
		return nil, fmt.Errorf("state key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("state key: %w", err)
	}
	return &Key{ID: id, secret: append([]byte(nil), secret...), aead: aead}, nil
}

// String never shows the secret.
func (k *Key) String() string { return "key " + k.ID }

// GoString never shows the secret.
func (k *Key) GoString() string { return k.String() }

// LogValue keeps the secret out of structured logs.
func (k *Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// Secret returns a copy of the key's secret, for handing the key to the one
// process that serves the VM (the worker of `vtpmd serve`). Never log it.
func (k *Key) Secret() []byte { return append([]byte(nil), k.secret...) }
