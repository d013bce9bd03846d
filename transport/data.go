package transport

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"time"

	"github.com/vtpmd/vtpmd/vtpm"
)

const (
	tpmHeaderSize = 10
	// sendCommandHeader is the MS simulator's TPM_SEND_COMMAND code that
	// starts a framed command: u32 8, u8 locality, u32 length.
	sendCommandHeader = 8
	framedHeaderSize  = 9
	rcCommandSize     = 0x142
	rcFailure         = 0x101
	// drainTimeout bounds the wait for the rest of an oversized command.
	drainTimeout = 200 * time.Millisecond
)

// DataCommand is one command read from the data channel.
type DataCommand struct {
	// Command is the TPM command; nil if it was larger than the engine takes.
	Command []byte
	// Framed says the command came with the send-command header, so the
	// response goes back framed too.
	Framed bool
	// Locality is the header's locality, when Framed.
	Locality uint8
}

// ReadDataCommand reads one TPM command, plain or with the send-command
// header (detected as swtpm does: not a TPM 2 tag and a first u32 of 8).
// The size field frames the command; one larger than the engine takes is
// read and dropped, and gives a nil Command.
func ReadDataCommand(r *bufio.Reader, conn ReadDeadliner) (DataCommand, error) {
	hdr, err := r.Peek(tpmHeaderSize)
	if err != nil {
		return DataCommand{}, err
	}
	var dc DataCommand
	size := binary.BigEndian.Uint32(hdr[2:])
	if tag := binary.BigEndian.Uint16(hdr); tag != 0x8001 && tag != 0x8002 && binary.BigEndian.Uint32(hdr) == sendCommandHeader {
		dc.Framed, dc.Locality, size = true, hdr[4], binary.BigEndian.Uint32(hdr[5:])
		if _, err := r.Discard(framedHeaderSize); err != nil {
			return DataCommand{}, err
		}
	}
	switch {
	case size > vtpm.MaxBufferSize:
		drain(r, conn, int64(size))
		return dc, nil
	case !dc.Framed && size < tpmHeaderSize:
		// A size that cannot be right: the header is all there is.
		size = tpmHeaderSize
	}
	dc.Command = make([]byte, size)
	if _, err := io.ReadFull(r, dc.Command); err != nil {
		return DataCommand{}, err
	}
	return dc, nil
}

// ReadDeadliner is the part of a connection ReadDataCommand uses to bound
// the drain of an oversized command; net.Conn has it.
type ReadDeadliner interface {
	SetReadDeadline(t time.Time) error
}

// dataConn is a data connection: a net.Conn or the direct loop's.
type dataConn interface {
	io.ReadWriteCloser
	ReadDeadliner
}

// drain drops n bytes, or as many as keep arriving within drainTimeout.
func drain(r *bufio.Reader, conn ReadDeadliner, n int64) {
	for n > 0 {
		// Drop what is at hand; read more only under the deadline.
		step := int64(r.Buffered())
		if step == 0 {
			if conn == nil || conn.SetReadDeadline(time.Now().Add(drainTimeout)) != nil {
				return
			}
			step = int64(r.Size())
		}
		m, err := r.Discard(int(min(n, step)))
		n -= int64(m)
		if err != nil {
			break
		}
	}
	if conn != nil {
		_ = conn.SetReadDeadline(time.Time{})
	}
}

// Marshal encodes the response to dc: framed with its length and a zero
// trailer if the command was.
func (dc DataCommand) Marshal(resp []byte) []byte {
	if !dc.Framed {
		return resp
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, len(resp)+8), uint32(len(resp)))
	out = append(out, resp...)
	return binary.BigEndian.AppendUint32(out, 0)
}

func (s *Server) serveDataConn(ctx context.Context, c net.Conn) {
	var conn dataConn = c
	direct := s.newDirectConn(c)
	if direct != nil {
		conn = direct
		s.direct.Store(direct)
		defer func() {
			s.direct.CompareAndSwap(direct, nil)
			direct.free()
		}()
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReaderSize(conn, vtpm.MaxBufferSize+framedHeaderSize)
	for {
		dc, err := ReadDataCommand(r, conn)
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				s.Log.Warn("data connection closed", "err", err)
			}
			if s.Terminate {
				s.finish("data connection closed")
			}
			return
		}
		if dc.Framed {
			// The header's locality is taken as given, as swtpm does; the
			// engine runs every command at locality 0 anyway.
			_ = s.TPM.SetLocality(dc.Locality)
		}
		resp := vtpm.ErrorResponse(rcCommandSize)
		locked := s.lockStorage()
		switch {
		case locked != nil:
			// The state cannot be stored: no command may run.
			s.Log.Error("TPM command refused: no storage lock", "err", locked)
			resp = vtpm.ErrorResponse(rcFailure)
		case dc.Command != nil:
			resp = s.TPM.Execute(ctx, dc.Command)
		}
		if _, err := conn.Write(dc.Marshal(resp)); err != nil {
			s.Log.Warn("write TPM response", "err", err)
			return
		}
		if s.Disconnect {
			return
		}
		// With the storage lock held, the following commands can run in the
		// direct loop until it hands one back.
		if direct != nil && locked == nil && r.Buffered() == 0 && len(direct.left) == 0 {
			if err := s.serveDirect(ctx, direct); err != nil {
				s.Log.Warn("write TPM response", "err", err)
				return
			}
		}
	}
}
