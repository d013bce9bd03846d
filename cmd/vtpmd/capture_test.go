package main

import (
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// Traffic capture for the fuzz seed corpus.
//
// With VTPMD_CAPTURE=1 the tests that pass a capture name to captureSocket put
// a logging proxy between the clients (swtpm_ioctl, tcti-swtpm) and the
// daemon. Every chunk read from either side is recorded as one line
// "<channel>> <hex>" (client to daemon) or "<channel>< <hex>" (daemon to
// client) and the whole log is written to fuzz/testdata/capture/<name> when
// the test ends. Regenerate the corpus against the real swtpm with
//
//	VTPMD_CAPTURE=1 VTPMD_TEST_PEER=swtpm go test -count=1 -run 'TestIoctl|TestTPM2Tools' ./cmd/vtpmd/
//
// Without VTPMD_CAPTURE the clients talk to the daemon directly.

var captureLogs = struct {
	sync.Mutex
	byName map[string]*trafficLog
}{byName: map[string]*trafficLog{}}

// trafficLog is the ordered record of one capture file.
type trafficLog struct {
	mu    sync.Mutex
	name  string
	lines []string
}

func capturing() bool { return os.Getenv("VTPMD_CAPTURE") != "" }

// captureLog returns the log for the capture file name, or nil when not
// capturing. The file is rewritten with everything recorded so far in this
// test run whenever a test that used it ends.
func captureLog(t *testing.T, name string) *trafficLog {
	t.Helper()
	if !capturing() || name == "" {
		return nil
	}
	captureLogs.Lock()
	l := captureLogs.byName[name]
	if l == nil {
		l = &trafficLog{name: name}
		captureLogs.byName[name] = l
	}
	captureLogs.Unlock()
	t.Cleanup(func() { l.save(t) })
	return l
}

func (l *trafficLog) record(channel, dir string, b []byte) {
	if l == nil || len(b) == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, channel+dir+" "+hex.EncodeToString(b))
}

func (l *trafficLog) save(t *testing.T) {
	l.mu.Lock()
	text := strings.Join(l.lines, "\n") + "\n"
	l.mu.Unlock()
	dir := filepath.Join("..", "..", "fuzz", "testdata", "capture")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Errorf("capture: %v", err)
		return
	}
	if err := os.WriteFile(filepath.Join(dir, l.name), []byte(text), 0o644); err != nil {
		t.Errorf("capture: %v", err)
	}
}

// captureSocket returns the path the daemon must listen on so that clients
// can use clientPath. Without a log both are the same; with one, a proxy
// listening on clientPath forwards every connection to clientPath+".d" and
// records the traffic as channel ("ctrl" or "data").
func captureSocket(t *testing.T, log *trafficLog, clientPath, channel string) string {
	t.Helper()
	if log == nil {
		return clientPath
	}
	daemonPath := clientPath + ".d"
	ln, err := net.Listen("unix", clientPath)
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("unix", daemonPath)
			if err != nil {
				client.Close()
				continue
			}
			track(client)
			track(server)
			wg.Add(2)
			go func() { defer wg.Done(); pipeChunks(client, server, log, channel, ">") }()
			go func() { defer wg.Done(); pipeChunks(server, client, log, channel, "<") }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return daemonPath
}

// pipeChunks copies src to dst read by read, recording each read, and passes
// on a half close.
func pipeChunks(src, dst net.Conn, log *trafficLog, channel, dir string) {
	buf := make([]byte, 1<<20)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			log.record(channel, dir, buf[:n])
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if uc, ok := dst.(*net.UnixConn); ok {
					_ = uc.CloseWrite()
					return
				}
			}
			break
		}
	}
	dst.Close()
	src.Close()
}
