package provision

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/vtpm"
)

// openTPM opens a device on store and closes it when the test ends.
func openTPM(t *testing.T, store vtpm.Store) *vtpm.Device {
	t.Helper()
	d, err := vtpm.Open(vtpm.Config{Store: store})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := OpenCA(DefaultCAFiles(filepath.Join(t.TempDir(), "ca")))
	require.NoError(t, err)
	return ca
}

func provisioned(t *testing.T, store vtpm.Store, opts Options) (*vtpm.Device, *Result) {
	t.Helper()
	d := openTPM(t, store)
	require.NoError(t, Start(d))
	res, err := Run(context.Background(), d, opts)
	require.NoError(t, err)
	return d, res
}

// tpm returns a go-tpm transport on a started device.
func tpm(t *testing.T, d *vtpm.Device) *provisioner {
	t.Helper()
	if !d.Running() {
		require.NoError(t, Start(d))
	}
	return newProvisioner(context.Background(), d, nil)
}

func nvRead(t *testing.T, p *provisioner, index tpm2.TPMHandle) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(p)
	require.NoError(t, err)
	contents, err := pub.NVPublic.Contents()
	require.NoError(t, err)
	var out []byte
	for off := 0; off < int(contents.DataSize); off += maxNVWrite {
		n := min(maxNVWrite, int(contents.DataSize)-off)
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.TPMRHOwner,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(p)
		require.NoError(t, err)
		out = append(out, rsp.Data.Buffer...)
	}
	return out
}

