package vmstate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// A delta holds the bytes of a state image that changed since the image
// before: the image's length (4 bytes), then runs of an offset (4 bytes), a
// length (2 bytes) and that many bytes, in increasing order without
// overlap. A durable write of a few NV bytes stores a few dozen bytes, not
// the whole 16 KiB image.

// ErrBadDelta is wrapped by every error of ApplyDelta.
var ErrBadDelta = errors.New("bad state delta")

const (
	// deltaGap: changes fewer bytes apart than this go in one run, which
	// costs less than a run header.
	deltaGap = 8
	maxRun   = 0xffff
	// equalBlock is the stride at which unchanged bytes are skipped.
	equalBlock = 64
)

// EncodeDelta returns the delta that turns old into cur, which must have
// the same length.
func EncodeDelta(old, cur []byte) []byte {
	out := binary.BigEndian.AppendUint32(nil, uint32(len(cur)))
	for i := 0; i < len(cur); {
		if j := i + equalBlock; j <= len(cur) && bytes.Equal(old[i:j], cur[i:j]) {
			i = j
			continue
		}
		if old[i] == cur[i] {
			i++
			continue
		}
		start, end := i, i+1
		for k := end; k < len(cur) && k-end < deltaGap && k-start < maxRun; k++ {
			if old[k] != cur[k] {
				end = k + 1
			}
		}
		out = binary.BigEndian.AppendUint32(out, uint32(start))
		out = binary.BigEndian.AppendUint16(out, uint16(end-start))
		out = append(out, cur[start:end]...)
		i = end
	}
	return out
}

// ApplyDelta returns a copy of image with the delta's changes made. A delta
// for an image of another length, a run outside it, out of order or
// overlapping the one before, or a truncated run is refused.
func ApplyDelta(image, delta []byte) ([]byte, error) {
	if len(delta) < 4 {
		return nil, fmt.Errorf("%w: %d bytes is shorter than its header", ErrBadDelta, len(delta))
	}
	if n := binary.BigEndian.Uint32(delta); int64(n) != int64(len(image)) {
		return nil, fmt.Errorf("%w: made for an image of %d bytes, not %d", ErrBadDelta, n, len(image))
	}
	out := bytes.Clone(image)
	next := 0 // the first offset a run may start at
	for rest := delta[4:]; len(rest) > 0; {
		if len(rest) < 6 {
			return nil, fmt.Errorf("%w: a run header truncated to %d bytes", ErrBadDelta, len(rest))
		}
		off, n := int64(binary.BigEndian.Uint32(rest)), int(binary.BigEndian.Uint16(rest[4:]))
		rest = rest[6:]
		switch {
		case n == 0:
			return nil, fmt.Errorf("%w: an empty run at offset %d", ErrBadDelta, off)
		case off < int64(next):
			return nil, fmt.Errorf("%w: a run at offset %d before the end of the one before (%d)", ErrBadDelta, off, next)
		case off+int64(n) > int64(len(image)):
			return nil, fmt.Errorf("%w: a run of %d bytes at offset %d ends past the image's %d bytes", ErrBadDelta, n, off, len(image))
		case n > len(rest):
			return nil, fmt.Errorf("%w: a run of %d bytes truncated to %d", ErrBadDelta, n, len(rest))
		}
		copy(out[off:], rest[:n])
		rest, next = rest[n:], int(off)+n
	}
	return out, nil
}
