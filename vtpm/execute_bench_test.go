package vtpm_test

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/vtpm"
)

// benchSend runs go-tpm's typed commands on a Device, for set-up.
type benchSend struct{ d *vtpm.Device }

func (s benchSend) Send(cmd []byte) ([]byte, error) {
	return append([]byte(nil), s.d.Execute(context.Background(), cmd)...), nil
}

// benchCounter is the NV counter index the durable-write benchmark bumps.
const benchCounter = 0x01500020

var (
	// TPM2_GetRandom(32).
	benchGetRandom = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x20}
	// TPM2_PCR_Extend(16, SHA-256) with a password session.
	benchPCRExtend = append([]byte{0x80, 0x02, 0, 0, 0, 0x41, 0, 0, 0x01, 0x82, 0, 0, 0, 0x10,
		0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b}, make([]byte, 32)...)
	// TPM2_NV_Increment(benchCounter) with a password session.
	benchNVIncrement = []byte{0x80, 0x02, 0, 0, 0, 0x1f, 0, 0, 0x01, 0x34,
		0x01, 0x50, 0, 0x20, 0x01, 0x50, 0, 0x20, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0}
)

// BenchmarkExecute times Device.Execute, the engine round trip of every data
// channel command. GetRandom and PCR_Extend leave NV alone; NV_Increment of
// a counter changes it, so it includes the export and encoding of the NV
// image handed to the store (kept in memory here: the cost of the disk is
// measured by bench/, with the daemon's own store).
func BenchmarkExecute(b *testing.B) {
	d, err := vtpm.Open(vtpm.Config{Store: &vtpm.MemoryStore{}})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := d.Init(false); err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(benchSend{d}); err != nil {
		b.Fatal(err)
	}
	_, err = tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    benchCounter,
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{AuthWrite: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTCounter},
			DataSize:   8,
		}),
	}.Execute(benchSend{d})
	if err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cmd  []byte
	}{
		{"GetRandom", benchGetRandom},
		{"PCRExtend", benchPCRExtend},
		{"NVIncrement", benchNVIncrement},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			for b.Loop() {
				resp := d.Execute(ctx, tc.cmd)
				if len(resp) < 10 || binary.BigEndian.Uint32(resp[6:]) != 0 {
					b.Fatalf("response % x", resp)
				}
			}
		})
	}
}
