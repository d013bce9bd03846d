package serve

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
	"github.com/vtpmd/vtpmd/state"
)

func protectorOf(t *testing.T, vmID string) []byte {
	t.Helper()
	k, err := guardian.NewEncryptionKey()
	require.NoError(t, err)
	secret, err := guardian.NewStateKey()
	require.NoError(t, err)
	p, err := guardian.NewProtector(vmID, secret, guardian.Recipient{Name: "fabric1", Public: k.Public()})
	require.NoError(t, err)
	b, err := p.Marshal()
	require.NoError(t, err)
	return b
}

// A worker gets and stores its own VM's key protector only: one that
// parses, is of its VM, made before the VM has state, and never over
// another; without a guardian there is none.
func TestWorkerProtectorRequests(t *testing.T) {
	s := testSupervisor(t)
	r := &vmRun{s: s, vm: state.VM{Name: "vm1", ID: "id1"}, log: slog.New(slog.DiscardHandler)}
	assert.Equal(t, workerproto.NotFound{}, r.getProtector(workerproto.GetProtector{VMID: "id1"}))

	mine, other := protectorOf(t, "id1"), protectorOf(t, "id2")
	for _, bad := range []workerproto.PutProtector{
		{VMID: "id2", Data: other},
		{VMID: "id1", Data: other},
		{VMID: "id1", Data: []byte("{")},
	} {
		assert.IsType(t, workerproto.Error{}, r.putProtector(bad))
	}
	assert.Equal(t, workerproto.Ack{}, r.putProtector(workerproto.PutProtector{VMID: "id1", Data: mine}))
	again := protectorOf(t, "id1")
	assert.Equal(t, workerproto.Protector{Data: mine}, r.putProtector(workerproto.PutProtector{VMID: "id1", Data: again}),
		"an existing protector is sent back, not replaced")
	assert.Equal(t, workerproto.Protector{Data: mine}, r.getProtector(workerproto.GetProtector{VMID: "id1"}))
	assert.IsType(t, workerproto.Error{}, r.getProtector(workerproto.GetProtector{VMID: "id2"}))

	// A VM with state gets no new protector.
	r2 := &vmRun{s: s, vm: state.VM{Name: "vm2", ID: "id2"}, log: slog.New(slog.DiscardHandler)}
	require.NoError(t, s.store.Put(&state.Record{VMID: "id2", Generation: 1, Sealed: []byte("sealed")}))
	assert.Equal(t, workerproto.Error{Message: "the VM has state: a new key would not open it"},
		r2.putProtector(workerproto.PutProtector{VMID: "id2", Data: other}))

	// Without a guardian the worker has a key, and no protector.
	key, err := sealing.NewKey("host:x", make([]byte, 32))
	require.NoError(t, err)
	r.key = key
	assert.IsType(t, workerproto.Error{}, r.getProtector(workerproto.GetProtector{VMID: "id1"}))
}

// The workers' guardian config is the file's, checked, with the host key
// of host-key mode beside the host-local key by default.
func TestGuardianConfig(t *testing.T) {
	dir := t.TempDir()
	c := Config{HostKey: filepath.Join(dir, "keys", "host.key")}
	b, err := c.guardian()
	require.NoError(t, err)
	assert.Nil(t, b, "no guardian")

	c.GuardianConfig = filepath.Join(dir, "guardian.json")
	require.NoError(t, os.WriteFile(c.GuardianConfig, []byte(`{"urls":["https://g1:8443"],"ca_file":"ca.pem","host":"h1","mode":"hostkey"}`), 0o644))
	b, err = c.guardian()
	require.NoError(t, err)
	g, err := host.ParseConfig(b, "/")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "keys", "guardian-host.key"), g.HostKeyFile)
	assert.Equal(t, filepath.Join(dir, "ca.pem"), g.CAFile, "relative to the config file")

	require.NoError(t, os.WriteFile(c.GuardianConfig, []byte(`{"urls":["http://g1"],"ca_file":"ca.pem"}`), 0o644))
	_, err = c.guardian()
	assert.ErrorContains(t, err, c.GuardianConfig)
}
