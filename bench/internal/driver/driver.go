// Package driver runs the benchmark: it starts N instances of each daemon,
// one persistent data connection per VM, runs the same operations on all of
// them for each number of VMs, and measures throughput, latency, CPU,
// memory and start-up time, next to the floors: a unix-socket echo server and
// the engine in process.
package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/report"
	"github.com/vtpmd/vtpmd/bench/internal/workload"
)

// Daemon is a swtpm-compatible daemon to measure.
type Daemon struct {
	Name string
	Path string
	// Env is added to its environment, e.g. GOMAXPROCS=1.
	Env []string
	// Serve runs every VM under one `vtpmd serve` supervisor, created and
	// started through its admin API, instead of one `Path socket` per VM.
	Serve bool
	// Endpoints, when set, are the unix data sockets of TPMs already
	// running, one per VM (as many as the most VMs measured): they are
	// connected to, not started, and Path is unused.
	Endpoints []string
}

// Config configures a run.
type Config struct {
	// Daemons are measured in the same run, the one under test first.
	Daemons []Daemon
	// EchoArgv runs the echo server (ServeEcho) when the socket path is
	// appended; nil skips the echo floor.
	EchoArgv []string
	// Engine runs the in-process engine floor.
	Engine bool
	// VMs are the numbers of VMs to run at once.
	VMs []int
	Ops []workload.Op
	// Duration is the measured time of each cell, after Warmup.
	Duration time.Duration
	Warmup   time.Duration
	// EngineDuration is the time of each engine-floor operation;
	// 0 means Duration.
	EngineDuration time.Duration
	// Rounds is the number of times each cell runs, the daemons taking
	// turns; the best round (by throughput) is reported. 0 means 1.
	Rounds int
	// Starts is the number of start-up samples per daemon and state.
	Starts int
	// StateDir is where state directories are made; "" is the system's
	// temporary directory. They are removed at the end unless Keep.
	StateDir string
	Keep     bool
	// Progress receives one-line status updates.
	Progress func(string)
}

func (c *Config) progress(format string, args ...any) {
	if c.Progress != nil {
		c.Progress(fmt.Sprintf(format, args...))
	}
}

// vm is one VM's TPM: its daemon process and its set-up state.
type vm struct {
	in  *fleet.Instance
	tpm *workload.TPM
}

// run is the state of one Run.
type run struct {
	cfg   Config
	base  string
	kinds []fleet.Kind
	// servers are the supervisors of the Serve daemons.
	servers []*fleet.Server
	fleets  map[string][]*vm
	echo    []*fleet.Instance
	rep     *report.Report
}

// Run runs the benchmark. Every process it starts is ended before it
// returns; on ctx's end it stops early and returns what was measured with
// ctx's error.
func Run(ctx context.Context, cfg Config) (*report.Report, error) {
	if len(cfg.Daemons) == 0 || len(cfg.VMs) == 0 || len(cfg.Ops) == 0 {
		return nil, errors.New("nothing to run: need daemons, VM counts and operations")
	}
	if cfg.Starts <= 0 {
		cfg.Starts = 1
	}
	if cfg.Rounds <= 0 {
		cfg.Rounds = 1
	}
	if cfg.EngineDuration == 0 {
		cfg.EngineDuration = cfg.Duration
	}
	cfg.VMs = slices.Clone(cfg.VMs)
	slices.Sort(cfg.VMs)
	for _, d := range cfg.Daemons {
		if most := cfg.VMs[len(cfg.VMs)-1]; d.Endpoints != nil && len(d.Endpoints) < most {
			return nil, fmt.Errorf("%s: %d endpoints for up to %d VMs", d.Name, len(d.Endpoints), most)
		}
	}
	base, err := os.MkdirTemp(cfg.StateDir, "vtpmbench-")
	if err != nil {
		return nil, err
	}
	r := &run{cfg: cfg, base: base, fleets: map[string][]*vm{}}
	r.rep = &report.Report{
		Started: time.Now(),
		Settings: report.Settings{
			VMs: cfg.VMs, Duration: cfg.Duration, Warmup: cfg.Warmup, Starts: cfg.Starts, Rounds: cfg.Rounds,
		},
		Machine: machine(base, cfg.Daemons),
	}
	for _, op := range cfg.Ops {
		r.rep.Ops = append(r.rep.Ops, report.Op{Name: op.Name, Title: op.Title})
	}
	for _, d := range cfg.Daemons {
		// vtpmd seals state under a host key, kept in the run's directory
		// rather than the system's; swtpm ignores the variable.
		env := append([]string{"VTPMD_HOST_KEY=" + filepath.Join(base, "host.key")}, d.Env...)
		switch {
		case d.Endpoints != nil:
			r.kinds = append(r.kinds, fleet.Existing(d.Name, d.Endpoints))
		case d.Serve:
			srv := fleet.NewServer(d.Path, filepath.Join(base, d.Name), env)
			r.servers = append(r.servers, srv)
			r.kinds = append(r.kinds, fleet.ServeDaemon(d.Name, srv))
		default:
			r.kinds = append(r.kinds, fleet.Daemon(d.Name, d.Path, env))
		}
		r.rep.Daemons = append(r.rep.Daemons, d.Name)
	}
	defer func() {
		fleet.KillAll()
		if !cfg.Keep {
			os.RemoveAll(base)
		}
		r.rep.Elapsed = time.Since(r.rep.Started)
		r.rep.Machine.LoadAfter = loadAverage()
	}()
	err = r.all(ctx)
	if err == nil {
		err = r.stopAll()
	}
	return r.rep, err
}

