package serve

import (
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A taken spare is replaced once its VM's start is done (fill), not while
// the start runs, whose CPU the replacement's start would share.
func TestSparePoolReplacesOnlyWhenFilled(t *testing.T) {
	var starts atomic.Int32
	p := &sparePool{want: 1, log: slog.New(slog.NewTextHandler(io.Discard, nil)), start: func() (*startedWorker, error) {
		starts.Add(1)
		conn, theirs, err := socketpair("spare channel")
		if err != nil {
			return nil, err
		}
		defer theirs.Close()
		records, theirRecords, err := socketpair("spare records")
		if err != nil {
			conn.Close()
			return nil, err
		}
		defer theirRecords.Close()
		// Like a spare, it ends when its channel closes.
		cmd := exec.Command("sh", "-c", "exec cat <&3 >/dev/null")
		cmd.ExtraFiles = []*os.File{theirs, theirRecords}
		if err := cmd.Start(); err != nil {
			conn.Close()
			records.Close()
			return nil, err
		}
		return &startedWorker{cmd: cmd, conn: conn.(*net.UnixConn), records: records}, nil
	}}
	t.Cleanup(p.close)
	p.fill()
	require.Eventually(t, func() bool { return p.ready() == 1 }, 5*time.Second, time.Millisecond)

	w := p.take()
	require.NotNil(t, w)
	t.Cleanup(w.discard)
	assert.Zero(t, p.ready())
	assert.Never(t, func() bool { return starts.Load() > 1 }, 100*time.Millisecond, 5*time.Millisecond,
		"no replacement while the start that took the spare runs")
	assert.Nil(t, p.take(), "none idle: the next start starts its own worker")

	p.fill()
	require.Eventually(t, func() bool { return p.ready() == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, int32(2), starts.Load())
	p.fill()
	assert.Equal(t, int32(2), starts.Load(), "a full pool starts none")
}
