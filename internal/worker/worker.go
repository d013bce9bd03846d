package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/metrics"
	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
	"github.com/vtpmd/vtpmd/state"
	"github.com/vtpmd/vtpmd/transport"
	"github.com/vtpmd/vtpmd/vtpm"
	"golang.org/x/sys/unix"
)

// Config is what a worker is started with: the two socketpairs to the
// supervisor. Its VM comes later, with workerproto.Assign.
type Config struct {
	// Channel is the socketpair on which the supervisor assigns the VM,
	// sends the key and asks for statistics, and the worker says it is
	// ready.
	Channel *os.File
	// Records is the socketpair on which the worker asks the supervisor
	// for its VM's record and key protector and sends new ones, one request
	// at a time. It must be a blocking descriptor: the TPM's thread waits
	// for the answer in poll(2) and read(2), off Go's netpoller (see
	// remote).
	Records *os.File
	// Log receives the worker's logs; Run adds the VM's name once it has
	// one.
	Log *slog.Logger
}

// assignment is the VM a worker serves: its listening sockets and how it
// starts.
type assignment struct {
	// ctrl is the VM's listening control socket; data, its data socket
	// or nil.
	ctrl, data *os.File
	// vsockCtrl and vsockData are the VM's listening vsock sockets of the
	// control and data channels, or nil; only vsockCID is let in on them.
	vsockCtrl, vsockData *os.File
	vsockCID             uint32
	// startupClear powers the TPM on and sends TPM2_Startup(CLEAR) before
	// serving.
	startupClear bool
	log          *slog.Logger
}

// newAssignment takes the sockets that came with a, in its order.
func newAssignment(a workerproto.Assign, files []*os.File, log *slog.Logger) *assignment {
	as := &assignment{vsockCID: a.VsockCID, startupClear: a.StartupClear, log: log}
	for i, role := range a.Sockets {
		switch role {
		case workerproto.SocketCtrl:
			as.ctrl = files[i]
		case workerproto.SocketData:
			as.data = files[i]
		case workerproto.SocketVsockCtrl:
			as.vsockCtrl = files[i]
		case workerproto.SocketVsockData:
			as.vsockData = files[i]
		}
	}
	return as
}

// ErrSupervisorGone means the socketpair to the supervisor closed.
var ErrSupervisorGone = errors.New("the supervisor is gone")

// Run waits for its VM, as a spare, then serves it until ctx ends,
// CMD_SHUTDOWN, or the supervisor goes. It logs its own failure, with the
// VM's name once it has one. A spare that the supervisor lets go (the
// channel closes before Assign) ends with no error.
func Run(ctx context.Context, c Config) error {
	log, err := run(ctx, c)
	if err != nil {
		log.Error("worker failed", "err", err)
	}
	return err
}

// run is Run; it returns the logger of the worker's lines, the VM's once
// it has one.
func run(ctx context.Context, c Config) (*slog.Logger, error) {
	defer c.Records.Close()
	conn, err := net.FileConn(c.Channel)
	c.Channel.Close()
	if err != nil {
		return c.Log, fmt.Errorf("the channel to the supervisor: %w", err)
	}
	defer conn.Close()
	ch, ok := conn.(*net.UnixConn)
	if !ok {
		return c.Log, fmt.Errorf("the channel to the supervisor is a %T, not a unix socket", conn)
	}
	// The engine's first start in a process costs milliseconds (OpenSSL's
	// configuration and algorithm tables); later ones, tens of
	// microseconds. A spare pays it before its VM comes.
	if _, err := vtpm.Describe(); err != nil {
		return c.Log, err
	}
	a, files, err := workerproto.ReadAssign(ch)
	switch {
	case errors.Is(err, io.EOF):
		return c.Log, nil
	case err != nil:
		return c.Log, err
	}
	log := c.Log.With("vm", a.Name)
	return log, newAssignment(a, files, log).serve(ctx, ch, c.Records)
}

