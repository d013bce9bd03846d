package fuzz

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/vtpmd/vtpmd/vtpm"
)

// FuzzParseImage: ParseImage never panics, fails only with ErrBadImage, and
// what it parses marshals back to the same bytes without aliasing them.
// Each input is also tried with its trailing digest recomputed, so that the
// fuzzer gets past the digest to the fields before it.
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
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkImage(t, b)
		if len(b) >= sha256.Size {
			resealed := append([]byte(nil), b...)
			body := resealed[:len(b)-sha256.Size]
			digest := sha256.Sum256(body)
			copy(resealed[len(body):], digest[:])
			checkImage(t, resealed)
		}
	})
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
	if !bytes.Equal(out, b) {
		t.Fatalf("parsed %d bytes, marshal gives %d different ones", len(b), len(out))
	}
}

func imageEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"header-only", []any{hexBytes("5654504d 0001 0000 00004000 0000")}},
		{"magic-only", []any{[]byte("VTPM")}},
		{"unknown-flags", []any{hexBytes("5654504d 0001 fffc 00004000 0000")}},
		{"nv-size-ffffffff", []any{hexBytes("5654504d 0001 0000 ffffffff 0000")}},
		{"engine-length-ffff", []any{hexBytes("5654504d 0001 0003 00004000 ffff")}},
		{"version-2", []any{hexBytes("5654504d 0002 0000 00004000 0000")}},
	}
}
