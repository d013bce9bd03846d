package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/mdlayher/vsock"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// metricFamilies parses the Prometheus text format.
func metricFamilies(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(strings.NewReader(text))
	require.NoError(t, err, text)
	return mf
}

// metricValue is the value of the family's series with the labels (a
// counter's, a gauge's, or a histogram's count), and whether there is one.
func metricValue(mf map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	f := mf[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		for k, v := range labels {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

// commandCount sums the VM's TPM command counts over every command.
func commandCount(mf map[string]*dto.MetricFamily, vm string) uint64 {
	var n uint64
	if f := mf["vtpmd_tpm_command_duration_seconds"]; f != nil {
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == "vm" && l.GetValue() == vm {
					n += m.Histogram.GetSampleCount()
				}
			}
		}
	}
	return n
}

// freeTCPAddr is a loopback address with a port that was free a moment
// ago.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	return addr
}

// The metrics of `vtpmd serve`, from `vtpmd ctl metrics` (the admin socket)
// and --metrics-listen: after N TPM commands on a VM, its command count is
// N, with the NV_Writes under their name; the state commits and the
// store's syncs are counted; a worker killed with SIGKILL counts as a
// restart, and the VM's worker is up again.
func TestServeMetrics(t *testing.T) {
	addr := freeTCPAddr(t)
	s := startServe(t, "", "--metrics-listen", addr)
	s.ctlOK(t, "create", "--data", "m", "idle")
	s.ctlOK(t, "start", "m", "idle")
	const rounds = 5
	c := &vmClient{name: "m", ctrl: s.status(t, "m").Ctrl, data: s.status(t, "m").Data}
	require.NoError(t, c.run(rounds, func() bool { return false }))
	// TPM2_Startup, GetRandom, NV_DefineSpace, then an NV_Write and an
	// NV_Read a round.
	const commands = 3 + 2*rounds

	mf := metricFamilies(t, s.ctlOK(t, "metrics"))
	assert.Equal(t, uint64(commands), commandCount(mf, "m"))
	assert.Zero(t, commandCount(mf, "idle"))
	direct, ok := metricValue(mf, "vtpmd_tpm_direct_commands_total", map[string]string{"vm": "m"})
	require.True(t, ok)
	assert.Equal(t, float64(commands-1), direct, "all but the data connection's first ran in the direct loop, and were counted")
	for cmd, n := range map[string]float64{"NVWrite": rounds, "NVRead": rounds, "Startup": 1, "GetRandom": 1, "NVDefineSpace": 1} {
		got, ok := metricValue(mf, "vtpmd_tpm_command_duration_seconds", map[string]string{"vm": "m", "command": cmd})
		assert.True(t, ok, cmd)
		assert.Equal(t, n, got, cmd)
	}
	commits, ok := metricValue(mf, "vtpmd_state_commit_duration_seconds", nil)
	require.True(t, ok)
	assert.GreaterOrEqual(t, commits, float64(rounds+1), "every NV_Write and the NV_DefineSpace committed the state")
	syncs, ok := metricValue(mf, "vtpmd_state_wal_syncs_total", nil)
	require.True(t, ok)
	assert.Positive(t, syncs)
	for _, vm := range []string{"m", "idle"} {
		up, _ := metricValue(mf, "vtpmd_worker_up", map[string]string{"vm": vm})
		assert.Equal(t, 1.0, up, vm)
		restarts, ok := metricValue(mf, "vtpmd_worker_restarts_total", map[string]string{"vm": vm})
		assert.True(t, ok, vm)
		assert.Zero(t, restarts, vm)
	}

	// SIGKILL: one restart, up again, and the new worker counts afresh.
	require.NoError(t, syscall.Kill(s.status(t, "m").PID, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		st := s.status(t, "m")
		return st.Restarts == 1 && st.State == "running"
	}, 20*time.Second, 20*time.Millisecond)
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	mf = metricFamilies(t, string(body))
	restarts, _ := metricValue(mf, "vtpmd_worker_restarts_total", map[string]string{"vm": "m"})
	assert.Equal(t, 1.0, restarts)
	up, _ := metricValue(mf, "vtpmd_worker_up", map[string]string{"vm": "m"})
	assert.Equal(t, 1.0, up)
	assert.Zero(t, commandCount(mf, "m"), "a new worker")
	// The metrics listener serves nothing else.
	resp, err = http.Get("http://" + addr + "/v1/vms")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	// Every line about a VM, the supervisor's and its workers', names it
	// (vm=): all but the supervisor's own start and end.
	s.ctlOK(t, "stop", "m")
	for _, line := range strings.Split(strings.TrimSpace(s.stderr.String()), "\n") {
		if strings.Contains(line, "admin=") {
			continue
		}
		assert.Regexp(t, ` vm=(m|idle)( |$)`, line)
	}
}

