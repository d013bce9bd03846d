// Package fleet starts and stops the daemons under test: one process per VM,
// each with its own state directory and unix control and data sockets, the
// way libvirt starts swtpm, or every VM a worker of one `vtpmd serve`
// supervisor (Server). Every process it starts is recorded, so that KillAll
// can end them all however the benchmark ends.
package fleet

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/client"
	"github.com/vtpmd/vtpmd/transport"
)

// Kind is a program to start, one process per VM.
type Kind struct {
	// Name names it in reports: "vtpmd", "swtpm", "echo".
	Name string
	// Argv returns the command line for a state directory dir, whose data
	// socket is dir/data and control socket dir/ctrl.
	Argv func(dir string) []string
	// Env is added to the benchmark's environment for the process.
	Env []string
	// NoCtrl says it has no control socket.
	NoCtrl bool
	// Probe is the first command sent on a new data connection; the time
	// to its answer is the start-up time.
	Probe func(d *client.Data) error
	// Serve, when set, runs the VMs as workers of one `vtpmd serve`
	// supervisor instead of one process each; Argv is then unused.
	Serve *Server
	// Endpoints, when set, are the data sockets of TPMs already running,
	// one per VM in order: nothing is started, the VMs are connected to
	// (Connect), and their processes are unknown, so neither their CPU nor
	// their memory nor their start-up is measured.
	Endpoints []string
}

// Existing is the Kind of TPMs already serving at the unix data sockets
// endpoints, driven as they are: started (TPM2_Startup done) and with an
// empty owner authorization, as a fresh VM's TPM.
func Existing(name string, endpoints []string) Kind {
	return Kind{Name: name, Endpoints: endpoints, NoCtrl: true, Probe: probeGetRandom}
}

// Daemon is the Kind of a swtpm-compatible daemon at path, started as
// libvirt would start it for a VM without QEMU's CMD_SET_DATAFD.
func Daemon(name, path string, env []string) Kind {
	return Kind{
		Name: name,
		Env:  env,
		Argv: func(dir string) []string {
			return []string{path, "socket", "--tpm2",
				"--tpmstate", "dir=" + dir,
				"--ctrl", "type=unixio,path=" + filepath.Join(dir, "ctrl"),
				"--server", "type=unixio,path=" + filepath.Join(dir, "data"),
				"--flags", "not-need-init,startup-clear"}
		},
		Probe: probeGetRandom,
	}
}

// getRandom8 is TPM2_GetRandom(8).
var getRandom8 = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}

func probeGetRandom(d *client.Data) error {
	resp, err := d.RoundTrip(getRandom8)
	if err != nil {
		return err
	}
	if rc := client.RC(resp); rc != 0 {
		return fmt.Errorf("GetRandom: response code %#x", rc)
	}
	return nil
}

// Instance is one running process with its connections.
type Instance struct {
	Kind Kind
	Dir  string
	// Data is the persistent data connection, as QEMU keeps one.
	Data *client.Data
	// Ctrl is the control connection; nil for a Kind without one.
	Ctrl *client.Ctrl
	// Ready is the time from the start of the process to the answer to
	// its first command.
	Ready time.Duration

	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}

	// dataPath and ctrlPath are the sockets.
	dataPath, ctrlPath string
	// sup is the supervisor serving a VM of a Serve kind, whose name is
	// name; cmd and log are then nil and done is the supervisor's.
	sup     *Server
	supProc *Instance
	name    string
}

// Pid is the process id; for a VM of a Serve kind, the supervisor's.
func (in *Instance) Pid() int {
	if in.supProc != nil {
		return in.supProc.Pid()
	}
	return in.cmd.Process.Pid
}

// pids returns the processes that serve the instance: for a VM of a Serve
// kind, the supervisor and all its workers; none for an existing TPM.
func (in *Instance) pids() []int {
	switch {
	case in.sup != nil:
		return in.sup.pids()
	case in.cmd == nil:
		return nil
	}
	return []int{in.cmd.Process.Pid}
}

var (
	liveMu sync.Mutex
	live   = map[*Instance]bool{}
)

// ReadyTimeout bounds the wait for a started process to answer.
var ReadyTimeout = 20 * time.Second

// Start starts kind with state directory dir (created if missing), waits
// until it answers its first command and, for a daemon, checks the control
// channel with CMD_GET_CAPABILITY.
func Start(kind Kind, dir string) (*Instance, error) {
	if kind.Serve != nil {
		return kind.Serve.startVM(kind, dir)
	}
	in, start, err := startProcess(kind, dir)
	if err != nil {
		return nil, err
	}
	if err := in.connect(start); err != nil {
		in.Kill()
		return nil, fmt.Errorf("%s in %s: %w%s", kind.Name, dir, err, in.tail())
	}
	return in, nil
}

// Connect connects to the i-th of kind's Endpoints and checks that it
// answers a command.
func Connect(kind Kind, i int) (*Instance, error) {
	if i >= len(kind.Endpoints) {
		return nil, fmt.Errorf("%s: no endpoint for VM %d: %d given", kind.Name, i+1, len(kind.Endpoints))
	}
	in := &Instance{Kind: kind, dataPath: kind.Endpoints[i]}
	d, err := client.DialData(in.dataPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", kind.Name, err)
	}
	in.Data = d
	start := time.Now()
	if err := in.probe(start, start.Add(ReadyTimeout)); err != nil {
		d.Close()
		return nil, fmt.Errorf("%s at %s: %w", kind.Name, in.dataPath, err)
	}
	return in, nil
}

