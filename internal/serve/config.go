package serve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"

	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

// Config configures a Supervisor. The command line fills it from the
// embedded defaults, an optional config file (LoadConfig) and flags.
type Config struct {
	// StateDir holds the one pebble store: every VM's sealed state and
	// the registry of VMs.
	StateDir string `json:"state_dir"`
	// RunDir holds the admin socket and the VMs' sockets.
	RunDir string `json:"run_dir"`
	// Admin is the admin socket (mode 0600); "" is RunDir/admin.sock.
	Admin string `json:"admin_socket"`
	// HostKey is the host-local key the VMs' state keys derive from. The
	// generation witnesses live beside it.
	HostKey string `json:"host_key"`
	// LogLevel is debug, info, warn or error; workers log at the same level.
	LogLevel string `json:"log_level"`
	// WorkerUser, if set (a user name or numeric uid), is the user the
	// workers run as, with that user's primary group and no others: a
	// supervisor running as root should name an unprivileged user that
	// owns nothing of vtpmd's. The vtpmd binary must be executable by it.
	WorkerUser string `json:"worker_user"`
	// MetricsListen, if set, is a TCP address (host:port) that serves
	// GET /metrics, and nothing else, for a Prometheus scraper; the admin
	// socket serves /metrics too.
	MetricsListen string `json:"metrics_listen"`
	// SocketGroup, if set (a group name or numeric gid), owns the VMs'
	// sockets, of mode 0660, and the run dir, of mode 0750: for a QEMU
	// that runs as another user of that group (libvirt's qemu user). The
	// admin socket stays 0600.
	SocketGroup string `json:"socket_group"`
	// GuardianConfig, if set, is the host's guardian configuration file
	// (see package host): each VM's state key is then released by the
	// guardian to the VM's worker when its TPM starts, never derived from
	// the host key, and never seen by the supervisor.
	GuardianConfig string `json:"guardian_config"`
	// SpareWorkers is how many workers are kept started ahead of need,
	// with no VM: a VM's start takes one, so that it does not wait for a
	// process to start. Each idle spare holds a worker's memory.
	SpareWorkers int `json:"spare_workers"`

	// Executable is the vtpmd binary the workers run ("" is this one).
	Executable string `json:"-"`
	// Log receives the supervisor's logs.
	Log *slog.Logger `json:"-"`
	// WorkerLog is where the workers write their logs (their stderr).
	WorkerLog *os.File `json:"-"`
}

// MaxSpareWorkers bounds Config.SpareWorkers.
const MaxSpareWorkers = 64

// LoadConfig applies the JSON config file at path over c. Unknown keys
// are errors.
func (c *Config) LoadConfig(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	return nil
}

// AdminSocket is the admin socket's path.
func (c *Config) AdminSocket() string {
	if c.Admin != "" {
		return c.Admin
	}
	return filepath.Join(c.RunDir, "admin.sock")
}

// Level is the slog level of LogLevel.
func (c *Config) Level() (slog.Level, error) {
	var l slog.Level
	if c.LogLevel == "" {
		return slog.LevelInfo, nil
	}
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return l, fmt.Errorf("log level %q: use debug, info, warn or error", c.LogLevel)
	}
	return l, nil
}

// workerCredential resolves WorkerUser; nil runs the workers as the
// supervisor's user.
func (c *Config) workerCredential() (*syscall.Credential, error) {
	if c.WorkerUser == "" {
		return nil, nil
	}
	u, err := user.Lookup(c.WorkerUser)
	if err != nil {
		if u, err = user.LookupId(c.WorkerUser); err != nil {
			return nil, fmt.Errorf("worker user %q: no such user", c.WorkerUser)
		}
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("worker user %q: uid %q, gid %q", c.WorkerUser, u.Uid, u.Gid)
	}
	if os.Geteuid() != 0 && uint64(os.Geteuid()) != uid {
		return nil, fmt.Errorf("worker user %q: only a supervisor running as root can run workers as another user", c.WorkerUser)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// socketGID resolves SocketGroup; -1 leaves the sockets' group alone.
func (c *Config) socketGID() (int, error) {
	if c.SocketGroup == "" {
		return -1, nil
	}
	g, err := user.LookupGroup(c.SocketGroup)
	if err != nil {
		if g, err = user.LookupGroupId(c.SocketGroup); err != nil {
			return 0, fmt.Errorf("socket group %q: no such group", c.SocketGroup)
		}
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("socket group %q: gid %q", c.SocketGroup, g.Gid)
	}
	return gid, nil
}

// guardian reads GuardianConfig into what the workers are given: the
// configuration, checked, its defaults and paths filled in (JSON); nil
// without a guardian. In host-key mode the host key defaults to
// guardian-host.key beside the host-local key, as in `vtpmd socket`.
func (c *Config) guardian() ([]byte, error) {
	if c.GuardianConfig == "" {
		return nil, nil
	}
	g, err := host.LoadConfig(c.GuardianConfig)
	if err != nil {
		return nil, err
	}
	if g.Mode == guardian.ModeHostKey && g.HostKeyFile == "" {
		g.HostKeyFile = filepath.Join(filepath.Dir(c.HostKey), "guardian-host.key")
	}
	return json.Marshal(g)
}

// nameRE is what a VM name may be: it becomes a file name in RunDir. Its
// length is checked apart: {1,64} would compile to 64 copies of the class
// in every process's start, vtpmd socket's included.
var nameRE = regexp.MustCompile(`^[a-zA-Z0-9._-]+$`)

// ValidName checks a VM name: 1 to 64 of [a-zA-Z0-9._-], not starting
// with a dot.
func ValidName(name string) error {
	if len(name) > 64 || !nameRE.MatchString(name) || name[0] == '.' {
		return fmt.Errorf("%w: bad VM name %q: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", ErrBadRequest, name)
	}
	return nil
}
