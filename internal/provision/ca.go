package provision

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/safefile"
	"github.com/vtpmd/vtpmd/vtpm"
)

// CAFiles names a local CA's files, as the keys of swtpm-localca.conf do.
type CAFiles struct {
	// Dir (statedir) holds the lock that serialises serial numbers and
	// the CA's creation.
	Dir string
	// SigningKey is the CA's private key (PEM: PKCS#8, PKCS#1 or SEC 1,
	// unencrypted).
	SigningKey string
	// IssuerCert is the CA's certificate (PEM).
	IssuerCert string
	// CertSerial holds the serial number of the last certificate issued
	// (decimal). If empty, serial numbers are random.
	CertSerial string
}

// DefaultCAFiles are the files of a CA kept in dir.
func DefaultCAFiles(dir string) CAFiles {
	return CAFiles{
		Dir:        dir,
		SigningKey: filepath.Join(dir, "signkey.pem"),
		IssuerCert: filepath.Join(dir, "issuercert.pem"),
		CertSerial: filepath.Join(dir, "certserial"),
	}
}

// CA is a local certificate authority that signs EK and platform
// certificates.
type CA struct {
	files CAFiles
	key   crypto.Signer
	cert  *x509.Certificate
	// root is the root CA's certificate beside the signing key, if any.
	root *x509.Certificate
	// Created reports that OpenCA made the CA.
	Created bool
}

// A CA that vtpmd creates is laid out as swtpm_localca lays out its own: a
// root CA whose key and certificate lie beside the signing key, and an
// intermediate CA, the signing key and the issuer certificate, that the
// root certifies and that signs the EK and platform certificates.
const (
	rootCommonName         = "swtpm-localca-rootca"
	intermediateCommonName = "swtpm-localca"
	rootKeyName            = "swtpm-localca-rootca-privkey.pem"
	rootCertName           = "swtpm-localca-rootca-cert.pem"
)

// RootFiles are the root CA's key and certificate of the CA whose signing
// key is signingKey, where swtpm_localca puts them.
func RootFiles(signingKey string) (key, cert string) {
	dir := filepath.Dir(signingKey)
	return filepath.Join(dir, rootKeyName), filepath.Join(dir, rootCertName)
}

// lockName is the lock file in the CA's directory; swtpm_localca uses the
// same, so that both serialise on one CA.
const lockName = ".lock.swtpm-localca"

// OpenCA loads the CA in files, or creates one when neither its signing key
// nor its issuer certificate exists: a root CA (reused if its files exist)
// and an intermediate CA, with ECDSA P-256 keys of mode 0600. A CA without
// a root (one self-signed issuer certificate, as vtpmd made before, or an
// operator's own) keeps working.
func OpenCA(files CAFiles) (*CA, error) {
	if files.SigningKey == "" || files.IssuerCert == "" {
		return nil, errors.New("local CA: the signing key and the issuer certificate must be named")
	}
	if files.Dir == "" {
		files.Dir = filepath.Dir(files.SigningKey)
	}
	ca, err := loadCA(files)
	if !errors.Is(err, fs.ErrNotExist) {
		return ca, err
	}
	if err := os.MkdirAll(files.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("local CA: %w", err)
	}
	var created bool
	err = withLock(files.Dir, func() error {
		// Another process may have made it meanwhile.
		if ca, err = loadCA(files); !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		ca, err = createCA(files)
		created = err == nil
		return err
	})
	if err != nil {
		return nil, err
	}
	ca.Created = created
	return ca, nil
}

// Certificate is the CA's certificate, the issuer of the certificates it
// signs.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Root is the root CA's certificate beside the signing key, nil if there
// is none.
func (ca *CA) Root() *x509.Certificate { return ca.root }

// Files are the CA's files.
func (ca *CA) Files() CAFiles { return ca.files }

// loadCA reads the CA's key and certificate, and the root certificate
// beside them if there is one. It fails with fs.ErrNotExist only when
// neither the key nor the certificate exists.
func loadCA(files CAFiles) (*CA, error) {
	key, cert, err := loadPair(files.SigningKey, files.IssuerCert, "signing key", "issuer certificate")
	if err != nil {
		return nil, err
	}
	ca := &CA{files: files, key: key, cert: cert}
	_, rootPath := RootFiles(files.SigningKey)
	rootPEM, err := os.ReadFile(rootPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return ca, nil
	case err != nil:
		return nil, fmt.Errorf("local CA: %w", err)
	}
	if ca.root, err = parseCertificate(rootPath, rootPEM); err != nil {
		return nil, err
	}
	if cert.CheckSignatureFrom(ca.root) != nil {
		// An issuer of the operator's beside another root: not its root.
		ca.root = nil
	}
	return ca, nil
}

