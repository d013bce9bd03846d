package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/serve"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/transport"
)

// End-to-end tests of `vtpmd serve`: a supervisor, its workers and `vtpmd
// ctl` as real processes, driven the way QEMU and the swtpm TCTI drive a
// TPM (CMD_INIT on the control socket, TPM commands on the data socket).

// serveTPM is a running `vtpmd serve` with its state and sockets in dir.
type serveTPM struct {
	*daemon
	dir, state, run, admin string
}

// startServe starts `vtpmd serve` on dir (a new short directory if "")
// with the extra options.
func startServe(t *testing.T, dir string, extra ...string) *serveTPM {
	t.Helper()
	if testingPeer() {
		t.Skip("swtpm has no serve mode")
	}
	if dir == "" {
		dir = sockDir(t)
	}
	s := &serveTPM{dir: dir, state: filepath.Join(dir, "state"), run: filepath.Join(dir, "run")}
	s.admin = filepath.Join(s.run, "admin.sock")
	// A killed supervisor leaves its admin socket file behind: wait for a
	// connection, not for the file.
	s.daemon = startDaemon(t, append([]string{"serve", "--state-dir", s.state, "--run-dir", s.run}, extra...))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", s.admin)
		if err == nil {
			c.Close()
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("vtpmd serve exited: %v\n%s", s.err, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("vtpmd serve did not listen on %s within 10 s: %v\n%s", s.admin, err, s.stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ctl runs `vtpmd ctl --admin <socket> args...` and returns its stdout and
// stderr, and its error.
func (s *serveTPM) ctl(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, daemonPath, append([]string{"ctl", "--admin", s.admin}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// ctlOK runs ctl, which must succeed, and returns its stdout.
func (s *serveTPM) ctlOK(t *testing.T, args ...string) string {
	t.Helper()
	stdout, stderr, err := s.ctl(t, args...)
	require.NoError(t, err, "vtpmd ctl %s\n%s%s\nsupervisor:\n%s", strings.Join(args, " "), stdout, stderr, s.stderr.String())
	return stdout
}

// pid is the supervisor's process id.
func (s *serveTPM) pid() int { return s.cmd.Process.Pid }

// serves says whether pid is the worker of a VM of the supervisor.
func (s *serveTPM) serves(t *testing.T, pid int) bool {
	t.Helper()
	var list []serve.Status
	require.NoError(t, json.Unmarshal([]byte(s.ctlOK(t, "--json", "list")), &list))
	for _, st := range list {
		if st.PID == pid {
			return true
		}
	}
	return false
}

// status reads one VM's status with `ctl status --json`.
func (s *serveTPM) status(t *testing.T, name string) serve.Status {
	t.Helper()
	var st serve.Status
	require.NoError(t, json.Unmarshal([]byte(s.ctlOK(t, "--json", "status", name)), &st))
	return st
}

// api sends one request to the admin API directly and returns the status
// code and body.
func (s *serveTPM) api(t *testing.T, method, path, body string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", s.admin)
		},
	}}
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, "http://vtpmd"+path, r)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// vmClient drives one VM's TPM as a guest would, and reports errors
// instead of failing the test, so that it can run in a goroutine.
type vmClient struct {
	name, ctrl, data string
	// dial connects to ctrl or data; nil is a unix socket dial.
	dial func(addr string) (net.Conn, error)
	conn net.Conn
	tpm  connTPM
	// acked is the value of the last acknowledged NV_Write; inFlight the
	// value of a write whose response never came (0 for none).
	acked, inFlight uint64
	writes          atomic.Int64
	reconnects      int
	// recovered is when the client had its TPM back after a restart.
	recovered time.Time
}

const serveNVIndex tpm2.TPMHandle = 0x01500200

func dialUnix(path string) (net.Conn, error) { return net.DialTimeout("unix", path, 5*time.Second) }

// ctrlInit sends CMD_INIT on a new control connection.
func ctrlInit(dial func(string) (net.Conn, error), addr string) error {
	c, err := dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write(transport.InitRequest{}.Marshal()); err != nil {
		return err
	}
	reply := make([]byte, 4)
	if _, err := io.ReadFull(c, reply); err != nil {
		return fmt.Errorf("CMD_INIT reply: %w", err)
	}
	if r := binary.BigEndian.Uint32(reply); r != 0 {
		return fmt.Errorf("CMD_INIT: result %#x", r)
	}
	return nil
}

// connect powers the TPM on (CMD_INIT), connects to its data socket and
// sends TPM2_Startup(CLEAR). It retries while the sockets refuse, for a
// worker that is being restarted.
func (c *vmClient) connect() error {
	if c.dial == nil {
		c.dial = dialUnix
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ctrlInit(c.dial, c.ctrl)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: power on: %w", c.name, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := c.dial(c.data)
	if err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	if err := conn.SetDeadline(time.Now().Add(120 * time.Second)); err != nil {
		return err
	}
	c.conn, c.tpm = conn, connTPM{conn}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(c.tpm); err != nil {
		return fmt.Errorf("%s: TPM2_Startup: %w", c.name, err)
	}
	return nil
}

// setup runs GetRandom and defines the client's NV index.
func (c *vmClient) setup() error {
	rnd, err := tpm2.GetRandom{BytesRequested: 16}.Execute(c.tpm)
	if err != nil {
		return fmt.Errorf("%s: GetRandom: %w", c.name, err)
	}
	if len(rnd.RandomBytes.Buffer) != 16 || bytes.Equal(rnd.RandomBytes.Buffer, make([]byte, 16)) {
		return fmt.Errorf("%s: GetRandom gave %x", c.name, rnd.RandomBytes.Buffer)
	}
	_, err = tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    serveNVIndex,
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
			DataSize:   8,
		}),
	}.Execute(c.tpm)
	if err != nil {
		return fmt.Errorf("%s: NV_DefineSpace: %w", c.name, err)
	}
	return nil
}

// round writes the next value and reads it back.
func (c *vmClient) round() error {
	v := c.acked + 1
	c.inFlight = v
	_, err := tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(serveNVIndex),
		Data: tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)}}.Execute(c.tpm)
	if err != nil {
		return err
	}
	c.acked, c.inFlight = v, 0
	c.writes.Add(1)
	got, err := readNV64(c.tpm, serveNVIndex)
	if err != nil {
		return err
	}
	if got != v {
		return fmt.Errorf("%s: NV_Read gave %d after writing %d", c.name, got, v)
	}
	return nil
}

