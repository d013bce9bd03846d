package main

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/vtpmd/vtpmd/internal/options"
)

// endpoint is where a channel is served: a listening unix or TCP socket
// that vtpmd creates, an inherited listening descriptor, or an inherited
// connected descriptor.
type endpoint struct {
	network string // "unix" or "tcp"
	path    string // unix socket path to create
	mode    os.FileMode
	uid     int
	gid     int
	addr    string // TCP address to listen on
	fd      int    // inherited listening socket, or -1
	connFD  int    // inherited connected socket, or -1

	terminate  bool // ctrl: end when the client disconnects
	disconnect bool // data: close after each response
}

// socketConfig is the command line of `vtpmd socket`, which is swtpm's.
type socketConfig struct {
	tpm2         bool
	stateDir     string // the state dir, or the state file if stateFile
	stateFile    bool
	key          string // --key's value, read when serving
	migrationKey string // --migration-key's value, read when serving
	// guardianConfig is --guardian-config: the guardian config file (else
	// $VTPMD_GUARDIAN_CONFIG or /etc/vtpmd/guardian.json if it exists).
	guardianConfig string

	// --migration: incoming defers the storage lock until the state is
	// set or first used; releaseLockOutgoing drops it once the outgoing
	// migration has read the state.
	incoming            bool
	releaseLockOutgoing bool

	ctrl   *endpoint
	server *endpoint

	logPath     string // "" for stderr, "-" for none
	logFD       int
	logLevel    int
	logPrefix   string
	logTruncate bool

	pidPath string
	pidFD   int

	terminate           bool
	daemon              bool
	notNeedInit         bool
	startup             string // "", "clear", "state" or "none"
	disableAutoShutdown bool
	rejectLocality4     bool

	printCapabilities bool
	printStates       bool
	help              bool
}

func parseSocketConfig(args []string) (*socketConfig, error) {
	c := &socketConfig{logFD: -1, pidFD: -1}
	var tpmstate, ctrl, server, logOpt, pid, flags, locality, port, fd string
	var runas, chroot, migration, seccomp string
	specs := []flagSpec{
		{long: "tpm2", set: setBool(&c.tpm2)},
		{long: "tpmstate", takesValue: true, set: setString(&tpmstate)},
		{long: "ctrl", takesValue: true, set: setString(&ctrl)},
		{long: "server", takesValue: true, set: setString(&server)},
		{long: "port", short: "p", takesValue: true, set: setString(&port)},
		{long: "fd", short: "f", takesValue: true, set: setString(&fd)},
		{long: "log", takesValue: true, set: setString(&logOpt)},
		{long: "pid", takesValue: true, set: setString(&pid)},
		{long: "terminate", short: "t", set: setBool(&c.terminate)},
		{long: "daemon", short: "d", set: setBool(&c.daemon)},
		{long: "flags", takesValue: true, set: setString(&flags)},
		{long: "locality", takesValue: true, set: setString(&locality)},
		{long: "print-capabilities", set: setBool(&c.printCapabilities)},
		{long: "print-states", set: setBool(&c.printStates)},
		{long: "help", short: "h", set: setBool(&c.help)},
		{long: "guardian-config", takesValue: true, set: setString(&c.guardianConfig)},
		// Options swtpm has that vtpmd refuses with a clear reason.
		{long: "key", takesValue: true, set: setString(&c.key)},
		{long: "migration-key", takesValue: true, set: setString(&c.migrationKey)},
		{long: "migration", takesValue: true, set: setString(&migration)},
		{long: "runas", short: "r", takesValue: true, set: setString(&runas)},
		{long: "chroot", short: "R", takesValue: true, set: setString(&chroot)},
		{long: "seccomp", takesValue: true, set: setString(&seccomp)},
	}
	if err := parseArgs("socket", args, specs); err != nil {
		return nil, err
	}
	for _, refused := range []struct{ name, value, why string }{
		{"--runas", runas, "run vtpmd as the target user instead"},
		{"--chroot", chroot, "chroot is not supported"},
		{"--seccomp", seccomp, "seccomp profiles are not supported yet"},
	} {
		if refused.value != "" {
			return nil, fmt.Errorf("socket: option %s is not supported: %s", refused.name, refused.why)
		}
	}
	if c.help || c.printCapabilities {
		return c, nil
	}
	if err := c.parseTPMState(tpmstate); err != nil {
		return nil, err
	}
	if c.printStates {
		return c, nil
	}
	var err error
	if ctrl != "" {
		if c.ctrl, err = parseCtrl(ctrl); err != nil {
			return nil, err
		}
	}
	if server != "" && (port != "" || fd != "") {
		return nil, fmt.Errorf("socket: --server cannot be combined with --port or --fd")
	}
	switch {
	case server != "":
		c.server, err = parseServer(server)
	case port != "":
		// The legacy -p: a TCP server that disconnects after each response.
		c.server, err = parseServer("type=tcp,disconnect,port=" + port)
	case fd != "":
		c.server, err = parseServer("type=tcp,fd=" + fd)
	}
	if err != nil {
		return nil, err
	}
	if c.server != nil && c.server.connFD >= 0 {
		// A connected data descriptor ends the process when it closes.
		c.terminate = true
	}
	if c.ctrl == nil && c.server == nil {
		return nil, fmt.Errorf("socket: give --ctrl, --server, --port or --fd: there is no channel to serve")
	}
	if err := c.parseLog(logOpt); err != nil {
		return nil, err
	}
	if err := c.parsePid(pid); err != nil {
		return nil, err
	}
	if err := c.parseFlags(flags); err != nil {
		return nil, err
	}
	if migration != "" {
		v, err := options.Parse("--migration", migration, "incoming", "release-lock-outgoing")
		if err != nil {
			return nil, err
		}
		c.incoming = v.Bool("incoming", false)
		c.releaseLockOutgoing = v.Bool("release-lock-outgoing", false)
	}
	if locality != "" {
		v, err := options.Parse("--locality", locality, "reject-locality-4", "allow-set-locality")
		if err != nil {
			return nil, err
		}
		if v.Has("allow-set-locality") {
			return nil, fmt.Errorf("--locality: allow-set-locality is not supported (it serves the kernel's vTPM proxy, which vtpmd does not)")
		}
		c.rejectLocality4 = v.Bool("reject-locality-4", false)
	}
	return c, nil
}

