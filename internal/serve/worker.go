package serve

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/state"
)

// Restart delays after a worker died: doubling from minBackoff up to
// maxBackoff while it keeps dying soon after its start, back to minBackoff
// once one ran for stableRun. A worker that ended after CMD_SHUTDOWN is
// replaced at once.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 10 * time.Second
	stableRun  = 30 * time.Second
	// stopTimeout bounds a worker's orderly stop before SIGKILL.
	stopTimeout = 10 * time.Second
)

// vmRun keeps one VM's worker running, restarting it when it ends, until
// shutdown. It holds the VM's listening sockets, which it hands every
// worker of the VM (assign), so the socket paths never change and clients
// queued on them are served by the next worker.
type vmRun struct {
	s          *Supervisor
	vm         state.VM
	log        *slog.Logger
	key        *sealing.Key // nil with a guardian
	ctrl, data *net.UnixListener
	// vsockCtrl and vsockData are the listening vsock sockets, or nil.
	vsockCtrl, vsockData *os.File

	stop      chan struct{} // closed by shutdown
	stopOnce  sync.Once
	done      chan struct{} // closed when the loop has ended
	ready     chan struct{} // closed when the first worker serves
	readyOnce sync.Once
	firstEnd  chan struct{} // closed when the first worker has ended

	// lastGen is the newest generation stored: a Put must be newer.
	// Only the conversation with the current worker touches it.
	lastGen uint64

	mu       sync.Mutex
	phase    string
	pid      int
	restarts int
	lastExit string
	// keyStatus says how the last attempt of a worker of the VM to obtain
	// the key from the guardian went.
	keyStatus string
	conn      net.Conn // the channel to the serving worker, nil if none

	wmu     sync.Mutex // one frame at a time to the worker
	statsMu sync.Mutex // one scrape at a time
	statsCh chan workerproto.Stats
}

// write sends m to the worker.
func (r *vmRun) write(conn net.Conn, m workerproto.Message) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return workerproto.WriteMessage(conn, m)
}

func (r *vmRun) setPhase(phase string, pid int) {
	r.mu.Lock()
	r.phase, r.pid = phase, pid
	r.mu.Unlock()
}

func (r *vmRun) stopping() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// shutdown stops the worker in order (SIGTERM: it stores the TPM's state
// and ends), closes the VM's sockets and makes the generation witness
// durable.
func (r *vmRun) shutdown() {
	r.stopOnce.Do(func() {
		r.setPhase("stopping", r.currentPID())
		close(r.stop)
	})
	<-r.done
	closeListeners(r.ctrl, r.data)
	r.closeVsock()
	if r.vm.Data != "" {
		os.Remove(tctiCtrlLink(&r.vm))
	}
	if r.lastGen > 0 {
		if err := r.s.witness.Sync(r.vm.ID, r.lastGen); err != nil {
			r.log.Warn("sync the generation witness", "err", err)
		}
	}
	r.setPhase("stopped", 0)
}

func (r *vmRun) closeVsock() {
	for _, f := range []*os.File{r.vsockCtrl, r.vsockData} {
		if f != nil {
			f.Close()
		}
	}
}

func (r *vmRun) currentPID() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pid
}

// loop runs workers until shutdown.
func (r *vmRun) loop() {
	defer close(r.done)
	defer r.readyOnce.Do(func() { close(r.ready) })
	backoff := minBackoff
	for first := true; ; first = false {
		started := time.Now()
		exit, err := r.runWorker()
		if r.stopping() {
			return
		}
		ran := time.Since(started)
		delay := backoff
		switch {
		case err == nil && exit == 0:
			delay = 0 // CMD_SHUTDOWN: QEMU is done; be ready for the next one
		case ran >= stableRun:
			delay, backoff = minBackoff, minBackoff
		default:
			backoff = min(2*backoff, maxBackoff)
		}
		how := describeExit(exit, err)
		r.mu.Lock()
		r.restarts++
		r.lastExit = how
		r.phase, r.pid = "restarting", 0
		n := r.restarts
		r.mu.Unlock()
		if first {
			close(r.firstEnd)
		}
		if delay == 0 {
			r.log.Info("worker ended; starting a new one", "exit", how, "restarts", n)
		} else {
			r.log.Warn("worker ended; restarting it from the last stored state", "exit", how, "after", ran.Round(time.Millisecond), "delay", delay, "restarts", n)
		}
		select {
		case <-time.After(delay):
		case <-r.stop:
			return
		}
	}
}

