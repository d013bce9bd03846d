package transport

import (
	"bufio"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/vtpm"
)

// A command whose size field announces more than the engine takes, and
// more than ever comes, is dropped once the client pauses, also when part
// of it is already buffered with the header; the connection goes on.
// (Found by fuzz.FuzzServer: the buffered part made the drain read on
// without a deadline, and the client waited for its response forever.)
func TestOversizedCommandThatNeverCompletes(t *testing.T) {
	for _, tc := range []struct{ name, cmd string }{
		{"plain", "8001ffffffff0000017b0008"},
		{"framed", "0000000800ffffffff00000000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, serverEnd := socketPair(t)
			server, err := net.FileConn(serverEnd)
			require.NoError(t, err)
			serverEnd.Close()
			defer server.Close()
			r := bufio.NewReaderSize(server, vtpm.MaxBufferSize+framedHeaderSize)

			_, err = client.Write(unhex(t, tc.cmd))
			require.NoError(t, err)
			start := time.Now()
			// Without the fix the drain waits for the client: end it.
			watchdog := time.AfterFunc(30*drainTimeout, func() { _ = server.SetReadDeadline(time.Now()) })
			dc, err := ReadDataCommand(r, server)
			watchdog.Stop()
			require.NoError(t, err)
			assert.Nil(t, dc.Command, "dropped")
			// A bound well above drainTimeout, for loaded machines, and below
			// the watchdog that ends a drain waiting for the client.
			assert.Less(t, time.Since(start), 25*drainTimeout, "drained until the client paused")

			getRandom := unhex(t, "80010000000c0000017b0008")
			_, err = client.Write(getRandom)
			require.NoError(t, err)
			dc, err = ReadDataCommand(r, server)
			require.NoError(t, err)
			assert.Equal(t, getRandom, dc.Command, "the next command")
		})
	}
}
