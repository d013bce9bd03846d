package serve

import (
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vtpmd/vtpmd/internal/metrics"
	"github.com/vtpmd/vtpmd/internal/workerproto"
)

// statsTimeout bounds a worker's answer to a scrape: a worker that is slow
// to answer (busy storing its state) is left out of that scrape.
const statsTimeout = 2 * time.Second

var (
	descCommand = prometheus.NewDesc("vtpmd_tpm_command_duration_seconds",
		"TPM commands the VM's worker executed, by command name (\"other\" for a code that is no TPM 2.0 command), and how long the engine took; reset when the worker restarts.",
		[]string{"vm", "command"}, nil)
	descDirect = prometheus.NewDesc("vtpmd_tpm_direct_commands_total",
		"Of the VM's TPM commands, those its worker ran in the direct data loop, in C (the others went through Go: a connection's first command, the control channel's, odd input); reset when the worker restarts.",
		[]string{"vm"}, nil)
	descUp = prometheus.NewDesc("vtpmd_worker_up",
		"1 while the VM's worker serves, 0 while it starts, restarts or stops; only VMs that are to run.",
		[]string{"vm"}, nil)
	descRestarts = prometheus.NewDesc("vtpmd_worker_restarts_total",
		"Workers of the VM that ended and were replaced since the VM was started: crashes, kills, and the fresh worker after QEMU's CMD_SHUTDOWN.",
		[]string{"vm"}, nil)
	descGuardian = prometheus.NewDesc("vtpmd_guardian_calls_total",
		"Calls of the VM's worker to the guardian, by op (nonce, attest, release, keys) and result (ok, the refusal code, or unreachable); reset when the worker restarts.",
		[]string{"vm", "op", "result"}, nil)
	descSyncs = prometheus.NewDesc("vtpmd_state_wal_syncs_total",
		"Syncs of the state store's write-ahead log: concurrent state commits share one, so commits per sync is the group commit's batch size.",
		nil, nil)
	descSpares = prometheus.NewDesc("vtpmd_spare_workers",
		"Workers started ahead of need, with no VM, ready for the next VM's start (--spare-workers).",
		nil, nil)
)

// commitBuckets are the bounds of the state commit latency histogram, in
// seconds: an fsync's.
var commitBuckets = []float64{100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5}

// newRegistry is the supervisor's metrics: its process's, the state
// commits', and every running VM's, asked from the workers when scraped.
func (s *Supervisor) newRegistry() *prometheus.Registry {
	s.commits = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "vtpmd_state_commit_duration_seconds",
		Help:    "Time to store one VM's sealed state record durably (the synced write, shared with concurrent commits, and the generation witness); the TPM response waits for it.",
		Buckets: commitBuckets,
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		s.commits, vmCollector{s})
	return reg
}

// MetricsHandler serves the Prometheus metrics.
func (s *Supervisor) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{ErrorLog: slogPrinter{s}})
}

// slogPrinter logs promhttp's errors.
type slogPrinter struct{ s *Supervisor }

func (p slogPrinter) Println(v ...any) { p.s.log.Warn("metrics", "err", v) }

// vmCollector collects the VMs' metrics at scrape time.
type vmCollector struct{ s *Supervisor }

func (vmCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCommand, descDirect, descUp, descRestarts, descGuardian, descSyncs, descSpares} {
		ch <- d
	}
}

func (c vmCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	ch <- prometheus.MustNewConstMetric(descSyncs, prometheus.CounterValue, float64(s.store.WALSyncs()))
	ch <- prometheus.MustNewConstMetric(descSpares, prometheus.GaugeValue, float64(s.spares.ready()))
	s.mu.Lock()
	runs := make([]*vmRun, 0, len(s.runs))
	for _, r := range s.runs {
		runs = append(runs, r)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.collect(ch)
		}()
	}
	wg.Wait()
}

// collect sends the VM's metrics.
func (r *vmRun) collect(ch chan<- prometheus.Metric) {
	name := r.vm.Name
	r.mu.Lock()
	up, restarts := 0.0, r.restarts
	if r.phase == "running" {
		up = 1
	}
	r.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, name)
	ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(restarts), name)
	st, ok := r.stats()
	if !ok {
		return
	}
	for _, cs := range st.Commands {
		buckets, err := metrics.Cumulative(cs)
		if err != nil {
			r.log.Warn("the worker's command counts do not add up; left out", "err", err)
			continue
		}
		ch <- prometheus.MustNewConstHistogram(descCommand, cs.Count, time.Duration(cs.Nanos).Seconds(), buckets, name, metrics.CommandName(cs.Code))
	}
	ch <- prometheus.MustNewConstMetric(descDirect, prometheus.CounterValue, float64(st.Direct), name)
	seen := map[workerproto.GuardianCalls]bool{}
	for _, g := range st.Guardian {
		key := workerproto.GuardianCalls{Op: g.Op, Result: g.Result}
		if !metrics.ValidGuardianCall(g.Op, g.Result) || seen[key] {
			r.log.Warn("the worker reported guardian calls of unknown labels, or twice; left out", "op", g.Op, "result", g.Result)
			continue
		}
		seen[key] = true
		ch <- prometheus.MustNewConstMetric(descGuardian, prometheus.CounterValue, float64(g.Count), name, g.Op, g.Result)
	}
}

// stats asks the running worker for its command counts; false if it has
// none to give (not running, or no answer within statsTimeout).
func (r *vmRun) stats() (workerproto.Stats, bool) {
	r.statsMu.Lock()
	defer r.statsMu.Unlock()
	r.mu.Lock()
	conn := r.conn
	r.mu.Unlock()
	if conn == nil {
		return workerproto.Stats{}, false
	}
	select {
	case <-r.statsCh: // a late answer to an earlier scrape
	default:
	}
	if err := r.write(conn, workerproto.StatsRequest{}); err != nil {
		return workerproto.Stats{}, false
	}
	select {
	case st := <-r.statsCh:
		return st, true
	case <-time.After(statsTimeout):
		r.log.Warn("the worker did not report its command counts in time; left out of this scrape", "timeout", statsTimeout)
		return workerproto.Stats{}, false
	}
}