// startProcess starts kind's process in dir and registers it.
func startProcess(kind Kind, dir string) (*Instance, time.Time, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, time.Time{}, err
	}
	logf, err := os.OpenFile(filepath.Join(dir, "stderr.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, time.Time{}, err
	}
	argv := kind.Argv(dir)
	in := &Instance{Kind: kind, Dir: dir, log: logf, done: make(chan struct{}),
		dataPath: filepath.Join(dir, "data"), ctrlPath: filepath.Join(dir, "ctrl")}
	in.cmd = exec.Command(argv[0], argv[1:]...)
	in.cmd.Stdout, in.cmd.Stderr = logf, logf
	if len(kind.Env) > 0 {
		in.cmd.Env = append(os.Environ(), kind.Env...)
	}
	// The daemons die with the benchmark even when it is killed with
	// SIGKILL; a new process group keeps a terminal's ^C for the benchmark,
	// which then stops them itself.
	in.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}

	// Register before starting so KillAll never misses a process.
	liveMu.Lock()
	live[in] = true
	start := time.Now()
	err = in.cmd.Start()
	liveMu.Unlock()
	if err != nil {
		forget(in)
		logf.Close()
		return nil, time.Time{}, fmt.Errorf("start %s: %w", kind.Name, err)
	}
	go func() {
		_ = in.cmd.Wait()
		close(in.done)
	}()
	return in, start, nil
}

func (in *Instance) connect(start time.Time) error {
	deadline := start.Add(ReadyTimeout)
	for {
		d, err := client.DialData(in.dataPath)
		if err == nil {
			in.Data = d
			break
		}
		select {
		case <-in.done:
			return errors.New("exited before it served")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no data socket after %v: %w", ReadyTimeout, err)
		}
		time.Sleep(200 * time.Microsecond)
	}
	if err := in.probe(start, deadline); err != nil {
		return err
	}
	if in.Kind.NoCtrl {
		return nil
	}
	c, err := client.DialCtrl(in.ctrlPath)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	in.Ctrl = c
	reply, err := c.Do(transport.GetCapabilityRequest{}, 5*time.Second)
	if err != nil {
		return err
	}
	if caps := reply.(transport.GetCapabilityReply).Caps; caps&transport.CapInit == 0 {
		return fmt.Errorf("CMD_GET_CAPABILITY: capabilities %#x lack CMD_INIT", caps)
	}
	return nil
}

// probe sends the Kind's first command on the data connection by deadline
// and sets Ready to the time from start to its answer.
func (in *Instance) probe(start, deadline time.Time) error {
	if err := in.Data.SetDeadline(deadline); err != nil {
		return err
	}
	if err := in.Kind.Probe(in.Data); err != nil {
		return fmt.Errorf("first command: %w", err)
	}
	in.Ready = time.Since(start)
	return in.Data.SetDeadline(time.Time{})
}

func (in *Instance) tail() string {
	dir := in.Dir
	if in.sup != nil {
		dir = in.sup.Dir
	}
	b, err := os.ReadFile(filepath.Join(dir, "stderr.log"))
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "\n" + string(b)
}

func forget(in *Instance) {
	liveMu.Lock()
	delete(live, in)
	liveMu.Unlock()
}

// Stop ends the process in order: SIGTERM, and SIGKILL if it is still
// there after timeout. The connections are closed first.
func (in *Instance) Stop(timeout time.Duration) error {
	defer forget(in)
	in.closeConns()
	switch {
	case in.sup != nil:
		if _, err := in.sup.api().Stop(in.name); err != nil {
			return fmt.Errorf("vtpmd serve: stop %s: %w", in.name, err)
		}
		return nil
	case in.cmd == nil:
		return nil // an existing TPM is left running
	}
	_ = in.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-in.done:
		in.log.Close()
		return nil
	case <-time.After(timeout):
	}
	in.Kill()
	return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v; killed", in.Kind.Name, in.Pid(), timeout)
}

// Kill ends the process with SIGKILL and waits for it.
func (in *Instance) Kill() {
	defer forget(in)
	in.closeConns()
	if in.sup != nil || in.cmd == nil {
		return // the supervisor is killed on its own; an existing TPM is not ours
	}
	_ = in.cmd.Process.Kill()
	<-in.done
	in.log.Close()
}

func (in *Instance) closeConns() {
	if in.Data != nil {
		in.Data.Close()
	}
	if in.Ctrl != nil {
		in.Ctrl.Close()
	}
}

// Exited reports whether the process has ended.
func (in *Instance) Exited() bool {
	select {
	case <-in.done:
		return true
	default:
		return false
	}
}

// KillAll ends every process started and not yet stopped, and returns how
// many there were.
func KillAll() int {
	liveMu.Lock()
	var all []*Instance
	for in := range live {
		all = append(all, in)
	}
	liveMu.Unlock()
	var wg sync.WaitGroup
	for _, in := range all {
		wg.Add(1)
		go func() { defer wg.Done(); in.Kill() }()
	}
	wg.Wait()
	return len(all)
}

// Live returns the number of processes started and not yet ended.
func Live() int {
	liveMu.Lock()
	defer liveMu.Unlock()
	return len(live)
}

// StopAll stops instances in parallel, each with Stop.
func StopAll(ins []*Instance, timeout time.Duration) error {
	errs := make([]error, len(ins))
	var wg sync.WaitGroup
	for i, in := range ins {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = in.Stop(timeout) }()
	}
	wg.Wait()
	return errors.Join(errs...)
}
