package transport

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/vtpm"
)

// socketPair returns both ends of a unix stream socketpair as connections.
func socketPair(t *testing.T) (*net.UnixConn, *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	f := os.NewFile(uintptr(fds[0]), "a")
	c, err := net.FileConn(f)
	require.NoError(t, err)
	f.Close()
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "b")
}

// serveDevice starts a Server for a new Device on a control socketpair and
// returns the client end.
func serveDevice(t *testing.T, configure ...func(*Server)) (*Server, *net.UnixConn) {
	t.Helper()
	dev, err := vtpm.Open(vtpm.Config{Store: &vtpm.MemoryStore{}})
	require.NoError(t, err)
	srv := &Server{TPM: dev}
	for _, c := range configure {
		c(srv)
	}
	client, serverEnd := socketPair(t)
	serverConn, err := net.FileConn(serverEnd)
	require.NoError(t, err)
	serverEnd.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeControlConn(ctx, serverConn); close(done) }()
	t.Cleanup(func() { cancel(); <-done; _ = dev.Close() })
	return srv, client
}

// exchange sends hex in one write and returns the hex of one read.
func exchange(t *testing.T, c net.Conn, msg string) string {
	t.Helper()
	_, err := c.Write(unhex(t, msg))
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
	buf := make([]byte, 8192)
	n, err := c.Read(buf)
	require.NoError(t, err, "reply to %s", msg)
	return hex.EncodeToString(buf[:n])
}

// QEMU's start, reset and guest traffic (spec §2.3 and Appendix A.1), with
// the bytes swtpm 0.7.1 answered, where vtpmd's engine does not differ.
func TestQEMUSequence(t *testing.T) {
	srv, ctrl := serveDevice(t)
	dataClient, dataServerEnd := socketPair(t)
	_, _, err := ctrl.WriteMsgUnix(unhex(t, "00000010"), syscall.UnixRights(int(dataServerEnd.Fd())), nil)
	require.NoError(t, err)
	dataServerEnd.Close()
	buf := make([]byte, 16)
	n, err := ctrl.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "00000000", hex.EncodeToString(buf[:n]), "SET_DATAFD")

	readClock := "80010000000a00000181"
	assert.Equal(t, "80010000000a00000101", exchange(t, dataClient, readClock), "TPM2_ReadClock probe before INIT")
	assert.Equal(t, "000000000000ffff", exchange(t, ctrl, "00000001"), "GET_CAPABILITY")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000e"), "STOP")
	assert.Equal(t, "00000000"+"00001000"+"000005e2"+"00001000", exchange(t, ctrl, "0000001100000000"), "SET_BUFFERSIZE query")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000e"), "STOP")
	assert.Equal(t, "00000000"+"00000f80"+"000005e2"+"00001000", exchange(t, ctrl, "0000001100000f80"), "SET_BUFFERSIZE 3968 (CRB)")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000200000000"), "INIT")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000500000000"), "SET_LOCALITY 0, QEMU's 4-byte body")
	assert.Equal(t, "80010000000a00000000", exchange(t, dataClient, "80010000000c000001440000"), "TPM2_Startup(CLEAR)")
	assert.Equal(t, "0000000000000000", exchange(t, ctrl, "00000004"), "GET_TPMESTABLISHED")
	assert.Equal(t, "0000003d", exchange(t, ctrl, "0000000b00000000"), "RESET_TPMESTABLISHED from locality 0")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000b03a5a5a5"), "RESET_TPMESTABLISHED from locality 3, junk after it")
	assert.Equal(t, "0000000000000000", exchange(t, ctrl, "0000000f"), "GET_CONFIG")
	assert.Equal(t, "00000000", exchange(t, ctrl, "00000009"), "CANCEL_TPM_CMD")
	assert.Equal(t, "00000800000000000000000000000000", exchange(t, ctrl, "0000000c000000010000000300000000"), "GET_STATEBLOB savestate")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000e"), "STOP")
	assert.Equal(t, "80010000000a00000101", exchange(t, dataClient, "80010000000c0000017b0008"), "GetRandom while stopped")
	assert.Equal(t, "0000000a", exchange(t, ctrl, "00000004"), "GET_TPMESTABLISHED while stopped")
	assert.Equal(t, "0000000a", exchange(t, ctrl, "0000000a"), "STORE_VOLATILE while stopped")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000200000001"), "INIT, delete volatile")
	assert.Equal(t, "80010000000a00000100", exchange(t, dataClient, "80010000000c0000017b0008"), "GetRandom before Startup")

	// The send-command header frames the command and its response.
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000200000000"), "INIT")
	resp := exchange(t, dataClient, "00000008"+"00"+"0000000c"+"80010000000c000001440000")
	assert.Equal(t, "0000000a"+"80010000000a00000000"+"00000000", resp, "framed Startup")
	resp = exchange(t, dataClient, "0000000803"+"0000000c"+"80010000000c0000017b0008")
	require.Len(t, resp, 2*(4+20+4))
	assert.Equal(t, "00000014"+"800100000014000000000008", resp[:32], "framed GetRandom(8)")
	assert.Equal(t, "00000000", resp[len(resp)-8:])

	assert.Equal(t, "00000000", exchange(t, ctrl, "00000003"), "SHUTDOWN")
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("SHUTDOWN did not end the server")
	}
}

