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
	b = wire.AppendString(b, r.VMID)
	b = binary.BigEndian.AppendUint64(b, r.Generation)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Created.UnixNano()))
	b = wire.AppendString(b, r.Engine)
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Sealed)))
	return append(b, r.Sealed...), nil
}

// ParseRecord decodes a record. The result does not alias b.
func ParseRecord(b []byte) (*Record, error) {
	d := wire.NewFields(b)
	if string(d.Take(4)) != recordMagic {
		return nil, fmt.Errorf("%w: no %q header", ErrCorrupt, recordMagic)
	}
	if v := d.Take(1); len(v) == 1 && v[0] != recordVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrCorrupt, v[0], recordVersion)
	}
	r := &Record{}
	r.VMID = d.Str()
	r.Generation = d.U64()
	r.Created = time.Unix(0, int64(d.U64())).UTC()
	r.Engine = d.Str()
	n := d.U32()
	r.Sealed = append([]byte(nil), d.Take(int(n))...)
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
