package provision

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
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
	require.Len(t, res.EKs, 2)
	assert.Equal(t, []string{"sha256"}, res.PCRBanks)
	assert.Equal(t, []tpm2.TPMHandle{RSAEKCertIndex, ECCEKCertIndex, PlatformCertIndex}, res.NVIndices)

	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	p := tpm(t, d)
	for _, ek := range res.EKs {
		stored := nvRead(t, p, ek.CertIndex)
		require.Equal(t, ek.Cert, stored, ek.Kind)
		cert, err := x509.ParseCertificate(stored)
		require.NoError(t, err, ek.Kind)
		verifyTCG(t, cert, roots)
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
	verifyTCG(t, plat, roots)
	checkSAN(t, plat, map[string]string{"2.23.133.5.1.1": "vtpmd", "2.23.133.5.1.4": "QEMU", "2.23.133.5.1.5": "1"})

	// The EKs are persistent, and re-deriving them gives the same keys.
	for _, ek := range res.EKs {
		rp, err := tpm2.ReadPublic{ObjectHandle: ek.Handle}.Execute(p)
		require.NoError(t, err, ek.Kind)
		pub, err := publicKey(&rp.OutPublic)
		require.NoError(t, err)
		assert.True(t, publicKeysEqual(ek.Public, pub), ek.Kind)
	}
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(p)
	require.NoError(t, err)
	pub, err := publicKey(&created.OutPublic)
	require.NoError(t, err)
	assert.True(t, publicKeysEqual(res.EKs[0].Public, pub))
	_, _ = tpm2.FlushContext{FlushHandle: created.ObjectHandle}.Execute(p)

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
	_, err = p.createPersistent(tpm2.TPMRHOwner, tpm2.RSASRKTemplate, SPKHandle)
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

// verifyTCG verifies the certificate against roots as a TCG-aware verifier
// does: the critical subject alternative name with a directoryName, which
// crypto/x509 does not handle, is the verifier's to check.
func verifyTCG(t *testing.T, cert *x509.Certificate, roots *x509.CertPool) {
	t.Helper()
	require.Len(t, cert.UnhandledCriticalExtensions, 1)
	require.True(t, cert.UnhandledCriticalExtensions[0].Equal(oidSubjectAltName))
	c := *cert
	c.UnhandledCriticalExtensions = nil
	_, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err)
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
	fi, err := os.Stat(filepath.Join(dir, "signkey.pem"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
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

	require.NoError(t, os.Remove(filepath.Join(dir, "signkey.pem")))
	_, err = OpenCA(DefaultCAFiles(dir))
	assert.ErrorContains(t, err, "signing key")
}
