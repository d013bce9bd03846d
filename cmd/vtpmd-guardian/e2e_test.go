package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

// binary is vtpmd-guardian, built once for the tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vtpmd-guardian-test-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "vtpmd-guardian")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		panic(string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func guardianCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(binary, args...).CombinedOutput()
	return string(out), err
}

func TestInitServeAndAdminThroughTheCLI(t *testing.T) {
	dir := t.TempDir()
	data, kek := filepath.Join(dir, "data"), filepath.Join(dir, "etc", "kek")
	out, err := guardianCmd(t, "init", "--data-dir", data, "--kek-file", kek, "--fabric", "fabric-a")
	require.NoError(t, err, out)
	assert.Contains(t, out, `fabric "fabric-a" initialized`)
	for path, mode := range map[string]os.FileMode{kek: 0o600, filepath.Join(data, "admin.token"): 0o600, filepath.Join(data, "keys.sealed"): 0o600} {
		fi, err := os.Stat(path)
		require.NoError(t, err)
		assert.Equal(t, mode, fi.Mode().Perm(), path)
	}
	out, err = guardianCmd(t, "init", "--data-dir", data, "--kek-file", kek)
	assert.Error(t, err)
	assert.Contains(t, out, "initialized already")

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	var logs bytes.Buffer
	serve := exec.Command(binary, "serve", "--listen", addr, "--data-dir", data, "--kek-file", kek, "--name", "r1")
	serve.Stdout, serve.Stderr = &logs, &logs
	require.NoError(t, serve.Start())
	t.Cleanup(func() {
		serve.Process.Signal(os.Interrupt)
		serve.Wait()
		if t.Failed() {
			t.Logf("serve's log:\n%s", logs.String())
		}
	})
	admin := func(args ...string) (string, error) {
		return guardianCmd(t, append(args, "--url", "https://"+addr, "--data-dir", data)...)
	}
	require.Eventually(t, func() bool {
		_, err := admin("host", "list")
		return err == nil
	}, time.Minute, 100*time.Millisecond, "serve answers")

	hk := &host.HostKey{Path: filepath.Join(dir, "host-key.pem")}
	id, err := hk.Identity()
	require.NoError(t, err)
	idFile := filepath.Join(dir, "identity.json")
	b, err := json.Marshal(id)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(idFile, b, 0o644))
	out, err = admin("host", "add", "host-1", "--group", "rack-1", "--identity", idFile)
	require.NoError(t, err, out)
	assert.Contains(t, out, "registered host host-1 in group rack-1 (hostkey mode)")
	out, err = admin("host", "add", "host-1", "--group", "rack-1", "--identity", idFile)
	assert.Error(t, err)
	assert.Contains(t, out, "conflict")
	out, err = admin("host", "list")
	require.NoError(t, err, out)
	assert.Regexp(t, `host-1\s+rack-1\s+hostkey`, out)

	boot := measuredboot.TypicalBoot("fw 1")
	log, err := measuredboot.Encode(boot)
	require.NoError(t, err)
	logFile := filepath.Join(dir, "binary_bios_measurements")
	require.NoError(t, os.WriteFile(logFile, log, 0o644))
	out, err = admin("baseline", "record", "rack-1", "--event-log", logFile, "--pcrs", "0,4")
	require.NoError(t, err, out)
	want := measuredboot.PCRs(boot, []int{4})
	assert.Contains(t, out, "recorded the baseline of group rack-1")
	assert.Regexp(t, `4\s+`+hex.EncodeToString(want[4]), out)
	out, err = admin("baseline", "list")
	require.NoError(t, err, out)
	assert.Contains(t, out, "group rack-1")

	out, err = guardianCmd(t, "host", "list", "--url", "https://"+addr, "--data-dir", data, "--token-file", idFile)
	assert.Error(t, err)
	assert.Contains(t, out, "unauthorized")

	out, err = admin("audit")
	require.NoError(t, err, out)
	assert.Regexp(t, `r1\s+host add\s+host-1\s+-\s+ok`, out)
	assert.Regexp(t, `r1\s+host add\s+host-1\s+-\s+conflict`, out)
	assert.Regexp(t, `r1\s+baseline record\s+-\s+-\s+ok`, out)
	assert.Regexp(t, `r1\s+host list\s+-\s+-\s+unauthorized`, out)
	assert.NotContains(t, logs.String(), strings.TrimSpace(readFile(t, filepath.Join(data, "admin.token"))), "no token in the log")
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// vtpmd's own processes (every VM's worker) must not link etcd: the guardian
// is a binary of its own for that.
func TestVtpmdDoesNotLinkEtcd(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "../vtpmd").CombinedOutput()
	require.NoError(t, err, string(out))
	assert.NotContains(t, string(out), "go.etcd.io/")
	assert.Contains(t, string(out), "github.com/vtpmd/vtpmd/vtpm\n", "the listing is vtpmd's")
}