// vsockLoopback skips the test unless a vsock connection to this host's
// own CID (VMADDR_CID_LOCAL) works: the vsock_loopback module
// (CONFIG_VSOCKETS_LOOPBACK), loaded with `modprobe vsock_loopback` if it
// is a module.
func vsockLoopback(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/sys/module/vsock_loopback"); err != nil {
		if path, err := exec.LookPath("modprobe"); err == nil {
			_ = exec.Command(path, "vsock_loopback").Run()
		}
	}
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, 0, nil)
	if err != nil {
		t.Skipf("no vsock here: listen: %v", err)
	}
	defer l.Close()
	port := l.Addr().(*vsock.Addr).Port
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := vsock.Dial(vsock.Local, port, nil)
	if err != nil {
		t.Skipf("no vsock loopback in this kernel: a dial of CID 1 (VMADDR_CID_LOCAL) port %d gave %v; it needs vsock_loopback (CONFIG_VSOCKETS_LOOPBACK; modprobe vsock_loopback)", port, err)
	}
	c.Close()
}

// dialVsock dials "vsock:<cid>:<port>".
func dialVsock(addr string) (net.Conn, error) {
	var cid, port uint32
	if _, err := fmt.Sscanf(addr, "vsock:%d:%d", &cid, &port); err != nil {
		return nil, fmt.Errorf("vsock address %q: %w", addr, err)
	}
	return vsock.Dial(cid, port, nil)
}

// A VM TPM served over vsock (through vsock_loopback): CMD_INIT on the
// vsock control port, TPM commands on the vsock data port, across a
// worker kill (the new worker serves the same ports); a VM whose guest has
// another CID does not let this one in.
func TestServeVsock(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skipf("no vsock in this kernel: %v", err)
	}
	s := startServe(t, "")
	base := 20000 + uint32(os.Getpid()%20000)*2
	ctrl, data := strconv.FormatUint(uint64(base), 10), strconv.FormatUint(uint64(base+1), 10)
	out := s.ctlOK(t, "create", "--vsock-cid", "1", "--vsock-ctrl-port", ctrl, "--vsock-data-port", data, "vs")
	assert.Contains(t, out, "control on vsock port "+ctrl+", data on vsock port "+data+", for CID 1 only")
	s.ctlOK(t, "start", "vs")
	st := s.status(t, "vs")
	assert.Equal(t, uint32(1), st.VsockCID)
	assert.Equal(t, "running", st.State)
	assert.Contains(t, s.stderr.String(), "vsock_ctrl=vm(4294967295):"+ctrl+" vsock_data=vm(4294967295):"+data, "the worker serves its vsock ports")
	assert.Contains(t, s.ctlOK(t, "status", "vs"), "vsock:")
	// The ports are this VM's.
	_, stderr, err := s.ctl(t, "create", "--vsock-cid", "5", "--vsock-ctrl-port", data, "clash")
	require.Error(t, err)
	assert.Contains(t, stderr, "vsock port "+data+` is VM "vs"'s (HTTP 409)`)

	vsockLoopback(t)

	c := &vmClient{name: "vs", ctrl: "vsock:1:" + ctrl, data: "vsock:1:" + data, dial: dialVsock}
	require.NoError(t, c.run(3, func() bool { return false }))
	mf := metricFamilies(t, s.ctlOK(t, "metrics"))
	assert.Equal(t, uint64(3+2*3), commandCount(mf, "vs"), "the commands over vsock")

	require.NoError(t, syscall.Kill(st.PID, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		now := s.status(t, "vs")
		return now.Restarts == 1 && now.State == "running"
	}, 20*time.Second, 20*time.Millisecond)
	require.NoError(t, c.connect())
	got, err := readNV64(c.tpm, serveNVIndex)
	require.NoError(t, err)
	assert.Equal(t, uint64(3), got, "the state across the worker's restart")
	_, err = tpm2.GetRandom{BytesRequested: 8}.Execute(c.tpm)
	require.NoError(t, err)
	c.conn.Close()

	// Another guest's TPM: this CID (1) is not let in.
	s.ctlOK(t, "create", "--vsock-cid", "7", "--vsock-data-port", strconv.FormatUint(uint64(base+2), 10), "other")
	s.ctlOK(t, "start", "other")
	conn, err := vsock.Dial(vsock.Local, base+2, nil)
	if err == nil {
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		_, err = connTPM{conn}.Send([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0})
		conn.Close()
	}
	assert.Error(t, err, "a connection from CID 1 to the TPM of CID 7")
	assert.Contains(t, s.stderr.String(), "vsock connection from another CID refused")
}
