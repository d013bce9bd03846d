package fuzz

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/state"
)

// FuzzParseRecord: state.ParseRecord never panics, fails only with
// ErrCorrupt, does not alias its input, and what it parses marshals back to
// the same bytes.
func FuzzParseRecord(f *testing.F) {
	for _, r := range []state.Record{
		{VMID: "vm1", Generation: 1, Created: time.Unix(1700000000, 5).UTC(), Engine: "go-tpm-tools v0.4.11 nv16384", Sealed: []byte("sealed")},
		{},
		{VMID: string(bytes.Repeat([]byte("v"), 4096)), Sealed: make([]byte, 17000)},
	} {
		b, err := r.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := state.ParseRecord(b)
		if err != nil {
			if r != nil || !errors.Is(err, state.ErrCorrupt) {
				t.Fatalf("ParseRecord: %v (record %v)", err, r != nil)
			}
			return
		}
		if aliases(r.Sealed, b) {
			t.Fatal("the sealed image aliases the input")
		}
		out, err := r.MarshalBinary()
		if err != nil {
			t.Fatalf("marshal a parsed record: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("parsed %x, marshal gives %x", head(b), head(out))
		}
	})
}

func recordEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"magic-only", []any{[]byte("VTSR")}},
		{"version-only", []any{hexBytes("56545352 01")}},
		{"vmid-len-ffff", []any{hexBytes("56545352 01 ffff 766d")}},
		{"sealed-len-ffffffff", []any{hexBytes("56545352 01 0000 0000000000000001 0000000000000000 0000 ffffffff 00")}},
		{"trailing-byte", []any{hexBytes("56545352 01 0000 0000000000000001 0000000000000000 0000 00000000 00")}},
		{"version-2", []any{hexBytes("56545352 02 0000 0000000000000001 0000000000000000 0000 00000000")}},
	}
}
