package serve

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Bad vsock settings and a port of another VM are refused with a clear
// HTTP error, and change nothing.
func TestVsockConfig(t *testing.T) {
	s := testSupervisor(t)
	h := s.Handler()
	code, body := do(t, h, "POST", "/v1/vms", `{"name": "a", "vsock_cid": 3, "vsock_ctrl_port": 2321, "vsock_data_port": 2322}`)
	require.Equal(t, http.StatusCreated, code, body)
	assert.Contains(t, body, `"vsock_ctrl_port":2321`)
	_, before := do(t, h, "GET", "/v1/vms", "")

	for _, c := range []struct {
		body string
		code int
		want string
	}{
		{`{"name": "b", "vsock_ctrl_port": 2400}`, 400, "need the guest's CID"},
		{`{"name": "b", "vsock_cid": 4294967295, "vsock_ctrl_port": 2400}`, 400, "need the guest's CID"},
		{`{"name": "b", "vsock_cid": 4}`, 400, "a vsock CID without a vsock port"},
		{`{"name": "b", "vsock_cid": 4, "vsock_ctrl_port": 2400, "vsock_data_port": 2400}`, 400, "both 2400"},
		{`{"name": "b", "vsock_cid": 4, "vsock_data_port": 4294967295}`, 400, "VMADDR_PORT_ANY"},
		{`{"name": "b", "vsock_cid": 4, "vsock_ctrl_port": 4294967296}`, 400, "not a create request"},
		{`{"name": "b", "vsock_cid": 4, "vsock_ctrl_port": -1}`, 400, "not a create request"},
		{`{"name": "b", "vsock_cid": 4, "vsock_ctrl_port": 2321}`, 409, `vsock port 2321 is VM "a"'s`},
		{`{"name": "b", "vsock_cid": 4, "vsock_data_port": 2321}`, 409, `vsock port 2321 is VM "a"'s`},
		{`{"name": "b", "vsock_cid": 4, "vsock_ctrl_port": 2400, "vsock_data_port": 2322}`, 409, `vsock port 2322 is VM "a"'s`},
		{`{"name": "a", "vsock_cid": 4, "vsock_ctrl_port": 2400}`, 409, `VM "a" exists`},
	} {
		code, body := do(t, h, "POST", "/v1/vms", c.body)
		assert.Equal(t, c.code, code, "%s: %s", c.body, body)
		var e apiError
		require.NoError(t, json.Unmarshal([]byte(body), &e), body)
		assert.Contains(t, e.Error, c.want, c.body)
	}
	_, after := do(t, h, "GET", "/v1/vms", "")
	assert.JSONEq(t, before, after, "refused creates changed nothing")

	// Other ports are free, also for the same guest CID's second TPM.
	code, body = do(t, h, "POST", "/v1/vms", `{"name": "b", "vsock_cid": 3, "vsock_ctrl_port": 1, "vsock_data_port": 4294967294}`)
	assert.Equal(t, http.StatusCreated, code, body)
	// Once a VM is deleted, its ports are free.
	code, body = do(t, h, "DELETE", "/v1/vms/a", "")
	require.Equal(t, http.StatusOK, code, body)
	code, body = do(t, h, "POST", "/v1/vms", `{"name": "c", "vsock_cid": 5, "vsock_ctrl_port": 2322}`)
	assert.Equal(t, http.StatusCreated, code, body)
}

// A vsock port that another process holds: the start fails with a 409
// that says so, and the VM stays stopped.
func TestVsockPortInUse(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skipf("no vsock here (%v): the kernel has no vsock transport", err)
	}
	holder, err := listenVsock(0x7654)
	if err != nil {
		t.Skipf("cannot listen on vsock here: %v", err)
	}
	defer holder.Close()
	s := testSupervisor(t)
	h := s.Handler()
	code, body := do(t, h, "POST", "/v1/vms", `{"name": "a", "vsock_cid": 3, "vsock_ctrl_port": 30292}`)
	require.Equal(t, http.StatusCreated, code, body)
	code, body = do(t, h, "POST", "/v1/vms/a/start", "")
	assert.Equal(t, http.StatusConflict, code, body)
	var e apiError
	require.NoError(t, json.Unmarshal([]byte(body), &e), body)
	assert.Contains(t, e.Error, `VM "a": conflict: listen on vsock port 30292: address already in use`)
	st, err := s.VM("a")
	require.NoError(t, err)
	assert.Equal(t, "stopped", st.Desired)
	assert.Equal(t, "stopped", st.State)
	_, err = os.Stat(st.Ctrl)
	assert.ErrorIs(t, err, os.ErrNotExist, "no control socket left behind")
}

// /metrics on the admin API: the supervisor's own metrics and the state
// store's syncs, in the Prometheus text format.
func TestMetricsEndpoint(t *testing.T) {
	s := testSupervisor(t)
	code, body := do(t, s.Handler(), "GET", "/metrics", "")
	require.Equal(t, http.StatusOK, code, body)
	for _, want := range []string{"# TYPE vtpmd_state_wal_syncs_total counter", "# TYPE vtpmd_state_commit_duration_seconds histogram", "process_resident_memory_bytes"} {
		assert.Contains(t, body, want)
	}
	assert.False(t, strings.Contains(body, "vtpmd_worker_up{"), "no VM runs")
}

// With socket_group, the VMs' sockets are 0660 of that group and the run
// dir 0750, for a QEMU of another user; the admin socket stays 0600.
func TestSocketGroup(t *testing.T) {
	dir := t.TempDir()
	gid := os.Getgid()
	s, err := Open(Config{StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		HostKey: filepath.Join(dir, "keys", "host.key"), Executable: filepath.Join(dir, "no-such-vtpmd"),
		SocketGroup: strconv.Itoa(gid), Log: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	defer s.Close()
	fi, err := os.Stat(s.cfg.RunDir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), fi.Mode().Perm())
	_, err = s.Create(CreateRequest{Name: "g", Data: true})
	require.NoError(t, err)
	_, err = s.Start("g") // the worker cannot start; the sockets are there
	require.ErrorContains(t, err, "did not start")
	for _, p := range []string{"g.ctrl", "g.data"} {
		fi, err := os.Stat(filepath.Join(s.cfg.RunDir, p))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o660), fi.Mode().Perm(), p)
		assert.Equal(t, uint32(gid), fi.Sys().(*syscall.Stat_t).Gid, p)
	}
	_, err = s.Stop("g")
	require.NoError(t, err)

	_, err = Open(Config{StateDir: filepath.Join(dir, "state2"), RunDir: filepath.Join(dir, "run2"),
		HostKey: filepath.Join(dir, "keys", "host.key"), SocketGroup: "no-such-group-of-vtpmd"})
	assert.ErrorContains(t, err, `socket group "no-such-group-of-vtpmd": no such group`)
}
