package host

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-attestation/attest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/internal/measuredboot/measuredboottest"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// bootedTPM is the simulator as a host TPM after boot.
func bootedTPM(t *testing.T, boot []measuredboot.Event) *TPM {
	t.Helper()
	open, eventLog := measuredboottest.Booted(t, boot)
	return &TPM{Open: open, EventLog: eventLog}
}

func TestTPMEvidenceVerifiesWithGoAttestation(t *testing.T) {
	tpm := bootedTPM(t, measuredboot.TypicalBoot("fw 1"))
	id, err := tpm.Identity()
	require.NoError(t, err)
	assert.Equal(t, guardian.ModeTPM, id.Mode)
	again, err := tpm.Identity()
	require.NoError(t, err)
	assert.Equal(t, id, again, "the same AK and EK at every start")

	nonce := make([]byte, guardian.NonceSize)
	transport, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	req, err := tpm.Evidence(nonce, transport.Public())
	require.NoError(t, err)
	assert.Len(t, req.TPM.PCRs, 8)

	ak, err := attest.ParseAKPublic(id.AKPublic)
	require.NoError(t, err)
	var pcrs []attest.PCR
	for i, v := range req.TPM.PCRs {
		pcrs = append(pcrs, attest.PCR{Index: i, Digest: v, DigestAlg: crypto.SHA256})
	}
	quote := attest.Quote{Quote: req.TPM.Quote, Signature: req.TPM.Signature}
	require.NoError(t, ak.Verify(quote, pcrs, guardian.AttestationDigest(nonce, transport.Public())))
	other, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	assert.Error(t, ak.Verify(quote, pcrs, guardian.AttestationDigest(nonce, other.Public())), "bound to the transport key")

	log, err := attest.ParseEventLog(req.TPM.EventLog)
	require.NoError(t, err)
	_, err = log.Verify(pcrs)
	require.NoError(t, err, "the event log explains the quoted PCRs")

	// Decoded as a guardian would.
	body, err := jsonBody(&guardian.AttestRequest{Host: "h1", Nonce: nonce, TransportKey: transport.Public(), TPM: req.TPM})
	require.NoError(t, err)
	_, err = guardian.DecodeAttestRequest(body)
	require.NoError(t, err)
	_, err = guardian.DecodeHostIdentity(mustJSON(t, id))
	require.NoError(t, err)
}

func TestTPMEvidenceNamesAMissingEventLog(t *testing.T) {
	tpm := &TPM{Open: func() (io.ReadWriteCloser, error) { panic("not reached") }, EventLog: filepath.Join(t.TempDir(), "none")}
	_, err := tpm.Evidence(make([]byte, 32), nil)
	assert.ErrorContains(t, err, "read event log")
	_, err = OpenTPM("unix:" + filepath.Join(t.TempDir(), "no.sock"))()
	assert.ErrorContains(t, err, "open host TPM unix:")
}

func TestHostKeyEvidence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "host-key.pem")
	h := &HostKey{Path: path}
	id, err := h.Identity()
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	again, err := (&HostKey{Path: path}).Identity()
	require.NoError(t, err)
	assert.Equal(t, id, again, "created once, then read")
	_, err = guardian.DecodeHostIdentity(mustJSON(t, id))
	require.NoError(t, err)

	nonce := make([]byte, guardian.NonceSize)
	transport, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	req, err := h.Evidence(nonce, transport.Public())
	require.NoError(t, err)
	pub, err := x509.ParsePKIXPublicKey(id.HostKey)
	require.NoError(t, err)
	digest := sha256.Sum256(guardian.AttestationDigest(nonce, transport.Public()))
	assert.True(t, ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], req.HostKey.Signature))

	require.NoError(t, os.Chmod(path, 0o644))
	_, err = h.Evidence(nonce, transport.Public())
	assert.ErrorContains(t, err, "readable by its owner only")
	require.NoError(t, os.Chmod(path, 0o600))
	require.NoError(t, os.WriteFile(path, []byte("junk"), 0o600))
	_, err = h.Identity()
	assert.ErrorContains(t, err, "not a PEM PRIVATE KEY")
}
