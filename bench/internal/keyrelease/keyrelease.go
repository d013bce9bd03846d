// Package keyrelease measures the time a VM's start spends in the guardian:
// the host's attestation (nonce, TPM quote of a vtpmd host TPM with a
// replayed measured-boot event log, verification) and the release of the
// VM's state key. It times CMD_INIT, which obtains the key, of a new
// `vtpmd socket` process for an existing VM (as libvirt starts it, plus
// --guardian-config), against the same start without a guardian (the host
// key seals the state): the difference is the guardian's share. Guardians
// are real vtpmd-guardian processes: one replica on its local store, and
// three replicas on a three-member etcd (Debian's etcd-server).
package keyrelease

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/client"
	"github.com/vtpmd/vtpmd/bench/internal/fleet"
	"github.com/vtpmd/vtpmd/bench/internal/report"
	"github.com/vtpmd/vtpmd/internal/measuredboot"
	"github.com/vtpmd/vtpmd/sealing/guardian/host/guardiantest"
	"github.com/vtpmd/vtpmd/transport"
)

// Method describes the measurement in the report.
const Method = "CMD_INIT's round trip on a new vtpmd socket process of an existing VM (libvirt's start, without not-need-init), " +
	"with --guardian-config (the key comes from the guardian: nonce, TPM quote of a vtpmd host TPM with a replayed event log, " +
	"attestation, release, over new HTTPS connections) and without (the host key); the guardian's share is the difference " +
	"of the quantiles. The setups take turns."

// Config configures a measurement.
type Config struct {
	// Vtpmd and Guardian are the vtpmd and vtpmd-guardian binaries.
	Vtpmd, Guardian string
	// Etcd is the etcd binary for the three-replica setup; "" or a
	// missing file skips that setup with a note.
	Etcd string
	// Runs is the number of measured starts of each setup.
	Runs int
	// Dir is where the state, the guardians and etcd live; removed at the
	// end.
	Dir string
	// Progress receives one-line status updates.
	Progress func(string)
}

// startDeadline is the hosts' start deadline: a start that needs longer
// fails the run.
const startDeadline = 30 * time.Second

// setup is one way of starting the VM.
type setup struct {
	name   string
	config string // guardian config file; "" for none
	kind   fleet.Kind
	dir    string // the VM's state
}

