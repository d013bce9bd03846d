package fuzz

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"unsafe"

	"github.com/vtpmd/vtpmd/transport"
)

// FuzzStateBlob: UnwrapStateBlob never panics and fails only with the blob
// result codes, without keys, with keys, and with the request's ENCRYPTED
// flag; a plain blob's image is a part of it; WrapStateBlob is undone for
// any image, with or without a migration key; and blobs encrypted as spec
// §1.6 describes, by an encoder written here from the spec, open to the
// image they were made of.
func FuzzStateBlob(f *testing.F) {
	for _, x := range ctrlExchanges(loadCaptures(f)) {
		switch {
		case x.command == transport.CmdSetStateBlob && len(x.request) > 16:
			f.Add(x.request[16:])
		case x.command == transport.CmdGetStateBlob && len(x.reply) > 16:
			f.Add(x.reply[16:])
		}
	}
	big, err := transport.WrapStateBlob(make([]byte, transport.MaxStateBlob+1-32), transport.BlobKeys{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(big)
	// Blobs that open with the target's keys, for the fuzzer to take apart.
	image := []byte("TPM state image")
	if b, err := transport.WrapStateBlob(image, fuzzBlobKeys); err == nil {
		f.Add(b)
	}
	for _, v := range specVariants {
		f.Add(v.blob(image))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, keys := range []transport.BlobKeys{{}, fuzzBlobKeys} {
			checkUnwrap(t, b, keys, false)
			checkUnwrap(t, b, keys, true)
		}
		// Any bytes are an image to wrap, with or without a migration key.
		for _, keys := range []transport.BlobKeys{{}, fuzzBlobKeys, {Migration: bytes.Repeat([]byte{1}, 16)}} {
			got, err := wrapUnwrap(b, keys)
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("unwrap(wrap(%x)) with %d-byte key = %x, %v", head(b), len(keys.Migration), head(got), err)
			}
		}
		// And to encrypt as swtpm does.
		for _, v := range specVariants {
			got, err := transport.UnwrapStateBlob(v.blob(b), v.keys(), false)
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("%s: unwrap = %x, %v", v.name, head(got), err)
			}
		}
	})
}

func checkUnwrap(t *testing.T, b []byte, keys transport.BlobKeys, stateEncrypted bool) {
	image, err := transport.UnwrapStateBlob(b, keys, stateEncrypted)
	if err != nil {
		var code transport.Result
		if !errors.As(err, &code) {
			t.Fatalf("error without a result code: %v", err)
		}
		switch code {
		case transport.ResultBadDataSize, transport.ResultBadVersion, transport.ResultKeyNotFound,
			transport.ResultDecryptError, transport.ResultBadKeyProperty:
		default:
			t.Fatalf("result %#x: %v", uint32(code), err)
		}
		return
	}
	flags := binary.BigEndian.Uint16(b[4:])
	if flags&(blobFlagEncrypted|blobFlagMigrationEncrypted) == 0 && !stateEncrypted && !within(image, b) {
		t.Fatalf("the %d-byte image is not part of the %d-byte plain blob", len(image), len(b))
	}
	again, err := wrapUnwrap(image, keys)
	if err != nil || !bytes.Equal(again, image) {
		t.Fatalf("re-wrapped image: %x, %v", head(again), err)
	}
}

// within reports whether part lies inside whole's memory (an empty part
// does, wherever it points).
func within(part, whole []byte) bool {
	if len(part) == 0 {
		return true
	}
	if len(whole) == 0 {
		return false
	}
	p, w := uintptr(unsafe.Pointer(unsafe.SliceData(part))), uintptr(unsafe.Pointer(unsafe.SliceData(whole)))
	return p >= w && p+uintptr(len(part)) <= w+uintptr(len(whole))
}

// aliases reports whether a non-empty part lies inside whole's memory.
func aliases(part, whole []byte) bool { return len(part) > 0 && within(part, whole) }

// wrapUnwrap wraps image and unwraps it again, checking the total length
// the header records.
func wrapUnwrap(image []byte, keys transport.BlobKeys) ([]byte, error) {
	wrapped, err := transport.WrapStateBlob(image, keys)
	if err != nil {
		return nil, err
	}
	if got := binary.BigEndian.Uint32(wrapped[6:]); int(got) != len(wrapped) {
		return nil, fmt.Errorf("wrapped blob of %d bytes says %d", len(wrapped), got)
	}
	return transport.UnwrapStateBlob(wrapped, keys, false)
}

// The state blob envelope as spec §1.6 describes it.
const (
	blobFlagEncrypted          = 0x01
	blobFlagMigrationEncrypted = 0x02
	blobFlagMigrationData      = 0x04
	blobFlagEncrypted256       = 0x08
	blobFlagMigration256       = 0x10
)

