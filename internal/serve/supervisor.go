package serve

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vtpmd/vtpmd/internal/unixsock"
	"github.com/vtpmd/vtpmd/internal/vmstate"
	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
)

// Errors of the VM operations; the admin API maps them to HTTP codes.
var (
	// ErrBadRequest: the request is malformed (400).
	ErrBadRequest = errors.New("bad request")
	// ErrUnknownVM: no VM has that name (404).
	ErrUnknownVM = errors.New("no such VM")
	// ErrConflict: the VM's state does not allow it (409).
	ErrConflict = errors.New("conflict")
)

// Supervisor is `vtpmd serve`: the one state store, the registry of VMs,
// a worker process per running VM, and the admin API.
type Supervisor struct {
	cfg   Config
	log   *slog.Logger
	store *state.Store
	keys  sealing.KeySource // nil with a guardian
	// guardian is the host's guardian config handed to every worker (JSON,
	// paths absolute), nil without a guardian.
	guardian []byte
	witness  *vmstate.Witness
	spawn    *spawner
	spares   *sparePool
	exe      string
	cred     *syscall.Credential
	// sockMode and sockGID are the VMs' sockets' mode and group.
	sockMode os.FileMode
	sockGID  int

	closeOnce sync.Once
	closeErr  error

	mu       sync.Mutex // runs and names
	runs     map[string]*vmRun
	names    map[string]*nameLock
	registry *prometheus.Registry
	commits  prometheus.Histogram // state commit latency
	pace     *commitPacer

	// vsockMu makes the check that a created VM's vsock ports are free
	// and its registration one step.
	vsockMu sync.Mutex
}

// nameLock serialises the operations on one VM; operations on different
// VMs run at once, so that their registry writes share an fsync.
type nameLock struct {
	mu    sync.Mutex
	users int
}

// lockName takes the VM's operation lock and returns its release.
func (s *Supervisor) lockName(name string) func() {
	s.mu.Lock()
	l := s.names[name]
	if l == nil {
		l = &nameLock{}
		s.names[name] = l
	}
	l.users++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.users--; l.users == 0 {
			delete(s.names, name)
		}
		s.mu.Unlock()
	}
}

// Open opens the state store (whose lock keeps a second supervisor off it)
// and prepares the supervisor. Close undoes it; Run closes it too.
func Open(cfg Config) (*Supervisor, error) {
	if cfg.StateDir == "" || cfg.RunDir == "" || cfg.HostKey == "" {
		return nil, errors.New("serve: the state dir, run dir and host key must be set")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.WorkerLog == nil {
		cfg.WorkerLog = os.Stderr
	}
	if _, err := cfg.Level(); err != nil {
		return nil, err
	}
	if cfg.SpareWorkers < 0 || cfg.SpareWorkers > MaxSpareWorkers {
		return nil, fmt.Errorf("serve: %d spare workers: use 0 to %d", cfg.SpareWorkers, MaxSpareWorkers)
	}
	cred, err := cfg.workerCredential()
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	exe := cfg.Executable
	if exe == "" {
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("serve: find the vtpmd binary for the workers: %w", err)
		}
	}
	if rel, err := filepath.Rel(cfg.StateDir, cfg.HostKey); err == nil && rel != ".." && !startsWithDotDot(rel) {
		return nil, fmt.Errorf("serve: the host key %s lies inside the state dir %s: keep it elsewhere", cfg.HostKey, cfg.StateDir)
	}
	gid, err := cfg.socketGID()
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	sockMode := os.FileMode(0o600)
	if gid >= 0 {
		// The group may reach the VMs' sockets, and nothing else of it.
		sockMode = 0o660
		if err := os.Chown(cfg.RunDir, -1, gid); err != nil {
			return nil, fmt.Errorf("serve: the run dir's group: %w", err)
		}
		if err := os.Chmod(cfg.RunDir, 0o750); err != nil {
			return nil, fmt.Errorf("serve: %w", err)
		}
	}
	guardianConfig, err := cfg.guardian()
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	spawn, err := newSpawner()
	if err != nil {
		return nil, err
	}
	store, err := state.Open(cfg.StateDir, state.Options{MemTableSize: 16 << 20, LogZeroFill: 1 << 20})
	if err != nil {
		return nil, err
	}
	s := &Supervisor{
		cfg:      cfg,
		log:      cfg.Log,
		store:    store,
		guardian: guardianConfig,
		witness:  &vmstate.Witness{Dir: filepath.Join(filepath.Dir(cfg.HostKey), "generations")},
		spawn:    spawn,
		exe:      exe,
		cred:     cred,

		sockMode: sockMode,
		sockGID:  gid,
		runs:     map[string]*vmRun{},
		names:    map[string]*nameLock{},
		pace:     newCommitPacer(),
	}
	if guardianConfig == nil {
		s.keys = &sealing.HostKey{Path: cfg.HostKey}
	}
	s.registry = s.newRegistry()
	s.spares = &sparePool{start: s.startWorker, log: s.log, want: cfg.SpareWorkers}
	s.spares.fill()
	return s, nil
}

