package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/vtpmd/vtpmd/internal/options"
	"github.com/vtpmd/vtpmd/internal/unixsock"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/state"
	"github.com/vtpmd/vtpmd/transport"
	"github.com/vtpmd/vtpmd/vtpm"
)

// runSocket is `vtpmd socket`: swtpm's `swtpm socket --tpm2`.
func runSocket(args []string, stdout io.Writer) error {
	c, err := parseSocketConfig(args)
	if err != nil {
		return err
	}
	switch {
	case c.help:
		fmt.Fprint(stdout, socketUsage)
		return nil
	case c.printCapabilities:
		return printCapabilities(stdout)
	case c.printStates:
		return printStates(stdout, c.stateDir, c.stateFile)
	case !c.tpm2:
		return errors.New("socket: vtpmd emulates TPM 2.0 only: pass --tpm2")
	case c.daemon && os.Getenv(daemonEnv) == "":
		return daemonize(c.inheritedFDs())
	}
	log, closeLog, err := c.logger()
	if err != nil {
		return err
	}
	defer closeLog()
	if os.Getenv("GOMAXPROCS") == "" {
		// One TPM per process, one command at a time: a second P only has
		// the runtime wake another thread at each hand-off between
		// goroutines of a durable write (measured in bench/RESULTS.md:
		// 20-30% more durable writes/s at 16 and 64 VMs, less CPU each).
		runtime.GOMAXPROCS(1)
	}
	if err := serveSocket(c, log); err != nil {
		log.Error("vtpmd socket failed", "err", err)
		return err
	}
	return nil
}

func serveSocket(c *socketConfig, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()

	keys, blobKeys, err := c.readKeys(log)
	if err != nil {
		return err
	}
	vmState, err := openVMState(ctx, c.stateDir, c.stateFile, keys, false)
	if err != nil {
		return err
	}
	defer vmState.Unlock()
	if key := vmState.Key(); key != nil {
		log.Info("state is encrypted", "protection", keys.Protection(), "key", key)
	} else {
		log.Info("state is encrypted; its key is obtained when the TPM starts", "protection", keys.Protection())
	}
	// The store's open mostly waits for the disk's syncs and the engine's
	// start is CPU work (the crypto library's first use): take the lock
	// while the engine starts, after Key, which would wait for it.
	locked := make(chan error, 1)
	if c.incoming {
		locked <- nil // the lock is taken when the migration's state arrives
	} else {
		go func() { locked <- vmState.Lock(0) }()
	}
	dev, err := vtpm.Open(vtpm.Config{
		Store:               vmState,
		Logger:              log,
		DisableAutoShutdown: c.disableAutoShutdown,
		RejectLocality4:     c.rejectLocality4,
	})
	if lockErr := <-locked; lockErr != nil {
		if err == nil {
			dev.Close()
		}
		return lockErr
	}
	if err != nil {
		return err
	}
	defer func() {
		if err := dev.Close(); err != nil {
			log.Error("TPM state not stored at exit", "err", err)
		}
	}()
	if c.notNeedInit {
		if err := dev.Init(false); err != nil {
			return err
		}
		switch c.startup {
		case "clear":
			err = dev.Startup(vtpm.StartupClear)
		case "state":
			err = dev.Startup(vtpm.StartupState)
		}
		if err != nil {
			return err
		}
	}

	srv := &transport.Server{
		TPM:           dev,
		Log:           log,
		Terminate:     c.terminate,
		CtrlTerminate: c.ctrl != nil && c.ctrl.terminate,
		Disconnect:    c.server != nil && c.server.disconnect,
		DataChannel:   c.server != nil,
		Storage:       vmState,

		ReleaseLockOutgoing: c.releaseLockOutgoing,
	}
	srv.BlobKeys = blobKeys
	errs := make(chan error, 2)
	for _, ch := range []struct {
		e     *endpoint
		serve func(context.Context, net.Listener) error
		conn  func(context.Context, net.Conn)
	}{
		{c.ctrl, srv.ServeControl, srv.ServeControlConn},
		{c.server, srv.ServeData, srv.ServeDataConn},
	} {
		if ch.e == nil {
			continue
		}
		l, conn, cleanup, err := ch.e.open()
		if err != nil {
			return err
		}
		defer cleanup()
		if conn != nil {
			go ch.conn(ctx, conn)
			continue
		}
		go func() { errs <- ch.serve(ctx, l) }()
	}
	if err := c.writePid(); err != nil {
		return err
	}
	defer c.removePid()
	notifyReady(log)
	if err := reportDaemonReady(); err != nil {
		return err
	}
	log.Info("serving", "state", c.stateDir)
	select {
	case <-ctx.Done():
		log.Info("ending on signal")
	case <-srv.Done():
	case err := <-errs:
		return err
	}
	return nil
}

