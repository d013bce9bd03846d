package workerproto

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/state"
)

// Messages are a few exemplars of every type, for tests here and seeds in
// fuzz/.
func Messages() []Message {
	rec := &state.Record{VMID: "0123", Generation: 7, Created: time.Unix(1700000000, 0).UTC(), Engine: "e", Sealed: []byte("sealed")}
	return []Message{
		Key{VMID: "0123", KeyID: "host:abcd", Secret: bytes.Repeat([]byte{7}, KeySize)},
		Ready{}, Get{VMID: "0123"}, Record{Record: rec}, NotFound{}, Put{Record: rec},
		Ack{Generation: 7}, Error{Message: "disk full"}, StatsRequest{},
		Stats{Commands: []CommandStats{{Code: 0x17b, Count: 3, Nanos: 90000, Buckets: []uint64{1, 2, 0}}, {Code: 0, Count: 1, Nanos: 5}}, Direct: 3},
		Stats{Guardian: []GuardianCalls{{Op: "release", Result: "ok", Count: 2}, {Op: "nonce", Result: "unreachable", Count: 1}}},
		Guardian{VMID: "0123", Config: []byte(`{"urls":["https://g1:8443"],"ca_file":"/etc/vtpmd/ca.pem"}`)},
		GetProtector{VMID: "0123"}, Protector{Data: []byte(`{"version":1}`)}, PutProtector{VMID: "0123", Data: []byte(`{"version":1}`)},
		KeyStatus{}, KeyStatus{Err: "guardian unreachable"},
		Assign{Name: "vm1", Sockets: []Socket{SocketCtrl}},
		Assign{Name: "web-01", Sockets: []Socket{SocketCtrl, SocketData, SocketVsockCtrl, SocketVsockData}, VsockCID: 42, StartupClear: true},
	}
}

func TestRoundTrip(t *testing.T) {
	var stream bytes.Buffer
	for _, m := range Messages() {
		b, err := Marshal(m)
		require.NoError(t, err)
		got, err := DecodeMessage(b[4:])
		require.NoError(t, err, "%T", m)
		assert.Equal(t, m, got)
		require.NoError(t, WriteMessage(&stream, m))
	}
	for _, m := range Messages() {
		got, err := ReadMessage(&stream)
		require.NoError(t, err)
		assert.Equal(t, m, got)
	}
	_, err := ReadMessage(&stream)
	assert.ErrorIs(t, err, io.EOF)
}

func TestMalformed(t *testing.T) {
	key, err := Marshal(Messages()[0])
	require.NoError(t, err)
	for _, b := range [][]byte{{}, {0}, {99}, key[4 : len(key)-1], append(append([]byte(nil), key[4:]...), 0), {byte(TypeAck), 1}, {byte(TypePut), 'V'}, {byte(TypeReady), 0},
		{byte(TypeStats), 0, 1, 0, 0, 1, 0x7b, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 65}, {byte(TypeStats), 0, 2}, {byte(TypeStats), 0, 0}, {byte(TypeStats), 0, 0, 0, 1, 0, 2, 'o', 'k'}, {byte(TypeGuardian), 0, 1, 'v'}, {byte(TypePutProtector), 0},
		{byte(TypeAssign), 0, 1, 'v', 0, 0, 0, 0, 0}, {byte(TypeAssign), 0, 1, 'v', 2, 0, 0, 0, 0, 0}, {byte(TypeAssign), 0, 1, 'v', 0, 0, 0, 0, 0, 1, 5},
		{byte(TypeAssign), 0, 1, 'v', 0, 0, 0, 0, 0, 2, 1, 1}, {byte(TypeAssign), 0, 1, 'v', 0, 0, 0, 0, 0, 2, 1}} {
		_, err := DecodeMessage(b)
		assert.ErrorIs(t, err, ErrMalformed, "%x", b)
	}
	_, err = ReadMessage(bytes.NewReader([]byte{0, 1, 0, 1}))
	assert.ErrorIs(t, err, ErrMalformed, "over the limit")
	_, err = ReadMessage(bytes.NewReader([]byte{0, 0, 0, 9, 2}))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, err = Marshal(Key{Secret: []byte("short")})
	assert.Error(t, err)
	_, err = Marshal(Assign{Sockets: []Socket{SocketCtrl, SocketCtrl}})
	assert.Error(t, err)
}

// unixPair is a connected pair of unix stream sockets.
func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	var conns [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		require.NoError(t, err)
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// inode identifies an open file.
func inode(t *testing.T, f *os.File) uint64 {
	var st syscall.Stat_t
	require.NoError(t, syscall.Fstat(int(f.Fd()), &st))
	return st.Ino
}

func TestAssignCarriesTheSockets(t *testing.T) {
	supervisor, worker := unixPair(t)
	dir := t.TempDir()
	var files []*os.File
	for _, name := range []string{"vm1.ctrl", "vm1.data"} {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, name), Net: "unix"})
		require.NoError(t, err)
		t.Cleanup(func() { l.Close() })
		f, err := l.File()
		require.NoError(t, err)
		files = append(files, f)
	}
	a := Assign{Name: "vm1", Sockets: []Socket{SocketCtrl, SocketData}, StartupClear: true}
	require.NoError(t, WriteAssign(supervisor, a, files))
	// What follows the frame is read as the next message, not with it.
	require.NoError(t, WriteMessage(supervisor, Messages()[0]))
	got, received, err := ReadAssign(worker)
	require.NoError(t, err)
	assert.Equal(t, a, got)
	require.Len(t, received, 2)
	for i := range files {
		assert.Equal(t, inode(t, files[i]), inode(t, received[i]), "socket %d", i)
		received[i].Close()
	}
	next, err := ReadMessage(worker)
	require.NoError(t, err)
	assert.Equal(t, Messages()[0], next)

	assert.Error(t, WriteAssign(supervisor, a, files[:1]), "fewer sockets than roles")
}

func TestReadAssignRefuses(t *testing.T) {
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	defer f.Close()
	for name, send := range map[string]func(*net.UnixConn) error{
		"another message first": func(c *net.UnixConn) error { return WriteMessage(c, Ready{}) },
		"no sockets": func(c *net.UnixConn) error {
			b, err := Marshal(Assign{Name: "vm1", Sockets: []Socket{SocketCtrl}})
			if err == nil {
				_, err = c.Write(b)
			}
			return err
		},
		"more sockets than roles": func(c *net.UnixConn) error {
			b, err := Marshal(Assign{Name: "vm1", Sockets: []Socket{SocketCtrl}})
			if err == nil {
				_, _, err = c.WriteMsgUnix(b, syscall.UnixRights(int(f.Fd()), int(f.Fd())), nil)
			}
			return err
		},
		"malformed": func(c *net.UnixConn) error {
			_, _, err := c.WriteMsgUnix([]byte{0, 0, 0, 2, byte(TypeAssign), 0}, syscall.UnixRights(int(f.Fd())), nil)
			return err
		},
	} {
		supervisor, worker := unixPair(t)
		require.NoError(t, send(supervisor), name)
		_, files, err := ReadAssign(worker)
		assert.Error(t, err, name)
		assert.Nil(t, files, name)
	}
	supervisor, worker := unixPair(t)
	supervisor.Close()
	_, _, err = ReadAssign(worker)
	assert.ErrorIs(t, err, io.EOF, "the supervisor gone before assigning")
}

func TestKeyNeverPrinted(t *testing.T) {
	k := Key{VMID: "vm", KeyID: "id", Secret: bytes.Repeat([]byte("S"), KeySize)}
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k)} {
		assert.NotContains(t, s, "SSSS")
	}
}