// serve serves the assigned VM.
func (as *assignment) serve(ctx context.Context, ch *net.UnixConn, recordsFile *os.File) error {
	log := as.log
	listeners, err := as.listeners()
	if err != nil {
		return err
	}
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	msg, err := workerproto.ReadMessage(ch)
	if err != nil {
		return fmt.Errorf("read the VM's key: %w", err)
	}
	var cmds metrics.Commands
	var calls metrics.GuardianCalls
	direct, err := transport.NewDirectStats(metrics.Bounds)
	if err != nil {
		return err
	}
	records := newRemote(ch, recordsFile, &cmds, direct, &calls, exitSupervisorGone(log))
	sealed := &vmstate.Sealed{Store: records}
	switch m := msg.(type) {
	case workerproto.Key:
		sealed.VMID = m.VMID
		sealed.Key, err = sealing.NewKey(m.KeyID, m.Secret)
		clear(m.Secret)
	case workerproto.Guardian:
		sealed.VMID = m.VMID
		sealed.StartKey, err = guardianKey(ctx, m, records, &calls, log)
	default:
		err = fmt.Errorf("the supervisor sent a message of type %d before the key", msg.Type())
	}
	if err != nil {
		return err
	}
	go records.read()
	dev, err := vtpm.Open(vtpm.Config{Store: sealed, Logger: log})
	if err != nil {
		return err
	}
	if as.startupClear {
		err := dev.Init(false)
		if err == nil {
			err = dev.Startup(vtpm.StartupClear)
		}
		if err != nil {
			dev.Close()
			return fmt.Errorf("power on and start the TPM: %w", err)
		}
	}
	srv := &transport.Server{TPM: metered{Device: dev, cmds: &cmds}, DirectStats: direct, Log: log, DataChannel: as.data != nil || as.vsockData != nil}
	// Ready goes out before any client is served: afterwards only the
	// TPM's Store writes to the channel.
	if err := records.send(workerproto.Ready{}); err != nil {
		dev.Close()
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, len(listeners))
	var wg sync.WaitGroup
	addrs := []any{"engine", vtpm.EngineVersion}
	for _, l := range listeners {
		serve := srv.ServeControl
		if l.data {
			serve = srv.ServeData
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- serve(ctx, l)
		}()
		addrs = append(addrs, l.name, l.Addr().String())
	}
	log.Info("serving", addrs...)
	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping on signal")
	case <-srv.Done():
	case <-records.closed:
		// Nothing can be stored any more: end without touching the TPM.
		log.Error("the supervisor is gone; ending")
		return ErrSupervisorGone
	case runErr = <-errs:
		log.Error("serving failed", "err", runErr)
	}
	cancel()
	waited := make(chan struct{})
	go func() { wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		log.Warn("clients did not let go within 5 s")
	}
	if err := dev.Close(); err != nil {
		log.Error("TPM state not stored at exit", "err", err)
		return errors.Join(runErr, err)
	}
	return runErr
}

// listener is one of the VM's listening sockets.
type listener struct {
	net.Listener
	name string // ctrl, data, vsock_ctrl, vsock_data: its log attribute
	data bool   // serves the data channel
}

// listeners takes over the assigned listening sockets, closing the files.
func (as *assignment) listeners() ([]listener, error) {
	var out []listener
	fail := func(err error) ([]listener, error) {
		for _, l := range out {
			l.Close()
		}
		return nil, err
	}
	sockets := []struct {
		f    *os.File
		name string
		data bool
	}{{as.ctrl, "ctrl", false}, {as.data, "data", true}, {as.vsockCtrl, "vsock_ctrl", false}, {as.vsockData, "vsock_data", true}}
	for i, f := range sockets {
		if f.f == nil {
			continue
		}
		var l net.Listener
		var err error
		if f.name == "ctrl" || f.name == "data" {
			l, err = net.FileListener(f.f)
		} else {
			l, err = vsockListener(f.f, as.vsockCID, as.log.With("listener", f.name))
		}
		f.f.Close()
		if err != nil {
			for _, rest := range sockets[i+1:] {
				if rest.f != nil {
					rest.f.Close()
				}
			}
			return fail(fmt.Errorf("listen on the assigned %s socket: %w", f.name, err))
		}
		out = append(out, listener{Listener: l, name: f.name, data: f.data})
	}
	if len(out) == 0 || out[0].name != "ctrl" {
		return fail(errors.New("no control socket"))
	}
	return out, nil
}

// metered counts the TPM commands the device executes (no system call:
// the clock is read through the vDSO). The commands of the direct loop
// (the Device's RunDirect) do not come through Execute: the loop counts
// them in the Server's DirectStats.
type metered struct {
	*vtpm.Device
	cmds *metrics.Commands
}

func (m metered) Execute(ctx context.Context, cmd []byte) []byte {
	code := metrics.CommandCode(cmd)
	start := time.Now()
	resp := m.Device.Execute(ctx, cmd)
	m.cmds.Observe(code, time.Since(start))
	return resp
}

