package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
)

// guardianStartDeadline is the hosts' start deadline with real guardians:
// long enough for an attestation on a loaded machine, short enough that a
// start with every replica down fails quickly.
const guardianStartDeadline = 5 * time.Second

// Three vtpmd-guardian replicas on a three-member etcd (Debian's etcd, real
// processes), end to end with vtpmd: a host registered and given its
// baseline through one replica attests at each of the others; with two
// replicas killed VMs still start; with all three down running VMs keep
// answering and a start fails within the start deadline naming every URL;
// a restarted replica serves the next CMD_INIT of the same vtpmd; the
// audit log, read through any replica, holds the releases and refusals of
// all of them.
func TestGuardianReplicasOnEtcd(t *testing.T) {
	if testingPeer() {
		t.Skip("the guardian is vtpmd's own")
	}
	if _, err := os.Stat(guardiantest.EtcdBinary); err != nil {
		requireEnv(t, "the guardian HA test runs a cluster of Debian's etcd (package etcd-server): %v", err)
	}
	dir := t.TempDir()
	etcd, err := guardiantest.StartEtcd(guardiantest.EtcdBinary, dir, 3)
	require.NoError(t, err)
	t.Cleanup(etcd.Stop)
	fabric, err := guardiantest.Init(guardianPath, dir, etcd.Endpoints)
	require.NoError(t, err)
	t.Cleanup(fabric.Stop)
	var replicas []*guardiantest.Replica
	for _, name := range []string{"r1", "r2", "r3"} {
		r, err := fabric.StartReplica(name)
		require.NoError(t, err)
		replicas = append(replicas, r)
	}
	r1, r2, r3 := replicas[0], replicas[1], replicas[2]
	t.Cleanup(func() {
		if t.Failed() {
			for _, r := range replicas {
				b, _ := os.ReadFile(r.Log)
				t.Logf("replica %s's log:\n%s", r.Name, b)
			}
		}
	})
	config := func(name, more string, rs ...*guardiantest.Replica) string {
		var urls []string
		for _, r := range rs {
			urls = append(urls, r.URL)
		}
		path := filepath.Join(dir, fmt.Sprintf("%s-%d-guardian.json", name, len(urls)))
		require.NoError(t, os.WriteFile(path, []byte(fabric.HostConfig(urls, name, guardianStartDeadline, more)), 0o644))
		return path
	}

	// Registered, and the baseline recorded, through r1 alone.
	good := measuredboot.TypicalBoot("firmware 1.0")
	tpm := bootedHostTPM(t, good)
	require.NoError(t, fabric.Register([]string{r1.URL}, "host1", "rack1", hostIdentity(t, config("host1", tpm, r1))))
	require.NoError(t, fabric.Baseline([]string{r1.URL}, "rack1", good))

	// The host attests at r2 and at r3, each alone in its config.
	for _, r := range []*guardiantest.Replica{r2, r3} {
		vm := startGuardedVM(t, "", config("host1", tpm, r))
		require.True(t, vm.init(t), "CMD_INIT attested at %s alone\n%s", r.Name, vm.logText(t))
		assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, vm.data, tpmStartupClear))
		vm.stop(t)
	}
	// An unregistered host is refused at r2 too.
	stranger := startGuardedVM(t, "", config("stranger", fmt.Sprintf(`,"mode":"hostkey","host_key_file":%q`, filepath.Join(dir, "stranger.key")), r2))
	assert.False(t, stranger.init(t), "CMD_INIT at an unregistered host")
	assert.Contains(t, stranger.logText(t), "unknown host")

	// Every replica in the config; a VM runs.
	all := config("host1", tpm, r1, r2, r3)
	running := startGuardedVM(t, "", all)
	require.True(t, running.init(t), "CMD_INIT with three replicas\n%s", running.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, running.data, tpmStartupClear))

	// Two replicas down (the first two tried): a new VM still starts.
	r1.Kill()
	r2.Kill()
	vm := startGuardedVM(t, "", all)
	require.True(t, vm.init(t), "CMD_INIT with r1 and r2 down\n%s", vm.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, vm.data, tpmStartupClear))

	// All three down: the running VMs answer; a start fails within the
	// start deadline (the bound here is loose), naming every URL tried.
	late := startGuardedVM(t, "", all)
	r3.Kill()
	requireGetRandom(t, running.data)
	requireGetRandom(t, vm.data)
	start := time.Now()
	assert.False(t, late.init(t), "CMD_INIT with every replica down")
	took := time.Since(start)
	assert.Less(t, took, guardianStartDeadline+25*time.Second, "bounded by the start deadline")
	assert.GreaterOrEqual(t, took, guardianStartDeadline/2, "failover retried until the deadline")
	text := late.logText(t)
	assert.Contains(t, text, "guardian unreachable")
	for _, r := range replicas {
		assert.Contains(t, text, r.URL)
	}
	assert.NotEqual(t, tpmRspSuccess, tpmRoundTrip(t, late.data, tpmStartupClear), "the TPM did not start")

	// One replica back: the same vtpmd's next CMD_INIT works.
	require.NoError(t, r2.Start())
	require.True(t, late.init(t), "CMD_INIT once r2 is back, same vtpmd\n%s", late.logText(t))
	assert.Equal(t, tpmRspSuccess, tpmRoundTrip(t, late.data, tpmStartupClear))

	// The audit log, through r2: the releases at every replica and the
	// refusal at r2.
	out, err := fabric.Admin([]string{r2.URL}, "audit", "--last", "0")
	require.NoError(t, err)
	for _, r := range replicas {
		assert.Regexp(t, regexp.MustCompile(`(?m)^\S+\s+`+r.Name+`\s+release\s+\S+\s+\S+\s+ok\b`), out, "a release at %s", r.Name)
	}
	assert.Regexp(t, `(?m)^\S+\s+r2\s+\S+\s+stranger\s+\S+\s+unknown_host\b`, out, "the refusal of the unregistered host")
	assert.Regexp(t, `(?m)^\S+\s+r1\s+host add\s+host1\s+-\s+ok\b`, out)
}