// recover reconnects after the worker died and checks that the TPM holds
// the last acknowledged value (or the one in flight at the kill).
func (c *vmClient) recover() error {
	c.conn.Close()
	c.reconnects++
	if err := c.connect(); err != nil {
		return err
	}
	got, err := readNV64(c.tpm, serveNVIndex)
	if err != nil {
		return fmt.Errorf("%s: read after restart: %w", c.name, err)
	}
	if got != c.acked && (c.inFlight == 0 || got != c.inFlight) {
		return fmt.Errorf("%s: after the restart the index holds %d; acknowledged %d, in flight %d", c.name, got, c.acked, c.inFlight)
	}
	c.acked, c.inFlight = got, 0
	c.recovered = time.Now()
	return nil
}

// run connects, sets up and runs rounds; a link failure is an error unless
// mayDie says the worker may have been killed, when the client recovers.
func (c *vmClient) run(rounds int, mayDie func() bool) error {
	if err := c.connect(); err != nil {
		return err
	}
	if err := c.setup(); err != nil {
		return err
	}
	// Until rounds writes are acknowledged: a write lost with a killed
	// worker (never acknowledged) is written again.
	for c.acked < uint64(rounds) {
		err := c.round()
		if err != nil && isLinkError(err) && mayDie() {
			if err := c.recover(); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("%s: write %d: %w", c.name, c.acked+1, err)
		}
	}
	return c.conn.Close()
}

