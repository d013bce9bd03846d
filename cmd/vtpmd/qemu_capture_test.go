package main

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// QEMU traffic capture. QEMU hands the data channel to the daemon as a file
// descriptor (CMD_SET_DATAFD), which the byte proxy of capture_test.go cannot
// forward. fdProxy forwards the control connection with its SCM_RIGHTS
// messages: for a descriptor QEMU sends, it makes a socketpair, passes one end
// to the daemon and relays between the other end and QEMU's descriptor, so the
// data channel is recorded too. Regenerate the captures with
//
//	VTPMD_CAPTURE=1 VTPMD_TEST_PEER=swtpm go test -count=1 -run TestQEMUBoot ./cmd/vtpmd/
//
// which writes fuzz/testdata/capture/qemu-boot-<device>-<firmware>.txt in the
// format of capture_test.go ("ctrl>"/"data>" QEMU to daemon, "ctrl<"/"data<"
// daemon to QEMU, then the bytes of one read in hex).

// fdProxy listens on the path QEMU connects to and forwards to the daemon.
type fdProxy struct {
	ln    *net.UnixListener
	log   *trafficLog
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
	once  sync.Once
}

// startFDProxy listens on clientPath and forwards each connection to
// daemonPath, recording into log. Close it before listening on clientPath
// again; it is closed at the end of the test in any case.
func startFDProxy(t *testing.T, log *trafficLog, clientPath, daemonPath string) *fdProxy {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: clientPath, Net: "unix"})
	require.NoError(t, err)
	p := &fdProxy{ln: ln, log: log}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			client, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			server, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: daemonPath, Net: "unix"})
			if err != nil {
				client.Close()
				continue
			}
			p.track(client, server)
			p.wg.Add(2)
			go func() { defer p.wg.Done(); p.forwardCtrl(client, server) }()
			go func() { defer p.wg.Done(); pipeChunks(server, client, log, "ctrl", "<") }()
		}
	}()
	t.Cleanup(p.close)
	return p
}

func (p *fdProxy) track(conns ...net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, conns...)
	p.mu.Unlock()
}

// close stops listening, closes every relayed connection and waits for the
// relays to end.
func (p *fdProxy) close() {
	p.once.Do(func() {
		p.ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
}

// forwardCtrl relays QEMU's control messages to the daemon, replacing each
// passed descriptor by one end of a recorded relay.
func (p *fdProxy) forwardCtrl(client, server *net.UnixConn) {
	defer client.Close()
	defer server.Close()
	buf := make([]byte, 1<<20)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := client.ReadMsgUnix(buf, oob)
		if n > 0 || oobn > 0 {
			p.log.record("ctrl", ">", buf[:n])
			var rights []byte
			var daemonEnds []int
			for _, fd := range receivedFDs(oob[:oobn]) {
				if end, ok := p.relayData(fd); ok {
					daemonEnds = append(daemonEnds, end)
				}
			}
			if len(daemonEnds) > 0 {
				rights = syscall.UnixRights(daemonEnds...)
			}
			_, _, werr := server.WriteMsgUnix(buf[:n], rights, nil)
			// The daemon has its own copies of the passed ends now.
			for _, fd := range daemonEnds {
				syscall.Close(fd)
			}
			if werr != nil {
				return
			}
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			_ = server.CloseWrite()
			return
		}
	}
}

// receivedFDs returns the descriptors of SCM_RIGHTS messages in oob.
func receivedFDs(oob []byte) []int {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if got, err := syscall.ParseUnixRights(&m); err == nil {
			fds = append(fds, got...)
		}
	}
	return fds
}

// relayData takes ownership of qemuFD (QEMU's data channel end), makes a
// socketpair, relays between qemuFD and one end, and returns the other end
// for the daemon.
func (p *fdProxy) relayData(qemuFD int) (int, bool) {
	qemuFile := os.NewFile(uintptr(qemuFD), "qemu-data")
	defer qemuFile.Close()
	pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, false
	}
	ourFile := os.NewFile(uintptr(pair[0]), "proxy-data")
	defer ourFile.Close()
	qemuConn, err1 := net.FileConn(qemuFile) // duplicates the descriptor
	ourConn, err2 := net.FileConn(ourFile)
	if err1 != nil || err2 != nil {
		syscall.Close(pair[1])
		return -1, false
	}
	p.track(qemuConn, ourConn)
	p.wg.Add(2)
	go func() { defer p.wg.Done(); pipeChunks(qemuConn, ourConn, p.log, "data", ">") }()
	go func() { defer p.wg.Done(); pipeChunks(ourConn, qemuConn, p.log, "data", "<") }()
	return pair[1], true
}