func describeExit(exit int, err error) string {
	switch {
	case err != nil:
		return err.Error()
	case exit == 0:
		return "exit status 0"
	case exit < 0:
		return "killed by signal " + syscall.Signal(-exit).String()
	}
	return "exit status " + strconv.Itoa(exit)
}

// runWorker runs one worker of the VM (a spare if one is idle), talks to
// it until it ends, and returns its exit status (negative: the signal
// that killed it), or an error if it could not start.
func (r *vmRun) runWorker() (int, error) {
	w, err := r.newWorker()
	if err != nil {
		return 0, err
	}
	cmd := w.cmd
	pid := cmd.Process.Pid
	r.setPhase("starting", pid)
	r.log.Info("worker started", "pid", pid, "spare", w.spare)

	exited := make(chan struct{})
	go func() {
		// shutdown: SIGTERM, then SIGKILL if the worker does not end.
		select {
		case <-r.stop:
		case <-exited:
			return
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			r.log.Warn("worker did not stop within the timeout; killing it", "pid", pid, "timeout", stopTimeout)
			_ = cmd.Process.Kill()
		}
	}()
	if err := r.converse(w.conn, w.records, pid); err != nil {
		r.log.Error("worker broke the protocol; killing it", "pid", pid, "err", err)
		_ = cmd.Process.Kill()
	}
	w.close()
	err = cmd.Wait()
	close(exited)
	r.s.spares.fill() // if it ended before it was ready
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return -int(ws.Signal()), nil
		}
		return exitErr.ExitCode(), nil
	}
	return 0, err
}

// newWorker returns a worker assigned to the VM: a spare if one is idle,
// else one started now.
func (r *vmRun) newWorker() (*startedWorker, error) {
	if w := r.s.spares.take(); w != nil {
		err := r.assign(w)
		if err == nil {
			return w, nil
		}
		r.log.Warn("spare worker lost; starting a new one", "pid", w.cmd.Process.Pid, "err", err)
		w.discard()
	}
	w, err := r.s.startWorker()
	if err != nil {
		return nil, err
	}
	if err := r.assign(w); err != nil {
		w.discard()
		return nil, err
	}
	return w, nil
}

// assign makes w the VM's worker: it sends the VM's name, how its TPM
// starts, and its listening sockets, which every worker of the VM serves,
// so that the socket paths never change.
func (r *vmRun) assign(w *startedWorker) error {
	a := workerproto.Assign{Name: r.vm.Name, VsockCID: r.vm.VsockCID, StartupClear: r.vm.StartupClear}
	var files, dups []*os.File
	defer func() { closeFiles(dups) }()
	for _, l := range []struct {
		role workerproto.Socket
		l    *net.UnixListener
	}{{workerproto.SocketCtrl, r.ctrl}, {workerproto.SocketData, r.data}} {
		if l.l == nil {
			continue
		}
		f, err := l.l.File()
		if err != nil {
			return fmt.Errorf("pass the socket on: %w", err)
		}
		dups = append(dups, f)
		files = append(files, f)
		a.Sockets = append(a.Sockets, l.role)
	}
	for _, v := range []struct {
		role workerproto.Socket
		f    *os.File
	}{{workerproto.SocketVsockCtrl, r.vsockCtrl}, {workerproto.SocketVsockData, r.vsockData}} {
		if v.f != nil {
			files = append(files, v.f)
			a.Sockets = append(a.Sockets, v.role)
		}
	}
	return workerproto.WriteAssign(w.conn, a, files)
}