// guardianKey is the StartKey of a VM whose key the guardian releases: at
// each attempt the worker attests (with a transport key of its own) and
// asks for the key's release, and tells the supervisor how it went. The
// key protector is kept by the supervisor, in the state store.
func guardianKey(ctx context.Context, m workerproto.Guardian, records *remote, calls *metrics.GuardianCalls, log *slog.Logger) (func(stored bool) (*sealing.Key, error), error) {
	config, err := host.ParseConfig(m.Config, "/")
	if err != nil {
		return nil, err
	}
	keys, err := host.NewKeySource(config, "", nil, log)
	if err != nil {
		return nil, err
	}
	keys.Protectors = records
	keys.Observe = calls.Observe
	return func(stored bool) (*sealing.Key, error) {
		key, err := keys.StartKey(ctx, m.VMID, stored)
		status := workerproto.KeyStatus{}
		if err != nil { // the TPM's start fails, and says why in the log
			status.Err = err.Error()
		}
		if serr := records.send(status); serr != nil && err == nil {
			err = serr
		}
		return key, err
	}, nil
}

// remote is the record store of a worker: the supervisor, asked over the
// records socketpair. It implements vmstate.Records and host.Protectors.
//
// A request and its answer are a write, a poll and a read on the caller's
// own thread: a durable TPM command waits for the supervisor's fsync
// without parking its goroutine in Go's netpoller, which would idle the
// worker's P and cost a wake-up of sysmon and of another thread on every
// write (see pacer for the rest of that story). Messages the supervisor
// starts (statistics requests) come on the other socketpair, ch, read by
// read.
type remote struct {
	ch      net.Conn
	records *os.File
	replies *bufio.Reader // of records
	mu      sync.Mutex    // one request at a time
	wmu     sync.Mutex    // one frame at a time on ch
	closed  chan struct{}
	readErr error
	cmds    *metrics.Commands
	direct  *transport.DirectStats
	calls   *metrics.GuardianCalls
	pace    *pacer
	// gone is called when the records channel fails: the supervisor is
	// gone, and a request (a TPM command's state, perhaps) will never be
	// answered.
	gone func(error)
}

func newRemote(ch net.Conn, records *os.File, cmds *metrics.Commands, direct *transport.DirectStats, calls *metrics.GuardianCalls, gone func(error)) *remote {
	return &remote{ch: ch, records: records, replies: bufio.NewReaderSize(records, workerproto.MaxFrame+4), closed: make(chan struct{}),
		cmds: cmds, direct: direct, calls: calls, pace: newPacer(), gone: gone}
}

// exitSupervisorGone ends the worker at once when its supervisor is gone
// during a request. The supervisor's death kills the worker anyway
// (PR_SET_PDEATHSIG), but until then the TPM command whose state was in
// flight must get no answer: TPM_RC_FAILURE would tell the VM that the
// command failed, yet the supervisor may have stored its state before it
// died. A closed connection leaves it undecided, as a crash does.
func exitSupervisorGone(log *slog.Logger) func(error) {
	return func(err error) {
		log.Error("the supervisor is gone; ending without answering", "err", err)
		os.Exit(1)
	}
}

// stats are the worker's counts: Execute's and the direct loop's.
func (r *remote) stats() workerproto.Stats {
	var more []workerproto.CommandStats
	var direct uint64
	r.direct.Each(func(code uint32, count, nanos uint64, buckets []uint64) {
		more = append(more, workerproto.CommandStats{Code: code, Count: count, Nanos: nanos, Buckets: buckets})
		direct += count
	})
	st := r.cmds.Stats(more...)
	st.Direct = direct
	st.Guardian = r.calls.Stats()
	return st
}

// read answers the supervisor's statistics requests until the channel
// closes.
func (r *remote) read() {
	defer close(r.closed)
	for {
		m, err := workerproto.ReadMessage(r.ch)
		if err != nil {
			r.readErr = err
			return
		}
		if _, ok := m.(workerproto.StatsRequest); !ok {
			r.readErr = fmt.Errorf("the supervisor sent an unasked message of type %d", m.Type())
			return
		}
		if err := r.send(r.stats()); err != nil {
			r.readErr = err
			return
		}
	}
}

// send writes m on the channel.
func (r *remote) send(m workerproto.Message) error {
	r.wmu.Lock()
	err := workerproto.WriteMessage(r.ch, m)
	r.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSupervisorGone, err)
	}
	return nil
}

// call sends req on the records socketpair and reads the answer. If the
// channel fails, the supervisor is gone: call hands that to r.gone, which
// ends the worker.
func (r *remote) call(req workerproto.Message) (workerproto.Message, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := workerproto.WriteMessage(r.records, req); err != nil {
		return nil, r.lost(err)
	}
	if r.replies.Buffered() == 0 {
		if err := waitReadable(r.records); err != nil {
			return nil, r.lost(err)
		}
	}
	m, err := workerproto.ReadMessage(r.replies)
	switch {
	case errors.Is(err, io.EOF):
		return nil, r.lost(errors.New("the records channel closed"))
	case err != nil:
		return nil, r.lost(err)
	}
	if e, ok := m.(workerproto.Error); ok {
		return nil, fmt.Errorf("supervisor: %s", e.Message)
	}
	return m, nil
}

