package driver

import (
	"errors"
	"net"
	"os"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/client"
	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
)

// ServeEcho serves the echo floor on a unix socket at path: every read is
// written back as it came. It is the least a daemon can do per command, over
// the same socket type, so its round trip is the transport's floor.
func ServeEcho(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer l.Close()
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			buf := make([]byte, client.MaxResponse)
			for {
				n, err := c.Read(buf)
				if err != nil {
					return
				}
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
		}()
	}
}

// echoKind runs argv (with the socket path appended) as the echo server.
func echoKind(argv []string) fleet.Kind {
	return fleet.Kind{
		Name: "echo",
		Argv: func(dir string) []string {
			return append(append([]string(nil), argv...), dir+"/data")
		},
		NoCtrl: true,
		Probe: func(d *client.Data) error {
			r, err := workload.EchoOp()
			if err != nil {
				return err
			}
			if err := d.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
				return err
			}
			return r.Run(d)
		},
	}
}