// startedWorker is a worker process and the supervisor's ends of its two
// socketpairs.
type startedWorker struct {
	cmd     *exec.Cmd
	conn    *net.UnixConn // the channel
	records net.Conn
	spare   bool // started ahead of need
	// watched is closed when the idle spare's watch has ended.
	watched chan struct{}
}

// startWorker starts a worker process. It has no VM until assigned one.
func (s *Supervisor) startWorker() (*startedWorker, error) {
	// Two socketpairs: the channel (the assignment, the key, statistics,
	// readiness) and the records channel (the worker's requests for its
	// state, answered in order; see worker.remote).
	conn, theirs, err := socketpair("worker channel")
	if err != nil {
		return nil, err
	}
	records, theirRecords, err := socketpair("worker records")
	if err != nil {
		conn.Close()
		theirs.Close()
		return nil, err
	}
	// The worker's descriptor n is ExtraFiles[n-3].
	cmd := exec.Command(s.exe, "worker", "--supervisor", strconv.Itoa(os.Getpid()),
		"--channel-fd", "3", "--records-fd", "4", "--log-level", s.cfg.LogLevel)
	// One P; the worker takes a second while its durable writes come fast
	// (see internal/worker's pacer).
	cmd.Env = []string{"GOMAXPROCS=1"}
	cmd.Stderr = s.cfg.WorkerLog
	cmd.ExtraFiles = []*os.File{theirs, theirRecords}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true, Credential: s.cred}
	err = s.spawn.start(cmd)
	theirs.Close()
	theirRecords.Close()
	if err != nil {
		conn.Close()
		records.Close()
		return nil, fmt.Errorf("start worker: %w", err)
	}
	return &startedWorker{cmd: cmd, conn: conn.(*net.UnixConn), records: records}, nil
}

// close closes the supervisor's ends of the socketpairs.
func (w *startedWorker) close() {
	w.conn.Close()
	w.records.Close()
}

// discard lets a worker that serves no VM go: its channel closes, on which
// it ends (killed if it has not within stopTimeout), and is waited for.
func (w *startedWorker) discard() {
	w.close()
	exited := make(chan struct{})
	go func() {
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			_ = w.cmd.Process.Kill()
		}
	}()
	_ = w.cmd.Wait()
	close(exited)
}

// sparePool keeps workers started ahead of need, so that a VM's start (or
// its worker's restart) finds a process past its own start and the
// engine's first (2 of a fresh worker's 10 ms or so; see
// bench/RESULTS.md). A spare holds nothing of any VM until assigned, and
// serves that VM only.
type sparePool struct {
	start func() (*startedWorker, error)
	log   *slog.Logger
	want  int

	mu       sync.Mutex
	idle     []*startedWorker
	starting int
	closed   bool
	wg       sync.WaitGroup // the starts under way
}

// take returns an idle spare, or nil. It starts no replacement: fill does,
// once the VM's worker is ready or has ended, since a worker's start is
// milliseconds of CPU that the VM's own start would share.
func (p *sparePool) take() *startedWorker {
	p.mu.Lock()
	var w *startedWorker
	if len(p.idle) > 0 {
		w = p.idle[0]
		p.idle = p.idle[1:]
	}
	p.mu.Unlock()
	if w != nil {
		// End the watch: the channel is the VM's from now on.
		_ = w.conn.SetReadDeadline(time.Now())
		<-w.watched
		_ = w.conn.SetReadDeadline(time.Time{})
	}
	return w
}

