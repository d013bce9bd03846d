package vtpm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sendFunc lets go-tpm's typed commands run on a Device.
type sendFunc func([]byte) ([]byte, error)

func (f sendFunc) Send(cmd []byte) ([]byte, error) { return f(cmd) }

func (d *Device) tpm() sendFunc {
	return func(cmd []byte) ([]byte, error) {
		return append([]byte(nil), d.Execute(context.Background(), cmd)...), nil
	}
}

// openDevice opens a device on store and closes it when the test ends.
func openDevice(t *testing.T, store *MemoryStore) *Device {
	t.Helper()
	d, err := Open(Config{Store: store})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func startedDevice(t *testing.T, store *MemoryStore) *Device {
	t.Helper()
	d := openDevice(t, store)
	require.NoError(t, d.Init(false))
	_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(d.tpm())
	require.NoError(t, err)
	return d
}

func pcrRead(t *testing.T, d *Device, pcr uint) []byte {
	t.Helper()
	rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcr)},
	}}}.Execute(d.tpm())
	require.NoError(t, err)
	require.Len(t, rsp.PCRValues.Digests, 1)
	return rsp.PCRValues.Digests[0].Buffer
}

func TestNotRunningGivesFailureResponse(t *testing.T) {
	d := openDevice(t, &MemoryStore{})
	readClock := []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81}
	assert.Equal(t, "80010000000a00000101", hex.EncodeToString(d.Execute(context.Background(), readClock)))
	_, err := d.Established()
	assert.ErrorIs(t, err, ErrNotRunning)
}

func TestCommandBeforeStartupAndSizeChecks(t *testing.T) {
	d := openDevice(t, &MemoryStore{})
	require.NoError(t, d.Init(false))
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	assert.Equal(t, "80010000000a00000100", hex.EncodeToString(d.Execute(context.Background(), getRandom)), "TPM_RC_INITIALIZE before Startup")
	assert.Equal(t, "80010000000a0000009a", hex.EncodeToString(d.Execute(context.Background(), getRandom[:4])), "short command")
	assert.Equal(t, "80010000000a00000142", hex.EncodeToString(d.Execute(context.Background(), make([]byte, 4097))), "oversized command")
}

func TestHashSequenceMeasuresPCR17(t *testing.T) {
	d := startedDevice(t, &MemoryStore{})
	established, err := d.Established()
	require.NoError(t, err)
	assert.False(t, established)

	require.NoError(t, d.HashStart())
	require.NoError(t, d.HashData([]byte("12")))
	require.NoError(t, d.HashData([]byte("34")))
	require.NoError(t, d.HashEnd())

	digest := sha256.Sum256([]byte("1234"))
	want := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	assert.Equal(t, hex.EncodeToString(want[:]), hex.EncodeToString(pcrRead(t, d, 17)))
	assert.Equal(t, "fca5d649", hex.EncodeToString(want[:4]), "swtpm's documented value")

	established, err = d.Established()
	require.NoError(t, err)
	assert.True(t, established)
	assert.ErrorIs(t, d.ResetEstablished(0), ErrBadLocality)
	require.NoError(t, d.ResetEstablished(3))
	established, err = d.Established()
	require.NoError(t, err)
	assert.False(t, established)
}