// vmNames are n VM names.
func vmNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("vm%03d", i)
	}
	return names
}

func (s *serveTPM) list(t *testing.T) []serve.Status {
	t.Helper()
	var list []serve.Status
	require.NoError(t, json.Unmarshal([]byte(s.ctlOK(t, "--json", "list")), &list))
	return list
}

// 100 VM TPMs, created and started with `vtpmd ctl`, each driven by its own
// client at once over its control and data sockets, while `ctl list`
// keeps answering; one worker is SIGKILLed during the load: the other 99
// clients see nothing, and the killed VM's client finds its TPM back with
// every acknowledged write.
func TestServeManyVMs(t *testing.T) {
	const (
		vms         = 100
		rounds      = 40
		listBound   = 5 * time.Second
		victimIndex = 42
	)
	start := time.Now()
	s := startServe(t, "")
	names := vmNames(vms)
	out := s.ctlOK(t, append([]string{"create", "--data"}, names...)...)
	require.Contains(t, out, "-chardev socket,id=chrtpm,path="+filepath.Join(s.run, "vm000.ctrl")+" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0")
	created := time.Now()
	s.ctlOK(t, append([]string{"start"}, names...)...)
	started := time.Now()
	list := s.list(t)
	require.Len(t, list, vms)
	pids := map[int]string{}
	for _, st := range list {
		require.Equal(t, "running", st.Desired, st.Name)
		require.Equal(t, "running", st.State, st.Name)
		require.NotZero(t, st.PID, st.Name)
		pids[st.PID] = st.Name
	}
	require.Len(t, pids, vms, "one worker process per VM")

	victim := names[victimIndex]
	var killed atomic.Bool
	clients := make([]*vmClient, vms)
	errs := make([]error, vms)
	var wg sync.WaitGroup
	for i, name := range names {
		c := &vmClient{name: name, ctrl: filepath.Join(s.run, name+".ctrl"), data: filepath.Join(s.run, name+".data")}
		clients[i] = c
		mayDie := func() bool { return i == victimIndex && killed.Load() }
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.run(rounds, mayDie)
		}()
	}
	loadDone := make(chan struct{})
	go func() { wg.Wait(); close(loadDone) }()

	// ctl list, over and over, while the clients run.
	var listTimes []time.Duration
	var listErr error
	listDone := make(chan struct{})
	go func() {
		defer close(listDone)
		for {
			select {
			case <-loadDone:
				return
			case <-time.After(200 * time.Millisecond):
			}
			t0 := time.Now()
			stdout, stderr, err := s.ctl(t, "list")
			listTimes = append(listTimes, time.Since(t0))
			if err != nil || strings.Count(stdout, "\n") != vms+1 {
				listErr = fmt.Errorf("ctl list: %v\n%s%s", err, stdout, stderr)
				return
			}
		}
	}()

	// Kill the victim's worker once its client is well into its rounds.
	v := clients[victimIndex]
	for v.writes.Load() < 3 {
		select {
		case <-loadDone:
			t.Fatalf("the load ended before the kill: %v", errors.Join(errs...))
		case <-time.After(5 * time.Millisecond):
		}
	}
	st := s.status(t, victim)
	killed.Store(true)
	require.NoError(t, syscall.Kill(st.PID, syscall.SIGKILL))
	killedAt := time.Now()
	t.Logf("killed %s's worker (pid %d) after %d acknowledged writes", victim, st.PID, v.writes.Load())

	select {
	case <-loadDone:
	case <-time.After(3 * time.Minute):
		t.Fatalf("the clients did not finish within 3 minutes\n%s", s.stderr.String())
	}
	<-listDone
	loadTime := time.Since(started)
	for i, err := range errs {
		require.NoError(t, err, "client of %s", names[i])
		if i != victimIndex {
			assert.Zero(t, clients[i].reconnects, names[i])
		}
		assert.Equal(t, uint64(rounds), clients[i].acked, names[i])
	}
	require.NoError(t, listErr)
	require.Equal(t, 1, v.reconnects, "the victim's client reconnected once")

	after := s.list(t)
	for _, st := range after {
		require.Equal(t, "running", st.State, st.Name)
		if st.Name == victim {
			assert.Equal(t, 1, st.Restarts, "the victim's worker restarted once")
			assert.NotEqual(t, pids[st.PID], victim, "a new worker")
			assert.Contains(t, st.LastExit, "signal killed")
		} else {
			assert.Zero(t, st.Restarts, st.Name)
			assert.Equal(t, st.Name, pids[st.PID], "%s kept its worker", st.Name)
		}
	}
	assert.Contains(t, s.stderr.String(), "vm="+victim)

	var rss, pss int64
	for _, st := range after {
		r, p := smapsRollup(st.PID)
		rss, pss = rss+r, pss+p
	}
	t.Logf("workers after the load: %d KiB RSS, %d KiB PSS per VM on average", rss/int64(len(after)), pss/int64(len(after)))

	slices.Sort(listTimes)
	require.NotEmpty(t, listTimes)
	worst := listTimes[len(listTimes)-1]
	assert.Less(t, worst, listBound, "ctl list took too long under load")
	var writes int64
	for _, c := range clients {
		writes += c.writes.Load()
	}
	t.Logf("%d VMs: created in %v, started in %v; %d acknowledged NV writes (+ reads, defines, startups) in %v; the killed VM's client had its TPM back %v after the kill; ctl list %d times under load, median %v, worst %v; %v in all",
		vms, created.Sub(start).Round(time.Millisecond), started.Sub(created).Round(time.Millisecond), writes, loadTime.Round(time.Millisecond),
		v.recovered.Sub(killedAt).Round(time.Millisecond), len(listTimes), listTimes[len(listTimes)/2].Round(time.Millisecond), worst.Round(time.Millisecond),
		time.Since(start).Round(time.Millisecond))
}

