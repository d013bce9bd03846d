package guardiantest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

// The rest of this package runs real processes: Debian's etcd, the
// vtpmd-guardian binary, and a vtpmd instance as a host's TPM. Its functions
// return errors rather than take a testing.TB, so that the benchmark uses
// them too; every process dies with its parent (PR_SET_PDEATHSIG).

// EtcdBinary is where Debian's etcd-server package installs etcd.
const EtcdBinary = "/usr/bin/etcd"

// readyTimeout bounds the wait for a started process to serve.
const readyTimeout = time.Minute

// process is one child process, its output appended to a log file.
type process struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProcess(log string, env []string, argv ...string) (*process, error) {
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := &process{cmd: exec.Command(argv[0], argv[1:]...), log: log, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.Env = env
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill ends the process at once, as a crash or a power cut would.
func (p *process) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// stop asks the process to end (SIGTERM), and kills it after 10 s.
func (p *process) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

// tail is the end of the process's log, for error messages.
func (p *process) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// waitFor polls ready until it succeeds, the process exits, or the
// timeout passes.
func (p *process) waitFor(what string, ready func() error) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited before it served (%v):\n%s", what, p.cmd.ProcessState, p.tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not serve after %v: %w\n%s", what, readyTimeout, err, p.tail())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// freeAddrs returns n loopback addresses (127.0.0.1:port) that were free a
// moment ago.
func freeAddrs(n int) ([]string, error) {
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

// Etcd is a cluster of etcd processes on loopback ports.
type Etcd struct {
	// Endpoints are the members' client URLs.
	Endpoints []string
	members   []*process
}

// StartEtcd starts a cluster of n members of binary (EtcdBinary), with
// their data and logs in dir, and waits until every member is healthy.
func StartEtcd(binary, dir string, n int) (*Etcd, error) {
	addrs, err := freeAddrs(2 * n)
	if err != nil {
		return nil, err
	}
	var cluster []string
	for i := range n {
		cluster = append(cluster, fmt.Sprintf("m%d=http://%s", i+1, addrs[2*i]))
	}
	e := &Etcd{}
	for i := range n {
		name, peer, client := fmt.Sprintf("m%d", i+1), "http://"+addrs[2*i], "http://"+addrs[2*i+1]
		p, err := startProcess(filepath.Join(dir, "etcd-"+name+".log"), nil, binary,
			"--name", name, "--data-dir", filepath.Join(dir, "etcd-"+name),
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--initial-cluster", strings.Join(cluster, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "vtpmd-guardiantest")
		if err != nil {
			e.Stop()
			return nil, err
		}
		e.members = append(e.members, p)
		e.Endpoints = append(e.Endpoints, client)
	}
	for i, p := range e.members {
		if err := p.waitFor("etcd member "+e.Endpoints[i], func() error { return etcdHealthy(e.Endpoints[i]) }); err != nil {
			e.Stop()
			return nil, err
		}
	}
	return e, nil
}

// etcdHealthy asks a member's /health, which is true once the cluster has
// a leader.
func etcdHealthy(endpoint string) error {
	c := http.Client{Timeout: 2 * time.Second}
	r, err := c.Get(endpoint + "/health")
	if err != nil {
		return err
	}
	defer r.Body.Close()
	var h struct{ Health string }
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&h); err != nil {
		return err
	}
	if h.Health != "true" {
		return fmt.Errorf("health %q", h.Health)
	}
	return nil
}

// Stop stops every member.
func (e *Etcd) Stop() {
	for _, p := range e.members {
		p.stop()
	}
}

// Fabric is a guardian made with `vtpmd-guardian init`, whose replicas are
// `vtpmd-guardian serve` processes: on the local store (one replica) or on
// etcd.
type Fabric struct {
	// Binary is vtpmd-guardian.
	Binary string
	// DataDir is init's data directory (CA certificate, admin token, and
	// the local store of a replica without etcd).
	DataDir string
	// KEKFile is the key-encryption key every replica is given.
	KEKFile string
	// CAFile is the guardian CA, which hosts trust.
	CAFile string
	// Etcd are the etcd endpoints; none for the local store.
	Etcd []string

	dir      string
	replicas []*Replica
}

// Init runs `vtpmd-guardian init` for the fabric "fabric1" in dir, storing
// the sealed keys in etcd too if endpoints are given.
func Init(binary, dir string, etcd []string) (*Fabric, error) {
	f := &Fabric{Binary: binary, DataDir: filepath.Join(dir, "guardian"), KEKFile: filepath.Join(dir, "kek"), Etcd: etcd, dir: dir}
	f.CAFile = filepath.Join(f.DataDir, "ca.crt")
	args := []string{"init", "--data-dir", f.DataDir, "--kek-file", f.KEKFile, "--fabric", "fabric1"}
	if len(etcd) > 0 {
		args = append(args, "--etcd-endpoints", strings.Join(etcd, ","))
	}
	if out, err := exec.Command(binary, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vtpmd-guardian init: %w: %s", err, out)
	}
	return f, nil
}

// Admin runs an administration command of vtpmd-guardian (host, baseline,
// audit...) against the replicas at urls, with init's CA and token, and
// returns its output.
func (f *Fabric) Admin(urls []string, args ...string) (string, error) {
	args = append(args, "--url", strings.Join(urls, ","), "--data-dir", f.DataDir, "--timeout", "30s")
	out, err := exec.Command(f.Binary, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("vtpmd-guardian %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Register adds the host with identity id (as `vtpmd host identity` prints
// it) to group through the replicas at urls.
func (f *Fabric) Register(urls []string, name, group string, id *guardian.HostIdentity) error {
	b, err := json.Marshal(id)
	if err != nil {
		return err
	}
	path := filepath.Join(f.dir, name+"-identity.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	_, err = f.Admin(urls, "host", "add", name, "--group", group, "--identity", path)
	return err
}

// Baseline records group's baseline from boot's event log through the
// replicas at urls.
func (f *Fabric) Baseline(urls []string, group string, boot []measuredboot.Event) error {
	log, err := measuredboot.Encode(boot)
	if err != nil {
		return err
	}
	path := filepath.Join(f.dir, group+"-baseline.log")
	if err := os.WriteFile(path, log, 0o644); err != nil {
		return err
	}
	_, err = f.Admin(urls, "baseline", "record", group, "--event-log", path)
	return err
}

// Replica is one `vtpmd-guardian serve` of a fabric.
type Replica struct {
	Name string
	// URL is where it serves (https://127.0.0.1:port), the same after a
	// restart.
	URL string
	// Log is its log file.
	Log string

	fabric *Fabric
	addr   string
	proc   *process
}

// StartReplica starts a replica named name on a free loopback port and
// waits until it serves. Replicas on etcd get data directories of their
// own: they share nothing but the KEK file and etcd.
func (f *Fabric) StartReplica(name string) (*Replica, error) {
	addrs, err := freeAddrs(1)
	if err != nil {
		return nil, err
	}
	r := &Replica{Name: name, URL: "https://" + addrs[0], Log: filepath.Join(f.dir, name+".log"), fabric: f, addr: addrs[0]}
	if err := r.Start(); err != nil {
		return nil, err
	}
	f.replicas = append(f.replicas, r)
	return r, nil
}

// Start starts the replica (again, on its address) and waits until it
// serves.
func (r *Replica) Start() error {
	if r.proc != nil && !r.proc.exited() {
		return fmt.Errorf("replica %s is running", r.Name)
	}
	f := r.fabric
	dataDir := f.DataDir
	args := []string{f.Binary, "serve", "--listen", r.addr, "--kek-file", f.KEKFile, "--name", r.Name}
	if len(f.Etcd) > 0 {
		dataDir = filepath.Join(f.dir, r.Name)
		args = append(args, "--etcd-endpoints", strings.Join(f.Etcd, ","))
	}
	p, err := startProcess(r.Log, nil, append(args, "--data-dir", dataDir)...)
	if err != nil {
		return err
	}
	r.proc = p
	probe, err := f.Client([]string{r.URL})
	if err != nil {
		r.proc.kill()
		return err
	}
	err = p.waitFor("guardian replica "+r.Name, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := probe.Keys(ctx)
		return err
	})
	if err != nil {
		r.proc.kill()
	}
	return err
}

// Kill kills the replica (SIGKILL): its address refuses connections.
func (r *Replica) Kill() {
	if r.proc != nil {
		r.proc.kill()
	}
}

// Stop stops every replica.
func (f *Fabric) Stop() {
	for _, r := range f.replicas {
		if r.proc != nil {
			r.proc.stop()
		}
	}
}

// HostConfig is a host's guardian config (JSON) for the replicas at urls:
// the host name, the start deadline, 1 s attempts, and more fields
// (",..." or "").
func (f *Fabric) HostConfig(urls []string, name string, deadline time.Duration, more string) string {
	return hostConfig(urls, f.CAFile, name, deadline, more)
}

func hostConfig(urls []string, caFile, name string, deadline time.Duration, more string) string {
	u, _ := json.Marshal(urls)
	return fmt.Sprintf(`{"urls":%s,"ca_file":%q,"host":%q,"start_deadline":%q,"attempt_timeout":"1s"%s}`, u, caFile, name, deadline.String(), more)
}

// Client is a host's client of the replicas at urls.
func (f *Fabric) Client(urls []string) (*guardian.Client, error) {
	c, err := host.ParseConfig([]byte(f.HostConfig(urls, "probe", time.Second, "")), "/")
	if err != nil {
		return nil, err
	}
	return c.Client()
}

// HostTPM is a host's TPM: a `vtpmd socket` instance, started as a host's
// firmware leaves its TPM, into whose PCRs a boot was replayed, with that
// boot's event log.
type HostTPM struct {
	// Socket is its data socket.
	Socket string
	// EventLog is the boot's event log file.
	EventLog string
	proc     *process
}

// StartHostTPM starts vtpmd socket in dir (its state and sockets; env is
// its environment, nil for the caller's) and replays boot into it.
func StartHostTPM(vtpmd, dir string, env []string, boot []measuredboot.Event) (*HostTPM, error) {
	h := &HostTPM{Socket: filepath.Join(dir, "data"), EventLog: filepath.Join(dir, "binary_bios_measurements")}
	p, err := startProcess(filepath.Join(dir, "vtpmd.log"), env, vtpmd, "socket", "--tpm2",
		"--tpmstate", "dir="+dir, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl"),
		"--server", "type=unixio,path="+h.Socket, "--flags", "not-need-init,startup-clear")
	if err != nil {
		return nil, err
	}
	h.proc = p
	open := host.OpenTPM("unix:" + h.Socket)
	var rw io.ReadWriteCloser
	// The socket file appears at bind(), a moment before listen().
	err = p.waitFor("host TPM "+dir, func() (err error) {
		rw, err = open()
		return err
	})
	if err == nil {
		err = errors.Join(measuredboot.Replay(rw, boot), rw.Close())
	}
	var log []byte
	if err == nil {
		log, err = measuredboot.Encode(boot)
	}
	if err == nil {
		err = os.WriteFile(h.EventLog, log, 0o644)
	}
	if err != nil {
		p.kill()
		return nil, fmt.Errorf("host TPM: %w", err)
	}
	return h, nil
}

// ConfigFields are the host_tpm and event_log fields of a host's guardian
// config (to append to its other fields).
func (h *HostTPM) ConfigFields() string {
	return fmt.Sprintf(`,"host_tpm":%q,"event_log":%q`, "unix:"+h.Socket, h.EventLog)
}

// Identity is the host identity to register (what `vtpmd host identity`
// prints).
func (h *HostTPM) Identity() (*guardian.HostIdentity, error) {
	return (&host.TPM{Open: host.OpenTPM("unix:" + h.Socket), EventLog: h.EventLog}).Identity()
}

// Stop stops the TPM.
func (h *HostTPM) Stop() { h.proc.stop() }
