package transport

import (
	"context"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/vtpm"
)

const (
	startupClear = "80010000000c000001440000"
	getRandom8   = "80010000000c0000017b0008"
	shutdownSt   = "80010000000c000001450001"
)

// serveData serves a started TPM on a data socketpair and returns the
// client end; store, if set, keeps the state; configure, if given, sets
// the server up before it serves.
func serveData(t testing.TB, tpm func(*vtpm.Device) TPM, store vtpm.Store, configure ...func(*Server)) (*Server, *vtpm.Device, *net.UnixConn) {
	t.Helper()
	if store == nil {
		store = &vtpm.MemoryStore{}
	}
	dev, err := vtpm.Open(vtpm.Config{Store: store})
	require.NoError(t, err)
	require.NoError(t, dev.Init(false))
	srv := &Server{TPM: tpm(dev), DataChannel: true}
	for _, c := range configure {
		c(srv)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "data")
		conns[i], err = net.FileConn(f)
		require.NoError(t, err)
		f.Close()
	}
	client, serverConn := conns[0].(*net.UnixConn), conns[1]
	t.Cleanup(func() { client.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeDataConn(ctx, serverConn); close(done) }()
	t.Cleanup(func() { cancel(); <-done; _ = dev.Close() })
	return srv, dev, client
}

func asDevice(d *vtpm.Device) TPM { return d }

// goPath hides the device's direct loop, so that every command goes
// through Go's path.
type goPath struct{ TPM }

func asGoPath(d *vtpm.Device) TPM { return goPath{d} }

// readN reads exactly n bytes and returns their hex.
func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	buf := make([]byte, n)
	_, err := io.ReadFull(c, buf)
	require.NoError(t, err)
	return hex.EncodeToString(buf)
}

// Commands after the first run in the direct loop: whole, split across
// writes, several in one write, framed and plain mixed, and the odd ones
// that Go's path answers.
func TestDirectLoopFraming(t *testing.T) {
	_, _, data := serveData(t, asDevice, nil)
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))

	cmd := unhex(t, getRandom8)
	_, err := data.Write(cmd[:3])
	require.NoError(t, err)
	_, err = data.Write(cmd[3:])
	require.NoError(t, err)
	assert.Equal(t, "800100000014000000000008", readN(t, data, 20)[:24], "GetRandom in two writes")

	framed := "00000008" + "03" + "0000000c" + getRandom8
	_, err = data.Write(unhex(t, getRandom8+framed+getRandom8))
	require.NoError(t, err)
	assert.Equal(t, "800100000014000000000008", readN(t, data, 20)[:24], "plain, first of three")
	resp := readN(t, data, 4+20+4)
	assert.Equal(t, "00000014"+"800100000014000000000008", resp[:32], "framed, second of three")
	assert.Equal(t, "00000000", resp[len(resp)-8:])
	assert.Equal(t, "800100000014000000000008", readN(t, data, 20)[:24], "plain, third of three")

	assert.Equal(t, "80010000000a00000142", exchange(t, data, "80010000100100000181"+hex.EncodeToString(make([]byte, 4097-10))),
		"a command over 4096 bytes")
	assert.Equal(t, "80010000000a00000142", exchange(t, data, "8001000000040000017b"), "a size below the header's")
	assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24], "then commands run again")
}

// peekStore checks, when a state is saved, that the client has not got
// the response yet: the response goes only once the state is stored.
type peekStore struct {
	vtpm.MemoryStore
	t      *testing.T
	mu     sync.Mutex
	client int // the client's descriptor once armed, else -1
	saves  int
}

func (s *peekStore) arm(fd int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.client = fd
}

func (s *peekStore) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.saves
}

func (s *peekStore) Save(image []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client >= 0 {
		_, _, err := syscall.Recvfrom(s.client, make([]byte, 1), syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		assert.True(s.t, errors.Is(err, syscall.EAGAIN), "a response was sent before the state was stored (err %v)", err)
		s.saves++
	}
	return s.MemoryStore.Save(image)
}

func TestDirectLoopStoresBeforeAnswering(t *testing.T) {
	store := &peekStore{t: t, client: -1}
	_, _, data := serveData(t, asDevice, store)
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))
	f, err := data.File()
	require.NoError(t, err)
	defer f.Close()
	store.arm(int(f.Fd()))
	assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
	assert.Equal(t, "80010000000a00000000", exchange(t, data, shutdownSt), "Shutdown(STATE) changes NV")
	assert.Equal(t, 1, store.count(), "the shutdown's state stored once")
}

// A control command needs the TPM that the direct loop holds while the data
// connection is idle: the loop lets go, and commands run in it again after.
func TestDirectLoopYieldsToControl(t *testing.T) {
	_, dev, data := serveData(t, asDevice, nil)
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))
	assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
	for range 3 {
		established, err := dev.Established()
		require.NoError(t, err)
		assert.False(t, established)
		require.NoError(t, dev.SetLocality(3))
		assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
	}
	require.NoError(t, dev.Stop())
	assert.Equal(t, "80010000000a00000101", exchange(t, data, getRandom8), "stopped")
	require.NoError(t, dev.Init(false))
	assert.Equal(t, "80010000000a00000000", exchange(t, data, startupClear))
	assert.Equal(t, "800100000014000000000008", exchange(t, data, getRandom8)[:24])
}

// BenchmarkDataRoundTrip: a GetRandom(32) answered over a unix socketpair,
// in the direct loop and in Go's path. The client uses blocking system
// calls, as a VM's does from its own process, so that Go's scheduler
// serves only the server. direct-counted counts the commands in
// DirectStats, as vtpmd serve's workers do.
func BenchmarkDataRoundTrip(b *testing.B) {
	counted := func(s *Server) {
		stats, err := NewDirectStats([]time.Duration{25 * time.Microsecond, time.Millisecond})
		require.NoError(b, err)
		s.DirectStats = stats
	}
	for _, bc := range []struct {
		name      string
		tpm       func(*vtpm.Device) TPM
		configure []func(*Server)
	}{{"direct", asDevice, nil}, {"direct-counted", asDevice, []func(*Server){counted}}, {"go", asGoPath, nil}} {
		b.Run(bc.name, func(b *testing.B) {
			_, _, data := serveData(b, bc.tpm, nil, bc.configure...)
			f, err := data.File()
			require.NoError(b, err)
			defer f.Close()
			fd := int(f.Fd())
			require.NoError(b, syscall.SetNonblock(fd, false))
			buf := make([]byte, 64)
			roundTrip := func(c []byte) {
				if _, err := syscall.Write(fd, c); err != nil {
					b.Fatal(err)
				}
				for n := 0; n < 10 || n < int(buf[5]); {
					m, err := syscall.Read(fd, buf[n:])
					if err != nil || m == 0 {
						b.Fatal("read response:", err)
					}
					n += m
				}
			}
			startup, _ := hex.DecodeString(startupClear)
			cmd, _ := hex.DecodeString("80010000000c0000017b0020")
			roundTrip(startup)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			for b.Loop() {
				roundTrip(cmd)
			}
		})
	}
}
