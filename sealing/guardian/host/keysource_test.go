package host

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// closedURL is the URL of a port nothing listens on: a guardian that is down.
func closedURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return "https://" + addr
}

func TestKeySourceRefusesANewKeyOverExistingState(t *testing.T) {
	dir := t.TempDir()
	s := &KeySource{
		Client:        &guardian.Client{URLs: []string{closedURL(t)}},
		Host:          "h1",
		Prover:        &HostKey{Path: filepath.Join(dir, "host.key")},
		ProtectorPath: func(string) string { return filepath.Join(dir, "key-protector.json") },
	}
	_, err := s.StartKey(context.Background(), "vm1", true)
	assert.ErrorContains(t, err, "VM \"vm1\"")
	assert.ErrorContains(t, err, "has state but its key protector")
	_, err = s.StateKey(context.Background(), "vm1")
	assert.ErrorContains(t, err, "has state but its key protector", "StateKey never makes a key")
	assert.NoFileExists(t, filepath.Join(dir, "key-protector.json"))

	require.NoError(t, os.WriteFile(filepath.Join(dir, "key-protector.json"), []byte(`{"version":1}`), 0o600))
	_, err = s.StartKey(context.Background(), "vm1", true)
	assert.ErrorContains(t, err, "bad protector")
}

func TestKeySourceNamesTheURLsOfAGuardianThatIsDown(t *testing.T) {
	dir := t.TempDir()
	urls := []string{closedURL(t), closedURL(t)}
	s := &KeySource{
		Client:        &guardian.Client{URLs: urls, AttemptTimeout: time.Second},
		Host:          "h1",
		Prover:        &HostKey{Path: filepath.Join(dir, "host.key")},
		ProtectorPath: func(string) string { return filepath.Join(dir, "key-protector.json") },
		StartDeadline: 500 * time.Millisecond,
	}
	assert.Equal(t, "guardian h1 ("+urls[0]+", "+urls[1]+")", s.Protection())
	_, err := s.StartKey(context.Background(), "vm1", false)
	require.Error(t, err)
	assert.ErrorContains(t, err, "guardian unreachable")
	assert.ErrorContains(t, err, urls[0])
	assert.ErrorContains(t, err, urls[1])
	assert.NoFileExists(t, filepath.Join(dir, "key-protector.json"), "no protector without the guardian's key")
}
