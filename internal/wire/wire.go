// Package wire holds the field codec of vtpmd's own binary formats (state
// records, the serve registry, the supervisor-worker messages): big-endian
// integers and strings with a 16-bit length. Fields takes fields off the
// front of a buffer and remembers when it ran short, so that a decoder reads
// every field and checks once, at the end.
package wire

import "encoding/binary"

// Fields reads fields off the front of a buffer.
type Fields struct {
	b     []byte
	short bool
}

// NewFields reads the fields in b.
func NewFields(b []byte) *Fields { return &Fields{b: b} }

// Take returns the next n bytes (aliasing the buffer), or nil when fewer are
// left, from then on reading as short.
func (f *Fields) Take(n int) []byte {
	if n < 0 || n > len(f.b) {
		f.short, f.b = true, nil
		return nil
	}
	v := f.b[:n]
	f.b = f.b[n:]
	return v
}

// Rest returns what is left (aliasing the buffer).
func (f *Fields) Rest() []byte {
	v := f.b
	f.b = nil
	return v
}

// U16 reads a big-endian uint16, 0 when short.
func (f *Fields) U16() uint16 {
	if v := f.Take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

// U32 reads a big-endian uint32, 0 when short.
func (f *Fields) U32() uint32 {
	if v := f.Take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

// U64 reads a big-endian uint64, 0 when short.
func (f *Fields) U64() uint64 {
	if v := f.Take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// Str reads a string with a 16-bit length, "" when short.
func (f *Fields) Str() string { return string(f.Take(int(f.U16()))) }

// Short says a field was cut short.
func (f *Fields) Short() bool { return f.short }

// Left is how many bytes are left unread.
func (f *Fields) Left() int { return len(f.b) }

// AppendString appends s with its 16-bit length; s must be shorter than
// 64 KiB, which the caller checks.
func AppendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}
