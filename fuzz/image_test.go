package fuzz

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"reflect"
	"testing"

	"github.com/vtpmd/vtpmd/vtpm"
)

// FuzzParseImage: ParseImage never panics, fails only with ErrBadImage, and
// what it parses marshals back to the same bytes without aliasing them (a
// version 1 image, to a version 2 one that parses the same). Each input is
// also tried with its trailing check value recomputed (a CRC-32C, or
// version 1's SHA-256), so that the fuzzer gets past it to the fields.
func FuzzParseImage(f *testing.F) {
	nv := make([]byte, vtpm.NVSize)
	for i := range nv {
		nv[i] = byte(i * 7)
	}
	for _, img := range []vtpm.Image{
		{Engine: vtpm.EngineVersion, NV: nv},
		{Engine: vtpm.EngineVersion, Established: true, Resume: true, NV: make([]byte, vtpm.NVSize)},
		{Engine: "another engine", NV: nv},
		{NV: nv},
	} {
		b, err := img.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		// The same as version 1 wrote it, with a SHA-256 at the end.
		v1 := append(append([]byte(nil), b[:len(b)-4]...), make([]byte, sha256.Size)...)
		v1[5] = 1
		f.Add(withCheck(v1))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkImage(t, b)
		if resealed := withCheck(b); resealed != nil {
			checkImage(t, resealed)
		}
	})
}

// imageV1 says b is an image of version 1, which ends with a SHA-256 and
// marshals as version 2.
func imageV1(b []byte) bool { return len(b) > 5 && b[4] == 0 && b[5] == 1 }

// withCheck returns b with its last bytes replaced by the check value of
// the rest, as its version byte asks, or nil if b is too short.
func withCheck(b []byte) []byte {
	size, v1 := 4, imageV1(b)
	if v1 {
		size = sha256.Size
	}
	if len(b) < size {
		return nil
	}
	out := append([]byte(nil), b...)
	body := out[:len(b)-size]
	if v1 {
		sum := sha256.Sum256(body)
		copy(out[len(body):], sum[:])
	} else {
		binary.BigEndian.PutUint32(out[len(body):], crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
	}
	return out
}

func checkImage(t *testing.T, b []byte) {
	img, err := vtpm.ParseImage(b)
	if err != nil {
		if img != nil || !errors.Is(err, vtpm.ErrBadImage) {
			t.Fatalf("ParseImage: %v (image %v)", err, img != nil)
		}
		return
	}
	if aliases(img.NV, b) {
		t.Fatal("the parsed NV aliases the input")
	}
	out, err := img.MarshalBinary()
	if err != nil {
		t.Fatalf("marshal a parsed image: %v", err)
	}
	if imageV1(b) { // version 1 marshals as version 2
		again, err := vtpm.ParseImage(out)
		if err != nil || !reflect.DeepEqual(again, img) {
			t.Fatalf("a version 1 image marshals to one that parses to %v (%v)", again != nil, err)
		}
		return
	}
	if !bytes.Equal(out, b) {
		t.Fatalf("parsed %d bytes, marshal gives %d different ones", len(b), len(out))
	}
}

func imageEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"header-only", []any{hexBytes("5654504d 0002 0000 00004000 0000")}},
		{"magic-only", []any{[]byte("VTPM")}},
		{"unknown-flags", []any{hexBytes("5654504d 0002 fffc 00004000 0000")}},
		{"nv-size-ffffffff", []any{hexBytes("5654504d 0001 0000 ffffffff 0000")}},
		{"engine-length-ffff", []any{hexBytes("5654504d 0002 0003 00004000 ffff")}},
		{"version-3", []any{hexBytes("5654504d 0003 0000 00004000 0000")}},
		{"version-1-header", []any{hexBytes("5654504d 0001 0000 00004000 0000")}},
	}
}