// watch waits in the background for the idle spare w to end (a spare
// sends nothing before it is assigned, so anything readable on its
// channel is its end), and replaces it: a spare killed while idle (the OOM
// killer, an operator) is reaped and not handed to a VM. take ends the
// watch with a read deadline.
func (p *sparePool) watch(w *startedWorker) {
	w.watched = make(chan struct{})
	go func() {
		defer close(w.watched)
		rc, err := w.conn.SyscallConn()
		if err != nil {
			return
		}
		var b [1]byte
		if err := rc.Read(func(fd uintptr) bool {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return err != syscall.EAGAIN
		}); err != nil {
			return // take's deadline, or close
		}
		p.mu.Lock()
		i := slices.Index(p.idle, w)
		if i >= 0 {
			p.idle = slices.Delete(p.idle, i, i+1)
		}
		p.mu.Unlock()
		if i < 0 {
			return // taken meanwhile: its start finds it gone
		}
		p.log.Warn("spare worker ended while idle; starting another", "pid", w.cmd.Process.Pid)
		w.discard()
		p.fill()
	}()
}

// ready counts the idle spares.
func (p *sparePool) ready() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// fill starts the spares that are missing, in the background.
func (p *sparePool) fill() {
	p.mu.Lock()
	n := 0
	if !p.closed {
		n = p.want - len(p.idle) - p.starting
	}
	p.starting += n
	p.wg.Add(n)
	p.mu.Unlock()
	for range n {
		go func() {
			defer p.wg.Done()
			w, err := p.start()
			if err != nil {
				p.log.Warn("spare worker not started", "err", err)
			} else {
				w.spare = true
			}
			p.mu.Lock()
			p.starting--
			keep := err == nil && !p.closed
			if keep {
				p.idle = append(p.idle, w)
				p.watch(w)
			}
			p.mu.Unlock()
			if err == nil && !keep {
				w.discard()
			}
		}()
	}
}

// close lets every spare go and starts no more.
func (p *sparePool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	p.wg.Wait()
	for _, w := range idle {
		w.discard()
	}
}

// socketpair makes a connected pair of unix stream sockets: ours, in Go's
// netpoller, and the worker's end, blocking, to be inherited.
func socketpair(name string) (net.Conn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair for the %s: %w", name, err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), name), os.NewFile(uintptr(fds[1]), name)
	conn, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		theirs.Close()
		return nil, nil, fmt.Errorf("the %s: %w", name, err)
	}
	return conn, theirs, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// converse hands the worker its key (or the guardian's config), reads what
// the worker says on the channel, and answers its requests on the records
// channel, until the worker goes. An error is a protocol violation.
func (r *vmRun) converse(conn, records net.Conn, pid int) error {
	var err error
	if r.key == nil {
		err = r.write(conn, workerproto.Guardian{VMID: r.vm.ID, Config: r.s.guardian})
	} else {
		secret := r.key.Secret()
		err = r.write(conn, workerproto.Key{VMID: r.vm.ID, KeyID: r.key.ID, Secret: secret})
		clear(secret)
	}
	if err != nil {
		return nil // the worker is already gone; Wait says why
	}
	defer func() {
		r.mu.Lock()
		r.conn = nil
		r.mu.Unlock()
	}()
	told := make(chan error, 1)
	go func() {
		err := r.listen(conn, pid)
		if err != nil {
			records.Close() // ends answer
		}
		told <- err
	}()
	err = r.answer(records)
	if err != nil {
		conn.Close() // ends listen
	}
	return errors.Join(err, <-told)
}

// next reads the worker's next message from r: nil, and no error, once the
// worker has gone (the socketpair's end).
func next(r io.Reader) (workerproto.Message, error) {
	m, err := workerproto.ReadMessage(r)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) {
		return nil, nil
	}
	return m, err
}

// listen reads what the worker says on the channel: Ready, Stats and
// KeyStatus, none of them answered.
func (r *vmRun) listen(conn net.Conn, pid int) error {
	for {
		m, err := next(conn)
		if m == nil {
			return err
		}
		switch m := m.(type) {
		case workerproto.Ready:
			r.mu.Lock()
			r.phase, r.pid, r.conn = "running", pid, conn
			r.mu.Unlock()
			r.readyOnce.Do(func() { close(r.ready) })
			r.s.spares.fill() // the start is done: replace the spare it took
		case workerproto.Stats:
			select {
			case r.statsCh <- m:
			default: // nobody asked: drop it
			}
		case workerproto.KeyStatus:
			r.setKeyStatus(m)
		default:
			return fmt.Errorf("unexpected message of type %d on the channel", m.Type())
		}
	}
}

