package transport

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err)
	return b
}

// Requests as QEMU, swtpm_ioctl and the swtpm TCTI send them (swtpm's
// tpm_ioctl.h layouts; spec Appendix A).
func TestRequestCodec(t *testing.T) {
	for _, tc := range []struct {
		wire string
		req  Request
	}{
		{"00000001", GetCapabilityRequest{}},
		{"0000000200000000", InitRequest{}},
		{"0000000200000001", InitRequest{Flags: InitFlagDeleteVolatile}},
		{"00000003", ShutdownRequest{}},
		{"00000004", GetTPMEstablishedRequest{}},
		{"0000000503", SetLocalityRequest{Locality: 3}},
		{"00000006", HashStartRequest{}},
		{"000000070000000431323334", HashDataRequest{Length: 4, Data: []byte("1234")}},
		{"00000008", HashEndRequest{}},
		{"00000009", CancelTPMCmdRequest{}},
		{"0000000a", StoreVolatileRequest{}},
		{"0000000b03", ResetTPMEstablishedRequest{Locality: 3}},
		{"0000000c000000010000000200000000", GetStateBlobRequest{Flags: 1, Type: 2}},
		{"0000000d000000000000000100000002abcd", SetStateBlobRequest{Type: 1, Length: 2, Data: []byte{0xab, 0xcd}}},
		{"0000000e", StopRequest{}},
		{"0000000f", GetConfigRequest{}},
		{"00000010", SetDataFDRequest{}},
		{"0000001100000fa0", SetBufferSizeRequest{Size: 4000}},
		{"00000012000000000000000300000000" + "00000000", GetInfoRequest{Flags: 3}},
		{"000000130000012c", LockStorageRequest{Retries: 300}},
	} {
		wire := unhex(t, tc.wire)
		assert.Equal(t, tc.wire, hex.EncodeToString(tc.req.Marshal()), "marshal %T", tc.req)
		got, err := DecodeRequest(wire)
		require.NoError(t, err, tc.wire)
		assert.Equal(t, tc.req, got, tc.wire)
		assert.LessOrEqual(t, MinRequestSize(tc.req.Command()), len(wire))
	}
}

func TestDecodeQuirks(t *testing.T) {
	// QEMU sends SET_LOCALITY and RESET_TPMESTABLISHED with 4-byte bodies,
	// the last three bytes junk: only the first counts.
	req, err := DecodeRequest(unhex(t, "0000000b03a5a5a5"))
	require.NoError(t, err)
	assert.Equal(t, ResetTPMEstablishedRequest{Locality: 3}, req)
	req, err = DecodeRequest(unhex(t, "0000000500000000"))
	require.NoError(t, err)
	assert.Equal(t, SetLocalityRequest{}, req)

	for _, tc := range []struct {
		wire string
		want error
	}{
		{"000002", ErrShortRequest},
		{"00000002", ErrShortRequest},                                // INIT without body
		{"00000002000000", ErrShortRequest},                          // INIT with 3 bytes
		{"000000020000000000", ResultBadParameter},                   // INIT with 5 bytes
		{"00000005", ErrShortRequest},                                // SET_LOCALITY without locality
		{"00000099", ResultBadOrdinal},                               // unknown command
		{"00000000", ResultBadOrdinal},                               // code 0
		{"0000000700000001aabb", ResultBadParameter},                 // more hash data than announced
		{"0000000d000000000000000100080001", ResultFail},             // blob over 512 KiB
		{"0000000d0000000000000001000000010102", ResultBadParameter}, // more blob than announced
		{"0000000c0000000000000001", ErrShortRequest},                // GET_STATEBLOB without offset
	} {
		_, err := DecodeRequest(unhex(t, tc.wire))
		assert.ErrorIs(t, err, tc.want, tc.wire)
	}
}

// Replies byte for byte as swtpm 0.7.1 sent them (spec Appendix A).
func TestReplyCodec(t *testing.T) {
	info := `{"TPMSpecification":{"family":"2.0","level":0,"revision":164}}` + "\x00"
	for _, tc := range []struct {
		cmd   Command
		wire  string
		reply Reply
	}{
		{CmdInit, "00000000", ResultReply{}},
		{CmdSetLocality, "0000003d", ResultReply{Result: ResultBadLocality}},
		{CmdGetCapability, "000000000000ffff", GetCapabilityReply{Caps: 0xffff}},
		{CmdGetTPMEstablished, "0000000000000000", GetTPMEstablishedReply{}},
		{CmdGetTPMEstablished, "0000000001000000", GetTPMEstablishedReply{Established: true}},
		{CmdGetTPMEstablished, "0000000a", ResultReply{Result: ResultBadOrdinal}},
		{CmdGetConfig, "0000000000000000", GetConfigReply{}},
		{CmdSetBufferSize, "0000000000001000" + "00000af800001000", SetBufferSizeReply{Size: 4096, Min: 2808, Max: 4096}},
		{CmdGetInfo, "000000000000003f0000003f" + hex.EncodeToString([]byte(info)), GetInfoReply{Total: 0x3f, Data: []byte(info)}},
		{CmdGetStateBlob, "00000800000000000000000000000000", GetStateBlobReply{Result: ResultRetry, Data: []byte{}}},
		// Refused before the handler (TPM not running): the bare result, as
		// the server and swtpm send it (found by fuzz.FuzzServer).
		{CmdGetStateBlob, "0000000a", ResultReply{Result: ResultBadOrdinal}},
		{CmdGetStateBlob, "000000000000000000000002" + "00000002abcd", GetStateBlobReply{Total: 2, Data: []byte{0xab, 0xcd}}},
	} {
		assert.Equal(t, tc.wire, hex.EncodeToString(tc.reply.Marshal()), "marshal %T", tc.reply)
		got, err := DecodeReply(tc.cmd, unhex(t, tc.wire))
		require.NoError(t, err, tc.wire)
		assert.Equal(t, tc.reply, got, tc.wire)
	}
	_, err := DecodeReply(CmdSetBufferSize, unhex(t, "0000000000001000"))
	assert.Error(t, err, "truncated success reply")
}