// Run measures each setup Runs times, after one unmeasured start of each
// that creates the VM's state (and key protector).
func Run(ctx context.Context, cfg Config) (*report.KeyRelease, error) {
	if cfg.Runs <= 0 {
		return nil, errors.New("key release: no runs")
	}
	base, err := os.MkdirTemp(cfg.Dir, "vtpmbench-guardian-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(base)
	progress := func(msg string) {
		if cfg.Progress != nil {
			cfg.Progress("guardian: " + msg)
		}
	}
	kr := &report.KeyRelease{Method: Method}
	env := []string{"VTPMD_HOST_KEY=" + filepath.Join(base, "host.key")}

	progress("host TPM")
	boot := measuredboot.TypicalBoot("firmware 1.0")
	tpmDir := filepath.Join(base, "host-tpm")
	if err := os.Mkdir(tpmDir, 0o700); err != nil {
		return nil, err
	}
	tpm, err := guardiantest.StartHostTPM(cfg.Vtpmd, tpmDir, append(os.Environ(), env...), boot)
	if err != nil {
		return nil, err
	}
	defer tpm.Stop()
	id, err := tpm.Identity()
	if err != nil {
		return nil, fmt.Errorf("host identity: %w", err)
	}

	setups := []*setup{{name: "no guardian"}}
	var stops []func() // the guardians and etcd, stopped at the end
	// fabric starts a guardian's replicas, registers the host and its
	// baseline, and adds the setup.
	fabric := func(name, dir string, etcd []string, replicas int) error {
		progress("starting " + name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			return err
		}
		f, err := guardiantest.Init(cfg.Guardian, dir, etcd)
		if err != nil {
			return err
		}
		var urls []string
		for i := range replicas {
			r, err := f.StartReplica(fmt.Sprintf("r%d", i+1))
			if err != nil {
				f.Stop()
				return err
			}
			urls = append(urls, r.URL)
		}
		if err := errors.Join(f.Register(urls, "host1", "rack1", id), f.Baseline(urls, "rack1", boot)); err != nil {
			f.Stop()
			return err
		}
		config := filepath.Join(dir, "host1-guardian.json")
		if err := os.WriteFile(config, []byte(f.HostConfig(urls, "host1", startDeadline, tpm.ConfigFields())), 0o644); err != nil {
			f.Stop()
			return err
		}
		setups = append(setups, &setup{name: name, config: config})
		stops = append(stops, f.Stop)
		return nil
	}
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()
	if err := fabric("1 replica (local store)", filepath.Join(base, "local"), nil, 1); err != nil {
		return nil, err
	}
	if _, err := os.Stat(cfg.Etcd); cfg.Etcd == "" || err != nil {
		kr.Notes = append(kr.Notes, fmt.Sprintf("3 replicas on etcd: skipped, no etcd at %q (package etcd-server)", cfg.Etcd))
	} else {
		progress("starting a 3-member etcd")
		etcdDir := filepath.Join(base, "etcd")
		if err := os.Mkdir(etcdDir, 0o700); err != nil {
			return nil, err
		}
		e, err := guardiantest.StartEtcd(cfg.Etcd, etcdDir, 3)
		if err != nil {
			return nil, err
		}
		stops = append(stops, e.Stop)
		if err := fabric("3 replicas (3-member etcd)", filepath.Join(base, "etcd-fabric"), e.Endpoints, 3); err != nil {
			return nil, err
		}
	}

	samples := make([][]time.Duration, len(setups))
	for i, s := range setups {
		s.dir = filepath.Join(base, fmt.Sprintf("vm-%d", i))
		s.kind = vmKind(cfg.Vtpmd, env, s.config)
	}
	for run := -1; run < cfg.Runs; run++ {
		for i, s := range setups {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			progress(fmt.Sprintf("%s, start %d/%d", s.name, run+1, cfg.Runs))
			d, err := s.start()
			if err != nil {
				return nil, fmt.Errorf("key release, %s: %w", s.name, err)
			}
			if run >= 0 { // the first start made the VM's state
				samples[i] = append(samples[i], d)
			}
		}
	}
	for i, s := range setups {
		kr.Setups = append(kr.Setups, report.NewKeyReleaseSetup(s.name, samples[i]))
	}
	return kr, nil
}

// vmKind is a VM's vtpmd socket as libvirt starts it (QEMU sends
// CMD_INIT), with config as its guardian config if not "".
func vmKind(vtpmd string, env []string, config string) fleet.Kind {
	return fleet.Kind{
		Name: "vtpmd",
		Env:  env,
		Argv: func(dir string) []string {
			a := []string{vtpmd, "socket", "--tpm2", "--tpmstate", "dir=" + dir,
				"--ctrl", "type=unixio,path=" + filepath.Join(dir, "ctrl"),
				"--server", "type=unixio,path=" + filepath.Join(dir, "data")}
			if config != "" {
				a = append(a, "--guardian-config", config)
			}
			return a
		},
		Probe: func(*client.Data) error { return nil }, // the TPM is not up before CMD_INIT
	}
}

// start starts the VM's vtpmd and times its CMD_INIT.
func (s *setup) start() (time.Duration, error) {
	in, err := fleet.Start(s.kind, s.dir)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	_, err = in.Ctrl.Do(transport.InitRequest{}, startDeadline+10*time.Second)
	took := time.Since(start)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, "stderr.log"))
		in.Kill()
		return 0, fmt.Errorf("CMD_INIT: %w\n%s", err, log)
	}
	return took, in.Stop(10 * time.Second)
}
