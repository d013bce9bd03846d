package transport

import (
	"encoding/hex"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A running TPM refuses SET_STATEBLOB first, also when the client closes
// before the blob it announced is all there, as swtpm does (found by
// fuzz.FuzzServer: the cut-short read answered 0x03).
func TestSetStateBlobWhileRunningCutShort(t *testing.T) {
	_, ctrl := serveDevice(t)
	require.Equal(t, "00000000", exchange(t, ctrl, "0000000200000000"), "INIT")
	_, err := ctrl.Write(unhex(t, "0000000d"+"00000000"+"00000001"+"00003030"))
	require.NoError(t, err)
	require.NoError(t, ctrl.CloseWrite())
	require.NoError(t, ctrl.SetReadDeadline(time.Now().Add(5*time.Second)))
	buf := make([]byte, 16)
	n, err := ctrl.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "0000000a", hex.EncodeToString(buf[:n]))
}