func TestProvisionLibvirtDefaults(t *testing.T) {
	ca := newCA(t)
	require.True(t, ca.Created)
	store := &vtpm.MemoryStore{}
	start := time.Now()
	d, res := provisioned(t, store, Options{
		Log: slog.New(slog.NewTextHandler(os.Stderr, nil)),
		EK:  true, EKCerts: true, PlatformCert: true, LockNV: true,
		PCRBanks: []string{"sha256"},
		CA:       ca, VMID: "vm1:0b5a2d0e-1111-2222-3333-444455556666",
		Platform: Platform{Manufacturer: "vtpmd", Model: "QEMU", Version: "1"},
	})
	t.Logf("provisioned in %v", time.Since(start))
	require.Len(t, res.EKs, 3)
	assert.Equal(t, []string{"sha256"}, res.PCRBanks)
	assert.Equal(t, []tpm2.TPMHandle{0x01c00002, 0x01c0000a, 0x01c00016, 0x01c08000}, res.NVIndices)

	roots, intermediates := chainPools(t, ca)
	p := tpm(t, d)
	for _, ek := range res.EKs {
		stored := nvRead(t, p, ek.CertIndex)
		require.Equal(t, ek.Cert, stored, ek.Kind)
		cert, err := x509.ParseCertificate(stored)
		require.NoError(t, err, ek.Kind)
		verifyTCG(t, cert, roots, intermediates)
		assert.True(t, publicKeysEqual(ek.Public, cert.PublicKey), ek.Kind)
		assert.Equal(t, "vm1:0b5a2d0e-1111-2222-3333-444455556666", cert.Subject.CommonName)
		assert.Equal(t, []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}}, cert.UnknownExtKeyUsage)
		checkSAN(t, cert, map[string]string{"2.23.133.2.1": "id:4D534654", "2.23.133.2.2": "vtpmd", "2.23.133.2.3": ""})
		switch ek.Public.(type) {
		case *rsa.PublicKey:
			assert.Equal(t, x509.KeyUsageKeyEncipherment, cert.KeyUsage)
		case *ecdsa.PublicKey:
			assert.Equal(t, x509.KeyUsageKeyAgreement, cert.KeyUsage)
		}
	}
	plat, err := x509.ParseCertificate(nvRead(t, p, PlatformCertIndex))
	require.NoError(t, err)
	verifyTCG(t, plat, roots, intermediates)
	checkSAN(t, plat, map[string]string{"2.23.133.5.1.1": "vtpmd", "2.23.133.5.1.4": "QEMU", "2.23.133.5.1.5": "1"})

	// The RSA and P-384 EKs are persistent at their handles, and
	// re-deriving each EK from its template gives the same key.
	for i, want := range []struct {
		kind     string
		handle   tpm2.TPMHandle
		template tpm2.TPMTPublic
	}{
		{"rsa2048", 0x81010001, tpm2.RSAEKTemplate},
		{"secp256r1", 0, tpm2.ECCEKTemplate},
		{"secp384r1", 0x81010016, ECCP384EKTemplate},
	} {
		ek := res.EKs[i]
		require.Equal(t, want.kind, ek.Kind)
		require.Equal(t, want.handle, ek.Handle, ek.Kind)
		if ek.Handle != 0 {
			rp, err := tpm2.ReadPublic{ObjectHandle: ek.Handle}.Execute(p)
			require.NoError(t, err, ek.Kind)
			pub, err := publicKey(&rp.OutPublic)
			require.NoError(t, err)
			assert.True(t, publicKeysEqual(ek.Public, pub), ek.Kind)
		}
		created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(want.template)}.Execute(p)
		require.NoError(t, err, ek.Kind)
		pub, err := publicKey(&created.OutPublic)
		require.NoError(t, err)
		assert.True(t, publicKeysEqual(ek.Public, pub), ek.Kind)
		_, _ = tpm2.FlushContext{FlushHandle: created.ObjectHandle}.Execute(p)
	}
	assert.Equal(t, elliptic.P256(), res.EKs[1].Public.(*ecdsa.PublicKey).Curve)
	assert.Equal(t, elliptic.P384(), res.EKs[2].Public.(*ecdsa.PublicKey).Curve)

	// Locked: not even the platform can write again.
	pubNV, err := tpm2.NVReadPublic{NVIndex: RSAEKCertIndex}.Execute(p)
	require.NoError(t, err)
	attrs, err := pubNV.NVPublic.Contents()
	require.NoError(t, err)
	assert.True(t, attrs.Attributes.WriteLocked)
	_, err = tpm2.NVWrite{AuthHandle: tpm2.TPMRHPlatform, NVIndex: tpm2.NamedHandle{Handle: RSAEKCertIndex, Name: pubNV.NVName},
		Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte{1}}}.Execute(p)
	assert.ErrorIs(t, err, tpm2.TPMRCNVLocked)

	// NV room left after the libvirt provisioning, for the guest: enough
	// for its own storage primary key and some indices.
	free := nvHeadroom(t, p)
	t.Logf("NV left for the guest: %d bytes in 256-byte indices", free)
	_, err = p.createPrimary(tpm2.TPMRHOwner, tpm2.RSASRKTemplate, SPKHandle)
	require.NoError(t, err, "the guest cannot persist its SRK")
	free = nvHeadroom(t, p)
	t.Logf("NV left for the guest after it persisted an RSA SRK: %d bytes in 256-byte indices", free)
	assert.GreaterOrEqual(t, free, 512)
}

// nvHeadroom defines 256-byte indices until NV is full, undefines them
// again and returns how many bytes fitted.
func nvHeadroom(t *testing.T, p *provisioner) int {
	t.Helper()
	var defined []tpm2.TPMHandle
	for i := 0; i < 200; i++ {
		h := tpm2.TPMHandle(0x01500000 + i)
		pub := tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary}, DataSize: 256}
		_, err := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}.Execute(p)
		if err != nil {
			require.ErrorIs(t, err, tpm2.TPMRCNVSpace)
			break
		}
		defined = append(defined, h)
	}
	for _, h := range defined {
		_, err := tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: nil}}}.Execute(p)
		require.NoError(t, err)
	}
	return 256 * len(defined)
}

// chainPools are the CA's root, from its file, as the only trust anchor
// and its issuer certificate as an intermediate.
func chainPools(t *testing.T, ca *CA) (roots, intermediates *x509.CertPool) {
	t.Helper()
	_, rootPath := RootFiles(ca.Files().SigningKey)
	b, err := os.ReadFile(rootPath)
	require.NoError(t, err)
	root, err := parseCertificate(rootPath, b)
	require.NoError(t, err)
	roots, intermediates = x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	intermediates.AddCert(ca.Certificate())
	return roots, intermediates
}

