package transport

import (
	"encoding/binary"
	"fmt"
)

// Reply is a control-channel reply. Every failure is a ResultReply.
type Reply interface {
	// Marshal encodes the reply as it goes on the wire.
	Marshal() []byte
}

// The replies, one type per layout.
type (
	// ResultReply is the 4-byte reply of most commands, and of every error.
	ResultReply struct{ Result Result }
	// GetCapabilityReply answers CMD_GET_CAPABILITY.
	GetCapabilityReply struct{ Caps uint32 }
	// GetTPMEstablishedReply answers CMD_GET_TPMESTABLISHED.
	GetTPMEstablishedReply struct{ Established bool }
	// GetConfigReply answers CMD_GET_CONFIG.
	GetConfigReply struct{ Flags uint32 }
	// SetBufferSizeReply answers CMD_SET_BUFFERSIZE with the size in force.
	SetBufferSizeReply struct{ Size, Min, Max uint32 }
	// GetInfoReply answers CMD_GET_INFO with a part of the NUL-terminated
	// JSON string, Total bytes long in all.
	GetInfoReply struct {
		Total uint32
		Data  []byte
	}
	// GetStateBlobReply answers CMD_GET_STATEBLOB: its 16-byte header is
	// sent even with a non-zero result.
	GetStateBlobReply struct {
		Result Result
		Flags  uint32
		Total  uint32
		Data   []byte
	}
)

func u32s(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func (r ResultReply) Marshal() []byte        { return u32s(uint32(r.Result)) }
func (r GetCapabilityReply) Marshal() []byte { return u32s(0, r.Caps) }
func (r GetTPMEstablishedReply) Marshal() []byte {
	b := u32s(0, 0)
	if r.Established {
		b[4] = 1
	}
	return b
}
func (r GetConfigReply) Marshal() []byte     { return u32s(0, r.Flags) }
func (r SetBufferSizeReply) Marshal() []byte { return u32s(0, r.Size, r.Min, r.Max) }
func (r GetInfoReply) Marshal() []byte {
	return append(u32s(0, r.Total, uint32(len(r.Data))), r.Data...)
}
func (r GetStateBlobReply) Marshal() []byte {
	return append(u32s(uint32(r.Result), r.Flags, r.Total, uint32(len(r.Data))), r.Data...)
}

// successSize is the size of each command's fixed success reply; commands
// not listed reply with 4 bytes, GET_INFO and GET_STATEBLOB carry data.
func successSize(c Command) int {
	switch c {
	case CmdGetCapability, CmdGetTPMEstablished, CmdGetConfig:
		return 8
	case CmdSetBufferSize:
		return 16
	case CmdGetInfo:
		return 12
	case CmdGetStateBlob:
		return 16
	}
	return 4
}

// ReplyHeaderSize is the size of the fixed part of a successful reply to a
// request with code c, what a client reads before DecodeReply. A GET_INFO or
// GET_STATEBLOB reply carries as many data bytes after it as it announces; a
// failure is the 4-byte result, except for GET_STATEBLOB refused by its
// handler, which keeps its 16-byte header.
func ReplyHeaderSize(c Command) int { return successSize(c) }

// DecodeReply decodes the reply to a request with code c. A reply with a
// non-zero result decodes as ResultReply; for GET_STATEBLOB only when it is
// the bare 4-byte result of a request refused before the handler (TPM not
// running), as its 16-byte header comes with every other result.
func DecodeReply(c Command, b []byte) (Reply, error) {
	if len(b) < 4 {
		return nil, fmt.Errorf("decode reply to command %#x: %d bytes", uint32(c), len(b))
	}
	u32 := func(i int) uint32 { return binary.BigEndian.Uint32(b[4*i:]) }
	result := Result(u32(0))
	if result != ResultSuccess && (c != CmdGetStateBlob || len(b) == 4) {
		return ResultReply{Result: result}, nil
	}
	if len(b) < successSize(c) {
		return nil, fmt.Errorf("decode reply to command %#x: %d bytes, want %d", uint32(c), len(b), successSize(c))
	}
	switch c {
	case CmdGetCapability:
		return GetCapabilityReply{Caps: u32(1)}, nil
	case CmdGetTPMEstablished:
		return GetTPMEstablishedReply{Established: b[4] != 0}, nil
	case CmdGetConfig:
		return GetConfigReply{Flags: u32(1)}, nil
	case CmdSetBufferSize:
		return SetBufferSizeReply{Size: u32(1), Min: u32(2), Max: u32(3)}, nil
	case CmdGetInfo:
		if n := u32(2); uint32(len(b)-12) != n {
			return nil, fmt.Errorf("decode GET_INFO reply: %d data bytes, header says %d", len(b)-12, n)
		}
		return GetInfoReply{Total: u32(1), Data: b[12:]}, nil
	case CmdGetStateBlob:
		if n := u32(3); uint32(len(b)-16) != n {
			return nil, fmt.Errorf("decode GET_STATEBLOB reply: %d data bytes, header says %d", len(b)-16, n)
		}
		return GetStateBlobReply{Result: result, Flags: u32(1), Total: u32(2), Data: b[16:]}, nil
	}
	return ResultReply{Result: result}, nil
}