// answer answers the worker's requests on the records channel, one at a
// time.
func (r *vmRun) answer(records net.Conn) error {
	requests := bufio.NewReaderSize(records, workerproto.MaxFrame+4) // a request in one read
	for {
		m, err := next(requests)
		if m == nil {
			return err
		}
		var reply workerproto.Message
		switch m := m.(type) {
		case workerproto.Get:
			reply = r.get(m)
		case workerproto.Put:
			reply = r.put(m)
		case workerproto.GetProtector:
			reply = r.getProtector(m)
		case workerproto.PutProtector:
			reply = r.putProtector(m)
		default:
			return fmt.Errorf("unexpected message of type %d on the records channel", m.Type())
		}
		if err := workerproto.WriteMessage(records, reply); err != nil {
			return nil
		}
	}
}

// get answers the worker's Get: its own VM's record only.
func (r *vmRun) get(m workerproto.Get) workerproto.Message {
	if m.VMID != r.vm.ID {
		r.log.Error("worker asked for another VM's state; refused", "asked", m.VMID)
		return workerproto.Error{Message: "not this worker's VM"}
	}
	rec, err := r.s.store.Get(r.vm.ID)
	if errors.Is(err, state.ErrNotFound) {
		return workerproto.NotFound{}
	}
	if err == nil {
		err = r.s.witness.Check(rec)
	}
	if err != nil {
		r.log.Error("state not loaded", "err", err)
		return workerproto.Error{Message: err.Error()}
	}
	r.lastGen = max(r.lastGen, rec.Newest())
	return workerproto.Record{Record: rec}
}

// put commits the worker's sealed record. Concurrent puts of all workers
// share the store's group commit; the Ack goes out only once the record is
// durable.
func (r *vmRun) put(m workerproto.Put) workerproto.Message {
	rec := m.Record
	switch {
	case rec.VMID != r.vm.ID:
		r.log.Error("worker tried to store another VM's state; refused", "vmid", rec.VMID)
		return workerproto.Error{Message: "not this worker's VM"}
	case rec.Generation <= r.lastGen:
		r.log.Error("worker tried to store an old generation; refused", "generation", rec.Generation, "stored", r.lastGen)
		return workerproto.Error{Message: fmt.Sprintf("generation %d is not newer than the stored %d", rec.Generation, r.lastGen)}
	case rec.Delta && (r.lastGen == 0 || rec.Generation != r.lastGen+1):
		r.log.Error("worker tried to store a change that does not follow the stored generation; refused", "generation", rec.Generation, "stored", r.lastGen)
		return workerproto.Error{Message: fmt.Sprintf("a change of generation %d does not follow the stored %d", rec.Generation, r.lastGen)}
	}
	start := time.Now()
	r.s.pace.begin(start)
	err := r.s.store.Put(rec)
	r.s.pace.end()
	if err != nil {
		r.log.Error("state not stored", "generation", rec.Generation, "err", err)
		return workerproto.Error{Message: err.Error()}
	}
	r.lastGen = rec.Generation
	if err := r.s.witness.Record(rec.VMID, rec.Generation); err != nil {
		r.log.Error("generation witness not recorded", "err", err)
		return workerproto.Error{Message: err.Error()}
	}
	r.s.commits.Observe(time.Since(start).Seconds())
	return workerproto.Ack{Generation: rec.Generation}
}

// setKeyStatus records how the worker's attempt to obtain the key went.
func (r *vmRun) setKeyStatus(m workerproto.KeyStatus) {
	status := "state key released by the guardian"
	if m.Err != "" {
		status = "state key not released: " + m.Err
	}
	r.mu.Lock()
	r.keyStatus = status
	r.mu.Unlock()
}