// verifyTCG verifies the certificate against roots as a TCG-aware verifier
// does: the critical subject alternative name with a directoryName, which
// crypto/x509 does not handle, is the verifier's to check. The chain must
// be root -> intermediate -> certificate.
func verifyTCG(t *testing.T, cert *x509.Certificate, roots, intermediates *x509.CertPool) {
	t.Helper()
	require.Len(t, cert.UnhandledCriticalExtensions, 1)
	require.True(t, cert.UnhandledCriticalExtensions[0].Equal(oidSubjectAltName))
	c := *cert
	c.UnhandledCriticalExtensions = nil
	chains, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err)
	require.Len(t, chains, 1)
	var names []string
	for _, c := range chains[0][1:] {
		names = append(names, c.Subject.CommonName)
	}
	require.Equal(t, []string{"swtpm-localca", "swtpm-localca-rootca"}, names)
}

// checkSAN checks the directoryName of the certificate's subject alternative
// name; an empty wanted value only requires the attribute.
func checkSAN(t *testing.T, cert *x509.Certificate, want map[string]string) {
	t.Helper()
	var ext *pkix.Extension
	for i := range cert.Extensions {
		if cert.Extensions[i].Id.Equal(oidSubjectAltName) {
			ext = &cert.Extensions[i]
		}
	}
	require.NotNil(t, ext, "no subject alternative name")
	assert.True(t, ext.Critical)
	var names []asn1.RawValue
	_, err := asn1.Unmarshal(ext.Value, &names)
	require.NoError(t, err)
	require.Len(t, names, 1)
	require.Equal(t, 4, names[0].Tag)
	var rdns pkix.RDNSequence
	_, err = asn1.Unmarshal(names[0].Bytes, &rdns)
	require.NoError(t, err)
	got := map[string]string{}
	for _, rdn := range rdns {
		for _, atv := range rdn {
			got[atv.Type.String()] = atv.Value.(string)
		}
	}
	require.Len(t, got, len(want))
	for oid, v := range want {
		require.Contains(t, got, oid)
		if v != "" {
			assert.Equal(t, v, got[oid], oid)
		}
	}
}

func TestStagedStoresOnlyOnCommit(t *testing.T) {
	mem := &vtpm.MemoryStore{}
	staged := &Staged{Store: mem}
	d := openTPM(t, staged)
	require.NoError(t, Start(d))
	require.NoError(t, d.Close())
	_, err := mem.Load()
	require.ErrorIs(t, err, os.ErrNotExist)
	require.NoError(t, staged.Commit())
	img, err := mem.Load()
	require.NoError(t, err)
	require.NotEmpty(t, img)

	// Fresh manufactures a new TPM over the stored one.
	fresh := &Staged{Store: mem, Fresh: true}
	_, err = fresh.Load()
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestReconfigurePCRBanks(t *testing.T) {
	store := &vtpm.MemoryStore{}
	d := openTPM(t, store)
	require.NoError(t, Start(d))
	p := newProvisioner(context.Background(), d, nil)
	sels, err := p.pcrBanks()
	require.NoError(t, err)
	var implemented []string
	for _, s := range sels {
		implemented = append(implemented, bankName(s.Hash))
	}
	t.Logf("implemented PCR banks %v, active %v", implemented, activeBanks(sels))

	active, err := Reconfigure(context.Background(), d, []string{"sha1", "sha256"}, nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"sha1", "sha256"}, active)
	require.NoError(t, Start(d))
	active, err = Reconfigure(context.Background(), d, []string{"sha256"}, nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"sha256"}, active)

	// The allocation survives a reopen from the store.
	require.NoError(t, d.Close())
	d = openTPM(t, store)
	p = tpm(t, d)
	sels, err = p.pcrBanks()
	require.NoError(t, err)
	assert.Equal(t, []string{"sha256"}, activeBanks(sels))

	_, err = Reconfigure(context.Background(), d, []string{"sha3"}, nil)
	assert.ErrorContains(t, err, "unknown PCR bank")
}

