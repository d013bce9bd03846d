package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// daemonPath is the binary the end-to-end tests run. It is the vtpmd built by
// TestMain, or swtpm when VTPMD_TEST_PEER=swtpm, so that every expectation can
// be checked against the real swtpm too.
var daemonPath string

// guardianPath is vtpmd-guardian, built by TestMain beside vtpmd (not with
// VTPMD_TEST_PEER=swtpm: the guardian is vtpmd's own).
var guardianPath string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if os.Getenv("VTPMD_TEST_PEER") == "swtpm" {
		path, err := exec.LookPath("swtpm")
		if err != nil {
			fmt.Fprintln(os.Stderr, "VTPMD_TEST_PEER=swtpm but swtpm is not installed:", err)
			return 1
		}
		daemonPath = path
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "vtpmd-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "create build dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	daemonPath = filepath.Join(dir, "vtpmd")
	// The daemons the tests start share one host key, outside every state
	// dir, instead of the machine's.
	os.Setenv("VTPMD_HOST_KEY", filepath.Join(dir, "keys", "host.key"))
	build := exec.Command("go", "build", "-o", daemonPath, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build vtpmd:", err)
		return 1
	}
	// Beside vtpmd, where `vtpmd guardian` looks for it.
	guardianPath = filepath.Join(dir, "vtpmd-guardian")
	build = exec.Command("go", "build", "-o", guardianPath, "../vtpmd-guardian")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build vtpmd-guardian:", err)
		return 1
	}
	return m.Run()
}

// testingPeer reports whether the tests run against the real swtpm.
func testingPeer() bool { return os.Getenv("VTPMD_TEST_PEER") == "swtpm" }

// daemon is one running vtpmd (or swtpm) process started by a test.
type daemon struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan struct{}
	err    error
}

// startDaemon runs the daemon with args (for example "socket", "--tpm2", ...),
// waits until every path in waitFor exists, and stops the process when the test
// ends.
func startDaemon(t *testing.T, args []string, waitFor ...string) *daemon {
	t.Helper()
	return startDaemonFiles(t, args, nil, waitFor...)
}

// startDaemonFiles is startDaemon with extra descriptors, 3 and up, for the
// daemon; it closes its copies of them once the daemon has started.
func startDaemonFiles(t *testing.T, args []string, files []*os.File, waitFor ...string) *daemon {
	t.Helper()
	d := &daemon{cmd: exec.Command(daemonPath, args...), stderr: &bytes.Buffer{}, done: make(chan struct{})}
	d.cmd.ExtraFiles = files
	d.cmd.Stdout = d.stderr
	d.cmd.Stderr = d.stderr
	require.NoError(t, d.cmd.Start(), "start %s %s", daemonPath, strings.Join(args, " "))
	for _, f := range files {
		f.Close()
	}
	go func() { d.err = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() { d.stop(t) })
	deadline := time.Now().Add(10 * time.Second)
	for _, path := range waitFor {
		for {
			if _, err := os.Stat(path); err == nil {
				break
			}
			select {
			case <-d.done:
				t.Fatalf("daemon exited before %s appeared: %v\n%s", path, d.err, d.stderr.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not appear within 10 s\n%s", path, d.stderr.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return d
}

// stop ends the process with SIGTERM (SIGKILL after 5 s) if it still runs.
func (d *daemon) stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(5 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		t.Logf("daemon needed SIGKILL\n%s", d.stderr.String())
	}
}

// waitExit waits up to timeout for the process to end by itself.
func (d *daemon) waitExit(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-d.done:
	case <-time.After(timeout):
		t.Fatalf("daemon still running after %v\n%s", timeout, d.stderr.String())
	}
}
