package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Command is a control-channel command code (swtpm's CMD_*).
type Command uint32

// Control-channel commands.
const (
	CmdGetCapability       Command = 0x01
	CmdInit                Command = 0x02
	CmdShutdown            Command = 0x03
	CmdGetTPMEstablished   Command = 0x04
	CmdSetLocality         Command = 0x05
	CmdHashStart           Command = 0x06
	CmdHashData            Command = 0x07
	CmdHashEnd             Command = 0x08
	CmdCancelTPMCmd        Command = 0x09
	CmdStoreVolatile       Command = 0x0a
	CmdResetTPMEstablished Command = 0x0b
	CmdGetStateBlob        Command = 0x0c
	CmdSetStateBlob        Command = 0x0d
	CmdStop                Command = 0x0e
	CmdGetConfig           Command = 0x0f
	CmdSetDataFD           Command = 0x10
	CmdSetBufferSize       Command = 0x11
	CmdGetInfo             Command = 0x12
	CmdLockStorage         Command = 0x13
)

// Result is a control-channel result code (TPM 1.2 numbering, as swtpm).
type Result uint32

// Result codes used on the control channel.
const (
	ResultSuccess      Result = 0x00
	ResultBadParameter Result = 0x03
	ResultFail         Result = 0x09
	ResultBadOrdinal   Result = 0x0a
	ResultKeyNotFound  Result = 0x0d
	ResultSize         Result = 0x17
	ResultIOError      Result = 0x1f
	ResultBadLocality  Result = 0x3d
	ResultRetry        Result = 0x800
)

func (r Result) Error() string { return fmt.Sprintf("control channel result %#x", uint32(r)) }

// Capability bits of CMD_GET_CAPABILITY.
const (
	CapInit                uint32 = 1 << 0
	CapShutdown            uint32 = 1 << 1
	CapGetTPMEstablished   uint32 = 1 << 2
	CapSetLocality         uint32 = 1 << 3
	CapHashing             uint32 = 1 << 4
	CapCancelTPMCmd        uint32 = 1 << 5
	CapStoreVolatile       uint32 = 1 << 6
	CapResetTPMEstablished uint32 = 1 << 7
	CapGetStateBlob        uint32 = 1 << 8
	CapSetStateBlob        uint32 = 1 << 9
	CapStop                uint32 = 1 << 10
	CapGetConfig           uint32 = 1 << 11
	CapSetDataFD           uint32 = 1 << 12
	CapSetBufferSize       uint32 = 1 << 13
	CapGetInfo             uint32 = 1 << 14
	CapSendCommandHeader   uint32 = 1 << 15
	CapLockStorage         uint32 = 1 << 16
)

// Flags of the control messages.
const (
	InitFlagDeleteVolatile uint32 = 1 // CMD_INIT
	ConfigFlagFileKey      uint32 = 1 // CMD_GET_CONFIG: a --key state key is set
	ConfigFlagMigrationKey uint32 = 2 // CMD_GET_CONFIG: a --migration-key is set
)

// MaxStateBlob is the largest blob CMD_SET_STATEBLOB accepts.
const MaxStateBlob = 512 * 1024

// Request is a decoded control-channel request.
type Request interface {
	// Command is the request's command code.
	Command() Command
	// Marshal encodes the request with its command code, as a client sends it.
	Marshal() []byte
}

// The requests, one type per command. Bodies follow swtpm's tpm_ioctl.h.
type (
	// GetCapabilityRequest asks which control commands are supported.
	GetCapabilityRequest struct{}
	// InitRequest powers the TPM on.
	InitRequest struct{ Flags uint32 }
	// ShutdownRequest stops the TPM and ends the process.
	ShutdownRequest struct{}
	// GetTPMEstablishedRequest reads the TPM-established flag.
	GetTPMEstablishedRequest struct{}
	// SetLocalityRequest sets the locality of later TPM commands.
	SetLocalityRequest struct{ Locality uint8 }
	// HashStartRequest starts a locality-4 hash sequence.
	HashStartRequest struct{}
	// HashDataRequest carries hash data. Data is the part of it that came
	// with the request; the rest, up to Length, follows on the stream.
	HashDataRequest struct {
		Length uint32
		Data   []byte
	}
	// HashEndRequest ends the hash sequence.
	HashEndRequest struct{}
	// CancelTPMCmdRequest cancels the running TPM command.
	CancelTPMCmdRequest struct{}
	// StoreVolatileRequest writes the volatile state.
	StoreVolatileRequest struct{}
	// ResetTPMEstablishedRequest clears the TPM-established flag.
	ResetTPMEstablishedRequest struct{ Locality uint8 }
	// GetStateBlobRequest reads a state blob.
	GetStateBlobRequest struct{ Flags, Type, Offset uint32 }
	// SetStateBlobRequest sets a state blob. Data is the part that came with
	// the request; the rest, up to Length, follows on the stream.
	SetStateBlobRequest struct {
		Flags, Type, Length uint32
		Data                []byte
	}
	// StopRequest stops the TPM; the process stays.
	StopRequest struct{}
	// GetConfigRequest asks which keys are configured.
	GetConfigRequest struct{}
	// SetDataFDRequest hands over the data channel's descriptor, which
	// travels as SCM_RIGHTS ancillary data and is not part of Marshal.
	SetDataFDRequest struct{}
	// SetBufferSizeRequest sets (or with 0 queries) the buffer size.
	SetBufferSizeRequest struct{ Size uint32 }
	// GetInfoRequest asks for the JSON description selected by Flags.
	GetInfoRequest struct {
		Flags  uint64
		Offset uint32
	}
	// LockStorageRequest takes the storage lock, retrying every 10 ms.
	LockStorageRequest struct{ Retries uint32 }
)

func (GetCapabilityRequest) Command() Command       { return CmdGetCapability }
func (InitRequest) Command() Command                { return CmdInit }
func (ShutdownRequest) Command() Command            { return CmdShutdown }
func (GetTPMEstablishedRequest) Command() Command   { return CmdGetTPMEstablished }
func (SetLocalityRequest) Command() Command         { return CmdSetLocality }
func (HashStartRequest) Command() Command           { return CmdHashStart }
func (HashDataRequest) Command() Command            { return CmdHashData }
func (HashEndRequest) Command() Command             { return CmdHashEnd }
func (CancelTPMCmdRequest) Command() Command        { return CmdCancelTPMCmd }
func (StoreVolatileRequest) Command() Command       { return CmdStoreVolatile }
func (ResetTPMEstablishedRequest) Command() Command { return CmdResetTPMEstablished }
func (GetStateBlobRequest) Command() Command        { return CmdGetStateBlob }
func (SetStateBlobRequest) Command() Command        { return CmdSetStateBlob }
func (StopRequest) Command() Command                { return CmdStop }
func (GetConfigRequest) Command() Command           { return CmdGetConfig }
func (SetDataFDRequest) Command() Command           { return CmdSetDataFD }
func (SetBufferSizeRequest) Command() Command       { return CmdSetBufferSize }
func (GetInfoRequest) Command() Command             { return CmdGetInfo }
func (LockStorageRequest) Command() Command         { return CmdLockStorage }

func codeOnly(c Command) []byte { return binary.BigEndian.AppendUint32(nil, uint32(c)) }

func withU32s(c Command, vs ...uint32) []byte {
	b := codeOnly(c)
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func (r GetCapabilityRequest) Marshal() []byte     { return codeOnly(r.Command()) }
func (r InitRequest) Marshal() []byte              { return withU32s(r.Command(), r.Flags) }
func (r ShutdownRequest) Marshal() []byte          { return codeOnly(r.Command()) }
func (r GetTPMEstablishedRequest) Marshal() []byte { return codeOnly(r.Command()) }
func (r SetLocalityRequest) Marshal() []byte       { return append(codeOnly(r.Command()), r.Locality) }
func (r HashStartRequest) Marshal() []byte         { return codeOnly(r.Command()) }
func (r HashDataRequest) Marshal() []byte {
	return append(withU32s(r.Command(), r.Length), r.Data...)
}
func (r HashEndRequest) Marshal() []byte       { return codeOnly(r.Command()) }
func (r CancelTPMCmdRequest) Marshal() []byte  { return codeOnly(r.Command()) }
func (r StoreVolatileRequest) Marshal() []byte { return codeOnly(r.Command()) }
func (r ResetTPMEstablishedRequest) Marshal() []byte {
	return append(codeOnly(r.Command()), r.Locality)
}
func (r GetStateBlobRequest) Marshal() []byte {
	return withU32s(r.Command(), r.Flags, r.Type, r.Offset)
}
func (r SetStateBlobRequest) Marshal() []byte {
	return append(withU32s(r.Command(), r.Flags, r.Type, r.Length), r.Data...)
}
func (r StopRequest) Marshal() []byte          { return codeOnly(r.Command()) }
func (r GetConfigRequest) Marshal() []byte     { return codeOnly(r.Command()) }
func (r SetDataFDRequest) Marshal() []byte     { return codeOnly(r.Command()) }
func (r SetBufferSizeRequest) Marshal() []byte { return withU32s(r.Command(), r.Size) }
func (r GetInfoRequest) Marshal() []byte {
	return withU32s(r.Command(), uint32(r.Flags>>32), uint32(r.Flags), r.Offset, 0)
}
func (r LockStorageRequest) Marshal() []byte { return withU32s(r.Command(), r.Retries) }

// ErrShortRequest means fewer bytes arrived than the command's fixed part.
// swtpm closes the connection without a reply when that happens.
var ErrShortRequest = errors.New("control request shorter than its fixed part")

// MinRequestSize is the number of bytes, command code included, that must
// arrive before a request with this code can be decoded. Unknown codes need
// only the code.
func MinRequestSize(c Command) int {
	switch c {
	case CmdInit, CmdHashData, CmdSetBufferSize, CmdLockStorage:
		return 8
	case CmdSetLocality, CmdResetTPMEstablished:
		return 5
	case CmdGetStateBlob, CmdSetStateBlob:
		return 16
	case CmdGetInfo:
		return 20
	}
	return 4
}

// DecodeRequest decodes one control message: the bytes that arrived for one
// request, at least MinRequestSize of them. Bytes beyond a command's body
// are ignored, as swtpm ignores them, except where swtpm rejects them. An
// unknown command gives ResultBadOrdinal; a malformed body gives
// ResultBadParameter or ErrShortRequest.
func DecodeRequest(msg []byte) (Request, error) {
	if len(msg) < 4 {
		return nil, ErrShortRequest
	}
	c := Command(binary.BigEndian.Uint32(msg))
	if len(msg) < MinRequestSize(c) {
		return nil, ErrShortRequest
	}
	body := msg[4:]
	u32 := func(i int) uint32 { return binary.BigEndian.Uint32(body[4*i:]) }
	switch c {
	case CmdGetCapability:
		return GetCapabilityRequest{}, nil
	case CmdInit:
		if len(body) != 4 {
			return nil, ResultBadParameter
		}
		return InitRequest{Flags: u32(0)}, nil
	case CmdShutdown:
		return ShutdownRequest{}, nil
	case CmdGetTPMEstablished:
		return GetTPMEstablishedRequest{}, nil
	case CmdSetLocality:
		return SetLocalityRequest{Locality: body[0]}, nil
	case CmdHashStart:
		return HashStartRequest{}, nil
	case CmdHashData:
		r := HashDataRequest{Length: u32(0), Data: body[4:]}
		if uint32(len(r.Data)) > r.Length {
			return nil, ResultBadParameter
		}
		return r, nil
	case CmdHashEnd:
		return HashEndRequest{}, nil
	case CmdCancelTPMCmd:
		return CancelTPMCmdRequest{}, nil
	case CmdStoreVolatile:
		return StoreVolatileRequest{}, nil
	case CmdResetTPMEstablished:
		return ResetTPMEstablishedRequest{Locality: body[0]}, nil
	case CmdGetStateBlob:
		return GetStateBlobRequest{Flags: u32(0), Type: u32(1), Offset: u32(2)}, nil
	case CmdSetStateBlob:
		r := SetStateBlobRequest{Flags: u32(0), Type: u32(1), Length: u32(2), Data: body[12:]}
		if r.Length > MaxStateBlob {
			return nil, ResultFail
		}
		if uint32(len(r.Data)) > r.Length {
			return nil, ResultBadParameter
		}
		return r, nil
	case CmdStop:
		return StopRequest{}, nil
	case CmdGetConfig:
		return GetConfigRequest{}, nil
	case CmdSetDataFD:
		return SetDataFDRequest{}, nil
	case CmdSetBufferSize:
		return SetBufferSizeRequest{Size: u32(0)}, nil
	case CmdGetInfo:
		return GetInfoRequest{Flags: uint64(u32(0))<<32 | uint64(u32(1)), Offset: u32(2)}, nil
	case CmdLockStorage:
		return LockStorageRequest{Retries: u32(0)}, nil
	}
	return nil, ResultBadOrdinal
}