// smapsRollup returns a process's RSS and PSS in KiB (0, 0 if unreadable).
func smapsRollup(pid int) (rss, pss int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		var v int64
		if n, _ := fmt.Sscanf(line, "Rss: %d kB", &v); n == 1 {
			rss = v
		}
		if n, _ := fmt.Sscanf(line, "Pss: %d kB", &v); n == 1 {
			pss = v
		}
	}
	return rss, pss
}

// Malformed admin requests get a clear HTTP error and change nothing.
func TestServeAdminErrors(t *testing.T) {
	s := startServe(t, "")
	s.ctlOK(t, "create", "vm1")
	s.ctlOK(t, "start", "vm1")
	s.ctlOK(t, "create", "idle")
	_, before := s.api(t, "GET", "/v1/vms", "")

	long := strings.Repeat("a", 65)
	for _, c := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"POST", "/v1/vms", `{"name": "bad/name"}`, 400, "bad VM name"},
		{"POST", "/v1/vms", `{"name": ".hidden"}`, 400, "bad VM name"},
		{"POST", "/v1/vms", `{"name": ""}`, 400, "bad VM name"},
		{"POST", "/v1/vms", `{"name": "` + long + `"}`, 400, "bad VM name"},
		{"POST", "/v1/vms", `{"name": "sp ace"}`, 400, "bad VM name"},
		{"POST", "/v1/vms", `{"name": "vm2"`, 400, "not a create request"},
		{"POST", "/v1/vms", `not json`, 400, "not a create request"},
		{"POST", "/v1/vms", ``, 400, "not a create request"},
		{"POST", "/v1/vms", `{"name": "vm2", "colour": "red"}`, 400, "unknown field"},
		{"POST", "/v1/vms", `{"name": 7}`, 400, "not a create request"},
		{"POST", "/v1/vms", `{"name": "vm2"} {"name": "vm3"}`, 400, "more than one"},
		{"POST", "/v1/vms", `{"name": "vm1"}`, 409, `VM "vm1" exists`},
		{"POST", "/v1/vms", `{"name": "idle"}`, 409, `VM "idle" exists`},
		{"GET", "/v1/vms/nosuch", "", 404, `no such VM: "nosuch"`},
		{"POST", "/v1/vms/nosuch/start", "", 404, "no such VM"},
		{"POST", "/v1/vms/nosuch/stop", "", 404, "no such VM"},
		{"DELETE", "/v1/vms/nosuch", "", 404, "no such VM"},
		{"GET", "/v1/vms/bad%20name", "", 400, "bad VM name"},
		{"POST", "/v1/vms/.x/start", "", 400, "bad VM name"},
		{"DELETE", "/v1/vms/vm1", "", 409, "is running: stop it first"},
	} {
		code, body := s.api(t, c.method, c.path, c.body)
		assert.Equal(t, c.code, code, "%s %s %s: %s", c.method, c.path, c.body, body)
		var e struct{ Error string }
		if assert.NoError(t, json.Unmarshal([]byte(body), &e), "%s %s: the body is JSON: %s", c.method, c.path, body) {
			assert.Contains(t, e.Error, c.want, "%s %s %s", c.method, c.path, c.body)
		}
	}
	_, after := s.api(t, "GET", "/v1/vms", "")
	assert.JSONEq(t, before, after, "refused requests changed nothing")

	// ctl reports the API's error and fails.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"status", "nosuch"}, `no such VM: "nosuch" (HTTP 404)`},
		{[]string{"create", "vm1"}, `VM "vm1" exists (HTTP 409)`},
		{[]string{"create", "-x"}, `unknown option "-x"`},
		{[]string{"delete", "vm1"}, `is running: stop it first (HTTP 409)`},
		{[]string{"start", "b@d"}, `bad VM name "b@d"`},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		stdout, stderr, err := s.ctl(t, c.args...)
		require.Error(t, err, "ctl %v: %s", c.args, stdout)
		assert.Contains(t, stderr, c.want, "ctl %v", c.args)
	}
	_, after = s.api(t, "GET", "/v1/vms", "")
	assert.JSONEq(t, before, after, "refused requests changed nothing")

	// The right order works: stop, delete; then the name is free again.
	s.ctlOK(t, "stop", "vm1")
	_, err := os.Stat(filepath.Join(s.run, "vm1.ctrl"))
	assert.ErrorIs(t, err, os.ErrNotExist, "a stopped VM's socket is removed")
	s.ctlOK(t, "delete", "vm1")
	code, _ := s.api(t, "GET", "/v1/vms/vm1", "")
	assert.Equal(t, 404, code)
	out := s.ctlOK(t, "list")
	assert.NotContains(t, out, "vm1")
	assert.Contains(t, out, "idle")
}

