package fuzz

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"github.com/vtpmd/vtpmd/transport"
)

// bigStateBlobRequest is a SET_STATEBLOB carrying length bytes of blob in
// the request itself, as swtpm_ioctl sends it.
func bigStateBlobRequest(length uint32) []byte {
	msg := transport.SetStateBlobRequest{Type: uint32(transport.BlobPermanent), Length: length}.Marshal()
	return append(msg, make([]byte, length)...)
}

// FuzzDecodeRequest: DecodeRequest never panics; what it decodes is at
// least MinRequestSize long, re-encodes to a request that decodes to the
// same value, and is what the client sent up to the bytes swtpm ignores.
func FuzzDecodeRequest(f *testing.F) {
	seen := map[string]bool{}
	for _, x := range ctrlExchanges(loadCaptures(f)) {
		if !seen[string(x.request)] {
			seen[string(x.request)] = true
			f.Add(x.request)
		}
	}
	f.Add(bigStateBlobRequest(transport.MaxStateBlob + 1))
	f.Add(bigStateBlobRequest(transport.MaxStateBlob))
	f.Fuzz(checkRequest)
}

func checkRequest(t *testing.T, msg []byte) {
	req, err := transport.DecodeRequest(msg)
	if err != nil {
		if req != nil {
			t.Fatalf("DecodeRequest returned %#v with error %v", req, err)
		}
		var code transport.Result
		switch {
		case errors.Is(err, transport.ErrShortRequest):
			if len(msg) >= 4 && len(msg) >= transport.MinRequestSize(commandOf(msg)) {
				t.Fatalf("%d bytes of command %#x are not short, got %v", len(msg), uint32(commandOf(msg)), err)
			}
		case errors.As(err, &code):
			if code == transport.ResultSuccess {
				t.Fatalf("error with result 0: %v", err)
			}
		default:
			t.Fatalf("error is neither ErrShortRequest nor a Result: %v", err)
		}
		return
	}
	c := commandOf(msg)
	if req.Command() != c {
		t.Fatalf("decoded %T for command %#x", req, uint32(c))
	}
	if n := transport.MinRequestSize(c); len(msg) < n {
		t.Fatalf("decoded %d bytes of command %#x, MinRequestSize is %d", len(msg), uint32(c), n)
	}
	wire := req.Marshal()
	if n := transport.MinRequestSize(c); len(wire) < n {
		t.Fatalf("%T marshals to %d bytes, MinRequestSize is %d", req, len(wire), n)
	}
	again, err := transport.DecodeRequest(wire)
	if err != nil {
		t.Fatalf("re-decode %x of %#v: %v", wire, req, err)
	}
	if !reflect.DeepEqual(normalRequest(req), normalRequest(again)) {
		t.Fatalf("round trip: %#v became %#v", req, again)
	}
	if !bytes.Equal(again.Marshal(), wire) {
		t.Fatalf("marshal is not stable: %x then %x", wire, again.Marshal())
	}
	// The encoding is the request as sent, less what swtpm ignores: bytes
	// after the fixed body, and GET_INFO's pad.
	sent := msg[:min(len(msg), len(wire))]
	if c == transport.CmdGetInfo {
		sent, wire = sent[:16], wire[:16]
	}
	if !bytes.Equal(sent, wire) {
		t.Fatalf("%#v marshals to %x, the request was %x", req, wire, msg)
	}
	switch r := req.(type) {
	case transport.HashDataRequest:
		if uint64(len(r.Data)) > uint64(r.Length) || len(msg) != 8+len(r.Data) {
			t.Fatalf("HASH_DATA: %d bytes of %d in a %d-byte request", len(r.Data), r.Length, len(msg))
		}
	case transport.SetStateBlobRequest:
		if r.Length > transport.MaxStateBlob || uint64(len(r.Data)) > uint64(r.Length) || len(msg) != 16+len(r.Data) {
			t.Fatalf("SET_STATEBLOB: %d bytes of %d in a %d-byte request", len(r.Data), r.Length, len(msg))
		}
	case transport.InitRequest:
		if len(msg) != 8 {
			t.Fatalf("INIT of %d bytes accepted", len(msg))
		}
	}
}

