package fuzz

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/state"
)

// FuzzParseRecord: state.ParseRecord never panics, fails only with
// ErrCorrupt, does not alias its input, and what it parses marshals back to
// the same bytes (a version 1 record, to a version 2 one that parses the
// same).
func FuzzParseRecord(f *testing.F) {
	for _, r := range []state.Record{
		{VMID: "vm1", Generation: 1, Created: time.Unix(1700000000, 5).UTC(), Engine: "go-tpm-tools v0.4.11 nv16384", Sealed: []byte("sealed")},
		{},
		{VMID: string(bytes.Repeat([]byte("v"), 4096)), Sealed: make([]byte, 17000)},
		{VMID: "vm1", Generation: 3, Engine: "e", Sealed: []byte("whole"), Deltas: [][]byte{[]byte("change 4"), {}, []byte("change 6")}},
		{VMID: "vm1", Generation: 4, Engine: "e", Sealed: []byte("change 4"), Delta: true},
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
		for _, d := range r.Deltas {
			if aliases(d, b) {
				t.Fatal("a delta aliases the input")
			}
		}
		out, err := r.MarshalBinary()
		if err != nil {
			t.Fatalf("marshal a parsed record: %v", err)
		}
		if recordV1(b) {
			again, err := state.ParseRecord(out)
			if err != nil || !reflect.DeepEqual(again, r) {
				t.Fatalf("a version 1 record marshals to %x, which parses to %+v (%v), not %+v", head(out), again, err, r)
			}
			return
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("parsed %x, marshal gives %x", head(b), head(out))
		}
	})
}

// recordV1 says b is a record of version 1, which marshals as version 2.
func recordV1(b []byte) bool { return len(b) > 4 && b[4] == 1 }

func recordEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"magic-only", []any{[]byte("VTSR")}},
		{"version-only", []any{hexBytes("56545352 01")}},
		{"vmid-len-ffff", []any{hexBytes("56545352 01 ffff 766d")}},
		{"sealed-len-ffffffff", []any{hexBytes("56545352 01 0000 0000000000000001 0000000000000000 0000 ffffffff 00")}},
		{"trailing-byte", []any{hexBytes("56545352 01 0000 0000000000000001 0000000000000000 0000 00000000 00")}},
		{"version-3", []any{hexBytes("56545352 03 0000 0000000000000001 0000000000000000 0000 00000000 00 0000")}},
		{"version-1", []any{hexBytes("56545352 01 0003 766d31 0000000000000001 0000000000000000 0001 65 00000001 73")}},
		{"v2-no-flags", []any{hexBytes("56545352 02 0000 0000000000000001 0000000000000000 0000 00000000")}},
		{"v2-unknown-flag", []any{hexBytes("56545352 02 0000 0000000000000001 0000000000000000 0000 00000000 02 0000")}},
		{"v2-deltas-ffff", []any{hexBytes("56545352 02 0000 0000000000000001 0000000000000000 0000 00000000 00 ffff")}},
		{"v2-delta-len-ffffffff", []any{hexBytes("56545352 02 0000 0000000000000001 0000000000000000 0000 00000000 00 0001 ffffffff 00")}},
	}
}
