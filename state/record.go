package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
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
	// Sealed is the sealed state image.
	Sealed []byte
}

// ErrCorrupt is wrapped by every error of ParseRecord.
var ErrCorrupt = errors.New("corrupt state record")

const (
	recordMagic   = "VTSR"
	recordVersion = 1
	maxRecordText = 4096
)

// MarshalBinary encodes the record.
func (r *Record) MarshalBinary() ([]byte, error) {
	if len(r.VMID) > maxRecordText || len(r.Engine) > maxRecordText {
		return nil, fmt.Errorf("encode state record: VM id or engine longer than %d bytes", maxRecordText)
	}
	b := make([]byte, 0, 4+1+2+len(r.VMID)+8+8+2+len(r.Engine)+4+len(r.Sealed))
	b = append(b, recordMagic...)
	b = append(b, recordVersion)
	b = appendString(b, r.VMID)
	b = binary.BigEndian.AppendUint64(b, r.Generation)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Created.UnixNano()))
	b = appendString(b, r.Engine)
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Sealed)))
	return append(b, r.Sealed...), nil
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// ParseRecord decodes a record. The result does not alias b.
func ParseRecord(b []byte) (*Record, error) {
	d := decoder{b: b}
	if string(d.take(4)) != recordMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrCorrupt, recordMagic)
	}
	if v := d.take(1); len(v) == 1 && v[0] != recordVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrCorrupt, v[0], recordVersion)
	}
	r := &Record{}
	r.VMID = d.str()
	r.Generation = d.u64()
	r.Created = time.Unix(0, int64(d.u64())).UTC()
	r.Engine = d.str()
	n := d.u32()
	r.Sealed = append([]byte(nil), d.take(int(n))...)
	switch {
	case d.short:
		return nil, fmt.Errorf("%w: truncated at %d bytes", ErrCorrupt, len(b))
	case len(d.b) != 0:
		return nil, fmt.Errorf("%w: %d bytes after the end", ErrCorrupt, len(d.b))
	case len(r.VMID) > maxRecordText || len(r.Engine) > maxRecordText:
		// MarshalBinary never writes these, and could not write it back.
		return nil, fmt.Errorf("%w: VM id or engine longer than %d bytes", ErrCorrupt, maxRecordText)
	}
	return r, nil
}

// decoder reads big-endian fields, remembering if it ran short.
type decoder struct {
	b     []byte
	short bool
}

func (d *decoder) take(n int) []byte {
	if n < 0 || n > len(d.b) {
		d.short, d.b = true, nil
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *decoder) str() string { return string(d.take(int(d.u16()))) }
