package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// Keys is a guardian's key bundle, the same at every replica: the fabric's
// name and encryption key (protectors are wrapped to it), the signing key of
// health certificates, the CA that certifies the replicas' TLS keys, and the
// hash of the admin token.
type Keys struct {
	Fabric     string
	Encryption *guardian.EncryptionKey
	Signing    *guardian.SigningKey
	CA         *x509.Certificate
	caKey      *ecdsa.PrivateKey
	adminToken [sha256.Size]byte
}

// keysFile is the bundle's plaintext encoding, which exists only to be
// sealed.
type keysFile struct {
	Fabric     string `json:"fabric"`
	Encryption []byte `json:"encryption"`
	Signing    []byte `json:"signing"`
	CACert     []byte `json:"ca_cert"`
	CAKey      []byte `json:"ca_key"`
	AdminToken []byte `json:"admin_token_sha256"`
}

// KeysKey is where the sealed bundle is kept in a Store.
const KeysKey = "keys/bundle"

// bundleBinding is bound into the sealed bundle's associated data.
const bundleBinding = "vtpmd guardian key bundle"

// NewKeys makes a fabric's key bundle, and the admin token whose hash it
// holds (the token is shown once, to be kept in a file of mode 0600).
func NewKeys(fabric string) (*Keys, string, error) {
	if err := guardian.ValidName("fabric", fabric); err != nil {
		return nil, "", err
	}
	k := &Keys{Fabric: fabric}
	var err error
	if k.Encryption, err = guardian.NewEncryptionKey(); err != nil {
		return nil, "", err
	}
	if k.Signing, err = guardian.NewSigningKey(); err != nil {
		return nil, "", err
	}
	if k.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return nil, "", fmt.Errorf("generate guardian CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "vtpmd guardian CA " + fabric},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.caKey.PublicKey, k.caKey)
	if err != nil {
		return nil, "", fmt.Errorf("make guardian CA: %w", err)
	}
	if k.CA, err = x509.ParseCertificate(der); err != nil {
		return nil, "", fmt.Errorf("make guardian CA: %w", err)
	}
	token := make([]byte, 32)
	if _, err := rand.Read(token); err != nil {
		return nil, "", fmt.Errorf("draw admin token: %w", err)
	}
	tokenText := hex.EncodeToString(token)
	k.adminToken = sha256.Sum256([]byte(tokenText))
	return k, tokenText, nil
}

func randomSerial() *big.Int {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand does not fail
	return new(big.Int).SetBytes(b)
}

// String never shows a private key.
func (k *Keys) String() string {
	return fmt.Sprintf("key bundle of fabric %q (%v, %v)", k.Fabric, k.Encryption, k.Signing)
}

// CAPEM is the guardian CA's certificate, which hosts and admin tools trust.
func (k *Keys) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: k.CA.Raw})
}

// adminTokenOK compares a presented admin token with the bundle's, in
// constant time.
func (k *Keys) adminTokenOK(token string) bool {
	sum := sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(sum[:], k.adminToken[:]) == 1
}

// ServerCertificate certifies a fresh TLS key of one replica, for the DNS
// names and IP addresses in names, with the guardian CA.
func (k *Keys) ServerCertificate(names []string, lifetime time.Duration) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate TLS key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: "vtpmd guardian " + k.Fabric},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if n != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, k.CA, &key.PublicKey, k.caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certify TLS key: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// LoadKEK reads the key-encryption key file, creating it (mode 0600, 32
// random bytes) when create is set and it does not exist.
func LoadKEK(path string, create bool) (*sealing.Key, error) {
	if !create {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("key-encryption key: %w (copy it from the replica where init ran)", err)
		}
	}
	kek, err := (&sealing.HostKey{Path: path}).StateKey(context.Background(), bundleBinding)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	return kek, nil
}

// SealKeys seals the bundle under the KEK (AES-256-GCM): the form it is
// stored in, on disk or in etcd.
func SealKeys(k *Keys, kek *sealing.Key) ([]byte, error) {
	signing, err := k.Signing.Bytes()
	if err != nil {
		return nil, err
	}
	caKey, err := x509.MarshalECPrivateKey(k.caKey)
	if err != nil {
		return nil, fmt.Errorf("seal key bundle: %w", err)
	}
	plain, err := json.Marshal(keysFile{
		Fabric: k.Fabric, Encryption: k.Encryption.Bytes(), Signing: signing,
		CACert: k.CA.Raw, CAKey: caKey, AdminToken: k.adminToken[:],
	})
	clear(signing)
	clear(caKey)
	if err != nil {
		return nil, fmt.Errorf("seal key bundle: %w", err)
	}
	defer clear(plain)
	return sealing.Seal(kek, bundleBinding, sealing.KindGuardianKeys, 0, plain)
}

// OpenKeys opens a bundle sealed by SealKeys.
func OpenKeys(sealed []byte, kek *sealing.Key) (*Keys, error) {
	plain, err := sealing.Open(kek, bundleBinding, sealing.KindGuardianKeys, 0, sealed)
	if err != nil {
		return nil, fmt.Errorf("open key bundle (is this the KEK it was sealed under?): %w", err)
	}
	defer clear(plain)
	var f keysFile
	if err := json.Unmarshal(plain, &f); err != nil {
		return nil, fmt.Errorf("open key bundle: %w", err)
	}
	defer func() { clear(f.Encryption); clear(f.Signing); clear(f.CAKey) }()
	k := &Keys{Fabric: f.Fabric}
	if len(f.AdminToken) != sha256.Size {
		return nil, errors.New("open key bundle: no admin token hash")
	}
	copy(k.adminToken[:], f.AdminToken)
	if k.Encryption, err = guardian.ParseEncryptionKey(f.Encryption); err != nil {
		return nil, fmt.Errorf("open key bundle: %w", err)
	}
	if k.Signing, err = guardian.ParseSigningKey(f.Signing); err != nil {
		return nil, fmt.Errorf("open key bundle: %w", err)
	}
	if k.CA, err = x509.ParseCertificate(f.CACert); err != nil {
		return nil, fmt.Errorf("open key bundle: CA: %w", err)
	}
	if k.caKey, err = x509.ParseECPrivateKey(f.CAKey); err != nil {
		return nil, fmt.Errorf("open key bundle: CA key: %w", err)
	}
	return k, nil
}