func TestCASerialsAndReload(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := OpenCA(DefaultCAFiles(dir))
	require.NoError(t, err)
	// swtpm_localca's layout: the root beside the intermediate that signs.
	for name, mode := range map[string]os.FileMode{
		"signkey.pem": 0o600, "issuercert.pem": 0o644,
		"swtpm-localca-rootca-privkey.pem": 0o600, "swtpm-localca-rootca-cert.pem": 0o644,
	} {
		fi, err := os.Stat(filepath.Join(dir, name))
		require.NoError(t, err)
		assert.Equal(t, mode, fi.Mode().Perm(), name)
	}
	require.NotNil(t, ca.Root())
	assert.Equal(t, "swtpm-localca-rootca", ca.Root().Subject.CommonName)
	assert.Equal(t, "swtpm-localca-rootca", ca.Certificate().Issuer.CommonName)
	assert.Equal(t, "swtpm-localca", ca.Certificate().Subject.CommonName)
	require.NoError(t, ca.Certificate().CheckSignatureFrom(ca.Root()))
	s1, err := ca.nextSerial()
	require.NoError(t, err)
	s2, err := ca.nextSerial()
	require.NoError(t, err)
	assert.Equal(t, int64(1), s1.Int64())
	assert.Equal(t, int64(2), s2.Int64())

	again, err := OpenCA(DefaultCAFiles(dir))
	require.NoError(t, err)
	assert.False(t, again.Created)
	assert.True(t, bytes.Equal(ca.Certificate().Raw, again.Certificate().Raw))

	require.True(t, bytes.Equal(ca.Root().Raw, again.Root().Raw))

	require.NoError(t, os.Remove(filepath.Join(dir, "signkey.pem")))
	_, err = OpenCA(DefaultCAFiles(dir))
	assert.ErrorContains(t, err, "signing key")

	// Without the intermediate, a new one is made under the same root.
	require.NoError(t, os.Remove(filepath.Join(dir, "issuercert.pem")))
	renewed, err := OpenCA(DefaultCAFiles(dir))
	require.NoError(t, err)
	assert.True(t, renewed.Created)
	assert.True(t, bytes.Equal(ca.Root().Raw, renewed.Root().Raw))
	require.NoError(t, renewed.Certificate().CheckSignatureFrom(ca.Root()))
}

// TestCAWithoutRoot keeps a CA of one self-signed certificate (as vtpmd
// made before, or an operator's) working: it signs, and has no root.
func TestCAWithoutRoot(t *testing.T) {
	dir := t.TempDir()
	files := DefaultCAFiles(dir)
	key, cert, err := createCAKey(files.SigningKey, files.IssuerCert, "vtpmd-localca", nil, nil)
	require.NoError(t, err)
	ca, err := OpenCA(files)
	require.NoError(t, err)
	assert.False(t, ca.Created)
	assert.Nil(t, ca.Root())
	assert.True(t, publicKeysEqual(key.Public(), ca.Certificate().PublicKey))
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	der, err := ca.IssueEK(&rsaKey.PublicKey, TPMInfo{Manufacturer: "id:00000000", Model: "m", Version: "id:00000000", SpecFamily: "2.0"}, "vm")
	require.NoError(t, err)
	ek, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	require.NoError(t, ek.CheckSignatureFrom(cert))
	_, rootCert := RootFiles(files.SigningKey)
	assert.NoFileExists(t, rootCert)
}