func (r *run) all(ctx context.Context) error {
	if r.cfg.Engine {
		for _, store := range []string{storeMemory, storeSync, storeFile, storeVtpmd} {
			cells, err := engineFloor(ctx, r.cfg.Ops, store, filepath.Join(r.base, "engine-"+store), r.cfg.EngineDuration, r.cfg.Progress)
			r.rep.Engine = append(r.rep.Engine, cells...)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				r.rep.Notes = append(r.rep.Notes, fmt.Sprintf("engine floor (%s store) skipped: %v", store, err))
				break
			}
		}
	}
	if err := r.startups(ctx); err != nil {
		return err
	}
	for _, n := range r.cfg.VMs {
		if err := r.level(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// startups measures the time to the first answer: Starts processes on new
// state directories, then Starts on the last of them, which has state.
func (r *run) startups(ctx context.Context) error {
	last := map[string]string{}
	samples := map[string][]time.Duration{}
	for _, state := range []string{"new", "existing"} {
		for i := range r.cfg.Starts {
			for _, k := range r.kinds {
				if k.Endpoints != nil {
					continue // not ours to start
				}
				if err := ctx.Err(); err != nil {
					return err
				}
				r.cfg.progress("start-up, %s state: %s %d/%d", state, k.Name, i+1, r.cfg.Starts)
				dir := last[k.Name]
				if state == "new" {
					dir = filepath.Join(r.base, fmt.Sprintf("start-%s-%d", k.Name, i))
					last[k.Name] = dir
				}
				in, err := fleet.Start(k, dir)
				if err != nil {
					return fmt.Errorf("start-up: %w", err)
				}
				samples[k.Name+state] = append(samples[k.Name+state], in.Ready)
				if err := in.Stop(10 * time.Second); err != nil {
					return err
				}
			}
		}
		for _, k := range r.kinds {
			s := samples[k.Name+state]
			if len(s) == 0 {
				continue
			}
			sorted := slices.Clone(s)
			slices.Sort(sorted)
			r.rep.Startup = append(r.rep.Startup, report.Startup{
				Daemon: k.Name, State: state, Samples: s, Median: sorted[len(sorted)/2],
			})
		}
	}
	return nil
}

// parallel runs f(i) for i in [0, n) on a few goroutines and returns the
// first error.
func parallel(n int, f func(i int) error) error {
	errs := make([]error, n)
	sem := make(chan struct{}, 2*runtime.NumCPU())
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// grow starts instances of kind until there are n, and sets them up.
func (r *run) grow(ctx context.Context, k fleet.Kind, n int) error {
	have := len(r.fleets[k.Name])
	if have >= n {
		return nil
	}
	added := make([]*vm, n-have)
	var done sync.Mutex
	count := 0
	err := parallel(n-have, func(i int) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		var in *fleet.Instance
		var err error
		if k.Endpoints != nil {
			in, err = fleet.Connect(k, have+i)
		} else {
			in, err = fleet.Start(k, filepath.Join(r.base, fmt.Sprintf("%s-%03d", k.Name, have+i)))
		}
		if err != nil {
			return err
		}
		added[i] = &vm{in: in}
		tpm, err := workload.Setup(in.Data, r.cfg.Ops)
		if err != nil {
			return fmt.Errorf("%s %d: set up: %w", k.Name, have+i, err)
		}
		added[i].tpm = tpm
		done.Lock()
		count++
		r.cfg.progress("%d VMs: starting %s and creating keys %d/%d", n, k.Name, count, n-have)
		done.Unlock()
		return nil
	})
	if err != nil {
		return err
	}
	r.fleets[k.Name] = append(r.fleets[k.Name], added...)
	return nil
}

// level measures everything at n VMs.
func (r *run) level(ctx context.Context, n int) error {
	for _, k := range r.kinds {
		if err := r.grow(ctx, k, n); err != nil {
			return err
		}
		switch {
		case k.Endpoints != nil:
			continue // their processes are not known
		case k.Serve != nil:
			if err := r.serveMemory(k, n); err != nil {
				return err
			}
			continue
		}
		if err := r.memory(k.Name, n); err != nil {
			return err
		}
	}
	if r.cfg.EchoArgv != nil {
		if err := r.echoCell(ctx, n); err != nil {
			return err
		}
	}
	for i, op := range r.cfg.Ops {
		best := map[string]report.Cell{}
		for round := range r.cfg.Rounds {
			kinds := slices.Clone(r.kinds)
			if (i+round)%2 == 1 {
				// Alternate which daemon goes first, so drift during the
				// run does not always favour the same one.
				slices.Reverse(kinds)
			}
			for _, k := range kinds {
				cell, err := r.opCell(ctx, k.Name, op, n)
				if err != nil {
					return err
				}
				if b, ok := best[k.Name]; !ok || better(cell, b) {
					best[k.Name] = cell
				}
			}
		}
		for _, k := range r.kinds {
			r.rep.Cells = append(r.rep.Cells, best[k.Name])
		}
	}
	return nil
}

func (r *run) memory(daemon string, n int) error {
	var rss, pss []int64
	for _, v := range r.fleets[daemon][:n] {
		m, err := fleet.MemoryOf(v.in.Pid())
		if err != nil {
			return err
		}
		rss, pss = append(rss, m.RSS), append(pss, m.PSS)
	}
	slices.Sort(rss)
	slices.Sort(pss)
	r.rep.Memory = append(r.rep.Memory, report.Memory{Daemon: daemon, VMs: n, RSSKiB: rss[n/2], PSSKiB: pss[n/2]})
	return nil
}

// serveMemory measures the n idle VMs of a vtpmd serve: the median
// worker's RSS, the workers' PSS summed and divided by the VMs, and the
// supervisor's PSS divided by the VMs. The workers include the supervisor's
// spare ones (started ahead, with no VM): they are part of serve's cost.
func (r *run) serveMemory(k fleet.Kind, n int) error {
	sup, workers, err := k.Serve.Memory()
	if err != nil {
		return err
	}
	if len(workers) < n {
		return fmt.Errorf("%s: %d workers for %d VMs", k.Name, len(workers), n)
	}
	var rss []int64
	var pss int64
	for _, m := range workers {
		rss = append(rss, m.RSS)
		pss += m.PSS
	}
	slices.Sort(rss)
	r.rep.Memory = append(r.rep.Memory, report.Memory{Daemon: k.Name, VMs: n, RSSKiB: rss[len(rss)/2], PSSKiB: pss / int64(n),
		SupervisorPSSKiB: sup.PSS / int64(n)})
	return nil
}

// opCell runs op on the first n VMs of daemon.
func (r *run) opCell(ctx context.Context, daemon string, op workload.Op, n int) (report.Cell, error) {
	vms := r.fleets[daemon][:n]
	phases := make([]*workload.Phase, n)
	defer func() {
		_ = parallel(n, func(i int) error {
			if phases[i] != nil {
				return phases[i].Close(vms[i].in.Data)
			}
			return nil
		})
	}()
	r.cfg.progress("%d VMs: %s %s: preparing", n, daemon, op.Name)
	err := parallel(n, func(i int) (err error) {
		phases[i], err = vms[i].tpm.Prepare(vms[i].in.Data, op)
		return err
	})
	if err != nil {
		return report.Cell{}, fmt.Errorf("%s: %w", daemon, err)
	}
	rts := make([]workload.RoundTripper, n)
	runners := make([]workload.Runner, n)
	ins := make([]*fleet.Instance, n)
	for i, v := range vms {
		rts[i], runners[i], ins[i] = v.in.Data, phases[i], v.in
	}
	r.cfg.progress("%d VMs: %s %s", n, daemon, op.Name)
	cell, err := r.cell(ctx, daemon, op.Name, rts, runners, ins)
	if err != nil {
		return cell, err
	}
	if cell.Errors > 0 {
		r.cfg.progress("%d VMs: %s %s: %d errors, first: %s", n, daemon, op.Name, cell.Errors, cell.FirstError)
	}
	return cell, nil
}

// echoCell measures the echo floor at n VMs: one echo process per VM, as
// the daemons run, so that it carries the same per-process costs.
func (r *run) echoCell(ctx context.Context, n int) error {
	kind := echoKind(r.cfg.EchoArgv)
	have := len(r.echo)
	added := make([]*fleet.Instance, n-have)
	err := parallel(n-have, func(i int) (err error) {
		added[i], err = fleet.Start(kind, filepath.Join(r.base, fmt.Sprintf("echo-%03d", have+i)))
		return err
	})
	for _, in := range added {
		if in != nil {
			r.echo = append(r.echo, in)
		}
	}
	if err != nil {
		return err
	}
	runner, err := workload.EchoOp()
	if err != nil {
		return err
	}
	rts := make([]workload.RoundTripper, n)
	runners := make([]workload.Runner, n)
	for i := range n {
		rts[i], runners[i] = r.echo[i].Data, runner
	}
	var best report.Cell
	for round := range r.cfg.Rounds {
		r.cfg.progress("%d VMs: echo floor", n)
		cell, err := r.cell(ctx, report.Echo, "echo", rts, runners, r.echo[:n])
		if err != nil {
			return err
		}
		if round == 0 || better(cell, best) {
			best = cell
		}
	}
	r.rep.Cells = append(r.rep.Cells, best)
	return nil
}

// better reports whether round a is to be kept rather than round b: fewer
// errors, then more throughput. Other load on the machine only slows a round
// down, so the best of a few is the closest to what the daemon can do.
func better(a, b report.Cell) bool {
	if (a.Errors == 0) != (b.Errors == 0) {
		return a.Errors == 0
	}
	return a.OpsPerSec > b.OpsPerSec
}

// cell runs runners[i] on rts[i], each on its own goroutine, for the warm-up
// and then the measured window, and measures the CPU time of the procs in
// that window. The window lasts Duration, and longer if need be until every
// VM has completed an operation in it, so that a slow operation (or a stall
// of the disk) cannot leave a cell without a sample.
func (r *run) cell(ctx context.Context, daemon, op string, rts []workload.RoundTripper, runners []workload.Runner, procs []*fleet.Instance) (report.Cell, error) {
	n := len(rts)
	start := time.Now()
	from := start.Add(r.cfg.Warmup)
	end := from.Add(r.cfg.Duration)
	type result struct {
		lat  []time.Duration
		errs int64
		err  error
	}
	results := make([]result, n)
	var closed atomic.Bool // the window has ended
	var waiting atomic.Int64
	waiting.Store(int64(n))
	sampled := make(chan struct{}) // every VM has a sample or has failed
	done := func() {
		if waiting.Add(-1) == 0 {
			close(sampled)
		}
	}
	var wg sync.WaitGroup
	for i := range n {
		if d, ok := rts[i].(interface{ SetDeadline(time.Time) error }); ok {
			// A daemon that stops answering fails the cell instead of
			// hanging the run.
			_ = d.SetDeadline(end.Add(2 * time.Minute))
			defer d.SetDeadline(time.Time{})
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := &results[i]
			counted := false
			defer func() {
				if !counted {
					done()
				}
			}()
			for t0 := time.Now(); !closed.Load() && ctx.Err() == nil; {
				err := runners[i].Run(rts[i])
				t1 := time.Now()
				if err != nil {
					res.errs++
					res.err = err
					return
				}
				if closed.Load() {
					return
				}
				if t1.After(from) {
					res.lat = append(res.lat, t1.Sub(t0))
					if !counted {
						counted = true
						done()
					}
				}
				t0 = t1
			}
		}()
	}
	var cpu0, cpu1, self0, self1 time.Duration
	var cs0, cs1 int64
	var cpuErr error
	sample := func(daemons, self *time.Duration, cs *int64) {
		var err error
		if *daemons, err = fleet.TotalCPU(procs); err != nil && cpuErr == nil {
			cpuErr = err
		}
		if *self, err = fleet.CPUTime(os.Getpid()); err != nil && cpuErr == nil {
			cpuErr = err
		}
		if *cs, err = fleet.TotalContextSwitches(procs); err != nil && cpuErr == nil {
			cpuErr = err
		}
	}
	sleepUntil(ctx, from)
	sample(&cpu0, &self0, &cs0)
	sleepUntil(ctx, end)
	select {
	case <-sampled:
	case <-ctx.Done():
	}
	closed.Store(true)
	window := time.Since(from)
	sample(&cpu1, &self1, &cs1)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return report.Cell{}, err
	}
	cell := report.Cell{Daemon: daemon, Op: op, VMs: n, Seconds: window.Seconds()}
	var all []time.Duration
	for _, res := range results {
		all = append(all, res.lat...)
		cell.Errors += res.errs
		if res.err != nil && cell.FirstError == "" {
			cell.FirstError = res.err.Error()
		}
	}
	if cpuErr != nil {
		return cell, fmt.Errorf("%s %s: CPU time: %w", daemon, op, cpuErr)
	}
	slices.Sort(all)
	cell.Ops = int64(len(all))
	if cell.Ops > 0 {
		cell.OpsPerSec = float64(cell.Ops) / cell.Seconds
		cell.P50 = all[len(all)/2]
		cell.P99 = all[min(len(all)-1, len(all)*99/100)]
		cell.Max = all[len(all)-1]
		cell.CPUPer1000 = (cpu1 - cpu0).Seconds() * 1000 / float64(cell.Ops)
		cell.DriverCPUPer1000 = (self1 - self0).Seconds() * 1000 / float64(cell.Ops)
		cell.SwitchesPerOp = float64(cs1-cs0) / float64(cell.Ops)
	}
	for _, p := range procs {
		if p.Exited() {
			return cell, fmt.Errorf("%s %s: %s in %s exited during the run", daemon, op, p.Kind.Name, p.Dir)
		}
	}
	return cell, nil
}

func sleepUntil(ctx context.Context, t time.Time) {
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(t)):
	}
}

