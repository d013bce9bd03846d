// Command vtpmbench measures vtpmd and swtpm side by side in the same run:
// N instances of each, one per VM with its own state directory and unix
// control and data sockets, the same TPM operations on both, over one
// persistent data connection per VM as QEMU keeps. It reports throughput,
// latency, CPU per operation, memory per instance and start-up time, their
// vtpmd/swtpm ratios, and the floors: a unix-socket echo server per VM and the
// engine in process. Results go to the terminal and, as markdown, SVG and
// JSON, to the results directory.
//
// With -serve it also measures `vtpmd serve`, one supervisor for every VM:
// its memory per idle VM (the workers' PSS, and the supervisor's share
// apart) and the time from the admin API's start request to the first
// answer, beside swtpm's.
// It also measures the provisioning of a new VM's TPM with libvirt's
// swtpm_setup options, `vtpmd setup` against swtpm_setup (-setup-runs),
// and the time a VM's start spends in the guardian's attestation and key
// release, with one replica and with three on etcd (-guardian-runs).
//
// With -connect it drives TPMs already running, at their unix data
// sockets (any swtpm-protocol endpoint: a swtpm or vtpmd started with
// --server, a `vtpmd serve` VM's data socket), beside or instead of
// (-vtpmd none) the ones it starts; their CPU, memory and start-up are not
// measured.
//
//	vtpmbench -vtpmd bin/vtpmd [-serve] [-swtpm /usr/bin/swtpm] [-vms 1,4,16,64,256] [-ops all] [-duration 3s]
//	vtpmbench -vtpmd none -connect /run/a/data,/run/b/data -vms 1,2 [-swtpm none]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/driver"
	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/keyrelease"
	"github.com/vtpmd/vtpmd/bench/internal/provisioning"
	"github.com/vtpmd/vtpmd/bench/internal/report"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == "echo-server" {
		if err := driver.ServeEcho(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "vtpmbench echo-server:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vtpmbench:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		vtpmd     = flag.String("vtpmd", "bin/vtpmd", "the vtpmd binary to measure (`make build` makes bin/vtpmd); \"none\" to start none (with -connect)")
		connect   = flag.String("connect", "", "comma-separated unix data sockets of TPMs already running (any swtpm-protocol endpoint, started and with an empty owner authorization), one per VM and each free (a data socket serves one client at a time), measured as daemon -connect-name: their CPU, memory and start-up are not measured, and the operations' keys and NV indices are made in them")
		connName  = flag.String("connect-name", "existing", "the name the -connect TPMs have in the report")
		serve     = flag.Bool("serve", false, "also measure vtpmd serve (daemon \"vtpmd-serve\"): every VM a worker of one supervisor with one shared store, created and started through its admin API")
		vtpmdEnv  = flag.String("vtpmd-env", "", "comma-separated `VAR=value` settings added to vtpmd's environment, e.g. GOMAXPROCS=1")
		swtpm     = flag.String("swtpm", "", "the swtpm binary to compare with; default: swtpm on $PATH if installed; \"none\" to skip")
		vms       = flag.String("vms", "1,4,16,64,256", "comma-separated numbers of VMs to run at once")
		ops       = flag.String("ops", "all", "comma-separated operations, or all: "+strings.Join(workload.Names(), ","))
		duration  = flag.Duration("duration", 3*time.Second, "measured time of each (daemon, operation, VMs) cell")
		warmup    = flag.Duration("warmup", 300*time.Millisecond, "unmeasured time before each cell")
		engineD   = flag.Duration("engine-duration", time.Second, "time of each engine-floor operation")
		rounds    = flag.Int("rounds", 1, "runs of each cell, the daemons taking turns; the best is reported (for a machine with other load)")
		starts    = flag.Int("starts", 5, "start-up samples per daemon, for a new and for an existing state")
		setups    = flag.Int("setup-runs", 20, "provisioning runs of vtpmd setup and of swtpm_setup, with libvirt's options; 0 skips them")
		setupBin  = flag.String("swtpm-setup", "/usr/bin/swtpm_setup", "the swtpm_setup to compare vtpmd setup with (it drives -swtpm, or /usr/bin/swtpm); \"none\" to skip")
		guardRuns = flag.Int("guardian-runs", 20, "VM starts with each guardian setup (1 replica, 3 replicas on etcd) and without, timing CMD_INIT; 0 skips them")
		guardBin  = flag.String("guardian", "", "the vtpmd-guardian binary (default: vtpmd-guardian beside -vtpmd)")
		etcdBin   = flag.String("etcd", "/usr/bin/etcd", "the etcd of the 3-replica guardian setup (Debian's etcd-server); the setup is skipped without it")
		out       = flag.String("out", "results", "directory for results.md, results.svg and results.json")
		stateDir  = flag.String("statedir", "", "where to make the state directories (default: the system's temporary directory)")
		keep      = flag.Bool("keep", false, "keep the state directories")
		echo      = flag.Bool("echo", true, "measure the echo floor")
		engine    = flag.Bool("engine", true, "measure the engine floor in process")
		quiet     = flag.Bool("quiet", false, "no progress line on stderr")
		from      = flag.String("from", "", "run nothing: render the results.json of an earlier run again into -out")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if *from != "" {
		return rerender(*from, *out)
	}

	cfg := driver.Config{
		Duration: *duration, Warmup: *warmup, EngineDuration: *engineD, Starts: *starts, Rounds: *rounds,
		StateDir: *stateDir, Keep: *keep, Engine: *engine,
	}
	var err error
	if cfg.VMs, err = parseInts(*vms); err != nil {
		return fmt.Errorf("-vms: %w", err)
	}
	if cfg.Ops, err = workload.Select(*ops); err != nil {
		return fmt.Errorf("-ops: %w", err)
	}
	var endpoints, env []string
	if *connect != "" {
		endpoints = strings.Split(*connect, ",")
	}
	if *vtpmdEnv != "" {
		env = strings.Split(*vtpmdEnv, ",")
	}
	path := ""
	if *vtpmd != "none" {
		if path, err = filepath.Abs(*vtpmd); err == nil {
			_, err = os.Stat(path)
		}
		if err != nil {
			return fmt.Errorf("-vtpmd: %w (build it with `make build`)", err)
		}
		cfg.Daemons = append(cfg.Daemons, driver.Daemon{Name: "vtpmd", Path: path, Env: env})
	} else {
		if *serve {
			return errors.New("-serve needs -vtpmd")
		}
		*setups, *guardRuns = 0, 0 // both run vtpmd
	}
	if endpoints != nil {
		cfg.Daemons = append(cfg.Daemons, driver.Daemon{Name: *connName, Endpoints: endpoints})
	}
	switch *swtpm {
	case "none":
	case "":
		if p, err := exec.LookPath("swtpm"); err == nil {
			cfg.Daemons = append(cfg.Daemons, driver.Daemon{Name: "swtpm", Path: p})
		} else {
			fmt.Fprintln(os.Stderr, "vtpmbench: swtpm is not installed; measuring without it")
		}
	default:
		cfg.Daemons = append(cfg.Daemons, driver.Daemon{Name: "swtpm", Path: *swtpm})
	}
	if len(cfg.Daemons) == 0 {
		return errors.New("nothing to measure: -vtpmd none needs -connect or swtpm")
	}
	if *serve {
		cfg.Daemons = append(cfg.Daemons, driver.Daemon{Name: "vtpmd-serve", Path: path, Env: env, Serve: true})
	}
	if *echo {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		cfg.EchoArgv = []string{exe, "echo-server"}
	}
	prog := newProgress(os.Stderr, *quiet)
	cfg.Progress = prog.show

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		prog.done()
		fmt.Fprintf(os.Stderr, "vtpmbench: %v: stopping the daemons (again to kill them at once)\n", s)
		cancel()
		<-sigs
		fleet.KillAll()
		os.Exit(130)
	}()

	tree := sourceTree()
	rep, runErr := driver.Run(ctx, cfg)
	prog.done()
	if rep == nil {
		return runErr
	}
	rep.Machine.Tree = tree
	if runErr == nil && *setups > 0 {
		rep.Provisioning, runErr = measureProvisioning(ctx, path, *setupBin, *swtpm, *stateDir, *setups, prog)
	}
	if runErr == nil && *guardRuns > 0 {
		rep.KeyRelease, runErr = measureKeyRelease(ctx, path, *guardBin, *etcdBin, *stateDir, *guardRuns, prog)
	}
	if runErr != nil {
		rep.Notes = append(rep.Notes, "the run did not finish: "+runErr.Error())
	}
	if err := rep.Text(os.Stdout); err != nil {
		return err
	}
	if err := write(*out, rep); err != nil {
		return errors.Join(runErr, err)
	}
	fmt.Fprintf(os.Stderr, "vtpmbench: wrote %s\n", filepath.Join(*out, "results.{md,svg,json}"))
	return runErr
}