// loadPair reads a private key and its certificate. It fails with
// fs.ErrNotExist only when neither exists.
func loadPair(keyPath, certPath, keyWhat, certWhat string) (crypto.Signer, *x509.Certificate, error) {
	keyPEM, keyErr := os.ReadFile(keyPath)
	certPEM, certErr := os.ReadFile(certPath)
	switch {
	case errors.Is(keyErr, fs.ErrNotExist) && errors.Is(certErr, fs.ErrNotExist):
		return nil, nil, fmt.Errorf("local CA: %w", fs.ErrNotExist)
	case errors.Is(keyErr, fs.ErrNotExist):
		return nil, nil, fmt.Errorf("local CA: the %s %s exists but the %s %s does not", certWhat, certPath, keyWhat, keyPath)
	case errors.Is(certErr, fs.ErrNotExist):
		return nil, nil, fmt.Errorf("local CA: the %s %s exists but the %s %s does not", keyWhat, keyPath, certWhat, certPath)
	case keyErr != nil:
		return nil, nil, fmt.Errorf("local CA: %w", keyErr)
	case certErr != nil:
		return nil, nil, fmt.Errorf("local CA: %w", certErr)
	}
	key, err := parseSigningKey(keyPath, keyPEM)
	if err != nil {
		return nil, nil, err
	}
	cert, err := parseCertificate(certPath, certPEM)
	if err != nil {
		return nil, nil, err
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, nil, fmt.Errorf("local CA: the %s %s does not belong to the %s %s", keyWhat, keyPath, certWhat, certPath)
	}
	return key, cert, nil
}

func parseCertificate(path string, b []byte) (*x509.Certificate, error) {
	block := findPEM(b, "CERTIFICATE")
	if block == nil {
		return nil, fmt.Errorf("local CA: %s holds no PEM certificate", path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("local CA: %s: %w", path, err)
	}
	return cert, nil
}

// findPEM returns the first PEM block of the given type; text around the
// blocks (as certtool writes it) is skipped.
func findPEM(b []byte, typ string) *pem.Block {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil
		}
		if block.Type == typ {
			return block
		}
	}
}

func parseSigningKey(path string, b []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("local CA: %s holds no PEM private key (a pkcs11 URI or a TPM 1.2 key is not supported)", path)
		}
		if block.Type == "ENCRYPTED PRIVATE KEY" || block.Headers["Proc-Type"] != "" {
			return nil, fmt.Errorf("local CA: the signing key %s is encrypted; vtpmd needs it unencrypted (signingkey_password is not supported)", path)
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("local CA: signing key %s: %w", path, err)
		}
		switch k := key.(type) {
		case *rsa.PrivateKey:
			return k, nil
		case *ecdsa.PrivateKey:
			return k, nil
		}
		return nil, fmt.Errorf("local CA: signing key %s: only RSA and ECDSA keys can sign", path)
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// createCA makes a new CA: the root CA (unless its files exist) and the
// intermediate CA that signs.
func createCA(files CAFiles) (*CA, error) {
	rootKeyPath, rootCertPath := RootFiles(files.SigningKey)
	rootKey, root, err := loadPair(rootKeyPath, rootCertPath, "root CA key", "root CA certificate")
	if errors.Is(err, fs.ErrNotExist) {
		rootKey, root, err = createCAKey(rootKeyPath, rootCertPath, rootCommonName, nil, nil)
	}
	if err != nil {
		return nil, err
	}
	key, cert, err := createCAKey(files.SigningKey, files.IssuerCert, intermediateCommonName, root, rootKey)
	if err != nil {
		return nil, err
	}
	return &CA{files: files, key: key, cert: cert, root: root}, nil
}

