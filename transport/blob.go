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

// WrapStateBlob puts a state image into swtpm's migration envelope, as
// CMD_GET_STATEBLOB returns it: header with MIGRATION_DATA set, then
// TLV(MIGRATION_DATA, TLV(DATA, image)).
func WrapStateBlob(image []byte) []byte {
	inner := appendTLV(nil, tagData, image)
	total := blobHeaderSize + tlvHeaderSize + len(inner)
	b := []byte{blobVersion, blobMinVersion, 0, blobHeaderSize, 0, blobFlagMigData}
	b = binary.BigEndian.AppendUint32(b, uint32(total))
	return appendTLV(b, tagMigrationData, inner)
}

func appendTLV(b []byte, tag uint16, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, tag)
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// UnwrapStateBlob returns the state image inside a blob, with or without
// the migration wrapping, as CMD_SET_STATEBLOB accepts it. Encrypted blobs
// give ResultKeyNotFound: no state or migration key is configured. The
// returned slice aliases b.
func UnwrapStateBlob(b []byte) ([]byte, error) {
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
	case flags&(blobFlagEncrypt|blobFlagMigEnc) != 0:
		return nil, fmt.Errorf("state blob is encrypted (flags %#x): %w", flags, ResultKeyNotFound)
	}
	body := b[blobHeaderSize:]
	if flags&blobFlagMigData != 0 {
		var err error
		if body, err = findTLV(body, tagMigrationData); err != nil {
			return nil, err
		}
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
