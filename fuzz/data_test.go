package fuzz

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/vtpmd/vtpmd/transport"
	"github.com/vtpmd/vtpmd/vtpm"
)

// Data-channel framing (spec §3.2): the MS simulator's TPM_SEND_COMMAND
// header, u32 8, u8 locality, u32 length.
const (
	sendCommand      = 8
	framedHeaderSize = 9
	tpmHeaderSize    = 10
	// dataReaderSize is the server's read buffer: a whole command and its
	// send-command header.
	dataReaderSize = vtpm.MaxBufferSize + framedHeaderSize
)

// framed wraps cmd in the send-command header.
func framed(locality byte, cmd []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, sendCommand)
	b = append(b, locality)
	b = binary.BigEndian.AppendUint32(b, uint32(len(cmd)))
	return append(b, cmd...)
}

// FuzzReadDataCommand reads commands from a stream of data-channel bytes
// until it ends: ReadDataCommand never panics, never returns a command
// larger than the engine takes, and consumes exactly the framing and the
// command the size fields announce.
func FuzzReadDataCommand(f *testing.F) {
	seen := map[string]bool{}
	cmds := dataCommands(loadCaptures(f))
	for _, cmd := range cmds {
		if !seen[string(cmd)] {
			seen[string(cmd)] = true
			f.Add(cmd)
		}
	}
	// A few streams of several commands, plain and framed, as a client
	// that pipelines would send them.
	var plain, fr []byte
	for i, cmd := range cmds[:min(len(cmds), 24)] {
		plain = append(plain, cmd...)
		fr = append(fr, framed(byte(i%5), cmd)...)
	}
	f.Add(plain)
	f.Add(fr)
	f.Fuzz(checkDataStream)
}

func checkDataStream(t *testing.T, data []byte) {
	src := bytes.NewReader(data)
	r := bufio.NewReaderSize(src, dataReaderSize)
	consumed := func() int { return len(data) - src.Len() - r.Buffered() }
	for range 64 {
		start := consumed()
		rest := data[start:]
		dc, err := transport.ReadDataCommand(r, nil)
		n := consumed() - start
		if len(rest) < tpmHeaderSize {
			if err == nil {
				t.Fatalf("at offset %d: a command from %d bytes", start, len(rest))
			}
			return
		}
		hdr, size := 0, uint64(binary.BigEndian.Uint32(rest[2:]))
		isFramed := binary.BigEndian.Uint32(rest) == sendCommand
		if isFramed {
			hdr, size = framedHeaderSize, uint64(binary.BigEndian.Uint32(rest[5:]))
		} else if size < tpmHeaderSize {
			size = tpmHeaderSize // the header is all there is
		}
		complete := uint64(len(rest)) >= uint64(hdr)+size
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("at offset %d: %v", start, err)
			}
			if complete || size > vtpm.MaxBufferSize {
				t.Fatalf("at offset %d: %v reading a command of %d bytes from %d", start, err, size, len(rest))
			}
			return
		}
		if len(dc.Command) > vtpm.MaxBufferSize {
			t.Fatalf("at offset %d: %d-byte command, the engine takes %d", start, len(dc.Command), vtpm.MaxBufferSize)
		}
		if dc.Framed != isFramed || (isFramed && dc.Locality != rest[4]) {
			t.Fatalf("at offset %d: %x read as framed=%v locality %d", start, rest[:tpmHeaderSize], dc.Framed, dc.Locality)
		}
		if size > vtpm.MaxBufferSize {
			// Dropped; without a connection only what is at hand goes.
			if dc.Command != nil || uint64(n) > uint64(hdr)+size || n < hdr {
				t.Fatalf("at offset %d: oversized command of %d: got %d bytes, consumed %d", start, size, len(dc.Command), n)
			}
			continue
		}
		if !complete || dc.Command == nil || uint64(len(dc.Command)) != size || n != hdr+int(size) {
			t.Fatalf("at offset %d: command of %d bytes after a %d-byte header in %d: got %d bytes, consumed %d", start, size, hdr, len(rest), len(dc.Command), n)
		}
		if !bytes.Equal(dc.Command, rest[hdr:n]) {
			t.Fatalf("at offset %d: command %x, the stream has %x", start, dc.Command, rest[hdr:n])
		}
		// The response goes back in the framing the command came in.
		resp := vtpm.ErrorResponse(0x101)
		out := dc.Marshal(resp)
		if !dc.Framed && !bytes.Equal(out, resp) {
			t.Fatalf("plain response marshalled to %x", out)
		}
		if dc.Framed && (len(out) != len(resp)+8 || binary.BigEndian.Uint32(out) != uint32(len(resp)) ||
			!bytes.Equal(out[4:4+len(resp)], resp) || binary.BigEndian.Uint32(out[4+len(resp):]) != 0) {
			t.Fatalf("framed response marshalled to %x", out)
		}
	}
}

func dataEdgeSeeds() []seed {
	getRandom := hexBytes("8001 0000000c 0000017b 0008")
	return []seed{
		{"empty", []any{[]byte{}}},
		{"short-header", []any{hexBytes("8001 0000000c 0000")}},
		{"size-ffffffff", []any{hexBytes("8001 ffffffff 0000017b 0008")}},
		{"size-4097", []any{append(hexBytes("8001 00001001 0000017b"), make([]byte, 4097-10)...)}},
		{"size-4096", []any{append(hexBytes("8001 00001000 0000017b"), make([]byte, 4096-10)...)}},
		{"size-0", []any{hexBytes("8001 00000000 0000017b 0008")}},
		{"size-more-than-sent", []any{hexBytes("8001 00000100 0000017b 0008")}},
		{"size-less-than-sent", []any{append(hexBytes("8001 0000000a 00000181"), getRandom...)}},
		{"bad-tag", []any{hexBytes("c400 0000000c 0000017b 0008")}},
		{"framed", []any{framed(3, getRandom)}},
		{"framed-zero-length", []any{append(framed(0, nil), 0)}},
		{"framed-zero-length-alone", []any{framed(0, nil)}},
		{"framed-length-ffffffff", []any{hexBytes("00000008 00 ffffffff 8001 0000000c 0000017b 0008")}},
		{"framed-length-short", []any{hexBytes("00000008 00 00000004 8001 0000 0c")}},
		{"framed-header-truncated", []any{hexBytes("00000008 00 0000")}},
		{"framed-then-plain", []any{append(framed(4, getRandom), getRandom...)}},
		{"first-u32-8-with-tpm-tag", []any{hexBytes("8001 00000008 00000000")}},
	}
}