// specVariant is one way swtpm writes a blob: the data encrypted with a
// state key or not, inside the migration wrapping or not, that encrypted
// with a migration key or not, with 128- or 256-bit keys.
type specVariant struct {
	name             string
	stateKey, migKey int // key lengths, 0 for none
	wrapped          bool
}

var specVariants = []specVariant{
	{name: "state key 128, file form", stateKey: 16},
	{name: "state key 256, migration data", stateKey: 32, wrapped: true},
	{name: "migration key 256", migKey: 32, wrapped: true},
	{name: "state key 128 inside migration key 128", stateKey: 16, migKey: 16, wrapped: true},
}

func (v specVariant) keys() transport.BlobKeys {
	var k transport.BlobKeys
	if v.stateKey > 0 {
		k.State = bytes.Repeat([]byte{0x53}, v.stateKey)
	}
	if v.migKey > 0 {
		k.Migration = bytes.Repeat([]byte{0x4d}, v.migKey)
	}
	return k
}

func (v specVariant) blob(image []byte) []byte {
	keys := v.keys()
	var flags uint16
	payload := tlv(1, image) // DATA
	if v.stateKey > 0 {
		payload = specEncrypt(keys.State, image, 2, 6) // ENCRYPTED_DATA, IVEC_ENCRYPTED_DATA
		flags |= blobFlagEncrypted
		if v.stateKey == 32 {
			flags |= blobFlagEncrypted256
		}
	}
	if v.wrapped {
		flags |= blobFlagMigrationData
		if v.migKey > 0 {
			payload = specEncrypt(keys.Migration, payload, 5, 7) // ENCRYPTED_MIGRATION_DATA, IVEC_ENCRYPTED_MIGRATION_DATA
			flags |= blobFlagMigrationEncrypted
			if v.migKey == 32 {
				flags |= blobFlagMigration256
			}
		} else {
			payload = tlv(4, payload) // MIGRATION_DATA
		}
	}
	b := []byte{2, 1, 0, 10}
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint32(b, uint32(10+len(payload)))
	return append(b, payload...)
}

func tlv(tag uint16, v []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, tag)
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// specEncrypt is swtpm's blob encryption: AES-CBC with the first 16 bytes
// of a key-length IV, padding to a multiple of the key length, and
// HMAC-SHA256 under the same key over the ciphertext and the IV, written
// as TLV(data) TLV(HMAC) TLV(IV). The IV is derived from the plaintext
// here, to keep the target deterministic.
func specEncrypt(key, plain []byte, dataTag, ivTag uint16) []byte {
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	sum := sha256.Sum256(plain)
	iv := sum[:len(key)]
	n := len(key) - len(plain)%len(key)
	ct := append(append([]byte(nil), plain...), bytes.Repeat([]byte{byte(n)}, n)...)
	cipher.NewCBCEncrypter(block, iv[:aes.BlockSize]).CryptBlocks(ct, ct)
	mac := hmac.New(sha256.New, key)
	mac.Write(ct)
	mac.Write(iv)
	out := tlv(dataTag, ct)
	out = append(out, tlv(3, mac.Sum(nil))...)
	return append(out, tlv(ivTag, iv)...)
}

func blobEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"header-only", []any{hexBytes("02 01 000a 0000 0000000a")}},
		{"header-short", []any{hexBytes("02 01 000a 0000 0000")}},
		{"data-tlv", []any{hexBytes("02 01 000a 0000 00000012 0001 00000002 abcd")}},
		{"migration-wrapped", []any{hexBytes("02 01 000a 0004 00000018 0004 00000008 0001 00000002 abcd")}},
		{"migration-flag-without-tlv", []any{hexBytes("02 01 000a 0004 00000012 0001 00000002 abcd")}},
		{"tlv-length-ffffffff", []any{hexBytes("02 01 000a 0000 00000012 0001 ffffffff abcd")}},
		{"inner-tlv-overrun", []any{hexBytes("02 01 000a 0004 00000018 0004 00000008 0001 00000003 abcd")}},
		{"truncated-tlv-header", []any{hexBytes("02 01 000a 0000 0000000e 0001 0000")}},
		{"encrypted", []any{hexBytes("02 01 000a 0009 00000012 0002 00000002 abcd")}},
		{"migration-encrypted", []any{hexBytes("02 01 000a 0016 00000012 0005 00000002 abcd")}},
		{"min-version-3", []any{hexBytes("03 03 000a 0000 00000012 0001 00000002 abcd")}},
		{"header-size-12", []any{hexBytes("02 01 000c 0000 00000014 0000 0001 00000002 abcd")}},
		{"total-ffffffff", []any{hexBytes("02 01 000a 0000 ffffffff 0001 00000002 abcd")}},
		{"other-tags-first", []any{hexBytes("02 01 000a 0000 0000001a 0003 00000002 0000 0001 00000002 abcd")}},
		{"encrypted-empty-triple", []any{hexBytes("02 01 000a 0001 0000001c 0002 00000000 0003 00000000 0006 00000000")}},
	}
}
