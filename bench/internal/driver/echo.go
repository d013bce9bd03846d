package driver

/*
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

// echo_serve writes back every read on fd until the peer closes it: poll,
// read, write, the loop of swtpm's and vtpmd's own data channels with no
// command run in between.
static void echo_serve(int fd, char *buf, int size) {
	int flags = fcntl(fd, F_GETFL);
	if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, -1) < 0 && errno != EINTR) break;
		ssize_t n = read(fd, buf, size);
		if (n < 0 && errno == EINTR) continue;
		if (n <= 0) break;
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w < 0 && errno == EINTR) continue;
			if (w <= 0) return;
			off += w;
		}
	}
}
*/
import "C"

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/client"
	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
	"github.com/vtpmd/vtpmd/internal/unixsock"
)

// ServeEcho serves the echo floor on a unix socket at path: every read is
// written back as it came, by a loop in C of poll, read and write on the
// connection (no Go scheduler), the least a daemon can do per command over
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
		// Out of Go's netpoller, as vtpmd's direct loop takes its own
		// (os.File would register the duplicate there again).
		fd, err := unixsock.Dup(c)
		c.Close()
		if err != nil {
			return err
		}
		go func() {
			defer syscall.Close(fd)
			buf := C.malloc(C.size_t(client.MaxResponse))
			defer C.free(buf)
			C.echo_serve(C.int(fd), (*C.char)(buf), C.int(client.MaxResponse))
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
