// Package unixsock creates the unix sockets vtpmd listens on, private from
// the moment they exist, and takes a connection's descriptor for a loop
// that polls it itself.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
)

// Listen listens on path, replacing a stale socket file, with the given
// mode and owner (uid and gid -1 leave them). The listener removes the file
// when closed.
func Listen(path string, mode os.FileMode, uid, gid int) (*net.UnixListener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove old socket %s: %w", path, err)
	}
	// The umask keeps the socket private until its mode is set.
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	err = os.Chmod(path, mode)
	if err == nil && (uid >= 0 || gid >= 0) {
		err = os.Lchown(path, uid, gid)
	}
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("set mode and owner of %s: %w", path, err)
	}
	return l, nil
}

// Dup returns a close-on-exec duplicate of c's descriptor. Once c is
// closed, the duplicate is out of Go's netpoller, for a loop that polls it
// itself: while registered there, every request would wake the
// netpoller's thread.
func Dup(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("duplicate the descriptor of a %T: it has none", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("duplicate a connection's descriptor: %w", err)
	}
	fd := -1
	if cerr := raw.Control(func(orig uintptr) { fd, err = syscall.Dup(int(orig)) }); cerr != nil {
		err = cerr
	}
	if err != nil {
		return -1, fmt.Errorf("duplicate a connection's descriptor: %w", err)
	}
	syscall.CloseOnExec(fd)
	return fd, nil
}
