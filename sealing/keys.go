package sealing

import (
	"context"
	"crypto/hkdf"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/options"
	"github.com/vtpmd/vtpmd/internal/safefile"
)

// KeySource gives each VM its state key.
type KeySource interface {
	// StateKey returns the VM's state key.
	StateKey(ctx context.Context, vmID string) (*Key, error)
	// Protection says how the keys are protected, for the logs.
	Protection() string
}

// deriveStateKey derives a VM's state key from a source secret, so that one
// VM's key opens nothing of another's.
func deriveStateKey(idPrefix string, secret []byte, vmID string) (*Key, error) {
	k, err := hkdf.Key(sha256.New, secret, nil, "vtpmd state key\x00"+vmID, 32)
	if err != nil {
		return nil, fmt.Errorf("derive state key: %w", err)
	}
	fingerprint := sha256.Sum256(secret)
	return NewKey(idPrefix+":"+hex.EncodeToString(fingerprint[:8]), k)
}

// HostKey is a host-local secret in a file of mode 0600, created on first
// use. It protects state against copies to another host, not against this
// host's root: "local protection only".
type HostKey struct {
	// Path is the key file. It must not be inside a VM's state directory.
	Path string
}

const hostKeySize = 32

// StateKey derives the VM's key from the host key, creating the host key if
// there is none.
func (h *HostKey) StateKey(_ context.Context, vmID string) (*Key, error) {
	secret, err := h.read()
	if errors.Is(err, fs.ErrNotExist) {
		secret, err = h.create()
	}
	if err != nil {
		return nil, err
	}
	return deriveStateKey("host", secret, vmID)
}

// Protection implements KeySource.
func (h *HostKey) Protection() string { return "local protection only (host key " + h.Path + ")" }

func (h *HostKey) read() ([]byte, error) {
	secret, err := safefile.Load(h.Path, hostKeySize, true)
	if err != nil {
		return nil, fmt.Errorf("read host key: %w", err)
	}
	if len(secret) != hostKeySize {
		return nil, fmt.Errorf("host key %s has %d bytes, want %d", h.Path, len(secret), hostKeySize)
	}
	return secret, nil
}

func (h *HostKey) create() ([]byte, error) {
	secret := make([]byte, hostKeySize)
	if _, err := rand.Read(secret); err != nil {
		return nil, fmt.Errorf("create host key: %w", err)
	}
	// Created whole, never over an existing key: a concurrent reader never
	// sees a partial key, and a concurrent creator's key wins.
	err := safefile.Create(h.Path, secret, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return h.read()
	}
	if err != nil {
		return nil, fmt.Errorf("create host key: %w", err)
	}
	return secret, nil
}

// SwtpmKey is a key given the way swtpm takes --key and --migration-key: a
// raw AES key (128 or 256 bits) from a file or descriptor, or derived from a
// passphrase.
type SwtpmKey struct {
	// Raw is the AES key as swtpm would use it.
	Raw []byte
	// CBC256 says the key is for aes-256-cbc (else aes-128-cbc).
	CBC256 bool
}

// ParseSwtpmKey reads the key that an option value like
// "pwdfd=3,mode=aes-256-cbc" or "file=/k,format=hex,remove=true" names.
func ParseSwtpmKey(option, value string) (*SwtpmKey, error) {
	v, err := options.Parse(option, value, "file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove")
	if err != nil {
		return nil, err
	}
	sources := 0
	for _, name := range []string{"file", "fd", "pwdfile", "pwdfd"} {
		if v.Has(name) {
			sources++
		}
	}
	if sources != 1 {
		return nil, fmt.Errorf("%s: give exactly one of file=, fd=, pwdfile= or pwdfd=", option)
	}
	mode, err := v.OneOf("mode", "aes-cbc", "aes-cbc", "aes-128-cbc", "aes-256-cbc")
	if err != nil {
		return nil, err
	}
	key := &SwtpmKey{CBC256: mode == "aes-256-cbc"}
	keyLen := 16
	if key.CBC256 {
		keyLen = 32
	}
	passphrase := v.Has("pwdfile") || v.Has("pwdfd")
	if passphrase && v.Has("format") {
		return nil, fmt.Errorf("%s: format= is for file= and fd= keys", option)
	}
	if !passphrase && v.Has("kdf") {
		return nil, fmt.Errorf("%s: kdf= is for pwdfile= and pwdfd= keys", option)
	}
	material, err := readKeyMaterial(option, v)
	if err != nil {
		return nil, err
	}
	if passphrase {
		kdf, err := v.OneOf("kdf", "pbkdf2", "pbkdf2", "sha512")
		if err != nil {
			return nil, err
		}
		if kdf == "sha512" {
			sum := sha512.Sum512(material)
			key.Raw = sum[:keyLen]
		} else if key.Raw, err = pbkdf2.Key(sha512.New, string(material), []byte("swtpm"), 1000, keyLen); err != nil {
			return nil, fmt.Errorf("%s: %w", option, err)
		}
		return key, nil
	}
	format, err := v.OneOf("format", "hex", "hex", "binary")
	if err != nil {
		return nil, err
	}
	if format == "hex" {
		text := strings.TrimPrefix(strings.TrimSpace(string(material)), "0x")
		if material, err = hex.DecodeString(text); err != nil {
			return nil, fmt.Errorf("%s: the key is not a hex string", option)
		}
	}
	if len(material) != keyLen {
		return nil, fmt.Errorf("%s: the key has %d bytes, %s needs %d", option, len(material), mode, keyLen)
	}
	key.Raw = material
	return key, nil
}

// readKeyMaterial reads the file or descriptor the option names, removing
// the file afterwards if remove= says so.
func readKeyMaterial(option string, v options.Values) ([]byte, error) {
	const maxKeyMaterial = 4096
	var r io.ReadCloser
	path := v.String("file") + v.String("pwdfile")
	if path != "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", option, err)
		}
		r = f
	} else {
		name := "fd"
		if v.Has("pwdfd") {
			name = "pwdfd"
		}
		fd, err := v.Int(name, -1)
		if err != nil {
			return nil, err
		}
		r = os.NewFile(uintptr(fd), option+" fd")
	}
	material, err := io.ReadAll(io.LimitReader(r, maxKeyMaterial+1))
	err = errors.Join(err, r.Close())
	if err != nil {
		return nil, fmt.Errorf("%s: read key: %w", option, err)
	}
	if len(material) > maxKeyMaterial {
		return nil, fmt.Errorf("%s: key material longer than %d bytes", option, maxKeyMaterial)
	}
	if path != "" && v.Bool("remove", false) {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("%s: remove key file: %w", option, err)
		}
	}
	return material, nil
}

// StateKey derives the VM's state key from the swtpm key.
func (k *SwtpmKey) StateKey(_ context.Context, vmID string) (*Key, error) {
	return deriveStateKey("swtpm", k.Raw, vmID)
}

// Protection implements KeySource.
func (k *SwtpmKey) Protection() string { return "the key given with --key" }

// String never shows the key.
func (k *SwtpmKey) String() string { return "swtpm key (hidden)" }

// GoString never shows the key.
func (k *SwtpmKey) GoString() string { return k.String() }
