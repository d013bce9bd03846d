// Package client talks to a swtpm-compatible daemon the way a hypervisor
// does: one persistent data connection carrying raw TPM commands, and a
// control connection whose messages are encoded and decoded by
// github.com/vtpmd/vtpmd/transport.
package client

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vtpmd/vtpmd/transport"
)

// MaxResponse is the largest TPM response read (the engines' buffer size).
const MaxResponse = 4096

const headerSize = 10

// RC returns the response code of a TPM response, or an error code of its
// own (0xffffffff) when the response is shorter than its header.
func RC(resp []byte) uint32 {
	if len(resp) < headerSize {
		return 0xffffffff
	}
	return binary.BigEndian.Uint32(resp[6:10])
}

// Data is one data-channel connection. It is not safe for concurrent use.
type Data struct {
	conn net.Conn
	buf  [MaxResponse]byte
}

// DialData connects to a unix data socket.
func DialData(path string) (*Data, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return nil, err
	}
	return &Data{conn: c}, nil
}

// RoundTrip writes cmd and reads one response, framed by the size field of
// its header. The returned slice is valid until the next RoundTrip.
func (d *Data) RoundTrip(cmd []byte) ([]byte, error) {
	if _, err := d.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	n, want := 0, headerSize
	for n < want {
		m, err := d.conn.Read(d.buf[n:])
		n += m
		if err != nil {
			return nil, fmt.Errorf("read response (%d of %d bytes): %w", n, want, err)
		}
		if n >= headerSize && want == headerSize {
			want = int(binary.BigEndian.Uint32(d.buf[2:6]))
			if want < headerSize || want > MaxResponse {
				return nil, fmt.Errorf("response size field %d out of range", want)
			}
		}
	}
	return d.buf[:want], nil
}

// Send implements go-tpm's transport.TPM, for setup commands; the response is
// a copy.
func (d *Data) Send(cmd []byte) ([]byte, error) {
	resp, err := d.RoundTrip(cmd)
	if err != nil {
		return nil, err
	}
	return append([]byte(nil), resp...), nil
}

// SetDeadline bounds the following round trips; the zero time removes it.
func (d *Data) SetDeadline(t time.Time) error { return d.conn.SetDeadline(t) }

// Close closes the connection.
func (d *Data) Close() error { return d.conn.Close() }

// Ctrl is a control-channel connection.
type Ctrl struct {
	conn net.Conn
	buf  [4096]byte
}

// DialCtrl connects to a unix control socket.
func DialCtrl(path string) (*Ctrl, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return nil, err
	}
	return &Ctrl{conn: c}, nil
}

// ErrResult is returned for a reply whose result is not success.
var ErrResult = errors.New("control command failed")

// Do sends req in one write and decodes the reply, read as swtpm_ioctl does
// with one read, within timeout.
func (c *Ctrl) Do(req transport.Request, timeout time.Duration) (transport.Reply, error) {
	if err := c.conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(req.Marshal()); err != nil {
		return nil, fmt.Errorf("control command %#x: %w", uint32(req.Command()), err)
	}
	n, err := c.conn.Read(c.buf[:])
	if err != nil {
		return nil, fmt.Errorf("control command %#x: read reply: %w", uint32(req.Command()), err)
	}
	reply, err := transport.DecodeReply(req.Command(), c.buf[:n])
	if err != nil {
		return nil, err
	}
	if r, ok := reply.(transport.ResultReply); ok && r.Result != transport.ResultSuccess {
		return reply, fmt.Errorf("%w: command %#x: result %#x", ErrResult, uint32(req.Command()), uint32(r.Result))
	}
	return reply, nil
}

// Close closes the connection.
func (c *Ctrl) Close() error { return c.conn.Close() }