func (c *socketConfig) parseTPMState(s string) error {
	var err error
	if s == "" {
		if env := os.Getenv("TPM_PATH"); env != "" {
			c.stateDir, c.stateFile, err = parseBackendURI("$TPM_PATH", "dir://"+env)
			return err
		}
		return fmt.Errorf("socket: give --tpmstate dir=<dir> or backend-uri=file://<file> (or set TPM_PATH)")
	}
	v, err := options.Parse("--tpmstate", s, "dir", "backend-uri", "mode", "lock", "fsync")
	if err != nil {
		return err
	}
	switch dir, uri := v.String("dir"), v.String("backend-uri"); {
	case dir != "" && uri != "":
		return fmt.Errorf("--tpmstate: give dir= or backend-uri=, not both")
	case dir != "":
		c.stateDir, c.stateFile, err = parseBackendURI("--tpmstate", "dir://"+dir)
	case uri != "":
		c.stateDir, c.stateFile, err = parseBackendURI("--tpmstate", uri)
	default:
		return fmt.Errorf("--tpmstate: dir= or backend-uri= is required")
	}
	if err != nil {
		return err
	}
	// The store's files are always 0600 (in a 0700 directory), so mode= can
	// only make them more private than asked; every write is synced, so
	// fsync= holds either way.
	if _, err := v.Mode("mode", 0o600); err != nil {
		return err
	}
	// swtpm locks a state file only with lock; vtpmd always locks.
	if !v.Bool("lock", true) {
		return fmt.Errorf("--tpmstate: lock=false: the state store is always locked while open")
	}
	return nil
}

func parseCtrl(s string) (*endpoint, error) {
	v, err := options.Parse("--ctrl", s, "type", "path", "mode", "uid", "gid", "port", "bindaddr", "ifname", "fd", "clientfd", "terminate")
	if err != nil {
		return nil, err
	}
	e, err := parseEndpoint("--ctrl", v)
	if err != nil {
		return nil, err
	}
	e.terminate = v.Bool("terminate", false)
	return e, nil
}

func parseServer(s string) (*endpoint, error) {
	v, err := options.Parse("--server", s, "type", "path", "mode", "uid", "gid", "port", "bindaddr", "ifname", "fd", "disconnect")
	if err != nil {
		return nil, err
	}
	if !v.Has("type") {
		// swtpm's --server defaults to TCP.
		if v, err = options.Parse("--server", "type=tcp,"+s, "type", "path", "mode", "uid", "gid", "port", "bindaddr", "ifname", "fd", "disconnect"); err != nil {
			return nil, err
		}
	}
	e, err := parseEndpoint("--server", v)
	if err != nil {
		return nil, err
	}
	e.disconnect = v.Bool("disconnect", false)
	return e, nil
}

