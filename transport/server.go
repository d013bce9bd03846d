package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/vtpm"
)

// TPM is the device a Server serves. *vtpm.Device implements it.
type TPM interface {
	Init(deleteVolatile bool) error
	Running() bool
	Stop() error
	Execute(ctx context.Context, cmd []byte) []byte
	SetLocality(l uint8) error
	Established() (bool, error)
	ResetEstablished(l uint8) error
	HashStart() error
	HashData(data []byte) error
	HashEnd() error
	Cancel() error
	StoreVolatile() error
	BufferSize(size uint32) (uint32, error)
	InfoJSON(flags uint64) string
	State(part vtpm.StatePart) ([]byte, error)
	SetState(part vtpm.StatePart, image []byte) error
}

// Storage is the lock on a TPM's state storage, for CMD_LOCK_STORAGE and
// for handing the state over in a migration on shared storage.
type Storage interface {
	// Lock takes the lock, trying again every 10 ms up to retries times.
	Lock(retries int) error
	// Unlock releases the lock.
	Unlock() error
}

// Capabilities is what CMD_GET_CAPABILITY reports without a Storage: every
// command the Server implements but CMD_LOCK_STORAGE.
const Capabilities = CapInit | CapShutdown | CapGetTPMEstablished | CapSetLocality | CapHashing |
	CapCancelTPMCmd | CapStoreVolatile | CapResetTPMEstablished | CapGetStateBlob | CapSetStateBlob |
	CapStop | CapGetConfig | CapSetDataFD | CapSetBufferSize | CapGetInfo | CapSendCommandHeader

// Timeouts of the control channel.
const (
	// RequestTimeout bounds the arrival of a request's fixed part, as swtpm's
	// 500 ms; a request still short then closes the connection unanswered.
	RequestTimeout = 500 * time.Millisecond
	// StreamTimeout bounds each read of hash data or a state blob.
	StreamTimeout = 10 * time.Second
)

// Server serves one TPM over swtpm's control and data channels.
type Server struct {
	// TPM is the device served. Required.
	TPM TPM
	// Log receives the server's logs; it should carry the VM id.
	Log *slog.Logger
	// Terminate ends the server when the data connection closes (--terminate).
	Terminate bool
	// CtrlTerminate ends the server when a control client disconnects
	// (--ctrl ...,terminate).
	CtrlTerminate bool
	// Disconnect closes a data connection after each response
	// (--server ...,disconnect).
	Disconnect bool
	// DataChannel says the data channel is served from a listener or a
	// connected socket (--server), so CMD_SET_DATAFD is refused.
	DataChannel bool
	// BlobKeys encrypt and decrypt state blobs as swtpm's --migration-key
	// and --key do; CMD_GET_CONFIG reports which are set.
	BlobKeys BlobKeys
	// Storage, if set, is taken before each TPM command and state blob,
	// and serves CMD_LOCK_STORAGE.
	Storage Storage
	// ReleaseLockOutgoing releases Storage once an outgoing migration has
	// read the last state blob (--migration release-lock-outgoing).
	ReleaseLockOutgoing bool
	// DirectStats, if set, counts the commands the direct loop runs.
	DirectStats *DirectStats

	hasData  atomic.Bool
	direct   atomic.Pointer[directConn]
	doneOnce sync.Once
	done     chan struct{}
	initOnce sync.Once
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.done = make(chan struct{})
		s.hasData.Store(s.DataChannel)
		if s.Log == nil {
			s.Log = slog.New(slog.DiscardHandler)
		}
	})
}

// Done is closed when the server is to end: after CMD_SHUTDOWN, or a
// disconnect that Terminate or CtrlTerminate asks to end on.
func (s *Server) Done() <-chan struct{} {
	s.init()
	return s.done
}

func (s *Server) finish(reason string) {
	s.init()
	s.doneOnce.Do(func() {
		s.Log.Info("ending", "reason", reason)
		close(s.done)
	})
}

// ServeControl accepts control clients on l one at a time, as swtpm does,
// until ctx ends or the server is done.
func (s *Server) ServeControl(ctx context.Context, l net.Listener) error {
	s.init()
	return s.acceptLoop(ctx, l, "control", s.ServeControlConn)
}

// ServeData accepts data clients on l one at a time until ctx ends or the
// server is done. Set DataChannel when there is one.
func (s *Server) ServeData(ctx context.Context, l net.Listener) error {
	s.init()
	return s.acceptLoop(ctx, l, "data", s.serveDataConn)
}

func (s *Server) acceptLoop(ctx context.Context, l net.Listener, what string, serve func(context.Context, net.Conn)) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	go func() {
		<-s.done
		l.Close()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || s.isDone() {
				return nil
			}
			return fmt.Errorf("accept %s client on %s: %w", what, l.Addr(), err)
		}
		serve(ctx, c)
	}
}