func commandOf(msg []byte) transport.Command {
	return transport.Command(binary.BigEndian.Uint32(msg))
}

// normalRequest makes empty data compare equal however it is sliced.
func normalRequest(r transport.Request) transport.Request {
	switch v := r.(type) {
	case transport.HashDataRequest:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	case transport.SetStateBlobRequest:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	}
	return r
}

func requestEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"two-bytes", []any{hexBytes("0000")}},
		{"setdatafd-truncated", []any{hexBytes("000000")}},
		{"setdatafd-without-fd", []any{hexBytes("00000010")}},
		{"init-no-body", []any{hexBytes("00000002")}},
		{"init-long-body", []any{hexBytes("00000002 00000000 00")}},
		{"hash-data-len-ffffffff", []any{hexBytes("00000007 ffffffff 31323334")}},
		{"hash-data-len-0", []any{hexBytes("00000007 00000000")}},
		{"hash-data-more-than-len", []any{hexBytes("00000007 00000001 3132")}},
		{"set-stateblob-len-00080001", []any{hexBytes("0000000d 00000000 00000001 00080001")}},
		{"set-stateblob-len-0", []any{hexBytes("0000000d 00000000 00000001 00000000")}},
		{"set-stateblob-more-than-len", []any{hexBytes("0000000d 00000000 00000002 00000001 0201")}},
		{"set-stateblob-short-header", []any{hexBytes("0000000d 00000000 00000001")}},
		{"get-info-short", []any{hexBytes("00000012 00000000 00000003")}},
		{"get-info-pad", []any{hexBytes("00000012 00000000 00000003 00000000 ffffffff")}},
		{"set-locality-qemu", []any{hexBytes("00000005 04000000")}},
		{"unknown-command", []any{hexBytes("000000ff")}},
		{"command-0", []any{hexBytes("00000000 00000000")}},
	}
}

// FuzzDecodeReply: DecodeReply never panics for any command; a decoded
// reply re-encodes to the bytes it came from where the layout is fixed,
// and decodes again to the same value.
func FuzzDecodeReply(f *testing.F) {
	seen := map[string]bool{}
	for _, x := range ctrlExchanges(loadCaptures(f)) {
		key := string(binary.BigEndian.AppendUint32(nil, uint32(x.command))) + string(x.reply)
		if x.reply != nil && !seen[key] {
			seen[key] = true
			f.Add(uint32(x.command), x.reply)
		}
	}
	f.Fuzz(func(t *testing.T, code uint32, b []byte) {
		checkReply(t, transport.Command(code), b)
		for c := transport.CmdGetCapability; c <= transport.CmdLockStorage; c++ {
			checkReply(t, c, b)
		}
	})
}

// successLayout is the reply type of each command's success.
var successLayout = map[transport.Command]reflect.Type{
	transport.CmdGetCapability:     reflect.TypeFor[transport.GetCapabilityReply](),
	transport.CmdGetTPMEstablished: reflect.TypeFor[transport.GetTPMEstablishedReply](),
	transport.CmdGetConfig:         reflect.TypeFor[transport.GetConfigReply](),
	transport.CmdSetBufferSize:     reflect.TypeFor[transport.SetBufferSizeReply](),
	transport.CmdGetInfo:           reflect.TypeFor[transport.GetInfoReply](),
	transport.CmdGetStateBlob:      reflect.TypeFor[transport.GetStateBlobReply](),
}