// createCAKey makes a CA key (ECDSA P-256, mode 0600) and its certificate,
// valid until 9999, signed by parent (self-signed if nil), and writes them
// to keyPath and certPath.
func createCAKey(keyPath, certPath, cn string, parent *x509.Certificate, parentKey crypto.Signer) (crypto.Signer, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("local CA: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Minute).UTC(),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	if parent == nil {
		parent, parentKey = template, key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, parent, key.Public(), parentKey)
	if err != nil {
		return nil, nil, fmt.Errorf("local CA: create the %s certificate: %w", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	for _, f := range []struct {
		path string
		pem  *pem.Block
		mode os.FileMode
	}{
		{keyPath, &pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}, 0o600},
		{certPath, &pem.Block{Type: "CERTIFICATE", Bytes: der}, 0o644},
	} {
		if err := safefile.Create(f.path, pem.EncodeToMemory(f.pem), f.mode); err != nil {
			return nil, nil, fmt.Errorf("local CA: %w", err)
		}
	}
	return key, cert, nil
}

// notAfter is the "no well-defined expiration" date of RFC 5280, which
// swtpm_localca gives its certificates too.
var notAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

// withLock runs f holding the CA directory's lock (flock).
func withLock(dir string, f func() error) error {
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("local CA: lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("local CA: lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	return f()
}

func randomSerial() (*big.Int, error) {
	// 64 random bits, positive and non-zero.
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 63))
	if err != nil {
		return nil, err
	}
	return n.Add(n, big.NewInt(1)), nil
}

// nextSerial takes the next serial number from the certserial file, as
// swtpm_localca does, or a random one when there is no such file named.
func (ca *CA) nextSerial() (*big.Int, error) {
	if ca.files.CertSerial == "" {
		return randomSerial()
	}
	var serial *big.Int
	err := withLock(ca.files.Dir, func() error {
		last := big.NewInt(0)
		b, err := os.ReadFile(ca.files.CertSerial)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return fmt.Errorf("local CA: %w", err)
		default:
			if _, ok := last.SetString(strings.TrimSpace(string(b)), 10); !ok || last.Sign() < 0 {
				return fmt.Errorf("local CA: %s does not hold a serial number", ca.files.CertSerial)
			}
		}
		serial = last.Add(last, big.NewInt(1))
		tmp := ca.files.CertSerial + ".tmp"
		if err := os.WriteFile(tmp, []byte(serial.String()), 0o644); err != nil {
			return fmt.Errorf("local CA: %w", err)
		}
		if err := os.Rename(tmp, ca.files.CertSerial); err != nil {
			return fmt.Errorf("local CA: %w", err)
		}
		return nil
	})
	return serial, err
}

// TPMInfo describes the TPM in an EK certificate.
type TPMInfo struct {
	// Manufacturer, Model and Version go into the subject alternative
	// name ("id:4D534654", "vtpmd", "id:20170619").
	Manufacturer, Model, Version string
	// The TPM specification: family "2.0", level and revision.
	SpecFamily   string
	SpecLevel    int
	SpecRevision int
}

// TPMInfoOf describes the engine as CMD_GET_INFO does.
func TPMInfoOf(e *vtpm.EngineInfo) TPMInfo {
	return TPMInfo{
		Manufacturer: fmt.Sprintf("id:%08X", e.Manufacturer),
		Model:        vtpm.Model,
		Version:      fmt.Sprintf("id:%08X", e.Firmware),
		SpecFamily:   e.Family,
		SpecLevel:    int(e.Level),
		SpecRevision: int(e.Revision),
	}
}

// Platform describes the platform in a platform certificate, as the
// --platform-* options of swtpm-localca.options do.
type Platform struct {
	Manufacturer, Model, Version string
}

// TCG object identifiers (TCG EK Credential Profile, TCG Platform
// Attribute Credential Profile).
var (
	oidTPMManufacturer      = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel             = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion           = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidTPMSpecification     = asn1.ObjectIdentifier{2, 23, 133, 2, 16}
	oidPlatformManufacturer = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 1}
	oidPlatformModel        = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 4}
	oidPlatformVersion      = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 5}
	oidEKCertificate        = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidPlatformCertificate  = asn1.ObjectIdentifier{2, 23, 133, 8, 2}

	oidSubjectAltName        = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidSubjectDirectoryAttrs = asn1.ObjectIdentifier{2, 5, 29, 9}
)