func TestStateSurvivesReopen(t *testing.T) {
	store := &MemoryStore{}
	d := startedDevice(t, store)
	nvPublic := tpm2.New2B(tpm2.TPMSNVPublic{
		NVIndex:    0x01500001,
		NameAlg:    tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   8,
	})
	_, err := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: nvPublic}.Execute(d.tpm())
	require.NoError(t, err)
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(0x01500001)}.Execute(d.tpm())
	require.NoError(t, err)
	index := tpm2.NamedHandle{Handle: 0x01500001, Name: pub.NVName}
	_, err = tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: index, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("survives")}}.Execute(d.tpm())
	require.NoError(t, err)
	require.NoError(t, d.HashStart())
	require.NoError(t, d.Close())

	d = openDevice(t, store)
	require.NoError(t, d.Init(true))
	_, err = tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(d.tpm())
	require.NoError(t, err)
	pub, err = tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(0x01500001)}.Execute(d.tpm())
	require.NoError(t, err)
	rsp, err := tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: 0x01500001, Name: pub.NVName}, Size: 8}.Execute(d.tpm())
	require.NoError(t, err)
	assert.Equal(t, "survives", string(rsp.Data.Buffer))
	established, err := d.Established()
	require.NoError(t, err)
	assert.True(t, established, "the established flag is part of the stored state")
}

func lockoutCounter(t *testing.T, d *Device) uint32 {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTLockoutCounter), PropertyCount: 1}.Execute(d.tpm())
	require.NoError(t, err)
	props, err := rsp.CapabilityData.Data.TPMProperties()
	require.NoError(t, err)
	require.Equal(t, tpm2.TPMPTLockoutCounter, props.TPMProperty[0].Property)
	return props.TPMProperty[0].Value
}

func TestRebootsDoNotRaiseLockoutCounter(t *testing.T) {
	for _, tc := range []struct {
		disableAutoShutdown bool
		want                uint32
	}{{false, 0}, {true, 3}} {
		d, err := Open(Config{Store: &MemoryStore{}, DisableAutoShutdown: tc.disableAutoShutdown})
		require.NoError(t, err)
		require.NoError(t, d.Init(false))
		for range 4 {
			// A VM reset: QEMU sends STOP ... INIT, then the firmware Startup.
			_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(d.tpm())
			require.NoError(t, err)
			require.NoError(t, d.Stop())
			require.NoError(t, d.Init(false))
		}
		_, err = tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(d.tpm())
		require.NoError(t, err)
		assert.Equal(t, tc.want, lockoutCounter(t, d), "disable-auto-shutdown=%v", tc.disableAutoShutdown)
		require.NoError(t, d.Close())
	}
}

func TestStoreVolatileResumesPCRs(t *testing.T) {
	store := &MemoryStore{}
	d := startedDevice(t, store)
	_, err := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: 7, Auth: tpm2.PasswordAuth(nil)}, Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
		{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)},
	}}}.Execute(d.tpm())
	require.NoError(t, err)
	pcr7 := pcrRead(t, d, 7)
	require.NoError(t, d.StoreVolatile())
	require.NoError(t, d.Close())

	d = openDevice(t, store)
	require.NoError(t, d.Init(false))
	// Resumed: already started, PCR 7 kept.
	assert.Equal(t, pcr7, pcrRead(t, d, 7))
}

func TestBufferSize(t *testing.T) {
	d := openDevice(t, &MemoryStore{})
	size, err := d.BufferSize(0)
	require.NoError(t, err)
	assert.Equal(t, uint32(4096), size)
	size, err = d.BufferSize(100)
	require.NoError(t, err)
	assert.Equal(t, uint32(MinBufferSize), size)
	size, err = d.BufferSize(4000)
	require.NoError(t, err)
	assert.Equal(t, uint32(4000), size)
	require.NoError(t, d.Init(false))
	_, err = d.BufferSize(4096)
	assert.ErrorIs(t, err, ErrRunning)
}

func TestInfoJSON(t *testing.T) {
	d := openDevice(t, &MemoryStore{})
	assert.Equal(t, `{"TPMSpecification":{"family":"2.0","level":0,"revision":154}}`, d.Info().JSON(InfoSpecification))
	assert.Equal(t, `{"TPMFeatures":{"RSAKeySizes":[1024,2048]}}`, d.Info().JSON(InfoFeatures))
	assert.Equal(t, `{}`, d.Info().JSON(0))
	assert.Contains(t, d.Info().JSON(InfoAttributes), `"manufacturer":"id:4D534654"`)
}