func checkReply(t *testing.T, c transport.Command, b []byte) {
	rep, err := transport.DecodeReply(c, b)
	if err != nil {
		if rep != nil {
			t.Fatalf("DecodeReply(%#x) returned %#v with error %v", uint32(c), rep, err)
		}
		return
	}
	if len(b) < 4 {
		t.Fatalf("DecodeReply(%#x) decoded %d bytes", uint32(c), len(b))
	}
	result := transport.Result(binary.BigEndian.Uint32(b))
	wire := rep.Marshal()
	again, err := transport.DecodeReply(c, wire)
	if err != nil {
		t.Fatalf("re-decode %x of %#v: %v", wire, rep, err)
	}
	if !reflect.DeepEqual(normalReply(rep), normalReply(again)) {
		t.Fatalf("round trip: %#v became %#v", rep, again)
	}
	want, hasLayout := successLayout[c]
	switch r := rep.(type) {
	case transport.ResultReply:
		if c == transport.CmdGetStateBlob && (len(b) != 4 || result == transport.ResultSuccess) || result == transport.ResultSuccess && hasLayout {
			t.Fatalf("command %#x: %x decoded as a bare result", uint32(c), b)
		}
		if r.Result != result {
			t.Fatalf("result %#x decoded as %#x", uint32(result), uint32(r.Result))
		}
	case transport.GetTPMEstablishedReply:
		if len(b) < 8 || r.Established != (b[4] != 0) {
			t.Fatalf("GET_TPMESTABLISHED %x decoded as %#v", b, r)
		}
		// The pad bytes are not kept: compare the fixed part.
		wire, b = wire[:4], b[:4]
	}
	if !hasLayout && reflect.TypeOf(rep) != reflect.TypeFor[transport.ResultReply]() {
		t.Fatalf("command %#x: %x decoded as %T", uint32(c), b, rep)
	}
	if hasLayout && reflect.TypeOf(rep) != want && (result == transport.ResultSuccess || c == transport.CmdGetStateBlob && len(b) > 4) {
		t.Fatalf("command %#x: %x decoded as %T, want %v", uint32(c), b, rep, want)
	}
	switch rep.(type) {
	case transport.GetInfoReply, transport.GetStateBlobReply:
		// Variable layouts: the length field must cover the rest exactly.
		if !bytes.Equal(wire, b) {
			t.Fatalf("%x decoded as %#v, which marshals to %x", b, rep, wire)
		}
	default:
		if len(b) < len(wire) || !bytes.Equal(wire, b[:len(wire)]) {
			t.Fatalf("%x decoded as %#v, which marshals to %x", b, rep, wire)
		}
	}
}

func normalReply(r transport.Reply) transport.Reply {
	switch v := r.(type) {
	case transport.GetInfoReply:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	case transport.GetStateBlobReply:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	}
	return r
}

func replyEdgeSeeds() []seed {
	return []seed{
		{"short", []any{uint32(transport.CmdGetCapability), hexBytes("000000")}},
		{"capability-short", []any{uint32(transport.CmdGetCapability), hexBytes("00000000 0000")}},
		{"established-junk-pad", []any{uint32(transport.CmdGetTPMEstablished), hexBytes("00000000 02a5a5a5")}},
		{"info-length-ffffffff", []any{uint32(transport.CmdGetInfo), hexBytes("00000000 00000003 ffffffff 7b7d00")}},
		{"info-length-0", []any{uint32(transport.CmdGetInfo), hexBytes("00000000 00000000 00000000")}},
		{"stateblob-retry", []any{uint32(transport.CmdGetStateBlob), hexBytes("00000800 00000000 00000000 00000000")}},
		{"stateblob-error-4-bytes", []any{uint32(transport.CmdGetStateBlob), hexBytes("0000000a")}},
		{"stateblob-length-ffffffff", []any{uint32(transport.CmdGetStateBlob), hexBytes("00000000 00000000 ffffffff ffffffff 02")}},
		{"buffersize-error", []any{uint32(transport.CmdSetBufferSize), hexBytes("0000000a")}},
		{"buffersize-long", []any{uint32(transport.CmdSetBufferSize), hexBytes("00000000 00001000 00000af8 00001000 00")}},
		{"unknown-command", []any{uint32(0xff), hexBytes("00000000 00000000")}},
	}
}