// When the supervisor dies, its workers die with it; the next supervisor
// starts every VM that was running (and not the stopped ones) with its
// state.
func TestServeSupervisorRestart(t *testing.T) {
	dir := sockDir(t)
	s := startServe(t, dir)
	names := vmNames(3)
	s.ctlOK(t, append([]string{"create", "--data"}, names...)...)
	s.ctlOK(t, append([]string{"start"}, names...)...)
	var pids []int
	for _, name := range names {
		c := &vmClient{name: name, ctrl: filepath.Join(s.run, name+".ctrl"), data: filepath.Join(s.run, name+".data")}
		require.NoError(t, c.run(3, func() bool { return false }))
		pids = append(pids, s.status(t, name).PID)
	}
	s.ctlOK(t, "stop", names[2])

	killDaemon(t, s.daemon)
	for i, pid := range pids[:2] {
		require.Eventually(t, func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH }, 5*time.Second, 10*time.Millisecond,
			"the worker of %s (pid %d) outlived the supervisor", names[i], pid)
	}

	s = startServe(t, dir)
	require.Eventually(t, func() bool {
		for _, name := range names[:2] {
			if s.status(t, name).State != "running" {
				return false
			}
		}
		return true
	}, 20*time.Second, 50*time.Millisecond)
	assert.Equal(t, "stopped", s.status(t, names[2]).State)
	for _, name := range names[:2] {
		c := &vmClient{name: name, ctrl: filepath.Join(s.run, name+".ctrl"), data: filepath.Join(s.run, name+".data")}
		require.NoError(t, c.connect())
		got, err := readNV64(c.tpm, serveNVIndex)
		require.NoError(t, err, name)
		assert.Equal(t, uint64(3), got, name)
		c.conn.Close()
	}
	// The stopped VM starts again with its state too.
	s.ctlOK(t, "start", names[2])
	c := &vmClient{name: names[2], ctrl: filepath.Join(s.run, names[2]+".ctrl"), data: filepath.Join(s.run, names[2]+".data")}
	require.NoError(t, c.connect())
	got, err := readNV64(c.tpm, serveNVIndex)
	require.NoError(t, err)
	assert.Equal(t, uint64(3), got)
	c.conn.Close()
}

