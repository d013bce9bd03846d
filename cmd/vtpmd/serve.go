package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"

	"github.com/vtpmd/vtpmd/internal/serve"
	"github.com/vtpmd/vtpmd/internal/worker"
)

const serveUsage = `Usage: vtpmd serve [options]

Serves the TPMs of many VMs: one supervisor with an admin API (HTTP+JSON on
a unix socket; see 'vtpmd ctl'), one state store, and a worker process per
running VM TPM. Options (each overrides the config file, which overrides
the defaults):
--config <file>     JSON config file: {"state_dir", "run_dir", "admin_socket",
                    "host_key", "log_level", "worker_user", "metrics_listen",
                    "socket_group", "guardian_config", "spare_workers"}
--state-dir <dir>   the state store (default /var/lib/vtpmd/serve for root,
                    $XDG_DATA_HOME/vtpmd/serve otherwise)
--run-dir <dir>     the sockets (default /run/vtpmd, $XDG_RUNTIME_DIR/vtpmd)
--admin <socket>    the admin socket (default <run dir>/admin.sock)
--log-file <file>   log there instead of stderr (workers too)
--log-level <level> debug, info, warn or error (default info)
--worker-user <user> run the workers as this user (a supervisor running as
                    root should name an unprivileged one)
--metrics-listen <host:port>
                    serve Prometheus metrics (GET /metrics) there too; the
                    admin socket always serves them
--socket-group <group> the VMs' sockets are 0660 of this group (and the run
                    dir 0750), for a QEMU of another user (libvirt's)
--guardian-config <file>
                    the VMs' state keys come from the guardian this host
                    config names (default $VTPMD_GUARDIAN_CONFIG, else
                    /etc/vtpmd/guardian.json if it exists): each worker
                    attests and obtains its VM's key when the TPM starts
--spare-workers <n> workers kept started ahead of need, with no VM, so that
                    a VM's start does not wait for a process to start
                    (default 1; 0 to 64)
`

const ctlUsage = `Usage: vtpmd ctl [--admin <socket>] [--json] <command> [args]

Commands:
  create [--data] [--startup-clear] [--vsock-cid <cid>
         [--vsock-ctrl-port <port>] [--vsock-data-port <port>]] <name>...
                             register VM TPMs (stopped) and print their QEMU
                             arguments; --data adds a data socket (for the
                             swtpm TCTI: swtpm:path=<run dir>/<name>.data),
                             --startup-clear powers the TPM on and starts it
                             (for tpm2-tools; not for QEMU); --vsock-ctrl-port
                             and --vsock-data-port serve the control and data
                             channels on these host vsock ports too, to the
                             guest of CID --vsock-cid only (QEMU's vhost-vsock
                             guest-cid); one port serves one VM
  start <name>...            start their workers
  stop <name>...             stop their workers (the state is kept)
  delete <name>...           delete stopped VM TPMs and their state
  list                       list every VM TPM
  status <name>              show one VM TPM
  metrics                    print the Prometheus metrics
--admin is the admin socket (default <run dir>/admin.sock); --json prints
the admin API's JSON.
`

// serveDefaults is the embedded default configuration of `vtpmd serve`.
func serveDefaults() (serve.Config, error) {
	stateRoot, runDir := defaultDirs()
	hostKey, err := hostKeyPath()
	if err != nil {
		return serve.Config{}, err
	}
	return serve.Config{StateDir: filepath.Join(stateRoot, "serve"), RunDir: runDir, HostKey: hostKey, LogLevel: "info", SpareWorkers: 1}, nil
}

