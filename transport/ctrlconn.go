package transport

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// ctrlBufSize holds the largest fixed request with room to spare; longer
// bodies (hash data, state blobs) are streamed.
const ctrlBufSize = 4096 + 16

// ctrlReader reads control requests the way swtpm does: one read is one
// request, extended until the command's fixed part has arrived.
type ctrlReader struct {
	conn net.Conn
	buf  [ctrlBufSize]byte
	oob  [64]byte
}

// next reads one request and the descriptors that came with it.
func (r *ctrlReader) next() ([]byte, []int, error) {
	if err := r.conn.SetReadDeadline(time.Time{}); err != nil {
		return nil, nil, err
	}
	n, fds, err := r.read(r.buf[:])
	if err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(RequestTimeout)
	for n < 4 || n < MinRequestSize(Command(binary.BigEndian.Uint32(r.buf[:]))) {
		if err := r.conn.SetReadDeadline(deadline); err != nil {
			closeFDs(fds)
			return nil, nil, err
		}
		m, more, err := r.read(r.buf[n:])
		fds = append(fds, more...)
		n += m
		if err != nil {
			closeFDs(fds)
			return nil, nil, fmt.Errorf("%w: %d bytes arrived: %v", ErrShortRequest, n, err)
		}
	}
	return r.buf[:n], fds, nil
}

// read reads once, collecting descriptors passed on a unix socket.
func (r *ctrlReader) read(b []byte) (int, []int, error) {
	uc, ok := r.conn.(*net.UnixConn)
	if !ok {
		n, err := r.conn.Read(b)
		return n, nil, err
	}
	n, oobn, _, _, err := uc.ReadMsgUnix(b, r.oob[:])
	var fds []int
	if oobn > 0 {
		msgs, _ := syscall.ParseSocketControlMessage(r.oob[:oobn])
		for _, m := range msgs {
			if got, err := syscall.ParseUnixRights(&m); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	if n == 0 && err == nil {
		err = io.EOF
	}
	return n, fds, err
}

// readFull reads len(b) bytes, each read bounded by StreamTimeout.
func (r *ctrlReader) readFull(b []byte) error {
	for len(b) > 0 {
		if err := r.conn.SetReadDeadline(time.Now().Add(StreamTimeout)); err != nil {
			return err
		}
		n, err := r.conn.Read(b)
		b = b[n:]
		if err != nil && len(b) > 0 {
			return err
		}
	}
	return nil
}

// streamHashData feeds the request's data, and the rest of it that follows
// on the stream, to feed in chunks.
func (r *ctrlReader) streamHashData(req HashDataRequest, feed func([]byte) error) error {
	if err := feed(req.Data); err != nil {
		return err
	}
	chunk := make([]byte, 4096)
	for left := req.Length - uint32(len(req.Data)); left > 0; {
		part := chunk[:min(left, uint32(len(chunk)))]
		if err := r.readFull(part); err != nil {
			return fmt.Errorf("read hash data: %v: %w", err, ResultIOError)
		}
		if err := feed(part); err != nil {
			return err
		}
		left -= uint32(len(part))
	}
	return nil
}

// readBlob reads a SET_STATEBLOB's whole blob.
func (r *ctrlReader) readBlob(req SetStateBlobRequest) ([]byte, error) {
	blob := make([]byte, req.Length)
	n := copy(blob, req.Data)
	if err := r.readFull(blob[n:]); err != nil {
		return nil, fmt.Errorf("read state blob: %v: %w", err, ResultBadParameter)
	}
	return blob, nil
}

// discardBlob skips the data a rejected SET_STATEBLOB announced, for as
// long as it keeps arriving.
func (r *ctrlReader) discardBlob(msg []byte) {
	left := int64(binary.BigEndian.Uint32(msg[12:])) - int64(len(msg)-16)
	chunk := make([]byte, 4096)
	for left > 0 {
		if r.conn.SetReadDeadline(time.Now().Add(RequestTimeout)) != nil {
			return
		}
		n, err := r.conn.Read(chunk[:min(left, int64(len(chunk)))])
		left -= int64(n)
		if err != nil {
			return
		}
	}
}
