package fleet

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/serve"
)

// Server is one `vtpmd serve` supervisor serving every VM of a Kind: each
// VM is created and started with the admin API, runs in a worker process of
// the supervisor, and has the data socket <run dir>/<name>.data and the
// control socket <run dir>/<name>.ctrl. The workers die with the
// supervisor (PDEATHSIG).
type Server struct {
	// Path is the vtpmd binary; Dir holds the state store, the run
	// directory and the supervisor's stderr.log.
	Path, Dir string
	Env       []string

	mu      sync.Mutex
	in      *Instance // the supervisor, once started
	created map[string]bool
}

// NewServer returns a Server that runs path in dir with env added to the
// environment; the supervisor starts with the first VM.
func NewServer(path, dir string, env []string) *Server {
	return &Server{Path: path, Dir: dir, Env: env, created: map[string]bool{}}
}

// ServeDaemon is the Kind of the VMs served by s.
func ServeDaemon(name string, s *Server) Kind {
	return Kind{Name: name, Env: s.Env, Serve: s, Probe: probeGetRandom}
}

func (s *Server) runDir() string { return filepath.Join(s.Dir, "run") }

func (s *Server) admin() string { return filepath.Join(s.runDir(), "admin.sock") }

// ensure starts the supervisor if it is not running and waits until its
// admin socket takes connections.
func (s *Server) ensure() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.in != nil && !s.in.Exited() {
		return nil
	}
	kind := Kind{Name: "vtpmd serve", Env: s.Env, NoCtrl: true, Argv: func(dir string) []string {
		return []string{s.Path, "serve", "--state-dir", filepath.Join(dir, "state"), "--run-dir", s.runDir(), "--admin", s.admin()}
	}}
	in, start, err := startProcess(kind, s.Dir)
	if err != nil {
		return err
	}
	for {
		// A connection, not the file: the socket is bound before it
		// listens.
		if c, err := net.Dial("unix", s.admin()); err == nil {
			c.Close()
			break
		}
		if in.Exited() {
			return fmt.Errorf("vtpmd serve exited before it served%s", in.tail())
		}
		if time.Since(start) > ReadyTimeout {
			in.Kill()
			return fmt.Errorf("vtpmd serve: no admin socket after %v%s", ReadyTimeout, in.tail())
		}
		time.Sleep(time.Millisecond)
	}
	s.in = in
	s.created = map[string]bool{}
	return nil
}

// api is a client of the supervisor's admin API, as a management tool
// uses it (`vtpmd ctl` is one, whose own process start is not the VM's).
func (s *Server) api() *serve.Client { return serve.NewClient(s.admin()) }

// startVM creates (once) and starts the VM named after dir's last element,
// and connects to it. Ready counts from the admin API's start request.
func (s *Server) startVM(kind Kind, dir string) (*Instance, error) {
	if err := s.ensure(); err != nil {
		return nil, err
	}
	name := filepath.Base(dir)
	s.mu.Lock()
	sup, created := s.in, s.created[name]
	s.mu.Unlock()
	if !created {
		if _, err := s.api().Create(serve.CreateRequest{Name: name, Data: true, StartupClear: true}); err != nil {
			return nil, fmt.Errorf("vtpmd serve: create %s: %w", name, err)
		}
		s.mu.Lock()
		s.created[name] = true
		s.mu.Unlock()
	}
	in := &Instance{Kind: kind, Dir: dir, done: sup.done, sup: s, supProc: sup, name: name,
		dataPath: filepath.Join(s.runDir(), name+".data"), ctrlPath: filepath.Join(s.runDir(), name+".ctrl")}
	liveMu.Lock()
	live[in] = true
	liveMu.Unlock()
	start := time.Now()
	if _, err := s.api().Start(name); err != nil {
		in.Kill()
		return nil, fmt.Errorf("vtpmd serve: start %s: %w", name, err)
	}
	if err := in.connect(start); err != nil {
		in.Kill()
		return nil, fmt.Errorf("%s %s: %w%s", kind.Name, name, err, in.tail())
	}
	return in, nil
}

// pids returns the supervisor and its workers.
func (s *Server) pids() []int {
	s.mu.Lock()
	in := s.in
	s.mu.Unlock()
	if in == nil {
		return nil
	}
	return append([]int{in.Pid()}, children(in.Pid())...)
}

// Memory returns the supervisor's memory and each worker's.
func (s *Server) Memory() (sup Memory, workers []Memory, err error) {
	pids := s.pids()
	if len(pids) == 0 {
		return Memory{}, nil, errors.New("vtpmd serve is not running")
	}
	if sup, err = MemoryOf(pids[0]); err != nil {
		return Memory{}, nil, err
	}
	for _, pid := range pids[1:] {
		m, err := MemoryOf(pid)
		if err != nil {
			return Memory{}, nil, err
		}
		workers = append(workers, m)
	}
	return sup, workers, nil
}

// Stop stops the supervisor, if it runs, as Instance.Stop does.
func (s *Server) Stop(timeout time.Duration) error {
	s.mu.Lock()
	in := s.in
	s.in = nil
	s.mu.Unlock()
	if in == nil || in.Exited() {
		return nil
	}
	return in.Stop(timeout)
}