// inheritedFDs lists the descriptors the options name.
func (c *socketConfig) inheritedFDs() []int {
	var fds []int
	for _, fd := range []int{c.logFD, c.pidFD} {
		if fd >= 0 {
			fds = append(fds, fd)
		}
	}
	for _, key := range []string{c.key, c.migrationKey} {
		// The keys' fd=/pwdfd= are read by the daemon, not by its parent.
		if v, err := options.Parse("--key", key, "file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove"); err == nil {
			for _, name := range []string{"fd", "pwdfd"} {
				if fd, err := v.Int(name, -1); err == nil && fd >= 0 {
					fds = append(fds, fd)
				}
			}
		}
	}
	for _, e := range []*endpoint{c.ctrl, c.server} {
		if e != nil {
			for _, fd := range []int{e.fd, e.connFD} {
				if fd >= 0 {
					fds = append(fds, fd)
				}
			}
		}
	}
	return fds
}

// open creates the endpoint's listener, or wraps its connected descriptor.
// cleanup closes it and removes a socket file vtpmd created.
func (e *endpoint) open() (net.Listener, net.Conn, func(), error) {
	switch {
	case e.connFD >= 0:
		conn, err := fileConn(e.connFD)
		if err != nil {
			return nil, nil, nil, err
		}
		return nil, conn, func() { conn.Close() }, nil
	case e.fd >= 0:
		f := os.NewFile(uintptr(e.fd), "fd "+strconv.Itoa(e.fd))
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("listen on inherited descriptor %d: %w", e.fd, err)
		}
		return l, nil, func() { l.Close() }, nil
	case e.network == "unix":
		l, err := unixsock.Listen(e.path, e.mode, e.uid, e.gid)
		if err != nil {
			return nil, nil, nil, err
		}
		return l, nil, func() { l.Close() }, nil
	default:
		l, err := net.Listen("tcp", e.addr)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("listen on %s: %w", e.addr, err)
		}
		return l, nil, func() { l.Close() }, nil
	}
}

func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "fd "+strconv.Itoa(fd))
	defer f.Close()
	conn, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("use descriptor %d as a connected socket: %w", fd, err)
	}
	return conn, nil
}

func (c *socketConfig) writePid() error {
	pid := []byte(strconv.Itoa(os.Getpid()))
	switch {
	case c.pidPath != "":
		if err := os.WriteFile(c.pidPath, pid, 0o644); err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
	case c.pidFD >= 0:
		f := os.NewFile(uintptr(c.pidFD), "pid fd")
		defer f.Close()
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("--pid fd=%d is not a regular file", c.pidFD)
		}
		if _, err := f.Write(pid); err != nil {
			return fmt.Errorf("write pid to fd %d: %w", c.pidFD, err)
		}
	}
	return nil
}

func (c *socketConfig) removePid() {
	if c.pidPath != "" {
		os.Remove(c.pidPath)
	}
}

// notifyReady tells systemd that the TPM is ready, when it asks.
func notifyReady(log *slog.Logger) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err == nil {
		_, err = conn.Write([]byte("READY=1"))
		conn.Close()
	}
	if err != nil {
		log.Warn("systemd notification failed", "err", err)
	}
}

// logger builds the logger of --log: a file, a descriptor, nothing for
// file=-, and warnings on stderr when --log is not given.
func (c *socketConfig) logger() (*slog.Logger, func(), error) {
	level := slog.LevelInfo
	if c.logLevel >= 5 {
		level = slog.LevelDebug
	}
	var w io.Writer
	closeLog := func() {}
	switch {
	case c.logPath == "-":
		return slog.New(slog.DiscardHandler), closeLog, nil
	case c.logPath != "":
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if c.logTruncate {
			flags |= os.O_TRUNC
		}
		f, err := os.OpenFile(c.logPath, flags, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("open log file: %w", err)
		}
		w, closeLog = f, func() { f.Close() }
	case c.logFD >= 0:
		w = os.NewFile(uintptr(c.logFD), "log fd")
	default:
		w, level = os.Stderr, slog.LevelWarn
	}
	if c.logPrefix != "" {
		w = &prefixWriter{w: w, prefix: c.logPrefix}
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	return log.With("vm", c.stateDir), closeLog, nil
}

// prefixWriter puts --log prefix= before every line; slog writes one line
// per call.
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	if _, err := io.WriteString(p.w, p.prefix); err != nil {
		return 0, err
	}
	return p.w.Write(b)
}

