package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A real libvirt drives vtpmd installed as swtpm, swtpm_setup and
// swtpm_ioctl. Root's libvirtd is the machine's system instance (fixed
// /etc/libvirt and /run/libvirt paths), so the test runs a private session
// libvirtd instead, as an unprivileged user (nobody when the test runs as
// root) with its own HOME, XDG directories and PATH: libvirt looks swtpm up
// on the daemon's PATH when it starts (src/util/virtpm.c), and in session
// mode runs it as that user, without swtpm_user.

// libvirtSession is a private session libvirtd and the directory it lives
// in, readable by its user.
type libvirtSession struct {
	dir  string
	env  []string
	cred *syscall.Credential
	cmd  *exec.Cmd
}

// startLibvirtSession starts libvirtd with vtpmd first on its PATH under
// swtpm's names, and waits for its socket.
func startLibvirtSession(t *testing.T) *libvirtSession {
	t.Helper()
	libvirtd, err := exec.LookPath("libvirtd")
	if err != nil {
		requireEnv(t, "libvirtd not found (packages libvirt-daemon-system, libvirt-clients): %v", err)
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		requireEnv(t, "virsh not found (package libvirt-clients): %v", err)
	}
	dir, err := os.MkdirTemp("", "vtpmd-libvirt-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	s := &libvirtSession{dir: dir}
	uid, gid := os.Getuid(), os.Getgid()
	if uid == 0 {
		uid, gid = 65534, 65534 // nobody, nogroup
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}
		for p := filepath.Dir(dir); p != "/"; p = filepath.Dir(p) {
			fi, err := os.Stat(p)
			require.NoError(t, err)
			require.NotZero(t, fi.Mode()&0o001, "%s is not searchable by others, so nobody's libvirtd cannot reach %s: set TMPDIR", p, dir)
		}
	}
	bin := filepath.Join(dir, "bin")
	for _, sub := range []string{"bin", "home", "run", "config", "cache"} {
		require.NoError(t, os.Mkdir(filepath.Join(dir, sub), 0o755))
	}
	require.NoError(t, copyFile(daemonPath, filepath.Join(bin, "vtpmd")))
	require.NoError(t, os.Chmod(filepath.Join(bin, "vtpmd"), 0o755))
	for _, name := range []string{"swtpm", "swtpm_setup", "swtpm_ioctl"} {
		require.NoError(t, os.Symlink("vtpmd", filepath.Join(bin, name)))
	}
	require.NoError(t, chownTree(dir, uid, gid))
	s.env = []string{
		"HOME=" + filepath.Join(dir, "home"),
		"XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"),
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "config"),
		"XDG_CACHE_HOME=" + filepath.Join(dir, "cache"),
		"PATH=" + bin + ":/usr/sbin:/usr/bin:/sbin:/bin",
	}
	s.cmd = exec.Command(libvirtd)
	s.cmd.Env = s.env
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true}
	logFile, err := os.Create(filepath.Join(dir, "libvirtd.log"))
	require.NoError(t, err)
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	require.NoError(t, s.cmd.Start())
	logFile.Close()
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = s.cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(dir, "cache", "libvirt", "qemu", "log", "*.log"))
			for _, path := range append([]string{filepath.Join(dir, "libvirtd.log")}, logs...) {
				b, _ := os.ReadFile(path)
				t.Logf("%s:\n%s", filepath.Base(path), b)
			}
		}
	})
	sock := filepath.Join(dir, "run", "libvirt", "libvirt-sock")
	require.Eventually(t, func() bool { _, err := os.Stat(sock); return err == nil }, 30*time.Second, 50*time.Millisecond,
		"libvirtd did not create %s", sock)
	return s
}

// chownTree gives the tree at dir to uid and gid.
func chownTree(dir string, uid, gid int) error {
	return filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
}

