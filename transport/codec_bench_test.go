package transport_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"testing"

	"github.com/vtpmd/vtpmd/transport"
)

// benchRequests are control requests as QEMU and swtpm_ioctl send them.
var benchRequests = []transport.Request{
	transport.GetCapabilityRequest{},
	transport.InitRequest{Flags: transport.InitFlagDeleteVolatile},
	transport.SetLocalityRequest{Locality: 0},
	transport.GetInfoRequest{Flags: 1, Offset: 0},
	transport.HashDataRequest{Length: 64, Data: make([]byte, 64)},
	transport.SetStateBlobRequest{Flags: 0, Type: 2, Length: 4096, Data: make([]byte, 4096)},
}

func benchName(c transport.Command) string {
	return map[transport.Command]string{
		transport.CmdGetCapability: "GetCapability",
		transport.CmdInit:          "Init",
		transport.CmdSetLocality:   "SetLocality",
		transport.CmdGetInfo:       "GetInfo",
		transport.CmdHashData:      "HashData64",
		transport.CmdSetStateBlob:  "SetStateBlob4K",
	}[c]
}

func BenchmarkDecodeRequest(b *testing.B) {
	for _, req := range benchRequests {
		msg := req.Marshal()
		b.Run(benchName(req.Command()), func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := transport.DecodeRequest(msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkRequestMarshal(b *testing.B) {
	for _, req := range benchRequests {
		b.Run(benchName(req.Command()), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = req.Marshal()
			}
		})
	}
}

// benchReplies are replies with the command they answer.
var benchReplies = []struct {
	cmd   transport.Command
	reply transport.Reply
}{
	{transport.CmdInit, transport.ResultReply{Result: transport.ResultSuccess}},
	{transport.CmdGetCapability, transport.GetCapabilityReply{Caps: transport.Capabilities}},
	{transport.CmdSetBufferSize, transport.SetBufferSizeReply{Size: 4096, Min: 2808, Max: 4096}},
	{transport.CmdGetInfo, transport.GetInfoReply{Total: 200, Data: bytes.Repeat([]byte("x"), 200)}},
	{transport.CmdGetStateBlob, transport.GetStateBlobReply{Total: 4096, Data: make([]byte, 4096)}},
}

func BenchmarkReplyMarshal(b *testing.B) {
	for _, tc := range benchReplies {
		b.Run(benchName(tc.cmd)+replySuffix(tc.cmd), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = tc.reply.Marshal()
			}
		})
	}
}

func BenchmarkDecodeReply(b *testing.B) {
	for _, tc := range benchReplies {
		wire := tc.reply.Marshal()
		b.Run(benchName(tc.cmd)+replySuffix(tc.cmd), func(b *testing.B) {
			b.SetBytes(int64(len(wire)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := transport.DecodeReply(tc.cmd, wire); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func replySuffix(c transport.Command) string {
	switch c {
	case transport.CmdSetBufferSize:
		return "SetBufferSize"
	case transport.CmdGetStateBlob:
		return "GetStateBlob4K"
	}
	return ""
}

// cycleReader returns the same bytes over and over.
type cycleReader struct {
	b   []byte
	off int
}

func (c *cycleReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m := copy(p[n:], c.b[c.off:])
		n += m
		c.off = (c.off + m) % len(c.b)
	}
	return n, nil
}

var _ io.Reader = (*cycleReader)(nil)

// benchDataCommands are TPM commands as they arrive on the data channel.
func benchDataCommands() map[string][]byte {
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x20}
	// TPM2_PCR_Extend(16, SHA-256) with a password session: 65 bytes.
	extend := []byte{0x80, 0x02, 0, 0, 0, 0x41, 0, 0, 0x01, 0x82, 0, 0, 0, 0x10, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b}
	extend = append(extend, make([]byte, 32)...)
	// A 4 KiB command (the largest the engine takes), e.g. a big NV_Write.
	big := make([]byte, 4096)
	copy(big, []byte{0x80, 0x02, 0, 0, 0x10, 0, 0, 0, 0x01, 0x37})
	framed := binary.BigEndian.AppendUint32(nil, 8)
	framed = append(framed, 0)
	framed = binary.BigEndian.AppendUint32(framed, uint32(len(getRandom)))
	framed = append(framed, getRandom...)
	return map[string][]byte{
		"GetRandom":       getRandom,
		"PCRExtend":       extend,
		"Max4K":           big,
		"FramedGetRandom": framed,
	}
}

func BenchmarkReadDataCommand(b *testing.B) {
	for _, name := range []string{"GetRandom", "PCRExtend", "Max4K", "FramedGetRandom"} {
		cmd := benchDataCommands()[name]
		b.Run(name, func(b *testing.B) {
			r := bufio.NewReaderSize(&cycleReader{b: cmd}, 4096+9)
			b.SetBytes(int64(len(cmd)))
			b.ReportAllocs()
			for b.Loop() {
				dc, err := transport.ReadDataCommand(r, nil)
				if err != nil || dc.Command == nil {
					b.Fatalf("ReadDataCommand: %v, %d bytes", err, len(dc.Command))
				}
			}
		})
	}
}

func BenchmarkDataResponseMarshal(b *testing.B) {
	resp := make([]byte, 44) // a GetRandom(32) response
	for _, framed := range []bool{false, true} {
		name := "Plain"
		if framed {
			name = "Framed"
		}
		b.Run(name, func(b *testing.B) {
			dc := transport.DataCommand{Framed: framed}
			b.ReportAllocs()
			for b.Loop() {
				_ = dc.Marshal(resp)
			}
		})
	}
}
