package vmstate

import (
	"encoding/binary"
	"testing"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

// memRecords keeps the last record in memory: Save's own work (the delta,
// the seal, the record), without the disk, which state's BenchmarkDurablePut
// and bench/ measure.
type memRecords struct {
	rec    *state.Record
	deltas bool
}

func (m *memRecords) Get(string) (*state.Record, error) { return nil, state.ErrNotFound }
func (m *memRecords) Put(r *state.Record) error         { m.rec = r; return nil }
func (m *memRecords) KeepsDeltas() bool                 { return m.deltas }

// BenchmarkSave times a durable write of an NV counter's change to a 16 KiB
// image: as a delta, and whole (as for a store that keeps no deltas).
func BenchmarkSave(b *testing.B) {
	key, err := sealing.NewKey("bench", make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		deltas bool
	}{{"delta", true}, {"whole", false}} {
		b.Run(tc.name, func(b *testing.B) {
			s := &Sealed{Store: &memRecords{deltas: tc.deltas}, Key: key, VMID: "vm1"}
			image := make([]byte, 16*1024+100)
			var n uint64
			for b.Loop() {
				n++
				binary.BigEndian.PutUint64(image[8000:], n)
				if err := s.Save(image); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