// virsh runs virsh on the session daemon and returns its output; it must
// succeed.
func (s *libvirtSession) virsh(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", "qemu:///session"}, args...)...)
	cmd.Env = s.env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "virsh %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// file copies src into the session's directory, readable by its user.
func (s *libvirtSession) file(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(s.dir, filepath.Base(src))
	require.NoError(t, copyFile(src, dst))
	if s.cred != nil {
		require.NoError(t, os.Chown(dst, int(s.cred.Uid), int(s.cred.Gid)))
	}
	return dst
}

// followFile reads a file that another process is writing, waiting at its
// end for more until stop is closed.
type followFile struct {
	f    *os.File
	stop chan struct{}
}

func (r *followFile) Read(p []byte) (int, error) {
	for {
		n, err := r.f.Read(p)
		if n > 0 || err != io.EOF {
			return n, err
		}
		select {
		case <-r.stop:
			return 0, io.EOF
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestLibvirtDomainWithVtpmd defines and starts a libvirt domain with an
// emulated TPM 2.0 (tpm-crb) while vtpmd is installed as swtpm,
// swtpm_setup and swtpm_ioctl: libvirt provisions the TPM with vtpmd setup,
// serves it with vtpmd socket, and the guest (the QEMU boot test's kernel
// and initramfs, under TCG) sees a working TPM 2.0. Then the domain is
// destroyed and undefined.
func TestLibvirtDomainWithVtpmd(t *testing.T) {
	if testingPeer() {
		t.Skip("checks vtpmd as libvirt's swtpm")
	}
	_, kernel, initrd := prepareGuest(t)
	s := startLibvirtSession(t)
	caps := s.virsh(t, "domcapabilities", "--virttype", "qemu", "--arch", "x86_64", "--machine", "q35")
	require.Contains(t, caps, "<value>emulator</value>", "libvirt did not find vtpmd as swtpm")

	console := filepath.Join(s.dir, "console.log")
	name := fmt.Sprintf("vtpmd-test-%d", os.Getpid())
	domain := fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 panic=0</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'><source path='%s'/><target port='0'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
`, name, s.file(t, kernel.vmlinuz), s.file(t, initrd), console)
	xml := filepath.Join(s.dir, "domain.xml")
	require.NoError(t, os.WriteFile(xml, []byte(domain), 0o644))
	s.virsh(t, "define", xml)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for _, args := range [][]string{{"destroy", name}, {"undefine", name}} {
			cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", "qemu:///session"}, args...)...)
			cmd.Env, cmd.SysProcAttr = s.env, &syscall.SysProcAttr{Credential: s.cred}
			_ = cmd.Run()
		}
	})
	start := time.Now()
	s.virsh(t, "start", name)
	t.Logf("virsh start (vtpmd setup, vtpmd socket, QEMU) took %v", time.Since(start).Round(time.Millisecond))

	f, err := os.Open(console)
	require.NoError(t, err)
	defer f.Close()
	stop := make(chan struct{})
	defer close(stop)
	vm := &qemuVM{reports: make(chan guestReport, 16), panics: make(chan string, 1), done: make(chan struct{})}
	go vm.readConsole(&followFile{f: f, stop: stop})
	g := guestMachine{iface: "tpm-crb", fw: guestFirmwares[0]}
	g.check(t, vm, "libvirt boot")

	// libvirt ran vtpmd under both names: the setup before the start and
	// the daemon for QEMU, logging to the VM's swtpm log.
	log, err := os.ReadFile(filepath.Join(s.dir, "cache", "libvirt", "qemu", "log", name+"-swtpm.log"))
	require.NoError(t, err)
	require.Contains(t, string(log), "successfully authored TPM state", "vtpmd setup did not provision the TPM")
	require.Contains(t, s.virsh(t, "domstate", name), "running")

	s.virsh(t, "destroy", name)
	require.Contains(t, s.virsh(t, "domstate", name), "shut off")
	s.virsh(t, "undefine", name)
	require.NotContains(t, s.virsh(t, "list", "--all", "--name"), name)
}
