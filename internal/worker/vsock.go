package worker

import (
	"errors"
	"log/slog"
	"net"
	"os"

	"github.com/mdlayher/vsock"
)

// vsockListener is the assigned listening vsock socket f, letting in only
// the VM's CID: any guest of the host may connect to a host port.
func vsockListener(f *os.File, cid uint32, log *slog.Logger) (net.Listener, error) {
	if cid == 0 {
		return nil, errors.New("a vsock socket without the VM's CID")
	}
	l, err := vsock.FileListener(f)
	if err != nil {
		return nil, err
	}
	return &cidListener{Listener: l, cid: cid, log: log}, nil
}

// cidListener accepts connections from one CID and closes the others.
type cidListener struct {
	net.Listener
	cid uint32
	log *slog.Logger
}

func (l *cidListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if a, ok := c.RemoteAddr().(*vsock.Addr); ok && a.ContextID == l.cid {
			return c, nil
		}
		l.log.Warn("vsock connection from another CID refused", "peer", c.RemoteAddr().String(), "want_cid", l.cid)
		c.Close()
	}
}
