package fuzz

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/vmstate"
)

// FuzzApplyDelta: vmstate.ApplyDelta, which applies a stored change to a
// TPM's state image once it is unsealed, never panics, never changes the
// image it is given, fails only with ErrBadDelta, and what it makes is
// given back by EncodeDelta. The seeds are the changes of real NV writes.
func FuzzApplyDelta(f *testing.F) {
	base, deltas := nvWriteDeltas(f)
	for _, d := range deltas {
		f.Add(d)
	}
	f.Fuzz(func(t *testing.T, delta []byte) {
		before := bytes.Clone(base)
		out, err := vmstate.ApplyDelta(base, delta)
		if !bytes.Equal(base, before) {
			t.Fatal("ApplyDelta changed the image it was given")
		}
		if err != nil {
			if out != nil || !errors.Is(err, vmstate.ErrBadDelta) {
				t.Fatalf("ApplyDelta: %v (image %v)", err, out != nil)
			}
			return
		}
		again, err := vmstate.ApplyDelta(base, vmstate.EncodeDelta(base, out))
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("the delta EncodeDelta makes of the result does not give it back: %v", err)
		}
	})
}

// nvWriteDeltas writes the fuzz TPM's NV index twice and returns its
// stored image before, and the changes each write stored.
func nvWriteDeltas(f *testing.F) (base []byte, deltas [][]byte) {
	h := openHarness(f)
	if err := h.reset(true); err != nil {
		f.Fatal(err)
	}
	defer func() {
		if err := h.reset(false); err != nil {
			f.Fatal(err)
		}
	}()
	base = bytes.Clone(h.store.image)
	last := base
	index := tpm2.NamedHandle{Handle: nvIndex, Name: h.nvName}
	for _, value := range [][]byte{bytes.ToUpper(nvValue), nvValue} {
		if _, err := (tpm2.NVWrite{AuthHandle: index, NVIndex: index, Data: tpm2.TPM2BMaxNVBuffer{Buffer: value}}).Execute(deviceTPM{h.dev}); err != nil {
			f.Fatalf("write NV index: %v", err)
		}
		cur := bytes.Clone(h.store.image)
		if len(cur) != len(last) || bytes.Equal(cur, last) {
			f.Fatalf("the NV write stored an image of %d bytes after one of %d, changed: %v", len(cur), len(last), !bytes.Equal(cur, last))
		}
		deltas = append(deltas, vmstate.EncodeDelta(last, cur))
		last = cur
	}
	return base, deltas
}

func deltaEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"other-length", []any{hexBytes("00000001")}},
		{"cut-run-header", []any{hexBytes("00004000 00000000 00")}},
		{"empty-run", []any{hexBytes("00004000 00000010 0000")}},
		{"offset-ffffffff", []any{hexBytes("00004000 ffffffff 0001 00")}},
		{"run-len-ffff", []any{hexBytes("00004000 00000000 ffff 00")}},
		{"overlap", []any{hexBytes("00004000 00000010 0002 0102 00000011 0001 03")}},
	}
}