// getProtector answers the worker's GetProtector: its own VM's only, and
// only with a guardian.
func (r *vmRun) getProtector(m workerproto.GetProtector) workerproto.Message {
	if msg := r.checkProtectorRequest(m.VMID); msg != nil {
		return msg
	}
	p, err := r.s.store.GetProtector(r.vm.ID)
	if errors.Is(err, state.ErrNotFound) {
		return workerproto.NotFound{}
	}
	if err != nil {
		r.log.Error("key protector not read", "err", err)
		return workerproto.Error{Message: err.Error()}
	}
	return workerproto.Protector{Data: p}
}

// putProtector stores the worker's new key protector durably: one of its
// own VM, made before the VM has state (a new key would open no stored
// state), and never over an existing one, which is sent back instead.
func (r *vmRun) putProtector(m workerproto.PutProtector) workerproto.Message {
	if msg := r.checkProtectorRequest(m.VMID); msg != nil {
		return msg
	}
	p, err := guardian.ParseProtector(m.Data)
	switch {
	case err != nil:
		r.log.Error("worker sent a key protector that does not parse; refused", "err", err)
		return workerproto.Error{Message: err.Error()}
	case p.VMID != r.vm.ID:
		r.log.Error("worker sent another VM's key protector; refused", "protector_vm", p.VMID)
		return workerproto.Error{Message: "the protector is not of this worker's VM"}
	}
	if _, err := r.s.store.Get(r.vm.ID); !errors.Is(err, state.ErrNotFound) {
		r.log.Error("worker sent a new key protector for a VM with state; refused")
		return workerproto.Error{Message: "the VM has state: a new key would not open it"}
	}
	err = r.s.store.CreateProtector(r.vm.ID, m.Data)
	if errors.Is(err, state.ErrProtectorExists) {
		return r.getProtector(workerproto.GetProtector{VMID: r.vm.ID})
	}
	if err != nil {
		r.log.Error("key protector not stored", "err", err)
		return workerproto.Error{Message: err.Error()}
	}
	return workerproto.Ack{} // the worker logs it
}

// checkProtectorRequest refuses a protector request for another VM, or
// without a guardian; nil lets it through.
func (r *vmRun) checkProtectorRequest(vmID string) workerproto.Message {
	switch {
	case r.key != nil:
		r.log.Error("worker asked for a key protector without a guardian; refused")
		return workerproto.Error{Message: "no guardian: the VM has no key protector"}
	case vmID != r.vm.ID:
		r.log.Error("worker asked for another VM's key protector; refused", "asked", vmID)
		return workerproto.Error{Message: "not this worker's VM"}
	}
	return nil
}

// spawner starts the workers from one OS thread that it never gives up:
// PR_SET_PDEATHSIG fires when the thread that forked a child ends, and the
// thread's no_new_privs, set here and on no other thread of the
// supervisor, is inherited by every worker from its first instruction.
type spawner struct{ reqs chan spawnReq }

type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

func newSpawner() (*spawner, error) {
	s := &spawner{reqs: make(chan spawnReq)}
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread lives as long as the process
		const prSetNoNewPrivs = 38
		if _, _, errno := syscall.RawSyscall6(syscall.SYS_PRCTL, prSetNoNewPrivs, 1, 0, 0, 0, 0); errno != 0 {
			ready <- fmt.Errorf("PR_SET_NO_NEW_PRIVS on the spawning thread: %w", errno)
			select {} // keep the thread locked and unused
		}
		ready <- nil
		for req := range s.reqs {
			req.err <- req.cmd.Start()
		}
	}()
	return s, <-ready
}

func (s *spawner) start(cmd *exec.Cmd) error {
	req := spawnReq{cmd: cmd, err: make(chan error, 1)}
	s.reqs <- req
	return <-req.err
}
