package serve

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/unixsock"
)

func TestValidName(t *testing.T) {
	for name, ok := range map[string]bool{
		"vm1": true, "VM-1_a.b": true, strings.Repeat("a", 64): true, "a..b": true, "0": true,
		"": false, ".hidden": false, "..": false, strings.Repeat("a", 65): false, "a/b": false,
		"a b": false, "é": false, "a\x00": false, "vm:1": false,
	} {
		err := ValidName(name)
		if ok {
			assert.NoError(t, err, "%q", name)
		} else {
			assert.ErrorIs(t, err, ErrBadRequest, "%q", name)
		}
	}
}

// testSupervisor is a supervisor on temporary directories whose workers
// cannot start (the binary does not exist): enough for the registry.
func testSupervisor(t *testing.T) *Supervisor {
	t.Helper()
	dir, err := os.MkdirTemp("", "vs") // short: socket paths are limited
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	s, err := Open(Config{StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run"),
		HostKey: filepath.Join(dir, "keys", "host.key"), Executable: filepath.Join(dir, "no-such-vtpmd"),
		Log: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func do(t *testing.T, h http.Handler, method, path, body string) (int, string) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, path, r))
	return w.Code, w.Body.String()
}

func TestAPIRegistry(t *testing.T) {
	s := testSupervisor(t)
	h := s.Handler()
	code, body := do(t, h, "POST", "/v1/vms", `{"name": "vm1", "data": true}`)
	require.Equal(t, http.StatusCreated, code, body)
	var st Status
	require.NoError(t, json.Unmarshal([]byte(body), &st))
	assert.Equal(t, "vm1", st.Name)
	assert.Equal(t, filepath.Join(s.cfg.RunDir, "vm1.ctrl"), st.Ctrl)
	assert.Equal(t, filepath.Join(s.cfg.RunDir, "vm1.data"), st.Data)
	assert.Equal(t, "stopped", st.State)
	assert.Len(t, st.ID, 32)

	code, body = do(t, h, "POST", "/v1/vms", `{"name": "vm1"}`)
	assert.Equal(t, http.StatusConflict, code, body)
	code, body = do(t, h, "POST", "/v1/vms", `{"name": "`+strings.Repeat("x", 64)+`"}`)
	assert.Equal(t, http.StatusCreated, code, body)
	code, _ = do(t, h, "GET", "/v1/vms/nope", "")
	assert.Equal(t, http.StatusNotFound, code)
	code, _ = do(t, h, "PUT", "/v1/vms", "")
	assert.Equal(t, http.StatusMethodNotAllowed, code)

	// A worker that cannot start: a clear 500, and the VM stays wanted
	// until it is stopped.
	code, body = do(t, h, "POST", "/v1/vms/vm1/start", "")
	assert.Equal(t, http.StatusInternalServerError, code, body)
	assert.Contains(t, body, "did not start")
	assert.Contains(t, body, "no-such-vtpmd")
	// It is tried again after 100 ms, 200 ms, 400 ms, 800 ms...
	time.Sleep(1200 * time.Millisecond)
	st, err := s.VM("vm1")
	require.NoError(t, err)
	assert.Equal(t, "running", st.Desired)
	assert.Equal(t, "restarting", st.State)
	assert.GreaterOrEqual(t, st.Restarts, 3, "restarts within 1.2 s")
	assert.LessOrEqual(t, st.Restarts, 5, "restarts within 1.2 s")
	code, body = do(t, h, "DELETE", "/v1/vms/vm1", "")
	assert.Equal(t, http.StatusConflict, code, body)
	code, body = do(t, h, "POST", "/v1/vms/vm1/stop", "")
	assert.Equal(t, http.StatusOK, code, body)
	_, err = os.Stat(st.Ctrl)
	assert.ErrorIs(t, err, os.ErrNotExist)
	code, body = do(t, h, "DELETE", "/v1/vms/vm1", "")
	assert.Equal(t, http.StatusOK, code, body)

	code, body = do(t, h, "GET", "/v1/vms", "")
	require.Equal(t, http.StatusOK, code)
	var list []Status
	require.NoError(t, json.Unmarshal([]byte(body), &list))
	require.Len(t, list, 1)
	assert.Equal(t, strings.Repeat("x", 64), list[0].Name)
}

// A socket path too long for a unix socket is refused at create.
func TestLongSocketPath(t *testing.T) {
	s := testSupervisor(t)
	s.cfg.RunDir = "/" + strings.Repeat("r", 60)
	_, err := s.Create(CreateRequest{Name: strings.Repeat("n", 60)})
	assert.ErrorIs(t, err, ErrBadRequest)
	assert.ErrorContains(t, err, "longer than 107 bytes")
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "serve.json")
	require.NoError(t, os.WriteFile(path, []byte(`{"state_dir": "/s", "run_dir": "/r", "log_level": "debug"}`), 0o600))
	c := Config{StateDir: "/default", HostKey: "/k"}
	require.NoError(t, c.LoadConfig(path))
	assert.Equal(t, Config{StateDir: "/s", RunDir: "/r", HostKey: "/k", LogLevel: "debug"}, c)
	assert.Equal(t, "/r/admin.sock", c.AdminSocket())

	require.NoError(t, os.WriteFile(path, []byte(`{"state_dri": "/s"}`), 0o600))
	assert.ErrorContains(t, c.LoadConfig(path), "unknown field")
	c.LogLevel = "loud"
	_, err := c.Level()
	assert.Error(t, err)
	c = Config{WorkerUser: "no-such-user-of-vtpmd"}
	_, err = c.workerCredential()
	assert.ErrorContains(t, err, "no such user")
}

// The client reports the API's errors with their HTTP code.
func TestClient(t *testing.T) {
	s := testSupervisor(t)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	s.cfg.Admin = sock
	srv := httptest.NewUnstartedServer(s.Handler())
	l, err := unixsock.Listen(sock, 0o600, -1, -1)
	require.NoError(t, err)
	srv.Listener = l
	srv.Start()
	defer srv.Close()
	c := NewClient(sock)
	st, err := c.Create(CreateRequest{Name: "a"})
	require.NoError(t, err)
	assert.Equal(t, "a", st.Name)
	_, err = c.Create(CreateRequest{Name: "a"})
	var apiErr *APIError
	require.ErrorAs(t, err, &apiErr)
	assert.Equal(t, http.StatusConflict, apiErr.Code)
	_, err = c.VM("b")
	require.ErrorAs(t, err, &apiErr)
	assert.Equal(t, http.StatusNotFound, apiErr.Code)
	list, err := c.List()
	require.NoError(t, err)
	assert.Len(t, list, 1)
	require.NoError(t, c.Delete("a"))
	var buf bytes.Buffer
	require.NoError(t, json.NewEncoder(&buf).Encode(list))
}

// A second supervisor on the same run dir does not take the admin socket
// of the first, even on another state dir.
func TestAdminSocketInUse(t *testing.T) {
	s := testSupervisor(t)
	l, err := unixsock.Listen(s.cfg.AdminSocket(), 0o600, -1, -1)
	require.NoError(t, err)
	defer l.Close()
	err = s.Run(t.Context())
	assert.ErrorContains(t, err, "another supervisor answers")
}