// measureProvisioning compares vtpmd setup with swtpm_setup (driving the
// real swtpm, not a vtpmd installed as swtpm on PATH).
func measureProvisioning(ctx context.Context, vtpmd, swtpmSetup, swtpm, dir string, runs int, prog *progress) (*report.Provisioning, error) {
	cfg := provisioning.Config{Vtpmd: vtpmd, Swtpm: "/usr/bin/swtpm", LocalCA: "/usr/bin/swtpm_localca", Runs: runs, Dir: dir, Progress: prog.show}
	if swtpm != "" && swtpm != "none" {
		cfg.Swtpm = swtpm
	}
	if _, err := os.Stat(swtpmSetup); err == nil {
		cfg.SwtpmSetup = swtpmSetup
	} else if swtpmSetup != "none" {
		fmt.Fprintf(os.Stderr, "vtpmbench: %s is not installed; measuring vtpmd setup alone\n", swtpmSetup)
	}
	p, err := provisioning.Run(ctx, cfg)
	prog.done()
	if err != nil {
		return nil, fmt.Errorf("provisioning: %w", err)
	}
	return p, nil
}

// measureKeyRelease measures the guardian's share of a VM's start.
func measureKeyRelease(ctx context.Context, vtpmd, guardian, etcd, dir string, runs int, prog *progress) (*report.KeyRelease, error) {
	if guardian == "" {
		guardian = filepath.Join(filepath.Dir(vtpmd), "vtpmd-guardian")
	}
	if _, err := os.Stat(guardian); err != nil {
		return nil, fmt.Errorf("-guardian: %w (`make build` makes bin/vtpmd-guardian; -guardian-runs 0 skips the guardian)", err)
	}
	if _, err := os.Stat(etcd); err != nil {
		fmt.Fprintf(os.Stderr, "vtpmbench: %s is not installed (package etcd-server); measuring the guardian without the 3-replica setup\n", etcd)
	}
	k, err := keyrelease.Run(ctx, keyrelease.Config{Vtpmd: vtpmd, Guardian: guardian, Etcd: etcd, Runs: runs, Dir: dir, Progress: prog.show})
	prog.done()
	if err != nil {
		return nil, fmt.Errorf("guardian: %w", err)
	}
	return k, nil
}