func TestStateBlobEnvelope(t *testing.T) {
	image := []byte("image")
	blob, err := WrapStateBlob(image, BlobKeys{})
	require.NoError(t, err)
	// header: version 2, min 1, size 10, flags MIGRATION_DATA, total length;
	// then TLV(4, TLV(1, image)).
	assert.Equal(t, "0201000a0004"+"0000001b"+"0004"+"0000000b"+"0001"+"00000005"+hex.EncodeToString(image), hex.EncodeToString(blob))
	got, err := UnwrapStateBlob(blob, BlobKeys{}, false)
	require.NoError(t, err)
	assert.Equal(t, image, got)

	// Without the migration wrapping, as the state files hold it.
	plain := unhex(t, "0201000a0000"+"00000015"+"0001"+"00000005"+hex.EncodeToString(image))
	got, err = UnwrapStateBlob(plain, BlobKeys{}, false)
	require.NoError(t, err)
	assert.Equal(t, image, got)

	for _, tc := range []struct {
		name string
		blob []byte
		want Result
	}{
		{"short", blob[:9], ResultBadDataSize},
		{"truncated", blob[:len(blob)-1], ResultBadDataSize},
		{"bad header size", append([]byte{2, 1, 0, 11}, blob[4:]...), ResultBadVersion},
		{"min version too new", append([]byte{2, 3}, blob[2:]...), ResultBadVersion},
		{"encrypted", append([]byte{2, 1, 0, 10, 0, 0x05}, blob[6:]...), ResultKeyNotFound},
		{"TLV overrun", unhex(t, "0201000a0000"+"00000015"+"0001"+"00000009"+hex.EncodeToString(image)), ResultBadDataSize},
		{"no data TLV", unhex(t, "0201000a0000"+"00000015"+"0002"+"00000005"+hex.EncodeToString(image)), ResultBadDataSize},
	} {
		_, err := UnwrapStateBlob(tc.blob, BlobKeys{}, false)
		assert.ErrorIs(t, err, tc.want, tc.name)
	}
}

func TestEncryptedStateBlob(t *testing.T) {
	image := bytes.Repeat([]byte("image"), 100)
	for _, keyLen := range []int{16, 32} {
		key := bytes.Repeat([]byte{0x5a}, keyLen)
		keys := BlobKeys{Migration: key}
		blob, err := WrapStateBlob(image, keys)
		require.NoError(t, err)
		assert.NotContains(t, string(blob), "image", "no plaintext in the blob")
		wantFlags := "0006" // MIGRATION_DATA | MIGRATION_ENCRYPTED
		if keyLen == 32 {
			wantFlags = "0016" // | MIGRATION_256BIT_KEY
		}
		assert.Equal(t, wantFlags, hex.EncodeToString(blob[4:6]))
		got, err := UnwrapStateBlob(blob, keys, false)
		require.NoError(t, err)
		assert.Equal(t, image, got)

		_, err = UnwrapStateBlob(blob, BlobKeys{}, false)
		assert.ErrorIs(t, err, ResultKeyNotFound, "no migration key set")
		wrong := bytes.Repeat([]byte{0xa5}, keyLen)
		_, err = UnwrapStateBlob(blob, BlobKeys{Migration: wrong}, false)
		assert.ErrorIs(t, err, ResultDecryptError, "another key")
		_, err = UnwrapStateBlob(blob, BlobKeys{Migration: bytes.Repeat([]byte{0x5a}, 48-keyLen)}, false)
		assert.ErrorIs(t, err, ResultBadKeyProperty, "a key of another length")
		altered := append([]byte(nil), blob...)
		altered[40] ^= 1
		_, err = UnwrapStateBlob(altered, keys, false)
		assert.ErrorIs(t, err, ResultDecryptError, "altered ciphertext")
	}

	// A blob whose data is encrypted with the state key (as swtpm sends
	// it without PTM_STATE_FLAG_DECRYPTED), header flags ENCRYPTED|256BIT.
	stateKey := bytes.Repeat([]byte{7}, 32)
	inner, err := encryptTLVs(stateKey, image, tagEncryptedData, tagIVEncryptedData)
	require.NoError(t, err)
	blob := append([]byte{2, 1, 0, 10, 0, blobFlagEncrypt | blobFlagState256}, binary.BigEndian.AppendUint32(nil, uint32(10+len(inner)))...)
	blob = append(blob, inner...)
	got, err := UnwrapStateBlob(blob, BlobKeys{State: stateKey}, false)
	require.NoError(t, err)
	assert.Equal(t, image, got)
	_, err = UnwrapStateBlob(blob, BlobKeys{}, false)
	assert.ErrorIs(t, err, ResultKeyNotFound)
}
