package sealing

import (
	"fmt"
	"testing"
)

// BenchmarkSeal and BenchmarkOpen time the envelope of a durable write: a
// delta of a few NV bytes (about 100 bytes) and a whole state image.
func BenchmarkSeal(b *testing.B) {
	key := benchKey(b)
	for _, size := range []int{100, 16*1024 + 100} {
		b.Run(fmt.Sprintf("bytes=%d", size), func(b *testing.B) {
			plain := make([]byte, size)
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := Seal(key, "vm1", KindTPMDelta, 7, plain); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkOpen(b *testing.B) {
	key := benchKey(b)
	for _, size := range []int{100, 16*1024 + 100} {
		b.Run(fmt.Sprintf("bytes=%d", size), func(b *testing.B) {
			sealed, err := Seal(key, "vm1", KindTPMDelta, 7, make([]byte, size))
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := Open(key, "vm1", KindTPMDelta, 7, sealed); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func benchKey(b *testing.B) *Key {
	key, err := NewKey("bench", make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	return key
}