// directoryNameSAN is a critical subject alternative name holding one
// directoryName whose attributes are UTF8Strings.
func directoryNameSAN(attrs []pkix.AttributeTypeAndValue) (pkix.Extension, error) {
	var rdns pkix.RDNSequence
	for _, a := range attrs {
		value := asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte(a.Value.(string))}
		rdns = append(rdns, pkix.RelativeDistinguishedNameSET{{Type: a.Type, Value: value}})
	}
	name, err := asn1.Marshal(rdns)
	if err != nil {
		return pkix.Extension{}, err
	}
	// GeneralNames with one directoryName [4] (explicitly tagged Name).
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectAltName, Critical: true, Value: san}, nil
}

// tpmSpecification is the TPMSpecification attribute of the EK Credential
// Profile.
type tpmSpecification struct {
	Family   string `asn1:"utf8"`
	Level    int
	Revision int
}

type attribute struct {
	Type   asn1.ObjectIdentifier
	Values []asn1.RawValue `asn1:"set"`
}

func specificationAttrs(info TPMInfo) (pkix.Extension, error) {
	spec, err := asn1.Marshal(tpmSpecification{Family: info.SpecFamily, Level: info.SpecLevel, Revision: info.SpecRevision})
	if err != nil {
		return pkix.Extension{}, err
	}
	sda, err := asn1.Marshal([]attribute{{Type: oidTPMSpecification, Values: []asn1.RawValue{{FullBytes: spec}}}})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectDirectoryAttrs, Value: sda}, nil
}

func subject(vmid string) pkix.Name {
	if vmid == "" {
		vmid = "unknown"
	}
	return pkix.Name{CommonName: vmid}
}

// IssueEK issues the certificate of an endorsement key, with the fields
// swtpm_localca gives it: subject CN=<vmid>, a critical subject alternative
// name with the TPM's manufacturer, model and version, the TPM
// specification in the subject directory attributes, extended key usage
// tcg-kp-EKCertificate and key usage keyEncipherment (RSA) or keyAgreement
// (ECC).
func (ca *CA) IssueEK(pub crypto.PublicKey, info TPMInfo, vmid string) ([]byte, error) {
	var usage x509.KeyUsage
	switch pub.(type) {
	case *rsa.PublicKey:
		usage = x509.KeyUsageKeyEncipherment
	case *ecdsa.PublicKey:
		usage = x509.KeyUsageKeyAgreement
	default:
		return nil, fmt.Errorf("EK certificate: unsupported key type %T", pub)
	}
	san, err := directoryNameSAN([]pkix.AttributeTypeAndValue{
		{Type: oidTPMManufacturer, Value: info.Manufacturer},
		{Type: oidTPMModel, Value: info.Model},
		{Type: oidTPMVersion, Value: info.Version},
	})
	if err != nil {
		return nil, err
	}
	sda, err := specificationAttrs(info)
	if err != nil {
		return nil, err
	}
	return ca.issue(pub, vmid, usage, oidEKCertificate, san, sda)
}

// IssuePlatform issues the platform certificate for the EK pub, with the
// fields swtpm_localca gives it: a critical subject alternative name with
// the platform's manufacturer, model and version, and extended key usage
// tcg-kp-PlatformCertificate.
func (ca *CA) IssuePlatform(pub crypto.PublicKey, p Platform, vmid string) ([]byte, error) {
	san, err := directoryNameSAN([]pkix.AttributeTypeAndValue{
		{Type: oidPlatformManufacturer, Value: p.Manufacturer},
		{Type: oidPlatformModel, Value: p.Model},
		{Type: oidPlatformVersion, Value: p.Version},
	})
	if err != nil {
		return nil, err
	}
	return ca.issue(pub, vmid, x509.KeyUsageKeyEncipherment, oidPlatformCertificate, san)
}

func (ca *CA) issue(pub crypto.PublicKey, vmid string, usage x509.KeyUsage, eku asn1.ObjectIdentifier, exts ...pkix.Extension) ([]byte, error) {
	serial, err := ca.nextSerial()
	if err != nil {
		return nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject(vmid),
		NotBefore:             time.Now().UTC().Truncate(time.Second),
		NotAfter:              notAfter,
		KeyUsage:              usage,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{eku},
		BasicConstraintsValid: true,
		ExtraExtensions:       exts,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	return der, nil
}