// TestECCEKTemplateIsL2 compares the P-256 EK template with the TCG EK
// Credential Profile's template L-2 (2.3, B.3.4), which tpm2_createek -G
// ecc sends too.
func TestECCEKTemplateIsL2(t *testing.T) {
	want := []byte{
		0x00, 0x23, 0x00, 0x0b, // ECC, SHA-256
		0x00, 0x03, 0x00, 0xb2, // fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt
		0x00, 0x20, // authPolicy: PolicyA (SHA-256), PolicySecret(TPM_RH_ENDORSEMENT)
		0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
		0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
		0x00, 0x06, 0x00, 0x80, 0x00, 0x43, // AES-128-CFB
		0x00, 0x10, 0x00, 0x03, 0x00, 0x10, // no scheme, NIST P-256, no KDF
		0x00, 0x20, // unique: 32 zero bytes for x and for y
	}
	want = append(want, make([]byte, 32)...)
	want = append(want, 0x00, 0x20)
	want = append(want, make([]byte, 32)...)
	assert.Equal(t, want, tpm2.Marshal(tpm2.ECCEKTemplate))
}

// TestECCEKTemplateIsSwtpmSetups compares the P-384 EK template with the
// TPMT_PUBLIC swtpm_setup sends (swtpm.c,
// swtpm_tpm2_createprimary_ek_ecc_nist_p384, without --allow-signing).
func TestECCEKTemplateIsSwtpmSetups(t *testing.T) {
	want := []byte{
		0x00, 0x23, 0x00, 0x0c, // ECC, SHA-384
		0x00, 0x03, 0x00, 0xf2, // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|adminWithPolicy|restricted|decrypt
		0x00, 0x30, // authPolicy: PolicyB (SHA-384)
	}
	want = append(want, policyBSHA384...)
	want = append(want,
		0x00, 0x06, 0x01, 0x00, 0x00, 0x43, // AES-256-CFB
		0x00, 0x10, 0x00, 0x04, 0x00, 0x10, // no scheme, NIST P-384, no KDF
		0x00, 0x00, 0x00, 0x00, // empty unique
	)
	assert.Equal(t, want, tpm2.Marshal(ECCP384EKTemplate))
}

// BenchmarkRunLibvirt provisions a new TPM in process as `vtpmd setup`
// does with libvirt's options: the part of its time that is not process
// start, state store or sealing.
func BenchmarkRunLibvirt(b *testing.B) {
	ca, err := OpenCA(DefaultCAFiles(filepath.Join(b.TempDir(), "ca")))
	require.NoError(b, err)
	for b.Loop() {
		d, err := vtpm.Open(vtpm.Config{Store: &vtpm.MemoryStore{}})
		require.NoError(b, err)
		require.NoError(b, Start(d))
		_, err = Run(context.Background(), d, Options{
			EK: true, EKCerts: true, PlatformCert: true, LockNV: true, PCRBanks: []string{"sha256"},
			CA: ca, VMID: "bench", Platform: DefaultPlatform("1"),
		})
		require.NoError(b, err)
		require.NoError(b, d.Close())
	}
}

// TestStoragePrimaryKeys makes swtpm_setup's storage primary keys
// (--create-spk, with --ecc): RSA 2048, or ECC NIST P-384 with SHA-384
// names.
func TestStoragePrimaryKeys(t *testing.T) {
	for _, ecc := range []bool{false, true} {
		// One engine per process: a subtest, so that it closes.
		t.Run(fmt.Sprintf("ecc=%v", ecc), func(t *testing.T) { checkSPK(t, ecc) })
	}
}

func checkSPK(t *testing.T, ecc bool) {
	d, _ := provisioned(t, &vtpm.MemoryStore{}, Options{SPK: true, SPKECC: ecc})
	p := tpm(t, d)
	rp, err := tpm2.ReadPublic{ObjectHandle: SPKHandle}.Execute(p)
	require.NoError(t, err)
	pub, err := publicKey(&rp.OutPublic)
	require.NoError(t, err)
	contents, err := rp.OutPublic.Contents()
	require.NoError(t, err)
	assert.True(t, contents.ObjectAttributes.Restricted && contents.ObjectAttributes.Decrypt && contents.ObjectAttributes.NoDA)
	if ecc {
		assert.Equal(t, elliptic.P384(), pub.(*ecdsa.PublicKey).Curve)
		assert.Equal(t, tpm2.TPMAlgSHA384, contents.NameAlg)
	} else {
		assert.Equal(t, 2048, pub.(*rsa.PublicKey).N.BitLen())
	}
}
