package main

import (
	"context"
	"debug/elf"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/transport"
	"github.com/vtpmd/vtpmd/vtpm"
)

// runDaemonCmd runs the daemon binary to completion and returns its output
// and exit code.
func runDaemonCmd(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return runDaemonCmdEnv(t, os.Environ(), args...)
}

// runDaemonCmdEnv is runDaemonCmd with the environment env.
func runDaemonCmdEnv(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	// Output goes to a file, not a pipe: a daemonized child may keep it.
	out, err := os.CreateTemp(t.TempDir(), "out")
	require.NoError(t, err)
	defer out.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, daemonPath, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = env
	err = cmd.Run()
	text, readErr := os.ReadFile(out.Name())
	require.NoError(t, readErr)
	if exitErr, ok := err.(*exec.ExitError); ok {
		return string(text), exitErr.ExitCode()
	}
	require.NoError(t, err)
	return string(text), 0
}

func TestPrintCapabilities(t *testing.T) {
	out, code := runDaemonCmd(t, "socket", "--tpm2", "--print-capabilities")
	require.Equal(t, 0, code, out)
	if testingPeer() {
		assert.Contains(t, out, `"tpm-2.0"`)
		return
	}
	assert.Equal(t, `{ "type": "swtpm", "features": [ "tpm-2.0", "tpm-send-command-header", "flags-opt-startup", `+
		`"flags-opt-disable-auto-shutdown", "ctrl-opt-terminate", "cmdarg-key-fd", "cmdarg-pwd-fd", "cmdarg-print-states", "cmdarg-migration", "nvram-backend-dir", `+
		`"nvram-backend-file", "tpmstate-opt-lock", "tpmstate-dir-backend-opt-fsync", "rsa-keysize-1024", "rsa-keysize-2048", `+
		`"systemd-notify" ], "version": "0.1.0" }`+"\n", out)
	// libvirt asks without --tpm2.
	out2, code := runDaemonCmd(t, "socket", "--print-capabilities")
	require.Equal(t, 0, code)
	assert.Equal(t, out, out2)
}

func TestPrintStates(t *testing.T) {
	forEachBackend(t, testPrintStates)
}

func testPrintStates(t *testing.T, b stateBackend) {
	dir := sockDir(t)
	out, code := runDaemonCmd(t, "socket", "--tpm2", "--print-states", "--tpmstate", b.tpmstate(dir))
	require.Equal(t, 0, code, out)
	assert.Equal(t, `{ "type": "swtpm", "states": [] }`, strings.TrimSpace(out))
	if b == fileBackend {
		// As swtpm does; swtpm_setup 0.7.1 counts on it.
		assert.FileExists(t, b.statePath(dir), "--print-states creates a missing state file")
	}

	tpm := startSocketTPMOn(t, b, dir, "not-need-init", "")
	ioctlOK(t, tpm.ctrl, "-s")
	tpm.waitExit(t, 5*time.Second)
	uri := "backend-uri=dir://" + dir
	if b == fileBackend {
		uri = b.tpmstate(dir)
	}
	out, code = runDaemonCmd(t, "socket", "--tpm2", "--print-states", "--tpmstate", uri)
	require.Equal(t, 0, code, out)
	assert.Regexp(t, `^\{ "type": "swtpm", "states": \[ \{"name": "permall", "size": [1-9][0-9]+\} \] \}$`, strings.TrimSpace(out))
}

func TestBadCommandLines(t *testing.T) {
	dir := sockDir(t)
	ctrl := "type=unixio,path=" + filepath.Join(dir, "ctrl")
	for _, tc := range []struct {
		args      []string
		want      string // vtpmd's message
		vtpmdOnly bool   // swtpm accepts it: a TPM 1.2, a default port, or its own key support
	}{
		{[]string{"socket", "--tpm2", "--bogus"}, `unknown option "--bogus"`, false},
		{[]string{"socket", "--tpm2", "--print-cap"}, `unknown option "--print-cap"`, true}, // swtpm 0.7.1 prefix-matches
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", ctrl + ",foo=1"}, `--ctrl: unknown sub-option "foo=1"`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", ctrl + ",mode=0999"}, `mode="0999" is not an octal mode`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", "type=tcp"}, `type=tcp needs port=`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", ctrl, "--flags", "startup-clear,bogus"}, `--flags: unknown sub-option "bogus"`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", ctrl, "stray"}, `unexpected argument "stray"`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir}, `there is no channel to serve`, true},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl"}, `option --ctrl needs a value`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", ctrl, "--key", "file=/nonexistent/key"}, `--key: open /nonexistent/key: no such file or directory`, false},
		{[]string{"socket", "--tpmstate", "dir=" + dir, "--ctrl", ctrl}, `TPM 2.0 only: pass --tpm2`, true},
		{[]string{"socket", "--tpm2", "--tpmstate", "backend-uri=nbd://host/x", "--ctrl", ctrl}, `backend URI "nbd://host/x": give dir://<dir> or file://<file or block device>`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "backend-uri=file://", "--ctrl", ctrl}, `backend URI "file://" names no path`, false},
		{[]string{"socket", "--tpm2", "--tpmstate", "backend-uri=file://" + dir + "/f,lock=false", "--ctrl", ctrl}, `always locked`, true},
	} {
		if tc.vtpmdOnly && testingPeer() {
			continue
		}
		out, code := runDaemonCmd(t, tc.args...)
		assert.NotEqual(t, 0, code, "%v: %s", tc.args, out)
		if !testingPeer() {
			assert.Contains(t, out, tc.want, "%v", tc.args)
		}
	}
	_, err := os.Stat(filepath.Join(dir, "ctrl"))
	assert.ErrorIs(t, err, os.ErrNotExist, "no socket is left behind")
}