// printCapabilities prints swtpm's capability JSON with only the features
// vtpmd has; the RSA key sizes are those the engine accepts.
func printCapabilities(w io.Writer) error {
	info, err := vtpm.Describe()
	if err != nil {
		return err
	}
	features := []string{
		"tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "flags-opt-disable-auto-shutdown",
		"ctrl-opt-terminate", "cmdarg-key-fd", "cmdarg-pwd-fd", "cmdarg-print-states", "cmdarg-migration", "nvram-backend-dir", "nvram-backend-file", "tpmstate-opt-lock",
		"tpmstate-dir-backend-opt-fsync",
	}
	for _, bits := range info.RSAKeySizes {
		features = append(features, fmt.Sprintf("rsa-keysize-%d", bits))
	}
	features = append(features, "systemd-notify")
	quoted, err := json.Marshal(features)
	if err != nil {
		return err
	}
	// swtpm's spacing, which some callers match literally.
	list := string(quoted[1 : len(quoted)-1])
	list = strings.ReplaceAll(list, `","`, `", "`)
	_, err = fmt.Fprintf(w, "{ \"type\": \"swtpm\", \"features\": [ %s ], \"version\": %q }\n", list, version)
	return err
}

// printStates prints swtpm's --print-states JSON. vtpmd keeps a TPM's whole
// state in one record, listed under swtpm's name "permall"; a record that
// does not parse is listed too.
func printStates(w io.Writer, path string, file bool) error {
	entries, err := listStates(path, file)
	if err != nil {
		return err
	}
	var list []string
	for _, e := range entries {
		list = append(list, fmt.Sprintf("{\"name\": \"permall\", \"size\": %d}", e.Size))
	}
	if len(list) == 0 {
		_, err := fmt.Fprintln(w, `{ "type": "swtpm", "states": [] }`)
		return err
	}
	_, err = fmt.Fprintf(w, "{ \"type\": \"swtpm\", \"states\": [ %s ] }\n", strings.Join(list, ", "))
	return err
}

// listStates lists the records of the state dir or file at path, read only;
// there are none if it does not exist. A missing state file is created
// empty, as swtpm creates it: swtpm_setup 0.7.1 then removes it before
// provisioning, and fails if it is not there.
func listStates(path string, file bool) ([]state.Entry, error) {
	var store interface {
		List() ([]state.Entry, error)
		Close() error
	}
	var err error
	switch {
	case file:
		store, err = state.OpenFile(path, state.FileOptions{ReadOnly: true})
		if errors.Is(err, fs.ErrNotExist) {
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				return nil, fmt.Errorf("create state file %s: %w", path, err)
			}
			return nil, f.Close()
		}
	default:
		if _, err := os.Stat(filepath.Join(path, "CURRENT")); err != nil {
			return nil, nil
		}
		store, err = state.Open(path, state.Options{ReadOnly: true})
	}
	if err != nil {
		return nil, err
	}
	entries, err := store.List()
	return entries, errors.Join(err, store.Close())
}

// readKeys reads --key and --migration-key, once, since a descriptor can
// be read only once. The state is sealed under --key's key, or else under
// the host-local key ($VTPMD_HOST_KEY, or host.key in vtpmd's state root,
// which must lie outside the state dir). Their raw keys also encrypt state
// blobs as swtpm's do.
func (c *socketConfig) readKeys(log *slog.Logger) (sealing.KeySource, transport.BlobKeys, error) {
	var blobKeys transport.BlobKeys
	if c.migrationKey != "" {
		key, err := sealing.ParseSwtpmKey("--migration-key", c.migrationKey)
		if err != nil {
			return nil, blobKeys, err
		}
		blobKeys.Migration = key.Raw
	}
	if c.key != "" {
		key, err := sealing.ParseSwtpmKey("--key", c.key)
		if err != nil {
			return nil, blobKeys, err
		}
		blobKeys.State = key.Raw
		keys, err := stateKeys(c.stateDir, c.stateFile, key, c.guardianConfig, log)
		return keys, blobKeys, err
	}
	keys, err := stateKeys(c.stateDir, c.stateFile, nil, c.guardianConfig, log)
	return keys, blobKeys, err
}