// parseEndpoint reads the sub-options --ctrl and --server share.
func parseEndpoint(option string, v options.Values) (*endpoint, error) {
	e := &endpoint{fd: -1, connFD: -1}
	typ, err := v.OneOf("type", "", "unixio", "tcp")
	if err != nil {
		return nil, err
	}
	fd, err := v.Int("fd", -1)
	if err != nil {
		return nil, err
	}
	clientFD, err := v.Int("clientfd", -1)
	if err != nil {
		return nil, err
	}
	if fd >= 0 && clientFD >= 0 {
		return nil, fmt.Errorf("%s: fd= and clientfd= exclude each other", option)
	}
	for _, n := range []int{fd, clientFD} {
		if n >= 0 && n <= 2 {
			return nil, fmt.Errorf("%s: descriptor %d is stdin, stdout or stderr", option, n)
		}
	}
	switch typ {
	case "unixio":
		for _, tcpOnly := range []string{"port", "bindaddr", "ifname"} {
			if v.Has(tcpOnly) {
				return nil, fmt.Errorf("%s: %s= is for type=tcp", option, tcpOnly)
			}
		}
		e.network = "unix"
		e.path, e.fd, e.connFD = v.String("path"), fd, clientFD
		if (e.path != "") == (fd >= 0 || clientFD >= 0) {
			return nil, fmt.Errorf("%s: type=unixio needs exactly one of path=, fd= or clientfd=", option)
		}
		if e.mode, err = v.Mode("mode", 0o600); err != nil {
			return nil, err
		}
		if e.uid, err = v.UID("uid"); err != nil {
			return nil, err
		}
		if e.gid, err = v.GID("gid"); err != nil {
			return nil, err
		}
	case "tcp":
		for _, unixOnly := range []string{"path", "mode", "uid", "gid", "clientfd"} {
			if v.Has(unixOnly) {
				return nil, fmt.Errorf("%s: %s= is for type=unixio", option, unixOnly)
			}
		}
		e.network = "tcp"
		if fd >= 0 {
			if v.Has("port") {
				return nil, fmt.Errorf("%s: give port= or fd=, not both", option)
			}
			// swtpm treats a TCP fd as a connected socket for the data
			// channel (swtpm_setup passes a unix socketpair end so) and as a
			// listening one for the control channel.
			if option == "--server" {
				e.connFD = fd
			} else {
				e.fd = fd
			}
			break
		}
		port, err := v.Int("port", -1)
		if err != nil {
			return nil, err
		}
		if port <= 0 || port > 65535 {
			return nil, fmt.Errorf("%s: type=tcp needs port= (1-65535) or fd=", option)
		}
		host := v.String("bindaddr")
		if host == "" {
			host = "127.0.0.1"
		}
		if zone := v.String("ifname"); zone != "" {
			host += "%" + zone
		}
		e.addr = net.JoinHostPort(host, strconv.Itoa(port))
	default:
		return nil, fmt.Errorf("%s: type=unixio or type=tcp is required", option)
	}
	return e, nil
}

func (c *socketConfig) parseLog(s string) error {
	if s == "" {
		return nil
	}
	v, err := options.Parse("--log", s, "file", "fd", "level", "prefix", "truncate")
	if err != nil {
		return err
	}
	if v.Has("file") == v.Has("fd") {
		return fmt.Errorf("--log: give exactly one of file= or fd=")
	}
	c.logPath = v.String("file")
	if c.logFD, err = v.Int("fd", -1); err != nil {
		return err
	}
	if c.logLevel, err = v.Int("level", 1); err != nil {
		return err
	}
	c.logPrefix = v.String("prefix")
	c.logTruncate = v.Bool("truncate", false)
	return nil
}

func (c *socketConfig) parsePid(s string) error {
	if s == "" {
		return nil
	}
	v, err := options.Parse("--pid", s, "file", "fd")
	if err != nil {
		return err
	}
	if v.Has("file") == v.Has("fd") {
		return fmt.Errorf("--pid: give exactly one of file= or fd=")
	}
	c.pidPath = v.String("file")
	c.pidFD, err = v.Int("fd", -1)
	return err
}

func (c *socketConfig) parseFlags(s string) error {
	if s == "" {
		return nil
	}
	v, err := options.Parse("--flags", s, "not-need-init", "startup-clear", "startup-state", "startup-none", "startup-deactivated", "disable-auto-shutdown")
	if err != nil {
		return err
	}
	if v.Has("startup-deactivated") {
		return fmt.Errorf("--flags: startup-deactivated is for TPM 1.2; vtpmd emulates TPM 2.0 only")
	}
	for _, su := range []string{"clear", "state", "none"} {
		if v.Bool("startup-"+su, false) {
			if c.startup != "" {
				return fmt.Errorf("--flags: give one startup-* flag")
			}
			c.startup = su
		}
	}
	// Any startup-* implies not-need-init.
	c.notNeedInit = v.Bool("not-need-init", false) || c.startup != ""
	c.disableAutoShutdown = v.Bool("disable-auto-shutdown", false)
	return nil
}
