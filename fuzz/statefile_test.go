package fuzz

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/state"
)

// FuzzReadFileRecord: state.ReadFileRecord, the reader of state files
// (--tpmstate backend-uri=file://), never panics, fails only with ErrCorrupt
// or ErrNotFound, does not alias its input, and a record it reads marshals.
// Beside the hand-written seeds, it starts from files a FileStore wrote: one
// record, two, a grown file, and each with its newest slot torn.
func FuzzReadFileRecord(f *testing.F) {
	for _, b := range writtenStateFiles(f) {
		f.Add(b)
		f.Add(b[:len(b)-10]) // the newest slot torn
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := state.ReadFileRecord(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if r != nil || !(errors.Is(err, state.ErrCorrupt) || errors.Is(err, state.ErrNotFound)) {
				t.Fatalf("ReadFileRecord: %v (record %v)", err, r != nil)
			}
			return
		}
		if aliases(r.Sealed, b) {
			t.Fatal("the sealed image aliases the input")
		}
		if _, err := r.MarshalBinary(); err != nil {
			t.Fatalf("marshal a record read from a file: %v", err)
		}
	})
}

// writtenStateFiles returns the bytes of state files a FileStore wrote, after
// each of a few Puts (the last one grows the file), checking that each reads
// back as the record last put.
func writtenStateFiles(f *testing.F) [][]byte {
	path := filepath.Join(f.TempDir(), "tpm.state")
	s, err := state.OpenFile(path, state.FileOptions{})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	var files [][]byte
	for i, size := range []int{40, 60, 9000} {
		r := &state.Record{VMID: "/var/lib/vtpmd/vm1.state", Generation: uint64(i + 1), Created: time.Unix(1700000000, 0).UTC(),
			Engine: "go-tpm-tools v0.4.11 nv16384", Sealed: bytes.Repeat([]byte{byte(i + 1)}, size)}
		if err := s.Put(r); err != nil {
			f.Fatal(err)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		got, err := state.ReadFileRecord(bytes.NewReader(b), int64(len(b)))
		if err != nil || got.Generation != r.Generation {
			f.Fatalf("the file written after Put %d reads as %v, %v", i+1, got, err)
		}
		files = append(files, b)
	}
	return files
}

func stateFileEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"zeros", []any{make([]byte, 4096)}},
		{"magic-only", []any{[]byte("VTPMFILE")}},
		{"swtpm-linear", []any{append([]byte("nilmptws\x01\x00\xc0\x00"), make([]byte, 184)...)}},
		{"header-length-ffffffff", []any{hexBytes("5654504d46494c45 0000000000000001 ffffffff")}},
	}
}
