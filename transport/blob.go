package transport

import (
	"encoding/binary"
	"fmt"
)

// BlobType is the type of a state blob (PTM_BLOB_TYPE_*).
type BlobType uint32

// Blob types.
const (
	BlobPermanent BlobType = 1
	BlobVolatile  BlobType = 2
	BlobSavestate BlobType = 3
)

// swtpm's state-blob envelope (spec §1.6): a 10-byte header, then TLVs.
const (
	blobVersion      = 2
	blobMinVersion   = 1
	blobHeaderSize   = 10
	blobFlagEncrypt  = 0x01
	blobFlagMigEnc   = 0x02
	blobFlagMigData  = 0x04
	tagData          = 1
	tagMigrationData = 4
	tlvHeaderSize    = 6
)

// Result codes of blob header problems.
const (
	ResultBadDataSize Result = 0x2b
	ResultBadVersion  Result = 0x2e
)

// BlobKeys are the raw swtpm keys (16 or 32 bytes) that state blobs may be
// encrypted with: --migration-key for the blob, --key for its inner data.
type BlobKeys struct {
	Migration []byte
	State     []byte
}

// WrapStateBlob puts a state image into swtpm's migration envelope, as
// CMD_GET_STATEBLOB returns it: header with MIGRATION_DATA set, then
// TLV(MIGRATION_DATA, TLV(DATA, image)), or with a migration key the
// encrypted TLV(DATA, image).
func WrapStateBlob(image []byte, keys BlobKeys) ([]byte, error) {
	inner := appendTLV(nil, tagData, image)
	flags := uint16(blobFlagMigData)
	payload := appendTLV(nil, tagMigrationData, inner)
	if keys.Migration != nil {
		var err error
		if payload, err = encryptTLVs(keys.Migration, inner, tagEncryptedMigration, tagIVEncryptedMigation); err != nil {
			return nil, err
		}
		flags |= blobFlagMigEnc
		if len(keys.Migration) == 32 {
			flags |= blobFlagMigration256
		}
	}
	b := []byte{blobVersion, blobMinVersion, 0, blobHeaderSize}
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint32(b, uint32(blobHeaderSize+len(payload)))
	return append(b, payload...), nil
}

func appendTLV(b []byte, tag uint16, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, tag)
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// UnwrapStateBlob returns the state image inside a blob, with or without
// the migration wrapping, as CMD_SET_STATEBLOB accepts it, decrypting it
// with the migration key and then the state key where its flags say so
// (stateEncrypted is the request's PTM_STATE_FLAG_ENCRYPTED). A blob
// encrypted with a key that is not configured gives ResultKeyNotFound.
func UnwrapStateBlob(b []byte, keys BlobKeys, stateEncrypted bool) ([]byte, error) {
	if len(b) < blobHeaderSize {
		return nil, fmt.Errorf("state blob of %d bytes: %w", len(b), ResultBadDataSize)
	}
	minVersion, hdrSize := b[1], binary.BigEndian.Uint16(b[2:])
	flags, total := binary.BigEndian.Uint16(b[4:]), binary.BigEndian.Uint32(b[6:])
	switch {
	case minVersion > blobVersion || hdrSize != blobHeaderSize:
		return nil, fmt.Errorf("state blob header version %d/%d, size %d: %w", b[0], minVersion, hdrSize, ResultBadVersion)
	case int(total) != len(b):
		return nil, fmt.Errorf("state blob says %d bytes, has %d: %w", total, len(b), ResultBadDataSize)
	}
	body := b[blobHeaderSize:]
	var err error
	switch {
	case flags&blobFlagMigEnc != 0:
		if keys.Migration == nil {
			return nil, fmt.Errorf("state blob is encrypted with a migration key, and none is set: %w", ResultKeyNotFound)
		}
		if err := checkKeyLength(keys.Migration, flags, blobFlagMigration256); err != nil {
			return nil, err
		}
		if body, err = decryptTLVs(keys.Migration, body, tagEncryptedMigration, tagIVEncryptedMigation); err != nil {
			return nil, err
		}
	case flags&blobFlagMigData != 0:
		if body, err = findTLV(body, tagMigrationData); err != nil {
			return nil, err
		}
	}
	if flags&blobFlagEncrypt != 0 || stateEncrypted {
		if keys.State == nil {
			return nil, fmt.Errorf("state blob is encrypted with a state key, and none is set: %w", ResultKeyNotFound)
		}
		if flags&blobFlagEncrypt != 0 {
			if err := checkKeyLength(keys.State, flags, blobFlagState256); err != nil {
				return nil, err
			}
		}
		return decryptTLVs(keys.State, body, tagEncryptedData, tagIVEncryptedData)
	}
	return findTLV(body, tagData)
}

// findTLV returns the value of the first TLV with tag in b.
func findTLV(b []byte, tag uint16) ([]byte, error) {
	for len(b) > 0 {
		if len(b) < tlvHeaderSize {
			return nil, fmt.Errorf("truncated TLV header in state blob: %w", ResultBadDataSize)
		}
		t, n := binary.BigEndian.Uint16(b), binary.BigEndian.Uint32(b[2:])
		if uint64(n) > uint64(len(b)-tlvHeaderSize) {
			return nil, fmt.Errorf("TLV %d of %d bytes overruns the state blob: %w", t, n, ResultBadDataSize)
		}
		if t == tag {
			return b[tlvHeaderSize : tlvHeaderSize+n], nil
		}
		b = b[tlvHeaderSize+n:]
	}
	return nil, fmt.Errorf("state blob has no TLV %d: %w", tag, ResultBadDataSize)
}