func (s *Server) isDone() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// ServeControlConn serves one control client until it disconnects.
func (s *Server) ServeControlConn(ctx context.Context, c net.Conn) {
	s.init()
	defer c.Close()
	defer func() {
		if s.CtrlTerminate {
			s.finish("control client disconnected")
		}
	}()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	r := &ctrlReader{conn: c}
	for !s.isDone() {
		msg, fds, err := r.next()
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				s.Log.Warn("control connection closed", "err", err)
			}
			return
		}
		reply, after := s.handle(ctx, r, msg, fds)
		if reply == nil {
			s.Log.Warn("control connection closed: malformed request", "request", fmt.Sprintf("% x", head(msg)))
			return
		}
		if _, err := c.Write(reply.Marshal()); err != nil {
			s.Log.Warn("write control reply", "err", err)
			return
		}
		if after != nil {
			after()
		}
	}
}

func head(b []byte) []byte { return b[:min(len(b), 16)] }

// handle runs one request. A nil reply closes the connection unanswered;
// after, if set, runs once the reply is sent.
func (s *Server) handle(ctx context.Context, r *ctrlReader, msg []byte, fds []int) (reply Reply, after func()) {
	req, err := DecodeRequest(msg)
	if _, isSetFD := req.(SetDataFDRequest); !isSetFD || err != nil {
		closeFDs(fds)
	}
	var code Result
	switch {
	case errors.Is(err, ErrShortRequest):
		return nil, nil
	case errors.As(err, &code):
		// A rejected SET_STATEBLOB still announced its data: skip it, or
		// it would be read as requests. A running TPM is refused first,
		// as swtpm does.
		if setBlobCode(msg) {
			r.discardBlob(msg)
			if s.TPM.Running() {
				code = ResultBadOrdinal
			}
		}
		return ResultReply{Result: code}, nil
	}
	switch req := req.(type) {
	case GetCapabilityRequest:
		caps := Capabilities
		if s.Storage != nil {
			caps |= CapLockStorage
		}
		return GetCapabilityReply{Caps: caps}, nil
	case InitRequest:
		return s.result(s.TPM.Init(req.Flags&InitFlagDeleteVolatile != 0)), nil
	case ShutdownRequest:
		return s.result(s.TPM.Stop()), func() { s.finish("CMD_SHUTDOWN") }
	case StopRequest:
		return s.result(s.TPM.Stop()), nil
	case GetTPMEstablishedRequest:
		established, err := s.TPM.Established()
		if err != nil {
			return s.result(err), nil
		}
		return GetTPMEstablishedReply{Established: established}, nil
	case SetLocalityRequest:
		return s.result(s.TPM.SetLocality(req.Locality)), nil
	case ResetTPMEstablishedRequest:
		return s.result(s.TPM.ResetEstablished(req.Locality)), nil
	case HashStartRequest:
		return s.result(s.TPM.HashStart()), nil
	case HashDataRequest:
		return s.result(r.streamHashData(req, s.TPM.HashData)), nil
	case HashEndRequest:
		return s.result(s.TPM.HashEnd()), nil
	case CancelTPMCmdRequest:
		return s.result(s.TPM.Cancel()), nil
	case StoreVolatileRequest:
		return s.result(s.TPM.StoreVolatile()), nil
	case GetConfigRequest:
		var flags uint32
		if s.BlobKeys.State != nil {
			flags |= ConfigFlagFileKey
		}
		if s.BlobKeys.Migration != nil {
			flags |= ConfigFlagMigrationKey
		}
		return GetConfigReply{Flags: flags}, nil
	case SetBufferSizeRequest:
		size, err := s.TPM.BufferSize(req.Size)
		if err != nil {
			return s.result(err), nil
		}
		return SetBufferSizeReply{Size: size, Min: vtpm.MinBufferSize, Max: vtpm.MaxBufferSize}, nil
	case GetInfoRequest:
		info := s.TPM.InfoJSON(req.Flags) + "\x00"
		if int(req.Offset) >= len(info)-1 {
			return ResultReply{Result: ResultBadParameter}, nil
		}
		return GetInfoReply{Total: uint32(len(info)), Data: []byte(info[req.Offset:][:min(len(info)-int(req.Offset), 3072)])}, nil
	case GetStateBlobRequest:
		reply := s.getStateBlob(req)
		if BlobType(req.Type) == BlobSavestate && s.ReleaseLockOutgoing && s.Storage != nil {
			// The savestate blob is the last of an outgoing migration.
			return reply, func() {
				// The direct loop runs commands without taking the lock
				// again: make it hand the next one to Go's path, which does.
				if d := s.direct.Load(); d != nil {
					d.wake()
				}
				if err := s.Storage.Unlock(); err != nil {
					s.Log.Warn("release the storage lock", "err", err)
				}
			}
		}
		return reply, nil
	case SetStateBlobRequest:
		return s.result(s.setStateBlob(r, req)), nil
	case SetDataFDRequest:
		return s.setDataFD(ctx, fds), nil
	case LockStorageRequest:
		if s.Storage == nil {
			return ResultReply{Result: ResultBadOrdinal}, nil
		}
		if err := s.Storage.Lock(int(req.Retries)); err != nil {
			s.Log.Warn("CMD_LOCK_STORAGE failed", "err", err)
			return ResultReply{Result: ResultFail}, nil
		}
		return ResultReply{Result: ResultSuccess}, nil
	}
	return ResultReply{Result: ResultBadOrdinal}, nil
}

