package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/internal/wire"
)

// Record is one VM's stored state.
type Record struct {
	// VMID is the VM the state belongs to.
	VMID string
	// Generation counts the writes of the VM's state; every Put raises it.
	Generation uint64
	// Created is when the VM's TPM was first stored.
	Created time.Time
	// Engine names the engine build and NV layout of the image.
	Engine string
	// Sealed is the sealed state image, or with Delta its sealed change.
	Sealed []byte
	// Delta says Sealed is a change to the state of Generation-1, not a
	// whole state: Put keeps it beside the record it changes.
	Delta bool
	// Deltas are, in a record from Get, the sealed changes stored since
	// it, in order: those of generations Generation+1, Generation+2, ...
	Deltas [][]byte
}

// Newest is the generation of the newest state the record holds, its
// deltas applied.
func (r *Record) Newest() uint64 { return r.Generation + uint64(len(r.Deltas)) }

// ErrCorrupt is wrapped by every error of ParseRecord.
var ErrCorrupt = errors.New("corrupt state record")

const (
	recordMagic   = "VTSR"
	recordVersion = 2 // 2 added the delta flag and the deltas; 1 is still read
	maxRecordText = 4096
	// MaxDeltas bounds the deltas a record carries.
	MaxDeltas = 1024

	recordFlagDelta = 1 << 0
)

// MarshalBinary encodes the record.
func (r *Record) MarshalBinary() ([]byte, error) {
	if len(r.VMID) > maxRecordText || len(r.Engine) > maxRecordText {
		return nil, fmt.Errorf("encode state record: VM id or engine longer than %d bytes", maxRecordText)
	}
	if len(r.Deltas) > MaxDeltas {
		return nil, fmt.Errorf("encode state record: %d deltas, the limit is %d", len(r.Deltas), MaxDeltas)
	}
	size := 4 + 1 + 2 + len(r.VMID) + 8 + 8 + 2 + len(r.Engine) + 4 + len(r.Sealed) + 1 + 2
	for _, d := range r.Deltas {
		size += 4 + len(d)
	}
	b := make([]byte, 0, size)
	b = append(b, recordMagic...)
	b = append(b, recordVersion)
	b = wire.AppendString(b, r.VMID)
	b = binary.BigEndian.AppendUint64(b, r.Generation)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Created.UnixNano()))
	b = wire.AppendString(b, r.Engine)
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Sealed)))
	b = append(b, r.Sealed...)
	var flags byte
	if r.Delta {
		flags |= recordFlagDelta
	}
	b = append(b, flags)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Deltas)))
	for _, d := range r.Deltas {
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		b = append(b, d...)
	}
	return b, nil
}

// ParseRecord decodes a record. The result does not alias b.
func ParseRecord(b []byte) (*Record, error) {
	d := wire.NewFields(b)
	if string(d.Take(4)) != recordMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrCorrupt, recordMagic)
	}
	var version byte
	if v := d.Take(1); len(v) == 1 {
		version = v[0]
		if version != 1 && version != recordVersion {
			return nil, fmt.Errorf("%w: version %d, this build reads 1 and %d", ErrCorrupt, version, recordVersion)
		}
	}
	r := &Record{}
	r.VMID = d.Str()
	r.Generation = d.U64()
	r.Created = time.Unix(0, int64(d.U64())).UTC()
	r.Engine = d.Str()
	n := d.U32()
	r.Sealed = append([]byte(nil), d.Take(int(n))...)
	if version == recordVersion {
		flags := d.Take(1)
		if len(flags) == 1 {
			if flags[0]&^recordFlagDelta != 0 {
				return nil, fmt.Errorf("%w: unknown flags %#x", ErrCorrupt, flags[0])
			}
			r.Delta = flags[0]&recordFlagDelta != 0
		}
		count := int(d.U16())
		if count > MaxDeltas {
			return nil, fmt.Errorf("%w: %d deltas, the limit is %d", ErrCorrupt, count, MaxDeltas)
		}
		for i := 0; i < count && !d.Short(); i++ {
			r.Deltas = append(r.Deltas, append([]byte(nil), d.Take(int(d.U32()))...))
		}
	}
	switch {
	case d.Short():
		return nil, fmt.Errorf("%w: truncated at %d bytes", ErrCorrupt, len(b))
	case d.Left() != 0:
		return nil, fmt.Errorf("%w: %d bytes after the end", ErrCorrupt, d.Left())
	case len(r.VMID) > maxRecordText || len(r.Engine) > maxRecordText:
		// MarshalBinary never writes these, and could not write it back.
		return nil, fmt.Errorf("%w: VM id or engine longer than %d bytes", ErrCorrupt, maxRecordText)
	}
	return r, nil
}
