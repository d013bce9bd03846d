package serve

import (
	"log/slog"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

// fakeWorker is the worker's ends of the two socketpairs of a conversation
// with the supervisor, and the conversation's result.
type fakeWorker struct {
	ch, records net.Conn
	done        chan error
}

func converseWith(t *testing.T, r *vmRun) *fakeWorker {
	t.Helper()
	conn, theirs, err := socketpair("worker channel")
	require.NoError(t, err)
	records, theirRecords, err := socketpair("worker records")
	require.NoError(t, err)
	w := &fakeWorker{done: make(chan error, 1)}
	w.ch, err = net.FileConn(theirs)
	require.NoError(t, err)
	theirs.Close()
	w.records, err = net.FileConn(theirRecords)
	require.NoError(t, err)
	theirRecords.Close()
	t.Cleanup(func() { w.ch.Close(); w.records.Close() })
	go func() {
		err := r.converse(conn, records, 1)
		conn.Close()
		records.Close()
		w.done <- err
	}()
	m, err := workerproto.ReadMessage(w.ch)
	require.NoError(t, err)
	require.IsType(t, workerproto.Key{}, m, "the key comes first, on the channel")
	return w
}

func (w *fakeWorker) ask(t *testing.T, m workerproto.Message) workerproto.Message {
	t.Helper()
	require.NoError(t, workerproto.WriteMessage(w.records, m))
	reply, err := workerproto.ReadMessage(w.records)
	require.NoError(t, err)
	return reply
}

func testRun(t *testing.T) *vmRun {
	t.Helper()
	key, err := sealing.NewKey("host:x", make([]byte, 32))
	require.NoError(t, err)
	return &vmRun{s: testSupervisor(t), vm: state.VM{Name: "vm1", ID: "id1"}, key: key, log: slog.New(slog.DiscardHandler),
		ready: make(chan struct{}), statsCh: make(chan workerproto.Stats, 1)}
}

// On the records channel the supervisor stores the worker's own VM's newer
// records only, each acknowledged once stored; Ready and statistics come
// on the channel.
func TestWorkerConversation(t *testing.T) {
	r := testRun(t)
	w := converseWith(t, r)

	assert.Equal(t, workerproto.NotFound{}, w.ask(t, workerproto.Get{VMID: "id1"}))
	assert.Equal(t, workerproto.Ack{Generation: 1},
		w.ask(t, workerproto.Put{Record: &state.Record{VMID: "id1", Generation: 1, Engine: "e", Sealed: []byte("whole")}}))
	assert.Equal(t, workerproto.Ack{Generation: 2},
		w.ask(t, workerproto.Put{Record: &state.Record{VMID: "id1", Generation: 2, Engine: "e", Sealed: []byte("change"), Delta: true}}))
	for name, bad := range map[string]*state.Record{
		"another VM's":            {VMID: "id2", Generation: 3, Engine: "e", Sealed: []byte("x")},
		"not newer":               {VMID: "id1", Generation: 2, Engine: "e", Sealed: []byte("x")},
		"a change after a gap":    {VMID: "id1", Generation: 4, Engine: "e", Sealed: []byte("x"), Delta: true},
		"another VM's, as change": {VMID: "id2", Generation: 3, Engine: "e", Sealed: []byte("x"), Delta: true},
	} {
		assert.IsType(t, workerproto.Error{}, w.ask(t, workerproto.Put{Record: bad}), name)
	}
	assert.IsType(t, workerproto.Error{}, w.ask(t, workerproto.Get{VMID: "id2"}), "another VM's record")
	rec, err := r.s.store.Get("id1")
	require.NoError(t, err)
	assert.Equal(t, uint64(2), rec.Newest(), "nothing refused was stored")

	require.NoError(t, workerproto.WriteMessage(w.ch, workerproto.Ready{}))
	<-r.ready
	require.NoError(t, workerproto.WriteMessage(w.ch, workerproto.Stats{Direct: 7}))
	assert.Equal(t, uint64(7), (<-r.statsCh).Direct)

	w.records.Close()
	w.ch.Close()
	assert.NoError(t, <-w.done, "a worker that goes is no violation")
}

// A message on the wrong channel, or one the supervisor never takes, is a
// protocol violation: the conversation ends with an error (and the
// supervisor kills the worker), whichever channel it came on.
func TestWorkerProtocolViolations(t *testing.T) {
	for name, send := range map[string]func(w *fakeWorker) error{
		"a request on the channel": func(w *fakeWorker) error {
			return workerproto.WriteMessage(w.ch, workerproto.Get{VMID: "id1"})
		},
		"Ready on the records channel": func(w *fakeWorker) error {
			return workerproto.WriteMessage(w.records, workerproto.Ready{})
		},
		"the supervisor's own message": func(w *fakeWorker) error {
			return workerproto.WriteMessage(w.records, workerproto.Ack{Generation: 1})
		},
		"a malformed frame": func(w *fakeWorker) error {
			_, err := w.records.Write([]byte{0, 0, 0, 1, 0xff})
			return err
		},
	} {
		t.Run(name, func(t *testing.T) {
			w := converseWith(t, testRun(t))
			require.NoError(t, send(w))
			assert.Error(t, <-w.done)
		})
	}
}