// stateFlagEncrypted is PTM_STATE_FLAG_ENCRYPTED of SET_STATEBLOB: the
// blob's data is encrypted with the state key.
const stateFlagEncrypted = 2

// lockStorage takes the storage lock if there is one and it is not held.
func (s *Server) lockStorage() error {
	if s.Storage == nil {
		return nil
	}
	return s.Storage.Lock(0)
}

func setBlobCode(msg []byte) bool {
	return len(msg) >= 16 && Command(uint32(msg[0])<<24|uint32(msg[1])<<16|uint32(msg[2])<<8|uint32(msg[3])) == CmdSetStateBlob
}

// result turns a TPM error into its control-channel reply.
func (s *Server) result(err error) Reply {
	var code Result
	switch {
	case err == nil:
		return ResultReply{Result: ResultSuccess}
	case errors.Is(err, vtpm.ErrNotRunning), errors.Is(err, vtpm.ErrRunning):
		code = ResultBadOrdinal
	case errors.Is(err, vtpm.ErrBadLocality):
		code = ResultBadLocality
	case errors.As(err, &code):
	case errors.Is(err, vtpm.ErrBadImage):
		code = ResultBadVersion
	default:
		code = ResultFail
	}
	s.Log.Warn("control command failed", "result", fmt.Sprintf("%#x", uint32(code)), "err", err)
	return ResultReply{Result: code}
}

func (s *Server) getStateBlob(req GetStateBlobRequest) Reply {
	part := vtpm.StatePart(req.Type)
	if BlobType(req.Type) == BlobSavestate {
		// A TPM 2 keeps no savestate blob.
		return GetStateBlobReply{Result: ResultRetry}
	}
	image, err := s.TPM.State(part)
	switch {
	case errors.Is(err, vtpm.ErrNoSuchState):
		return GetStateBlobReply{Result: ResultFail}
	case err != nil:
		// Not running: refused before the handler, with 4 bytes as swtpm.
		return s.result(err)
	}
	blob, err := WrapStateBlob(image, s.BlobKeys)
	if err != nil {
		s.Log.Error("wrap state blob", "err", err)
		return GetStateBlobReply{Result: ResultFail}
	}
	if int(req.Offset) > len(blob) {
		return GetStateBlobReply{Result: ResultBadParameter}
	}
	rest := blob[req.Offset:]
	return GetStateBlobReply{Total: uint32(len(rest)), Data: rest}
}

func (s *Server) setStateBlob(r *ctrlReader, req SetStateBlobRequest) error {
	blob, err := r.readBlob(req)
	if s.TPM.Running() {
		// Refused before the blob is looked at, even one cut short, as
		// swtpm does; it is read all the same, to keep the stream in step.
		return fmt.Errorf("set state blob: %w", vtpm.ErrRunning)
	}
	if err != nil {
		return err
	}
	if err := s.lockStorage(); err != nil {
		return fmt.Errorf("set state blob: %v: %w", err, ResultIOError)
	}
	if BlobType(req.Type) == BlobSavestate {
		if len(blob) == 0 {
			return nil
		}
		return fmt.Errorf("set savestate blob: a TPM 2 has none: %w", ResultFail)
	}
	if len(blob) <= blobHeaderSize {
		return s.TPM.SetState(vtpm.StatePart(req.Type), nil)
	}
	image, err := UnwrapStateBlob(blob, s.BlobKeys, req.Flags&stateFlagEncrypted != 0)
	if err != nil {
		return err
	}
	return s.TPM.SetState(vtpm.StatePart(req.Type), image)
}

func (s *Server) setDataFD(ctx context.Context, fds []int) Reply {
	if len(fds) != 1 {
		closeFDs(fds)
		return ResultReply{Result: ResultBadParameter}
	}
	if !s.hasData.CompareAndSwap(false, true) {
		closeFDs(fds)
		return ResultReply{Result: ResultIOError}
	}
	f := os.NewFile(uintptr(fds[0]), "data-fd")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		s.hasData.Store(false)
		s.Log.Warn("SET_DATAFD: descriptor is not a socket", "err", err)
		return ResultReply{Result: ResultBadParameter}
	}
	go func() {
		s.serveDataConn(ctx, c)
		s.hasData.Store(false)
	}()
	return ResultReply{Result: ResultSuccess}
}

// ServeDataConn serves TPM commands on one connected data channel until it
// closes; with Terminate, the server then ends.
func (s *Server) ServeDataConn(ctx context.Context, c net.Conn) {
	s.init()
	s.serveDataConn(ctx, c)
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}