// QEMU boots against a VM TPM served by `vtpmd serve`, the way libvirt
// would use it: the control socket only, the data channel handed over with
// CMD_SET_DATAFD. When QEMU ends (CMD_SHUTDOWN), the supervisor puts a
// fresh worker on the same socket, and a second QEMU boots with the state
// the first one left.
func TestServeQEMUBoot(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm has no serve mode")
	}
	qemu, kernel, initrd := prepareGuest(t)

	s := startServe(t, "")
	out := s.ctlOK(t, "create", "guest")
	s.ctlOK(t, "start", "guest")
	st := s.status(t, "guest")
	require.Contains(t, out, strings.Join(st.QEMUArgs, " "))

	g := guestMachine{qemu: qemu, kernel: kernel.vmlinuz, initrd: initrd, iface: "tpm-crb", fw: guestFirmwares[0], dir: t.TempDir()}
	// startQEMU takes the TPM at <dir>/sock.
	require.NoError(t, os.Symlink(st.Ctrl, filepath.Join(g.dir, "sock")))

	start := time.Now()
	vm := g.startQEMU(t)
	g.check(t, vm, "cold boot")
	vm.console(t, "reboot")
	g.check(t, vm, "after guest reboot -f")
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	t.Logf("first QEMU run (2 boots) took %v", time.Since(start).Round(time.Millisecond))

	require.Eventually(t, func() bool {
		st := s.status(t, "guest")
		return st.Restarts == 1 && st.State == "running"
	}, exitTimeout, 20*time.Millisecond, "a fresh worker after QEMU's CMD_SHUTDOWN")
	st = s.status(t, "guest")
	assert.Equal(t, "exit status 0", st.LastExit)

	start = time.Now()
	vm = g.startQEMU(t)
	g.check(t, vm, "second QEMU run")
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	t.Logf("second QEMU run (1 boot) took %v", time.Since(start).Round(time.Millisecond))

	g.checkBoots(t)
}

