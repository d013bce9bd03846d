package main

import (
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/transport"
)

// ctrlRequest sends one control request on a new connection and returns
// the decoded reply, reading a state blob's whole data.
func ctrlRequest(t *testing.T, path string, req transport.Request) transport.Reply {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	_, err = c.Write(req.Marshal())
	require.NoError(t, err)
	if r, ok := req.(transport.SetStateBlobRequest); ok && len(r.Data) < int(r.Length) {
		t.Fatal("send the whole blob with the request")
	}
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	if req.Command() == transport.CmdGetStateBlob {
		head := make([]byte, 12)
		_, err = io.ReadFull(c, head)
		require.NoError(t, err)
		data := make([]byte, binary.BigEndian.Uint32(head[8:]))
		_, err = io.ReadFull(c, data)
		require.NoError(t, err)
		buf = append(append(buf, head...), data...)
	} else {
		// The rest of a fixed reply comes with the same write.
		rest := make([]byte, 64)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
		n, _ := c.Read(rest)
		buf = append(buf, rest[:n]...)
	}
	reply, err := transport.DecodeReply(req.Command(), buf)
	require.NoError(t, err)
	return reply
}

func resultOf(t *testing.T, path string, req transport.Request) transport.Result {
	t.Helper()
	r, ok := ctrlRequest(t, path, req).(transport.ResultReply)
	require.True(t, ok)
	return r.Result
}

// On shared storage, libvirt starts the destination with --migration
// incoming and the source with release-lock-outgoing: the state's lock
// passes from the source to the destination with the migration, and back
// with CMD_LOCK_STORAGE if the migration fails.
func TestStorageLockHandover(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm 0.7.1 has no --migration option")
	}
	forEachBackend(t, testStorageLockHandover)
}

func testStorageLockHandover(t *testing.T, b stateBackend) {
	dir := sockDir(t)
	run := sockDir(t)
	start := func(name, migration string) (ctrl, data string, d *daemon) {
		ctrl, data = filepath.Join(run, name+".ctrl"), filepath.Join(run, name+".data")
		d = startDaemon(t, []string{"socket", "--tpm2", "--tpmstate", b.tpmstate(dir),
			"--ctrl", "type=unixio,path=" + ctrl, "--server", "type=unixio,path=" + data,
			"--migration", migration}, ctrl, data)
		return ctrl, data, d
	}
	srcCtrl, srcData, _ := start("src", "release-lock-outgoing")
	require.Equal(t, transport.ResultSuccess, resultOf(t, srcCtrl, transport.InitRequest{}))
	caps := ctrlRequest(t, srcCtrl, transport.GetCapabilityRequest{}).(transport.GetCapabilityReply)
	assert.Equal(t, transport.Capabilities|transport.CapLockStorage, caps.Caps)
	tpmRoundTrip(t, srcData, unhex("80010000000c000001440000")) // Startup(CLEAR)
	before := requireGetRandom(t, srcData)

	dstCtrl, dstData, _ := start("dst", "incoming")
	assert.Equal(t, transport.ResultFail, resultOf(t, dstCtrl, transport.InitRequest{}), "the source holds the lock")

	var blobs [][]byte
	for _, typ := range []uint32{1, 2, 3} {
		r := ctrlRequest(t, srcCtrl, transport.GetStateBlobRequest{Flags: 1, Type: typ}).(transport.GetStateBlobReply)
		if typ == 3 {
			assert.Equal(t, transport.ResultRetry, r.Result)
			continue
		}
		require.Equal(t, transport.ResultSuccess, r.Result)
		blobs = append(blobs, r.Data)
	}

	require.Equal(t, transport.ResultSuccess, resultOf(t, dstCtrl, transport.StopRequest{}))
	for i, blob := range blobs {
		req := transport.SetStateBlobRequest{Type: uint32(i + 1), Length: uint32(len(blob)), Data: blob}
		require.Equal(t, transport.ResultSuccess, resultOf(t, dstCtrl, req), "SET_STATEBLOB %d", i+1)
	}
	require.Equal(t, transport.ResultSuccess, resultOf(t, dstCtrl, transport.InitRequest{Flags: transport.InitFlagDeleteVolatile}))
	after := requireGetRandom(t, dstData)
	assert.NotEqual(t, before, after)

	// The source cannot take the lock back while the destination holds it.
	assert.Equal(t, transport.ResultFail, resultOf(t, srcCtrl, transport.LockStorageRequest{Retries: 5}))
	require.Equal(t, transport.ResultSuccess, resultOf(t, dstCtrl, transport.ShutdownRequest{}))
	assert.Equal(t, transport.ResultSuccess, resultOf(t, srcCtrl, transport.LockStorageRequest{Retries: 300}), "after the destination ended")
	requireGetRandom(t, srcData)
}