func startsWithDotDot(rel string) bool {
	return len(rel) >= 3 && rel[:3] == ".."+string(filepath.Separator)
}

// Close stops every worker, leaving each VM's desired state as it is, and
// closes the store. Closing again does nothing.
func (s *Supervisor) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.close() })
	return s.closeErr
}

func (s *Supervisor) close() error {
	s.mu.Lock()
	runs := make([]*vmRun, 0, len(s.runs))
	for _, r := range s.runs {
		runs = append(runs, r)
	}
	s.runs = map[string]*vmRun{}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range runs {
		wg.Add(1)
		go func() { defer wg.Done(); r.shutdown() }()
	}
	wg.Wait()
	s.spares.close()
	return s.store.Close()
}

// Run restarts every VM whose desired state is running (a supervisor that
// went away took its workers with it), serves the admin API until ctx ends,
// then stops the workers and closes the store.
func (s *Supervisor) Run(ctx context.Context) error {
	admin := s.cfg.AdminSocket()
	if c, err := net.Dial("unix", admin); err == nil {
		c.Close()
		s.Close()
		return fmt.Errorf("serve: another supervisor answers on %s", admin)
	}
	l, err := unixsock.Listen(admin, 0o600, -1, -1)
	if err != nil {
		s.Close()
		return err
	}
	errorLog := slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	servers := []*http.Server{{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second, ErrorLog: errorLog}}
	listeners := []net.Listener{l}
	if s.cfg.MetricsListen != "" {
		ml, err := net.Listen("tcp", s.cfg.MetricsListen)
		if err != nil {
			l.Close()
			s.Close()
			return fmt.Errorf("serve: metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", s.MetricsHandler())
		servers = append(servers, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ErrorLog: errorLog})
		listeners = append(listeners, ml)
	}
	s.startWanted()
	served := make(chan error, len(servers))
	for i, srv := range servers {
		go func() { served <- srv.Serve(listeners[i]) }()
	}
	s.log.Info("serving", "admin", admin, "metrics", s.cfg.MetricsListen, "state", s.cfg.StateDir, "run", s.cfg.RunDir)
	select {
	case <-ctx.Done():
		s.log.Info("ending on signal")
	case err = <-served:
		s.log.Error("admin API or metrics failed", "err", err)
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, srv := range servers {
		_ = srv.Shutdown(shutdownCtx)
	}
	return errors.Join(err, s.Close())
}

// startWanted starts every VM whose desired state is running.
func (s *Supervisor) startWanted() {
	entries, err := s.store.ListVMs()
	if err != nil {
		s.log.Error("list VMs", "err", err)
	}
	for _, e := range entries {
		switch {
		case e.Err != nil:
			s.log.Error("registry entry does not parse; left alone", "vm", e.Name, "err", e.Err)
		case e.VM.Running:
			if err := s.startRun(e.VM); err != nil {
				s.log.Error("restart VM", "vm", e.Name, "err", err)
			}
		}
	}
}

// Status is a VM as the admin API reports it.
type Status struct {
	Name    string    `json:"name"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Ctrl    string    `json:"ctrl"`
	Data    string    `json:"data,omitempty"`
	// VsockCID is the guest CID let in on the vsock ports; VsockCtrl and
	// VsockData are the host's vsock ports of the control and data
	// channels (0: none).
	VsockCID  uint32 `json:"vsock_cid,omitempty"`
	VsockCtrl uint32 `json:"vsock_ctrl_port,omitempty"`
	VsockData uint32 `json:"vsock_data_port,omitempty"`
	// StartupClear: every worker powers the TPM on and starts it.
	StartupClear bool `json:"startup_clear,omitempty"`
	// Desired is "running" or "stopped": what the supervisor keeps the VM
	// at, also across its own restarts.
	Desired string `json:"desired"`
	// State is "stopped", "starting", "running", "restarting" or
	// "stopping".
	State string `json:"state"`
	// PID is the worker's process id while there is one.
	PID int `json:"pid,omitempty"`
	// Restarts counts the worker's restarts since the VM was started.
	Restarts int `json:"restarts"`
	// LastExit says how the last worker ended.
	LastExit string `json:"last_exit,omitempty"`
	// Guardian, with a guardian, says how the last attempt of the VM's
	// workers to obtain the state key went ("" before its TPM's first
	// start).
	Guardian string `json:"guardian,omitempty"`
	// QEMUArgs are the QEMU arguments for the VM's TPM.
	QEMUArgs []string `json:"qemu_args"`
}

// QEMUArgs are the QEMU arguments that give a VM the TPM on ctrl.
func QEMUArgs(ctrl string) []string {
	return []string{
		"-chardev", "socket,id=chrtpm,path=" + ctrl,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0",
	}
}

func (s *Supervisor) statusLocked(vm *state.VM) Status {
	st := Status{Name: vm.Name, ID: vm.ID, Created: vm.Created, Ctrl: vm.Ctrl, Data: vm.Data, StartupClear: vm.StartupClear,
		VsockCID: vm.VsockCID, VsockCtrl: vm.VsockCtrl, VsockData: vm.VsockData,
		Desired: "stopped", State: "stopped", QEMUArgs: QEMUArgs(vm.Ctrl)}
	if vm.Running {
		st.Desired = "running"
	}
	if r := s.runs[vm.Name]; r != nil {
		r.mu.Lock()
		st.State, st.PID, st.Restarts, st.LastExit, st.Guardian = r.phase, r.pid, r.restarts, r.lastExit, r.keyStatus
		r.mu.Unlock()
	}
	return st
}

// CreateRequest is the body of a create.
type CreateRequest struct {
	// Name names the VM.
	Name string `json:"name"`
	// Data gives the VM a data socket (for clients without
	// CMD_SET_DATAFD, like the swtpm TCTI) beside its control socket.
	Data bool `json:"data,omitempty"`
	// StartupClear has every worker of the VM power the TPM on and send
	// TPM2_Startup(CLEAR), as swtpm's --flags not-need-init,startup-clear:
	// for clients that do neither, like tpm2-tools on the data socket.
	StartupClear bool `json:"startup_clear,omitempty"`
	// VsockCID is the guest's CID (as QEMU's vhost-vsock guest-cid): the
	// only peer let in on the VM's vsock ports. Needed with a port.
	VsockCID uint32 `json:"vsock_cid,omitempty"`
	// VsockCtrlPort and VsockDataPort serve the control and data channels
	// on these vsock ports of the host too (beside the unix sockets);
	// 0 is none. No two VMs share a port.
	VsockCtrlPort uint32 `json:"vsock_ctrl_port,omitempty"`
	VsockDataPort uint32 `json:"vsock_data_port,omitempty"`
}

// maxSocketPath is the longest unix socket path.
const maxSocketPath = 107

// Create registers a new, stopped VM.
func (s *Supervisor) Create(req CreateRequest) (Status, error) {
	if err := ValidName(req.Name); err != nil {
		return Status{}, err
	}
	if err := validateVsock(req); err != nil {
		return Status{}, err
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return Status{}, err
	}
	vm := &state.VM{Name: req.Name, ID: hex.EncodeToString(id), Created: time.Now().UTC(),
		Ctrl: filepath.Join(s.cfg.RunDir, req.Name+".ctrl"), StartupClear: req.StartupClear,
		VsockCID: req.VsockCID, VsockCtrl: req.VsockCtrlPort, VsockData: req.VsockDataPort}
	if req.Data {
		vm.Data = filepath.Join(s.cfg.RunDir, req.Name+".data")
	}
	if len(vm.Ctrl) > maxSocketPath {
		return Status{}, fmt.Errorf("%w: the socket path %s is longer than %d bytes: use a shorter name or run dir", ErrBadRequest, vm.Ctrl, maxSocketPath)
	}
	defer s.lockName(req.Name)()
	if ports := vsockPorts(vm); len(ports) > 0 {
		s.vsockMu.Lock()
		defer s.vsockMu.Unlock()
		entries, err := s.store.ListVMs()
		if err != nil {
			return Status{}, err
		}
		if err := vsockClash(entries, vm.Name, ports); err != nil {
			return Status{}, fmt.Errorf("create VM %q: %w", vm.Name, err)
		}
	}
	_, err := s.store.GetVM(req.Name)
	switch {
	case err == nil:
		return Status{}, fmt.Errorf("%w: VM %q exists", ErrConflict, req.Name)
	case errors.Is(err, state.ErrCorrupt):
		return Status{}, fmt.Errorf("%w: VM %q exists (its registry entry does not parse: %v)", ErrConflict, req.Name, err)
	case !errors.Is(err, state.ErrNoVM):
		return Status{}, err
	}
	if err := s.store.PutVM(vm); err != nil {
		return Status{}, err
	}
	attrs := []any{"vm", vm.Name, "id", vm.ID, "ctrl", vm.Ctrl}
	if vm.VsockCID != 0 {
		attrs = append(attrs, "vsock_cid", vm.VsockCID, "vsock_ctrl_port", vm.VsockCtrl, "vsock_data_port", vm.VsockData)
	}
	s.log.Info("created", attrs...)
	return s.status(vm), nil
}

// status reports the VM.
func (s *Supervisor) status(vm *state.VM) Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statusLocked(vm)
}

// run is the VM's run, nil if it has none.
func (s *Supervisor) run(name string) *vmRun {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runs[name]
}

// get reads the VM's registry entry, mapping a missing one to
// ErrUnknownVM.
func (s *Supervisor) get(name string) (*state.VM, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	vm, err := s.store.GetVM(name)
	if errors.Is(err, state.ErrNoVM) {
		return nil, fmt.Errorf("%w: %q", ErrUnknownVM, name)
	}
	return vm, err
}

// VM reports one VM.
func (s *Supervisor) VM(name string) (Status, error) {
	vm, err := s.get(name)
	if err != nil {
		return Status{}, err
	}
	return s.status(vm), nil
}

// List reports every VM, by name.
func (s *Supervisor) List() ([]Status, error) {
	entries, err := s.store.ListVMs()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Status, 0, len(entries))
	for _, e := range entries {
		if e.Err != nil {
			out = append(out, Status{Name: e.Name, State: "corrupt", LastExit: e.Err.Error()})
			continue
		}
		out = append(out, s.statusLocked(e.VM))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// readyTimeout bounds the wait for a started worker to serve.
const readyTimeout = 20 * time.Second

// Start starts the VM's worker, records that the VM is to run, and
// returns once the worker serves. Starting a running VM does nothing.
func (s *Supervisor) Start(name string) (Status, error) {
	unlock := s.lockName(name)
	vm, err := s.get(name)
	if err != nil {
		unlock()
		return Status{}, err
	}
	r := s.run(name)
	if r == nil {
		vm.Running = true
		err = s.store.PutVM(vm)
		if err == nil {
			if err = s.startRun(vm); err != nil {
				vm.Running = false
				err = errors.Join(err, s.store.PutVM(vm))
			}
		}
		if err != nil {
			unlock()
			return Status{}, err
		}
		r = s.run(name)
	}
	unlock()
	select {
	case <-r.ready:
	case <-r.firstEnd:
		st, err := s.VM(name)
		if err == nil {
			why := st.LastExit
			if st.Guardian != "" {
				why += "; " + st.Guardian
			}
			err = fmt.Errorf("the worker of VM %q did not start (%s); the supervisor keeps trying until the VM is stopped", name, why)
		}
		return st, err
	case <-r.done:
	case <-time.After(readyTimeout):
		return Status{}, fmt.Errorf("the worker of VM %q did not serve within %v; the supervisor keeps trying until the VM is stopped", name, readyTimeout)
	}
	return s.VM(name)
}

// Stop stops the VM's worker, storing its TPM's state, and records that
// the VM is not to run.
func (s *Supervisor) Stop(name string) (Status, error) {
	defer s.lockName(name)()
	vm, err := s.get(name)
	if err != nil {
		return Status{}, err
	}
	if vm.Running {
		vm.Running = false
		if err := s.store.PutVM(vm); err != nil {
			return Status{}, err
		}
	}
	if r := s.run(name); r != nil {
		r.shutdown()
		s.mu.Lock()
		delete(s.runs, name)
		s.mu.Unlock()
		s.log.Info("stopped", "vm", name)
	}
	return s.status(vm), nil
}

// Delete removes a stopped VM and its state.
func (s *Supervisor) Delete(name string) error {
	defer s.lockName(name)()
	vm, err := s.get(name)
	if err != nil {
		return err
	}
	if vm.Running || s.run(name) != nil {
		return fmt.Errorf("%w: VM %q is running: stop it first", ErrConflict, name)
	}
	if err := s.store.DeleteVM(vm); err != nil {
		return err
	}
	if err := s.witness.Remove(vm.ID); err != nil {
		s.log.Warn("remove the generation witness", "vm", name, "err", err)
	}
	s.log.Info("deleted", "vm", name, "id", vm.ID)
	return nil
}

// startRun opens the VM's sockets and starts its run.
func (s *Supervisor) startRun(vm *state.VM) error {
	log := s.log.With("vm", vm.Name)
	var key *sealing.Key // nil with a guardian: the worker obtains it
	var err error
	if s.keys != nil {
		if key, err = s.keys.StateKey(context.Background(), vm.ID); err != nil {
			return err
		}
	}
	var lastGen uint64
	switch rec, err := s.store.Get(vm.ID); {
	case err == nil:
		lastGen = rec.Newest()
	case !errors.Is(err, state.ErrNotFound):
		return err
	}
	r := &vmRun{s: s, vm: *vm, log: log, key: key, lastGen: lastGen, phase: "starting",
		stop: make(chan struct{}), done: make(chan struct{}), ready: make(chan struct{}), firstEnd: make(chan struct{}),
		statsCh: make(chan workerproto.Stats, 1)}
	for _, v := range []struct {
		port uint32
		f    **os.File
	}{{vm.VsockCtrl, &r.vsockCtrl}, {vm.VsockData, &r.vsockData}} {
		if v.port == 0 {
			continue
		}
		if *v.f, err = listenVsock(v.port); err != nil {
			r.closeVsock()
			if errors.Is(err, syscall.EADDRINUSE) {
				err = fmt.Errorf("%w: %w (by another process)", ErrConflict, err)
			}
			return fmt.Errorf("VM %q: %w", vm.Name, err)
		}
	}
	if r.ctrl, err = unixsock.Listen(vm.Ctrl, s.sockMode, -1, s.sockGID); err != nil {
		r.closeVsock()
		return err
	}
	if vm.Data != "" {
		if r.data, err = unixsock.Listen(vm.Data, s.sockMode, -1, s.sockGID); err != nil {
			r.ctrl.Close()
			r.closeVsock()
			return err
		}
		// The swtpm TCTI (swtpm:path=<data socket>) looks for the control
		// socket at <data socket>.ctrl.
		link := tctiCtrlLink(vm)
		err := os.Remove(link)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			err = os.Symlink(filepath.Base(vm.Ctrl), link)
		}
		if err != nil {
			log.Warn("no control socket link for the swtpm TCTI", "err", err)
		}
	}
	s.mu.Lock()
	s.runs[vm.Name] = r
	s.mu.Unlock()
	go r.loop()
	return nil
}

// tctiCtrlLink is where the swtpm TCTI looks for the control socket of a
// VM with a data socket: a symlink to the control socket.
func tctiCtrlLink(vm *state.VM) string { return vm.Data + ".ctrl" }

// closeListeners closes whichever of the listeners are set; closing removes
// their socket files.
func closeListeners(ls ...*net.UnixListener) {
	for _, l := range ls {
		if l != nil {
			l.Close()
		}
	}
}