// Old libvirt starts swtpm with --daemon and --pid and waits for the pid
// file; libvirt stops it with swtpm_ioctl -s.
func TestDaemonWithPidFile(t *testing.T) {
	dir := sockDir(t)
	ctrl, pidFile := filepath.Join(dir, "ctrl"), filepath.Join(dir, "pid")
	out, code := runDaemonCmd(t, "socket", "--daemon", "--tpm2", "--ctrl", "type=unixio,path="+ctrl+",mode=0600",
		"--tpmstate", "dir="+dir, "--pid", "file="+pidFile, "--log", "file="+filepath.Join(dir, "log"))
	require.Equal(t, 0, code, out)
	pidText, err := os.ReadFile(pidFile)
	require.NoError(t, err, "the pid file is there when --daemon returns")
	pid, err := strconv.Atoi(string(pidText))
	require.NoError(t, err, "pid file holds only the number: %q", pidText)
	require.NoError(t, syscall.Kill(pid, 0), "the daemon runs")
	fi, err := os.Stat(ctrl)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	ioctlOK(t, ctrl, "-s")
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	assert.Error(t, syscall.Kill(pid, 0), "the daemon ended")
	for _, gone := range []string{pidFile, ctrl} {
		_, err := os.Stat(gone)
		assert.ErrorIs(t, err, os.ErrNotExist, gone)
	}
}

// swtpm_setup passes socketpair ends: the data channel as --server
// type=tcp,fd= and the control channel as --ctrl type=unixio,clientfd=.
func TestSwtpmSetupDescriptors(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm 0.7.1 resets such a data descriptor; its swtpm_setup passes them differently")
	}
	dir := sockDir(t)
	pair := func() (net.Conn, *os.File) {
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		require.NoError(t, err)
		local := os.NewFile(uintptr(fds[0]), "local")
		c, err := net.FileConn(local)
		require.NoError(t, err)
		local.Close()
		t.Cleanup(func() { c.Close() })
		return c, os.NewFile(uintptr(fds[1]), "remote")
	}
	data, dataRemote := pair()
	ctrl, ctrlRemote := pair()
	pidFile := filepath.Join(dir, "pid")
	cmd := exec.Command(daemonPath, "socket", "--flags", "not-need-init,startup-clear",
		"--tpmstate", "backend-uri=dir://"+dir+",lock", "--pid", "file="+pidFile, "--tpm2",
		"--server", "type=tcp,fd=3", "--ctrl", "type=unixio,clientfd=4")
	cmd.ExtraFiles = []*os.File{dataRemote, ctrlRemote}
	require.NoError(t, cmd.Start())
	dataRemote.Close()
	ctrlRemote.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	require.NoError(t, data.SetDeadline(time.Now().Add(10*time.Second)))
	_, err := data.Write(unhex("80010000000c0000017b0008"))
	require.NoError(t, err)
	rsp := recvTPMResponse(t, data)
	assert.Equal(t, unhex("800100000014000000000008"), rsp[:12], "GetRandom after startup-clear")

	require.NoError(t, ctrl.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = ctrl.Write(transport.GetInfoRequest{Flags: vtpm.InfoSpecification | vtpm.InfoAttributes}.Marshal())
	require.NoError(t, err)
	buf := make([]byte, 4096)
	n, err := ctrl.Read(buf)
	require.NoError(t, err)
	reply, err := transport.DecodeReply(transport.CmdGetInfo, buf[:n])
	require.NoError(t, err)
	assert.Contains(t, string(reply.(transport.GetInfoReply).Data), `"TPMSpecification":{"family":"2.0"`)

	_, err = ctrl.Write(transport.ShutdownRequest{}.Marshal())
	require.NoError(t, err)
	n, err = ctrl.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, unhex("00000000"), buf[:n])
	select {
	case err := <-exited:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("CMD_SHUTDOWN did not end the process")
	}
}

// --terminate ends the process when the data client disconnects; the
// control channel's terminate when the control client does.
func TestTerminate(t *testing.T) {
	for _, tc := range []struct{ name, ctrlOpt, flag, close string }{
		{"data", "", "--terminate", "data"},
		{"ctrl", ",terminate", "", "ctrl"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.ctrlOpt != "" && testingPeer() {
				t.Skip("swtpm 0.7.1 has no ctrl terminate")
			}
			dir := sockDir(t)
			ctrl, data := filepath.Join(dir, "ctrl"), filepath.Join(dir, "data")
			args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--flags", "not-need-init",
				"--ctrl", "type=unixio,path=" + ctrl + tc.ctrlOpt, "--server", "type=unixio,path=" + data}
			if tc.flag != "" {
				args = append(args, tc.flag)
			}
			d := startDaemon(t, args, ctrl, data)
			c, err := net.Dial("unix", map[string]string{"data": data, "ctrl": ctrl}[tc.close])
			require.NoError(t, err)
			require.NoError(t, c.Close())
			d.waitExit(t, 5*time.Second)
			assert.NoError(t, d.err)
		})
	}
}

// The NV image size is fixed in vtpm; the engine's s_NV symbol must match.
func TestEngineNVSize(t *testing.T) {
	if testingPeer() {
		t.Skip("a property of the vtpmd binary")
	}
	f, err := elf.Open(daemonPath)
	require.NoError(t, err)
	defer f.Close()
	syms, err := f.Symbols()
	require.NoError(t, err)
	for _, s := range syms {
		if s.Name == "s_NV" {
			assert.Equal(t, uint64(vtpm.NVSize), s.Size)
			return
		}
	}
	t.Fatal("no s_NV symbol in the vtpmd binary")
}