// A worker runs with no_new_privs, without core dumps, with GOMAXPROCS=1
// as its whole environment, and holds no file of the store or the host
// key; its VM's key is in neither its argv, its environment nor the logs.
func TestServeWorkerIsolation(t *testing.T) {
	s := startServe(t, "")
	s.ctlOK(t, "create", "--data", "iso")
	s.ctlOK(t, "start", "iso")
	st := s.status(t, "iso")
	c := &vmClient{name: "iso", ctrl: st.Ctrl, data: st.Data}
	require.NoError(t, c.run(2, func() bool { return false }))

	proc := func(name string) string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", st.PID, name))
		require.NoError(t, err)
		return string(b)
	}
	assert.Contains(t, proc("status"), "NoNewPrivs:\t1")
	assert.Regexp(t, `Max core file size\s+0\s+0`, proc("limits"))
	assert.Equal(t, "GOMAXPROCS=1\x00", proc("environ"))
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", st.PID))
	require.NoError(t, err)
	hostKey := os.Getenv("VTPMD_HOST_KEY")
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", st.PID, fd.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // closed since the listing: the runtime's transient files
		}
		require.NoError(t, err)
		// The Go runtime keeps the cgroup's CPU limit files open.
		ok := target == "/dev/null" || strings.HasPrefix(target, "socket:") || strings.HasPrefix(target, "pipe:") ||
			strings.HasPrefix(target, "anon_inode:") || strings.HasPrefix(target, "/sys/fs/cgroup/")
		assert.True(t, ok, "the worker holds fd %s: %s", fd.Name(), target)
		assert.False(t, strings.HasPrefix(target, s.state) || strings.HasPrefix(target, filepath.Dir(hostKey)), "fd %s: %s", fd.Name(), target)
	}

	key, err := (&sealing.HostKey{Path: hostKey}).StateKey(context.Background(), st.ID)
	require.NoError(t, err)
	secret := key.Secret()
	for what, text := range map[string]string{"argv": proc("cmdline"), "environment": proc("environ"), "logs": s.stderr.String()} {
		assert.NotContains(t, text, string(secret), what)
		assert.NotContains(t, text, hex.EncodeToString(secret), what)
		assert.NotContains(t, strings.ToLower(text), fmt.Sprintf("%x", secret), what)
	}
	// The VM came over the channel (the worker was a spare), not in argv.
	assert.Equal(t, daemonPath+"\x00worker\x00--supervisor\x00"+strconv.Itoa(s.pid())+"\x00--channel-fd\x003\x00--records-fd\x004\x00--log-level\x00info\x00", proc("cmdline"))
	// The worker logs carry the VM's name.
	for _, line := range strings.Split(s.stderr.String(), "\n") {
		if strings.Contains(line, "worker=") {
			assert.Contains(t, line, "vm=iso", line)
		}
	}
}

// A start takes the spare worker, started ahead with no VM, and another
// spare replaces it; a spare killed while idle is reaped and replaced; with
// --spare-workers 0 every start starts its worker.
func TestServeSpareWorkers(t *testing.T) {
	s := startServe(t, "")
	spares := func() []int {
		var out []int
		for _, pid := range workersOf(t, s.pid()) {
			if !s.serves(t, pid) {
				out = append(out, pid)
			}
		}
		return out
	}
	require.Eventually(t, func() bool { return len(spares()) == 1 && s.spareMetric(t) == 1 }, 10*time.Second, 10*time.Millisecond, "one spare before any VM")
	spare := spares()[0]
	s.ctlOK(t, "create", "--data", "vm1", "vm2", "vm3")
	s.ctlOK(t, "start", "vm1")
	assert.Equal(t, spare, s.status(t, "vm1").PID, "vm1's worker is the spare")
	assert.Contains(t, s.stderr.String(), fmt.Sprintf("worker started\" vm=vm1 pid=%d spare=true", spare))
	c := &vmClient{name: "vm1", ctrl: s.status(t, "vm1").Ctrl, data: s.status(t, "vm1").Data}
	require.NoError(t, c.run(2, func() bool { return false }))
	require.Eventually(t, func() bool { return len(spares()) == 1 }, 10*time.Second, 10*time.Millisecond, "a new spare")
	require.Eventually(t, func() bool { return s.spareMetric(t) == 1 }, 10*time.Second, 10*time.Millisecond, "vtpmd_spare_workers")

	// A spare killed while idle is reaped and replaced, before any start.
	killed := spares()[0]
	require.NoError(t, syscall.Kill(killed, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		now := spares()
		return len(now) == 1 && now[0] != killed && zombie(killed)
	}, 10*time.Second, 10*time.Millisecond, "the killed spare reaped and replaced")
	_, err := os.Stat(fmt.Sprintf("/proc/%d", killed))
	assert.ErrorIs(t, err, fs.ErrNotExist, "the killed spare is reaped")
	assert.Contains(t, s.stderr.String(), fmt.Sprintf("spare worker ended while idle; starting another\" pid=%d", killed))
	replacement := spares()[0]
	s.ctlOK(t, "start", "vm2")
	st := s.status(t, "vm2")
	assert.Equal(t, "running", st.State)
	assert.Equal(t, replacement, st.PID)
	c = &vmClient{name: "vm2", ctrl: st.Ctrl, data: st.Data}
	require.NoError(t, c.run(2, func() bool { return false }))

	none := startServe(t, "", "--spare-workers", "0")
	none.ctlOK(t, "create", "--data", "vm1")
	none.ctlOK(t, "start", "vm1")
	assert.Contains(t, none.stderr.String(), "spare=false")
	assert.Equal(t, []int{none.status(t, "vm1").PID}, workersOf(t, none.pid()), "no spare")
	assert.Zero(t, none.spareMetric(t))
}

