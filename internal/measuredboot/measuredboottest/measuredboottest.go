// Package measuredboottest gives unit tests a host TPM with a measured
// boot: the in-process TPM simulator into whose PCRs a boot was replayed,
// and that boot's event log in a file. (End-to-end tests use a vtpmd
// instance instead: see sealing/guardian/host/guardiantest.)
package measuredboottest

import (
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/measuredboot"
)

// Booted starts the simulator (one per process: it is closed when the test
// ends), replays boot into it, and writes boot's event log. It returns how
// to open the TPM (each Close leaves the simulator open, as a host's TPM
// outlives one attestation) and the event log's path.
func Booted(t testing.TB, boot []measuredboot.Event) (open func() (io.ReadWriteCloser, error), eventLog string) {
	t.Helper()
	sim, err := simulator.Get()
	require.NoError(t, err)
	t.Cleanup(func() { sim.Close() })
	require.NoError(t, measuredboot.Replay(sim, boot))
	log, err := measuredboot.Encode(boot)
	require.NoError(t, err)
	eventLog = filepath.Join(t.TempDir(), "binary_bios_measurements")
	require.NoError(t, os.WriteFile(eventLog, log, 0o644))
	return func() (io.ReadWriteCloser, error) { return openTPM{sim}, nil }, eventLog
}

// openTPM is the simulator whose Close leaves it open.
type openTPM struct{ *simulator.Simulator }

func (openTPM) Close() error { return nil }