// lost reports the supervisor gone, with the records channel's error.
func (r *remote) lost(err error) error {
	err = fmt.Errorf("%w: %v", ErrSupervisorGone, err)
	r.gone(err)
	return err
}

// waitReadable waits in poll(2) until f has bytes to read (or its end).
// A read(2) that blocks on a unix socket is woken, for nothing, also when
// the peer consumes what this side sent (the supervisor reading the
// request): poll's wake-ups go by event.
func waitReadable(f *os.File) error {
	fds := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if err != unix.EINTR {
			return err
		}
	}
}

// Get asks the supervisor for the VM's record.
func (r *remote) Get(vmID string) (*state.Record, error) {
	m, err := r.call(workerproto.Get{VMID: vmID})
	if err != nil {
		return nil, err
	}
	switch m := m.(type) {
	case workerproto.Record:
		return m.Record, nil
	case workerproto.NotFound:
		return nil, fmt.Errorf("VM %q: %w", vmID, state.ErrNotFound)
	}
	return nil, fmt.Errorf("the supervisor answered Get with a message of type %d", m.Type())
}

// Put sends the sealed record to the supervisor and returns once it is
// durably stored.
func (r *remote) Put(rec *state.Record) error {
	r.pace.write(time.Now())
	m, err := r.call(workerproto.Put{Record: rec})
	if err != nil {
		return err
	}
	if ack, ok := m.(workerproto.Ack); !ok || ack.Generation != rec.Generation {
		return fmt.Errorf("the supervisor answered Put of generation %d with %#v", rec.Generation, m)
	}
	return nil
}

// KeepsDeltas says that Put takes deltas: the supervisor's store keeps them.
func (r *remote) KeepsDeltas() bool { return true }

// ReadProtector asks the supervisor for the VM's key protector.
func (r *remote) ReadProtector(vmID string) ([]byte, error) {
	m, err := r.call(workerproto.GetProtector{VMID: vmID})
	if err != nil {
		return nil, err
	}
	switch m := m.(type) {
	case workerproto.Protector:
		return m.Data, nil
	case workerproto.NotFound:
		return nil, fmt.Errorf("key protector of VM %q: %w", vmID, fs.ErrNotExist)
	}
	return nil, fmt.Errorf("the supervisor answered GetProtector with a message of type %d", m.Type())
}

// CreateProtector sends the VM's new key protector to the supervisor and
// returns once it is durably stored.
func (r *remote) CreateProtector(vmID string, p []byte) error {
	m, err := r.call(workerproto.PutProtector{VMID: vmID, Data: p})
	if err != nil {
		return err
	}
	switch m.(type) {
	case workerproto.Ack:
		return nil
	case workerproto.Protector:
		return fmt.Errorf("key protector of VM %q: %w", vmID, fs.ErrExist)
	}
	return fmt.Errorf("the supervisor answered PutProtector with a message of type %d", m.Type())
}

// Where names where the supervisor keeps the protector.
func (r *remote) Where(string) string { return "in the state store of vtpmd serve" }

// Harden makes the worker undumpable and without core dumps (it holds the
// VM's key), makes sure it dies with the supervisor, and checks that
// no_new_privs is in force and the supervisor, supervisorPID, is still its
// parent (it may have died before the death signal was armed).
func Harden(supervisorPID int) error {
	const (
		prSetPdeathsig  = 1
		prSetDumpable   = 4
		prSetNoNewPrivs = 38
		prGetNoNewPrivs = 39
	)
	prctl := func(op, arg uintptr) (uintptr, error) {
		r, _, errno := syscall.RawSyscall6(syscall.SYS_PRCTL, op, arg, 0, 0, 0, 0)
		if errno != 0 {
			return 0, errno
		}
		return r, nil
	}
	if _, err := prctl(prSetPdeathsig, uintptr(syscall.SIGKILL)); err != nil {
		return fmt.Errorf("PR_SET_PDEATHSIG: %w", err)
	}
	if os.Getppid() != supervisorPID {
		return ErrSupervisorGone
	}
	if _, err := prctl(prSetDumpable, 0); err != nil {
		return fmt.Errorf("PR_SET_DUMPABLE: %w", err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{}); err != nil {
		return fmt.Errorf("RLIMIT_CORE: %w", err)
	}
	if on, err := prctl(prGetNoNewPrivs, 0); err != nil || on != 1 {
		// Inherited from the supervisor's spawning thread; set it here
		// too (on this thread) if it was not.
		if _, err := prctl(prSetNoNewPrivs, 1); err != nil {
			return fmt.Errorf("PR_SET_NO_NEW_PRIVS: %w", err)
		}
	}
	return nil
}