// spareMetric is the supervisor's vtpmd_spare_workers.
func (s *serveTPM) spareMetric(t *testing.T) float64 {
	t.Helper()
	v, ok := metricValue(metricFamilies(t, s.ctlOK(t, "metrics")), "vtpmd_spare_workers", nil)
	require.True(t, ok)
	return v
}

// A supervisor running as root runs its workers as the --worker-user.
func TestServeWorkerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	// The workers must be able to run the binary.
	require.NoError(t, os.Chmod(filepath.Dir(daemonPath), 0o755))
	s := startServe(t, "", "--worker-user", "nobody")
	s.ctlOK(t, "create", "--data", "lowpriv")
	s.ctlOK(t, "start", "lowpriv")
	st := s.status(t, "lowpriv")
	require.Equal(t, "running", st.State, "%+v\n%s", st, s.stderr.String())
	c := &vmClient{name: "lowpriv", ctrl: st.Ctrl, data: st.Data}
	require.NoError(t, c.run(3, func() bool { return false }))
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", st.PID))
	require.NoError(t, err)
	assert.Regexp(t, "(?m)^Uid:\\t"+nobody.Uid+"\\t"+nobody.Uid+"\\t", string(b))
	assert.Regexp(t, "(?m)^Groups:\\s*$", string(b))

	_, stderr, err := s.ctl(t, "status", "nosuch")
	require.Error(t, err)
	assert.Contains(t, stderr, "404")
}

// tpm2-tools through the swtpm TCTI (swtpm:path=<data socket>) on a VM TPM
// created with --data --startup-clear: no CMD_INIT or TPM2_Startup needed,
// also after its worker was killed and restarted.
func TestServeTPM2Tools(t *testing.T) {
	if _, err := exec.LookPath("tpm2_getrandom"); err != nil {
		requireEnv(t, "tpm2-tools not installed: %v", err)
	}
	s := startServe(t, "")
	s.ctlOK(t, "create", "--data", "--startup-clear", "tools")
	s.ctlOK(t, "start", "tools")
	st := s.status(t, "tools")
	require.True(t, st.StartupClear)
	assert.Contains(t, s.ctlOK(t, "status", "tools"), "TPM2_Startup(CLEAR)")
	work := t.TempDir()
	tools := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Dir = work
		cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+st.Data)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s\n%s\nsupervisor:\n%s", strings.Join(args, " "), out, s.stderr.String())
		return string(out)
	}
	assert.Len(t, strings.TrimSpace(tools("tpm2_getrandom", "--hex", "16")), 32)
	tools("tpm2_nvdefine", "0x1500017", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
	require.NoError(t, os.WriteFile(filepath.Join(work, "in"), []byte("serve-ok"), 0o600))
	tools("tpm2_nvwrite", "0x1500017", "-C", "o", "-i", "in")
	assert.Equal(t, "serve-ok", tools("tpm2_nvread", "0x1500017", "-C", "o", "-s", "8"))

	require.NoError(t, syscall.Kill(st.PID, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		now := s.status(t, "tools")
		return now.Restarts == 1 && now.State == "running"
	}, 20*time.Second, 20*time.Millisecond)
	assert.Equal(t, "serve-ok", tools("tpm2_nvread", "0x1500017", "-C", "o", "-s", "8"), "after the worker's restart")
}