// stopAll stops every instance in order, so that a daemon that ignores
// SIGTERM is reported.
func (r *run) stopAll() error {
	var all []*fleet.Instance
	for _, vms := range r.fleets {
		for _, v := range vms {
			all = append(all, v.in)
		}
	}
	all = append(all, r.echo...)
	r.cfg.progress("stopping %d processes", len(all))
	err := fleet.StopAll(all, 10*time.Second)
	for _, s := range r.servers {
		err = errors.Join(err, s.Stop(10*time.Second))
	}
	return err
}

// machine describes this machine and the daemons' versions.
func machine(stateDir string, daemons []Daemon) report.Machine {
	m := report.Machine{NProc: runtime.NumCPU(), GoVersion: runtime.Version(), Versions: map[string]string{}}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.StateFS = fsType(stateDir)
	m.LoadBefore = loadAverage()
	for _, d := range daemons {
		if d.Endpoints != nil {
			m.Versions[d.Name] = fmt.Sprintf("TPMs already running at %d data sockets (%s, ...)", len(d.Endpoints), d.Endpoints[0])
			continue
		}
		out, err := exec.Command(d.Path, "--version").CombinedOutput()
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		if err != nil {
			line = fmt.Sprintf("(--version failed: %v)", err)
		}
		m.Versions[d.Name] = line
	}
	return m
}

// loadAverage returns the 1, 5 and 15 minute load averages: other work on
// the machine during the run shows there.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