// runServe is `vtpmd serve`.
func runServe(args []string, stdout io.Writer) error {
	cfg, err := serveDefaults()
	if err != nil {
		return err
	}
	var configFile, logFile string
	var help bool
	spares := -1
	flags := map[string]*string{}
	specs := []flagSpec{
		{long: "config", takesValue: true, set: setString(&configFile)},
		{long: "log-file", takesValue: true, set: setString(&logFile)},
		{long: "help", short: "h", set: setBool(&help)},
		{long: "spare-workers", takesValue: true, set: func(s string) error {
			// serve.Open checks the bound, for the config file too.
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 {
				return fmt.Errorf("--spare-workers %q is not a count", s)
			}
			spares = n
			return nil
		}},
	}
	for _, name := range []string{"state-dir", "run-dir", "admin", "log-level", "worker-user", "metrics-listen", "socket-group", "guardian-config"} {
		v := new(string)
		flags[name] = v
		specs = append(specs, flagSpec{long: name, takesValue: true, set: func(s string) error {
			if s == "" {
				return fmt.Errorf("--%s needs a value", name)
			}
			*v = s
			return nil
		}})
	}
	if err := parseArgs("serve", args, specs); err != nil {
		return err
	}
	if help {
		fmt.Fprint(stdout, serveUsage)
		return nil
	}
	if configFile != "" {
		if err := cfg.LoadConfig(configFile); err != nil {
			return err
		}
	}
	for name, field := range map[string]*string{"state-dir": &cfg.StateDir, "run-dir": &cfg.RunDir, "admin": &cfg.Admin, "log-level": &cfg.LogLevel,
		"worker-user": &cfg.WorkerUser, "metrics-listen": &cfg.MetricsListen, "socket-group": &cfg.SocketGroup,
		"guardian-config": &cfg.GuardianConfig} {
		if v := *flags[name]; v != "" {
			*field = v
		}
	}
	if spares >= 0 {
		cfg.SpareWorkers = spares
	}
	// The flag or config file, else the environment or the default file,
	// as in `vtpmd socket`.
	if cfg.GuardianConfig, err = guardianConfig(cfg.GuardianConfig); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	for _, p := range []*string{&cfg.StateDir, &cfg.RunDir, &cfg.HostKey} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	level, err := cfg.Level()
	if err != nil {
		return err
	}
	cfg.WorkerLog = os.Stderr
	if logFile != "" {
		f, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("serve: open log file: %w", err)
		}
		defer f.Close()
		cfg.WorkerLog = f
	}
	cfg.Log = slog.New(slog.NewTextHandler(cfg.WorkerLog, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	sup, err := serve.Open(cfg)
	if err != nil {
		return err
	}
	return sup.Run(ctx)
}

// runWorker is `vtpmd worker`, the hidden command the supervisor of
// `vtpmd serve` starts for each running VM.
func runWorker(args []string) error {
	var level string
	fds := map[string]*int{"supervisor": new(int), "channel-fd": new(int), "records-fd": new(int)}
	specs := []flagSpec{{long: "log-level", takesValue: true, set: setString(&level)}}
	for flag, v := range fds {
		*v = -1
		specs = append(specs, flagSpec{long: flag, takesValue: true, set: func(s string) error {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 {
				return fmt.Errorf("--%s %q is not a number", flag, s)
			}
			*v = n
			return nil
		}})
	}
	if err := parseArgs("worker", args, specs); err != nil {
		return err
	}
	if *fds["supervisor"] < 0 || *fds["channel-fd"] < 0 || *fds["records-fd"] < 0 {
		return errors.New("worker: started by 'vtpmd serve' only")
	}
	lvl := slog.LevelInfo
	if level != "" {
		if err := lvl.UnmarshalText([]byte(level)); err != nil {
			return fmt.Errorf("worker: log level %q", level)
		}
	}
	// The worker adds the VM's name to every line once the supervisor has
	// assigned it one; a spare's lines have only its pid.
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})).With("worker", os.Getpid())
	if err := worker.Harden(*fds["supervisor"]); err != nil {
		log.Error("worker failed", "err", err)
		return exitCode(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	err := worker.Run(ctx, worker.Config{
		Channel: os.NewFile(uintptr(*fds["channel-fd"]), "supervisor"),
		Records: os.NewFile(uintptr(*fds["records-fd"]), "supervisor records"),
		Log:     log,
	})
	if err != nil {
		return exitCode(1) // Run logged it
	}
	return nil
}

// ctlParallel is how many requests `vtpmd ctl` has in flight for a
// command on several VMs.
const ctlParallel = 8

// runCtl is `vtpmd ctl`, the client of the admin API.
func runCtl(args []string, stdout io.Writer) error {
	_, runDir := defaultDirs()
	admin := filepath.Join(runDir, "admin.sock")
	var asJSON, data, startupClear bool
	var vsock [3]uint32 // CID, control port, data port
	vsockFlags := map[string]*uint32{"--vsock-cid": &vsock[0], "--vsock-ctrl-port": &vsock[1], "--vsock-data-port": &vsock[2]}
	var words []string
	for i := 0; i < len(args); i++ {
		flag, value, hasValue := strings.Cut(args[i], "=")
		if v := vsockFlags[flag]; v != nil {
			if !hasValue {
				if i+1 == len(args) {
					return fmt.Errorf("ctl: %s needs a value", flag)
				}
				i++
				value = args[i]
			}
			n, err := strconv.ParseUint(value, 10, 32)
			if err != nil {
				return fmt.Errorf("ctl: %s %q: not a number from 0 to 4294967295", flag, value)
			}
			*v = uint32(n)
			continue
		}
		switch a := args[i]; {
		case a == "--json":
			asJSON = true
		case a == "--data":
			data = true
		case a == "--startup-clear":
			startupClear = true
		case a == "--admin" && i+1 < len(args):
			i++
			admin = args[i]
		case strings.HasPrefix(a, "--admin="):
			admin = strings.TrimPrefix(a, "--admin=")
		case a == "-h" || a == "--help":
			fmt.Fprint(stdout, ctlUsage)
			return nil
		case strings.HasPrefix(a, "-"):
			return fmt.Errorf("ctl: unknown option %q (see vtpmd ctl --help)", a)
		default:
			words = append(words, a)
		}
	}
	if len(words) == 0 {
		fmt.Fprint(stdout, ctlUsage)
		return errors.New("ctl: missing command")
	}
	cmd, names := words[0], words[1:]
	if (data || startupClear || vsock != [3]uint32{}) && cmd != "create" {
		return errors.New("ctl: --data, --startup-clear and the --vsock options are options of create")
	}
	c := serve.NewClient(admin)
	switch cmd {
	case "metrics":
		if len(names) != 0 {
			return errors.New("ctl: metrics takes no names")
		}
		text, err := c.Metrics()
		if err != nil {
			return fmt.Errorf("ctl: %w", err)
		}
		_, err = io.WriteString(stdout, text)
		return err
	case "list":
		if len(names) != 0 {
			return errors.New("ctl: list takes no names")
		}
		list, err := c.List()
		if err != nil {
			return fmt.Errorf("ctl: %w", err)
		}
		if asJSON {
			return printJSON(stdout, list)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tDESIRED\tSTATE\tPID\tRESTARTS\tCONTROL SOCKET")
		for _, st := range list {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", st.Name, st.Desired, st.State, pidString(st.PID), st.Restarts, st.Ctrl)
		}
		return tw.Flush()
	case "status":
		if len(names) != 1 {
			return errors.New("ctl: status takes one name")
		}
		st, err := c.VM(names[0])
		if err != nil {
			return fmt.Errorf("ctl: %w", err)
		}
		if asJSON {
			return printJSON(stdout, st)
		}
		printStatus(stdout, st)
		return nil
	case "create", "start", "stop", "delete":
	default:
		return fmt.Errorf("ctl: unknown command %q (see vtpmd ctl --help)", cmd)
	}
	if len(names) == 0 {
		return fmt.Errorf("ctl: %s needs at least one name", cmd)
	}
	// The names are handled a few at a time (starts wait for their
	// workers), and reported in order.
	sts := make([]serve.Status, len(names))
	errs := make([]error, len(names))
	sem := make(chan struct{}, ctlParallel)
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			var err error
			switch cmd {
			case "create":
				sts[i], err = c.Create(serve.CreateRequest{Name: name, Data: data, StartupClear: startupClear,
					VsockCID: vsock[0], VsockCtrlPort: vsock[1], VsockDataPort: vsock[2]})
			case "start":
				sts[i], err = c.Start(name)
			case "stop":
				sts[i], err = c.Stop(name)
			case "delete":
				err = c.Delete(name)
				sts[i] = serve.Status{Name: name, State: "deleted"}
			}
			if err != nil {
				errs[i] = fmt.Errorf("ctl %s %s: %w", cmd, name, err)
			}
		}()
	}
	wg.Wait()
	var out []serve.Status
	for i, st := range sts {
		if errs[i] != nil {
			continue
		}
		out = append(out, st)
		if asJSON {
			continue
		}
		switch cmd {
		case "create":
			fmt.Fprintf(stdout, "created %s: control socket %s", st.Name, st.Ctrl)
			if st.Data != "" {
				fmt.Fprintf(stdout, ", data socket %s", st.Data)
			}
			if st.VsockCID != 0 {
				fmt.Fprintf(stdout, ", %s", vsockString(st))
			}
			fmt.Fprintf(stdout, "\nstart it with 'vtpmd ctl start %s', then give QEMU:\n  %s\n", st.Name, strings.Join(st.QEMUArgs, " "))
		case "start":
			fmt.Fprintf(stdout, "%s: %s (pid %s)\n", st.Name, st.State, pidString(st.PID))
		default:
			fmt.Fprintf(stdout, "%s: %s\n", st.Name, st.State)
		}
	}
	if asJSON {
		var err error
		if len(names) == 1 && len(out) == 1 {
			err = printJSON(stdout, out[0])
		} else if len(out) > 0 || len(names) > 1 {
			err = printJSON(stdout, out)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func pidString(pid int) string {
	if pid == 0 {
		return "-"
	}
	return strconv.Itoa(pid)
}

func printStatus(w io.Writer, st serve.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\nid:\t%s\ncreated:\t%s\ndesired:\t%s\nstate:\t%s\npid:\t%s\nrestarts:\t%d\ncontrol socket:\t%s\n",
		st.Name, st.ID, st.Created.Format("2006-01-02 15:04:05Z07:00"), st.Desired, st.State, pidString(st.PID), st.Restarts, st.Ctrl)
	if st.Data != "" {
		fmt.Fprintf(tw, "data socket:\t%s\n", st.Data)
	}
	if st.VsockCID != 0 {
		fmt.Fprintf(tw, "vsock:\t%s\n", vsockString(st))
	}
	if st.StartupClear {
		fmt.Fprintf(tw, "startup:\tpowered on and started (TPM2_Startup(CLEAR)) by every worker\n")
	}
	if st.LastExit != "" {
		fmt.Fprintf(tw, "last exit:\t%s\n", st.LastExit)
	}
	if st.Guardian != "" {
		fmt.Fprintf(tw, "guardian:\t%s\n", st.Guardian)
	}
	fmt.Fprintf(tw, "QEMU arguments:\t%s\n", strings.Join(st.QEMUArgs, " "))
	tw.Flush()
}

// vsockString describes the VM's vsock ports.
func vsockString(st serve.Status) string {
	var ports []string
	if st.VsockCtrl != 0 {
		ports = append(ports, fmt.Sprintf("control on vsock port %d", st.VsockCtrl))
	}
	if st.VsockData != 0 {
		ports = append(ports, fmt.Sprintf("data on vsock port %d", st.VsockData))
	}
	return fmt.Sprintf("%s, for CID %d only", strings.Join(ports, ", "), st.VsockCID)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