func TestControlErrors(t *testing.T) {
	_, ctrl := serveDevice(t)
	assert.Equal(t, "0000000a", exchange(t, ctrl, "00000099"), "unknown command")
	assert.Equal(t, "0000003d", exchange(t, ctrl, "0000000505"), "SET_LOCALITY 5")
	assert.Equal(t, "00000003", exchange(t, ctrl, "000000020000000000"), "INIT with a 5-byte body")
	assert.Equal(t, "0000000a", exchange(t, ctrl, "0000000c000000010000000100000000"), "GET_STATEBLOB while stopped")
	assert.Equal(t, "00000009", exchange(t, ctrl, "0000000d000000000000000100080001"), "SET_STATEBLOB over 512 KiB")

	info := `{"TPMSpecification":{"family":"2.0","level":0,"revision":154}}` + "\x00"
	want := "00000000" + "0000003f" + "0000003f" + hex.EncodeToString([]byte(info))
	assert.Equal(t, want, exchange(t, ctrl, "00000012"+"0000000000000001"+"00000000"+"00000000"), "GET_INFO spec")
	want = "00000000" + "0000003f" + "00000035" + hex.EncodeToString([]byte(info[10:]))
	assert.Equal(t, want, exchange(t, ctrl, "00000012"+"0000000000000001"+"0000000a"+"00000000"), "GET_INFO from offset 10")
	assert.Equal(t, "00000000"+"00000003"+"00000003"+"7b7d00", exchange(t, ctrl, "00000012"+"0000000000000000"+"00000000"+"00000000"), "GET_INFO nothing")
	assert.Equal(t, "00000003", exchange(t, ctrl, "00000012"+"0000000000000000"+"00000002"+"00000000"), "GET_INFO offset past the end")

	// A request shorter than its fixed part: no reply, the connection closes.
	start := time.Now()
	_, err := ctrl.Write(unhex(t, "00000002"))
	require.NoError(t, err)
	require.NoError(t, ctrl.SetReadDeadline(time.Now().Add(5*time.Second)))
	_, err = ctrl.Read(make([]byte, 16))
	assert.ErrorIs(t, err, io.EOF, "INIT without body")
	assert.GreaterOrEqual(t, time.Since(start), RequestTimeout)
}

// State blobs round-trip through GET_STATEBLOB and SET_STATEBLOB, and a bad
// blob leaves the TPM as it was.
func TestStateBlobs(t *testing.T) {
	_, ctrl := serveDevice(t)
	require.Equal(t, "00000000", exchange(t, ctrl, "0000000200000000"))
	reply := readReply(t, ctrl, GetStateBlobRequest{Flags: 1, Type: 1})
	blob := reply.(GetStateBlobReply)
	require.Equal(t, ResultSuccess, blob.Result)
	require.Equal(t, int(blob.Total), len(blob.Data))
	image, err := UnwrapStateBlob(blob.Data, BlobKeys{}, false)
	require.NoError(t, err)
	_, err = vtpm.ParseImage(image)
	require.NoError(t, err)

	assert.Equal(t, "0000000a", exchangeBlob(t, ctrl, blob.Data), "SET_STATEBLOB while running")
	// A running TPM is refused whatever the blob, as swtpm does (found by
	// fuzz.FuzzServer: a bad blob gave its blob error instead).
	assert.Equal(t, "0000000a", exchangeBlob(t, ctrl, blob.Data[:len(blob.Data)-1]), "truncated blob while running")
	assert.Equal(t, "0000000a", exchangeBlob(t, ctrl, blob.Data[:1]), "header-less blob while running")
	assert.Equal(t, "0000000a", exchange(t, ctrl, "0000000d000000000000000100080001"), "SET_STATEBLOB over 512 KiB while running")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000e"))
	assert.Equal(t, "0000002b", exchangeBlob(t, ctrl, blob.Data[:len(blob.Data)-1]), "truncated blob")
	garbage := append([]byte(nil), blob.Data...)
	garbage[len(garbage)-1] ^= 0xff
	garbage[40] ^= 0xff
	assert.Equal(t, "0000002e", exchangeBlob(t, ctrl, garbage), "blob with a foreign image")
	assert.Equal(t, "00000000", exchangeBlob(t, ctrl, blob.Data), "good blob")
	assert.Equal(t, "00000000", exchange(t, ctrl, "0000000200000001"), "INIT applies it")
}

func exchangeBlob(t *testing.T, c net.Conn, data []byte) string {
	t.Helper()
	req := SetStateBlobRequest{Type: 1, Length: uint32(len(data))}
	_, err := c.Write(req.Marshal())
	require.NoError(t, err)
	_, err = c.Write(data)
	require.NoError(t, err)
	buf := make([]byte, 16)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
	n, err := c.Read(buf)
	require.NoError(t, err)
	return hex.EncodeToString(buf[:n])
}

func readReply(t *testing.T, c net.Conn, req Request) Reply {
	t.Helper()
	_, err := c.Write(req.Marshal())
	require.NoError(t, err)
	buf := make([]byte, 64*1024)
	n, err := c.Read(buf)
	require.NoError(t, err)
	// The reply may span reads; the header says how long it is.
	if req.Command() == CmdGetStateBlob && n >= 16 {
		want := 16 + int(binary.BigEndian.Uint32(buf[12:]))
		for n < want {
			m, err := c.Read(buf[n:])
			require.NoError(t, err)
			n += m
		}
	}
	reply, err := DecodeReply(req.Command(), buf[:n])
	require.NoError(t, err)
	return reply
}

// With a data channel served (--server), CMD_SET_DATAFD is refused at once,
// whether or not that channel's client has connected yet.
func TestSetDataFDWithDataChannel(t *testing.T) {
	_, ctrl := serveDevice(t, func(s *Server) { s.DataChannel = true })
	_, extra := socketPair(t)
	defer extra.Close()
	_, _, err := ctrl.WriteMsgUnix(unhex(t, "00000010"), syscall.UnixRights(int(extra.Fd())), nil)
	require.NoError(t, err)
	buf := make([]byte, 16)
	n, err := ctrl.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "0000001f", hex.EncodeToString(buf[:n]))
}