// rerender writes the report of an earlier run's JSON again.
func rerender(path, out string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var rep report.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := rep.Text(os.Stdout); err != nil {
		return err
	}
	return write(out, &rep)
}

// write puts the markdown, SVG and JSON results into dir.
func write(dir string, rep *report.Report) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md, svg, js bytes.Buffer
	if err := errors.Join(rep.Markdown(&md, "results.svg"), rep.SVG(&svg), rep.JSON(&js)); err != nil {
		return err
	}
	for name, b := range map[string][]byte{"results.md": md.Bytes(), "results.svg": svg.Bytes(), "results.json": js.Bytes()} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// sourceTree names the commit of the git tree in the working directory,
// with "+dirty" when it has uncommitted changes; "" outside a git tree.
func sourceTree() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return ""
	}
	tree := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		tree += "+dirty"
	}
	return tree
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// progress shows one status line on stderr: rewritten in place on a
// terminal, at most one line a second otherwise.
type progress struct {
	mu    sync.Mutex
	w     *os.File
	tty   bool
	quiet bool
	start time.Time
	last  time.Time
	shown bool
}

func newProgress(w *os.File, quiet bool) *progress {
	fi, err := w.Stat()
	tty := err == nil && fi.Mode()&os.ModeCharDevice != 0
	return &progress{w: w, tty: tty, quiet: quiet, start: time.Now()}
}

func (p *progress) show(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.quiet {
		return
	}
	now := time.Now()
	line := fmt.Sprintf("[%5.0fs] %s", now.Sub(p.start).Seconds(), msg)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
		p.shown = true
		return
	}
	if now.Sub(p.last) >= time.Second {
		fmt.Fprintln(p.w, line)
		p.last = now
	}
}

// done ends the status line.
func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
		p.shown = false
	}
}
