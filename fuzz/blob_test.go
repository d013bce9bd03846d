package fuzz

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"unsafe"

	"github.com/vtpmd/vtpmd/transport"
)

// FuzzStateBlob: UnwrapStateBlob never panics, fails only with the blob
// header result codes, returns a part of its input, and undoes
// WrapStateBlob for any image.
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
	f.Fuzz(func(t *testing.T, b []byte) {
		image, err := transport.UnwrapStateBlob(b, blobKeys, false)
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
		} else {
			if !within(image, b) {
				t.Fatalf("the %d-byte image is not part of the %d-byte blob", len(image), len(b))
			}
			again, err := wrapUnwrap(image, blobKeys)
			if err != nil || !bytes.Equal(again, image) {
				t.Fatalf("re-wrapped image: %x, %v", again, err)
			}
		}
		// Any bytes are an image to wrap, with or without a migration key.
		for _, keys := range []transport.BlobKeys{{}, blobKeys} {
			got, err := wrapUnwrap(b, keys)
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("unwrap(wrap(%x)) = %x, %v", b, got, err)
			}
		}
	})
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
	}
}

// aliases reports whether a non-empty part lies inside whole's memory.
func aliases(part, whole []byte) bool { return len(part) > 0 && within(part, whole) }

// blobKeys is the migration key the target opens blobs with.
var blobKeys = transport.BlobKeys{Migration: bytes.Repeat([]byte{0x42}, 32)}

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
