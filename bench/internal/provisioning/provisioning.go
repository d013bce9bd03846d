// Package provisioning measures how long it takes to provision a new VM's
// TPM the way libvirt does before the VM's first start: swtpm_setup with
// libvirt's options (the EKs, their certificates and the platform
// certificate from a local CA, NV write-locked), `vtpmd setup` against
// Debian's swtpm_setup driving the real swtpm, each run on a new state
// directory, the tools taking turns.
package provisioning

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/bench/internal/report"
)

// Target is the goal: vtpmd setup at least 10 times faster than
// swtpm_setup.
const Target = 10

// Config configures a measurement.
type Config struct {
	// Vtpmd is the vtpmd binary.
	Vtpmd string
	// SwtpmSetup and Swtpm are the baseline's swtpm_setup and the swtpm
	// it drives (--tpm, so that a vtpmd installed as swtpm on PATH is not
	// measured in its place); SwtpmSetup "" measures vtpmd alone.
	SwtpmSetup, Swtpm string
	// LocalCA is swtpm's certificate tool (swtpm_localca).
	LocalCA string
	// Runs is the number of measured runs of each tool.
	Runs int
	// Dir is where the state directories and the CAs are made; removed
	// at the end.
	Dir string
	// Progress receives one-line status updates.
	Progress func(string)
}

// LibvirtArgs are the options libvirt 9 gives swtpm_setup for a TPM 2.0
// with its EK certificate (qemuTPMEmulatorRunSetup), less the state
// directory, VM id and log file that vary.
var LibvirtArgs = []string{"--tpm2", "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}

// tool is one provisioning program, set up to run.
type tool struct {
	name, version, command string
	env                    []string
	argv                   []string // the program and its extra options
	// caKey is the signing key of the tool's local CA, made by its first
	// run.
	caKey string
}

// Run measures every tool Runs times after one unmeasured run each (which
// creates its local CA).
func Run(ctx context.Context, cfg Config) (*report.Provisioning, error) {
	if cfg.Runs <= 0 {
		return nil, errors.New("provisioning: no runs")
	}
	base, err := os.MkdirTemp(cfg.Dir, "vtpmbench-setup-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(base)
	vtpmd, err := vtpmdTool(ctx, cfg.Vtpmd, filepath.Join(base, "vtpmd"))
	if err != nil {
		return nil, err
	}
	tools := []tool{vtpmd}
	if cfg.SwtpmSetup != "" {
		swtpm, err := swtpmSetupTool(ctx, cfg, filepath.Join(base, "swtpm_setup"))
		if err != nil {
			return nil, err
		}
		tools = append(tools, swtpm)
	}
	samples := make([][]time.Duration, len(tools))
	cpu := make([][]time.Duration, len(tools))
	order := make([]int, len(tools))
	for i := range order {
		order[i] = i
	}
	for i := -1; i < cfg.Runs; i++ {
		// Alternate which tool goes first, so that drift during the run
		// does not always favour the same one.
		slices.Reverse(order)
		for _, j := range order {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			t := tools[j]
			if cfg.Progress != nil {
				cfg.Progress(fmt.Sprintf("provisioning: %s %d/%d", t.name, i+1, cfg.Runs))
			}
			wall, used, err := t.provision(ctx, filepath.Join(base, fmt.Sprintf("%s-%d", strings.ReplaceAll(t.name, " ", "-"), i+1)), i+1)
			if err != nil {
				return nil, err
			}
			if i < 0 {
				// The first run made the CA: make sure it is the tool's own.
				if _, err := os.Stat(t.caKey); err != nil {
					return nil, fmt.Errorf("provisioning with %s did not use the benchmark's local CA: %w", t.name, err)
				}
				continue
			}
			samples[j] = append(samples[j], wall)
			cpu[j] = append(cpu[j], used)
		}
	}
	p := &report.Provisioning{Args: LibvirtArgs, Target: Target}
	for j, t := range tools {
		p.Tools = append(p.Tools, report.NewProvisioningTool(t.name, t.version, t.command, samples[j], cpu[j]))
	}
	return p, nil
}

// provision runs the tool once on a new state directory dir and returns
// its wall and CPU time.
func (t tool) provision(ctx context.Context, dir string, n int) (time.Duration, time.Duration, error) {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	args := append(append(t.argv[1:], LibvirtArgs...), "--tpm-state", dir, "--vmid", fmt.Sprintf("bench-%d", n),
		"--logfile", filepath.Join(dir, "setup.log"))
	cmd := exec.CommandContext(ctx, t.argv[0], args...)
	cmd.Env = t.env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "setup.log"))
		return 0, 0, fmt.Errorf("provisioning with %s: %w\n%s%s", t.name, err, out.Bytes(), log)
	}
	var used time.Duration
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		used = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return wall, used, nil
}

// vtpmdTool is `vtpmd setup` with the configuration files that
// `vtpmd setup --create-config-files` writes (its local CA in dir) and a
// host key of its own.
func vtpmdTool(ctx context.Context, vtpmd, dir string) (tool, error) {
	env := append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "VTPMD_HOST_KEY="+filepath.Join(dir, "host.key"))
	out, err := output(ctx, env, vtpmd, "setup", "--create-config-files", "root")
	if err != nil {
		return tool{}, err
	}
	version, err := output(ctx, env, vtpmd, "setup", "--version")
	if err != nil {
		return tool{}, fmt.Errorf("%w: %s", err, out)
	}
	return tool{name: "vtpmd setup", version: version, command: vtpmd + " setup", env: env, argv: []string{vtpmd, "setup"},
		caKey: filepath.Join(dir, "ca", "signkey.pem")}, nil
}

// swtpmSetupTool is swtpm_setup with swtpm_localca's configuration (its CA
// in dir), driving the swtpm named.
func swtpmSetupTool(ctx context.Context, cfg Config, dir string) (tool, error) {
	conf := filepath.Join(dir, "config")
	if err := os.MkdirAll(conf, 0o700); err != nil {
		return tool{}, err
	}
	caConf := filepath.Join(conf, "swtpm-localca.conf")
	caOpts := filepath.Join(conf, "swtpm-localca.options")
	ca := filepath.Join(dir, "ca")
	files := map[string]string{
		caConf: fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca),
		caOpts: "--platform-manufacturer vtpmbench\n--platform-version 1\n--platform-model QEMU\n",
		filepath.Join(conf, "swtpm_setup.conf"): fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
			cfg.LocalCA, caConf, caOpts),
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return tool{}, err
		}
	}
	env := append(os.Environ(), "XDG_CONFIG_HOME="+conf)
	version, err := output(ctx, env, cfg.SwtpmSetup, "--version")
	if err != nil {
		return tool{}, err
	}
	tpm := cfg.Swtpm + " socket"
	return tool{name: "swtpm_setup", version: version, command: fmt.Sprintf("%s --tpm %q", cfg.SwtpmSetup, tpm), env: env,
		argv: []string{cfg.SwtpmSetup, "--tpm", tpm}, caKey: filepath.Join(ca, "signkey.pem")}, nil
}

// output runs a command and returns its first output line. A --version
// that prints its line may still fail: swtpm_setup 0.7 exits with 1.
func output(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if err != nil && !(slices.Contains(args, "--version") && strings.Contains(line, "version")) {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return line, nil
}
