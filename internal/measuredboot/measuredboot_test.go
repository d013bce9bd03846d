package measuredboot

import (
	"crypto"
	"testing"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var pcrs0to7 = []int{0, 1, 2, 3, 4, 5, 6, 7}

// tpmPCRs reads the simulator's SHA-256 PCRs 0-7 as go-attestation wants them.
func tpmPCRs(t *testing.T, sim *simulator.Simulator) []attest.PCR {
	t.Helper()
	got, err := client.ReadPCRs(sim, tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: pcrs0to7})
	require.NoError(t, err)
	var out []attest.PCR
	for _, i := range pcrs0to7 {
		out = append(out, attest.PCR{Index: i, Digest: got.Pcrs[uint32(i)], DigestAlg: crypto.SHA256})
	}
	return out
}

func TestReplayedLogVerifiesWithGoAttestation(t *testing.T) {
	sim, err := simulator.Get()
	require.NoError(t, err)
	defer sim.Close()

	boot := TypicalBoot("test firmware 1.0")
	require.NoError(t, Replay(sim, boot))
	log, err := Encode(boot)
	require.NoError(t, err)

	parsed, err := attest.ParseEventLog(log)
	require.NoError(t, err, "go-attestation parses the log")
	assert.Equal(t, []attest.HashAlg{attest.HashSHA256}, parsed.Algs)
	quoted := tpmPCRs(t, sim)
	events, err := parsed.Verify(quoted)
	require.NoError(t, err, "the log replays to the TPM's PCRs")
	assert.Len(t, events, len(boot))
	assert.Equal(t, attest.EventType(EvEFIBootServicesApplication), events[len(events)-2].Type)

	// The software replay agrees with the TPM.
	want := PCRs(boot, pcrs0to7)
	for _, p := range quoted {
		assert.Equal(t, want[p.Index], p.Digest, "PCR %d", p.Index)
	}

	// A tampered log does not explain these PCRs, and names PCR 4.
	tampered, err := Encode(Tampered(boot))
	require.NoError(t, err)
	parsedTampered, err := attest.ParseEventLog(tampered)
	require.NoError(t, err)
	_, err = parsedTampered.Verify(quoted)
	var replayErr attest.ReplayError
	require.ErrorAs(t, err, &replayErr)
	assert.Equal(t, []int{4}, replayErr.InvalidPCRs)
}

func TestTamperedBootChangesOnlyTheBootLoaderPCR(t *testing.T) {
	boot := TypicalBoot("fw")
	good, bad := PCRs(boot, pcrs0to7), PCRs(Tampered(boot), pcrs0to7)
	for _, i := range pcrs0to7 {
		if i == 4 {
			assert.NotEqual(t, good[i], bad[i])
		} else {
			assert.Equal(t, good[i], bad[i], "PCR %d", i)
		}
	}
	assert.NotEqual(t, PCRs(TypicalBoot("fw 2"), pcrs0to7)[0], good[0], "another firmware version measures differently")
	assert.Equal(t, good, PCRs(boot, pcrs0to7), "Tampered leaves its input alone")
}

func TestBadEventsAreRefused(t *testing.T) {
	_, err := Encode([]Event{{PCR: 24, Type: EvPostCode}})
	assert.ErrorContains(t, err, "PCR 24")
	_, err = Encode([]Event{{PCR: 0, Type: EvPostCode, Digest: []byte{1}}})
	assert.ErrorContains(t, err, "digest of 1 bytes")
}
