package main

// End-to-end test: QEMU (TCG) boots Debian's cloud kernel with a TPM backed by
// the daemon, started the way libvirt starts swtpm (control socket only, QEMU
// hands over the data channel with CMD_SET_DATAFD). The guest reports what it
// sees of the TPM on the serial console; see guest_test.go for the guest.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	// bootTimeout bounds one guest boot, from power-on or reset to the
	// guest's "done" line. A boot takes a few seconds under TCG (OVMF more);
	// the margin is for slow, loaded CI machines.
	bootTimeout = 3 * time.Minute
	// exitTimeout bounds QEMU's exit after poweroff and the daemon's exit
	// after QEMU's.
	exitTimeout = 30 * time.Second
)

// guestFirmware is one of the firmwares the guest boots with.
type guestFirmware struct {
	name string
	// args returns QEMU arguments selecting the firmware; dir keeps files
	// (UEFI variables) that must survive from one QEMU run to the next.
	args func(t *testing.T, dir string) []string
	// stablePCRs are the PCRs whose values must be the same on every boot of
	// the same machine: they prove that a reset really reset the PCRs.
	stablePCRs []int
}

var guestFirmwares = []guestFirmware{
	{
		name:       "seabios",
		args:       func(*testing.T, string) []string { return nil }, // QEMU's default firmware
		stablePCRs: []int{0, 1, 2, 3, 4, 5, 6, 7},
	},
	{
		name:       "ovmf",
		args:       ovmfArgs,
		stablePCRs: []int{0, 1, 2, 3, 4, 5, 6, 7},
	},
}

// ovmfArgs maps OVMF's code read-only and a per-machine copy of its variable
// store as pflash, as libvirt does.
func ovmfArgs(t *testing.T, dir string) []string {
	t.Helper()
	vars := filepath.Join(dir, "OVMF_VARS.fd")
	for _, pair := range [][2]string{
		{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"},
		{"/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"},
	} {
		if _, err := os.Stat(pair[0]); err != nil {
			continue
		}
		if _, err := os.Stat(vars); err != nil {
			require.NoError(t, copyFile(pair[1], vars))
		}
		return []string{
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + pair[0],
			"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
		}
	}
	requireEnv(t, "OVMF firmware not found in /usr/share/OVMF (package ovmf)")
	return nil
}

// prepareGuest skips in -short mode, finds QEMU, and makes the guest's
// kernel and initramfs.
func prepareGuest(t *testing.T) (qemu string, kernel guestKernel, initrd string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU guests; skipped in -short mode")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		requireEnv(t, "qemu-system-x86_64 not found (package qemu-system-x86): %v", err)
	}
	kernel = loadGuestKernel(t)
	initrd = filepath.Join(t.TempDir(), "initrd.gz")
	buildInitramfs(t, kernel, initrd)
	return qemu, kernel, initrd
}

func TestQEMUBoot(t *testing.T) {
	qemu, kernel, initrd := prepareGuest(t)
	t.Logf("daemon %s, kernel %s, %d modules", daemonPath, filepath.Base(kernel.dir), len(kernel.modules))

	for _, iface := range []string{"tpm-crb", "tpm-tis"} {
		for _, fw := range guestFirmwares {
			t.Run(iface+"/"+fw.name, func(t *testing.T) {
				g := guestMachine{qemu: qemu, kernel: kernel.vmlinuz, initrd: initrd, iface: iface, fw: fw, dir: t.TempDir(),
					capture: captureLog(t, "qemu-boot-"+iface+"-"+fw.name+".txt")}
				g.run(t)
			})
		}
	}
}

// guestMachine is one virtual machine with a persistent TPM state directory
// that is booted by two successive QEMU processes.
type guestMachine struct {
	qemu, kernel, initrd string
	iface                string // tpm-crb or tpm-tis
	fw                   guestFirmware
	dir                  string
	capture              *trafficLog // non-nil with VTPMD_CAPTURE set
	proxy                *fdProxy    // the capture proxy of the running daemon
	incoming             string      // -incoming URI: QEMU waits for a migration
	daemonArgs           []string    // more options of the daemon
	boots                []guestBoot
}

// guestBoot is what one boot of the guest reported.
type guestBoot struct {
	what  string
	clock tpmClock
	pcrs  [8]string
}

func (g *guestMachine) run(t *testing.T) {
	state := filepath.Join(g.dir, "state")
	require.NoError(t, os.MkdirAll(state, 0o700))

	// First QEMU process: cold boot, guest-initiated reboot, system_reset
	// from the monitor, then guest poweroff.
	start := time.Now()
	d := g.startDaemon(t)
	vm := g.startQEMU(t)
	g.check(t, vm, "cold boot")
	vm.console(t, "reboot")
	g.check(t, vm, "after guest reboot -f")
	vm.monitor(t, "system_reset")
	g.check(t, vm, "after monitor system_reset")
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	d.waitExit(t, exitTimeout)
	t.Logf("first QEMU run (3 boots) took %v", time.Since(start).Round(time.Millisecond))
	// swtpm keeps tpm2-00.permall here; vtpmd may name its files differently.
	entries, err := os.ReadDir(state)
	require.NoError(t, err)
	var stored []string
	for _, e := range entries {
		if e.Type().IsRegular() && e.Name() != ".lock" {
			stored = append(stored, e.Name())
		}
	}
	assert.NotEmpty(t, stored, "no TPM state stored in %s", state)

	// Second QEMU process and daemon on the same state directory.
	start = time.Now()
	d = g.startDaemon(t)
	vm = g.startQEMU(t)
	g.check(t, vm, "second QEMU run")
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	d.waitExit(t, exitTimeout)
	t.Logf("second QEMU run (1 boot) took %v", time.Since(start).Round(time.Millisecond))

	g.checkBoots(t)
}

// checkBoots compares the boots seen so far. Every boot starts the TPM
// (TPM2_Startup(CLEAR) by the firmware): a TPM Reset increments resetCount,
// a TPM Restart restartCount. Both are kept in the TPM's NV state, so the
// pair must grow from boot to boot, also across daemon restarts. The
// firmware measures the same things on every boot; equal PCRs show that
// each reset also reset the PCRs.
func (g *guestMachine) checkBoots(t *testing.T) {
	t.Helper()
	for i := 1; i < len(g.boots); i++ {
		prev, cur := g.boots[i-1], g.boots[i]
		assert.True(t, cur.clock.after(prev.clock), "TPM reset/restart counters did not advance from %s %+v to %s %+v",
			prev.what, prev.clock, cur.what, cur.clock)
	}
	for _, pcr := range g.fw.stablePCRs {
		for _, b := range g.boots[1:] {
			assert.Equal(t, g.boots[0].pcrs[pcr], b.pcrs[pcr], "PCR %d differs between %s and %s", pcr, g.boots[0].what, b.what)
		}
	}
}

// startDaemon starts the daemon with the arguments libvirt 9.x/10.x uses.
// When capturing, QEMU talks to it through a recording proxy.
func (g *guestMachine) startDaemon(t *testing.T) *daemon {
	t.Helper()
	sock := filepath.Join(g.dir, "sock")
	if g.capture != nil {
		if g.proxy != nil {
			g.proxy.close()
		}
		g.proxy = startFDProxy(t, g.capture, sock, sock+".d")
		sock += ".d"
	}
	return startDaemon(t, append([]string{
		"socket",
		"--ctrl", "type=unixio,path=" + sock + ",mode=0600",
		"--tpmstate", "dir=" + filepath.Join(g.dir, "state") + ",mode=0600",
		"--log", "file=" + filepath.Join(g.dir, "log"),
		"--terminate",
		"--tpm2",
	}, g.daemonArgs...), sock)
}

func (g *guestMachine) startQEMU(t *testing.T) *qemuVM {
	t.Helper()
	monitor := filepath.Join(g.dir, "monitor")
	args := []string{
		"-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-nographic", "-serial", "stdio",
		"-monitor", "unix:" + monitor + ",server=on,wait=off",
		"-kernel", g.kernel, "-initrd", g.initrd,
		"-append", "console=ttyS0 panic=0",
		"-chardev", "socket,id=chrtpm,path=" + filepath.Join(g.dir, "sock"),
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", g.iface + ",tpmdev=tpm0",
	}
	args = append(args, g.fw.args(t, g.dir)...)
	if g.incoming != "" {
		args = append(args, "-incoming", g.incoming)
	}
	return startQEMU(t, g.qemu, args, monitor)
}

// check waits for the guest's next report and checks it.
func (g *guestMachine) check(t *testing.T, vm *qemuVM, what string) {
	t.Helper()
	start := time.Now()
	r := vm.waitReport(t, bootTimeout, what)
	t.Logf("%s: report after %v", what, time.Since(start).Round(time.Millisecond))
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s: %s\nguest report:\n%s\nconsole tail:\n%s", what, fmt.Sprintf(format, args...), r, vm.tail())
	}
	if e := r.get("error"); e != "" {
		fail("guest error %s", e)
	}
	if r.get("tpm0") != "present" {
		fail("/sys/class/tpm/tpm0 missing")
	}
	if v := r.get("tpm_version_major"); v != "2" {
		fail("tpm_version_major = %q, want 2", v)
	}
	wantDriver := map[string]string{"tpm-crb": "tpm_crb", "tpm-tis": "tpm_tis"}[g.iface]
	if v := r.get("driver"); v != wantDriver {
		fail("tpm0 driver = %q, want %q", v, wantDriver)
	}
	b := guestBoot{what: what}
	for i := range b.pcrs {
		v := r.get(fmt.Sprintf("pcr-sha256-%d", i))
		raw, err := hex.DecodeString(strings.ToLower(v))
		if err != nil || len(raw) != 32 {
			fail("pcr-sha256/%d = %q is not a SHA-256 value", i, v)
		}
		if bytes.Equal(raw, make([]byte, 32)) {
			fail("PCR %d is zero: the firmware measured nothing into it", i)
		}
		b.pcrs[i] = strings.ToLower(v)
	}

	rsp, err := hex.DecodeString(r.get("getrandom"))
	if err != nil {
		fail("getrandom response %q is not hex", r.get("getrandom"))
	}
	if err := checkTPMResponse(rsp); err != nil {
		fail("TPM2_GetRandom: %v (response %x)", err, rsp)
	}
	if len(rsp) < 12 || int(binary.BigEndian.Uint16(rsp[10:])) != getRandomBytes || len(rsp) != 12+getRandomBytes {
		fail("TPM2_GetRandom returned %x, want a TPM2B of %d bytes", rsp, getRandomBytes)
	}
	if bytes.Equal(rsp[12:], make([]byte, getRandomBytes)) {
		fail("TPM2_GetRandom returned only zeros")
	}

	rsp, err = hex.DecodeString(r.get("readclock"))
	if err != nil {
		fail("readclock response %q is not hex", r.get("readclock"))
	}
	if err := checkTPMResponse(rsp); err != nil {
		fail("TPM2_ReadClock: %v (response %x)", err, rsp)
	}
	if len(rsp) != 10+8+8+4+4+1 {
		fail("TPM2_ReadClock response has %d bytes, want 35: %x", len(rsp), rsp)
	}
	b.clock = tpmClock{reset: binary.BigEndian.Uint32(rsp[26:]), restart: binary.BigEndian.Uint32(rsp[30:])}
	t.Logf("%s: resetCount %d restartCount %d, PCR0 %s…", what, b.clock.reset, b.clock.restart, b.pcrs[0][:16])
	g.boots = append(g.boots, b)
}

// checkTPMResponse checks a TPM 2.0 response header: tag, size field equal to
// the length, response code 0.
func checkTPMResponse(rsp []byte) error {
	if len(rsp) < 10 {
		return fmt.Errorf("%d bytes, shorter than a response header", len(rsp))
	}
	if tag := binary.BigEndian.Uint16(rsp); tag != 0x8001 {
		return fmt.Errorf("tag %#04x, want 0x8001", tag)
	}
	if size := binary.BigEndian.Uint32(rsp[2:]); int(size) != len(rsp) {
		return fmt.Errorf("size field %d but %d bytes read", size, len(rsp))
	}
	if rc := binary.BigEndian.Uint32(rsp[6:]); rc != 0 {
		return fmt.Errorf("response code %#x", rc)
	}
	return nil
}

// tpmClock holds the counters of TPMS_CLOCK_INFO.
type tpmClock struct{ reset, restart uint32 }

func (c tpmClock) after(prev tpmClock) bool {
	return c.reset > prev.reset || (c.reset == prev.reset && c.restart > prev.restart)
}

// guestReport is one boot's "VTPMD-TEST key=value" lines.
type guestReport map[string]string

func (r guestReport) get(key string) string { return r[key] }

func (r guestReport) String() string {
	var sb strings.Builder
	for _, k := range sortedKeys(r) {
		fmt.Fprintf(&sb, "  %s=%s\n", k, r[k])
	}
	return sb.String()
}

// qemuVM is a running QEMU whose serial console is the process's stdio.
type qemuVM struct {
	cmd         *exec.Cmd
	stdin       io.WriteCloser
	monitorPath string
	reports     chan guestReport
	panics      chan string
	done        chan struct{}
	err         error

	mu  sync.Mutex
	out bytes.Buffer // everything the console printed
}

func startQEMU(t *testing.T, qemu string, args []string, monitor string) *qemuVM {
	t.Helper()
	vm := &qemuVM{
		cmd:         exec.Command(qemu, args...),
		monitorPath: monitor,
		reports:     make(chan guestReport, 16),
		panics:      make(chan string, 1),
		done:        make(chan struct{}),
	}
	stdout, err := vm.cmd.StdoutPipe()
	require.NoError(t, err)
	vm.cmd.Stderr = vm.cmd.Stdout
	vm.stdin, err = vm.cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, vm.cmd.Start(), "start %s %s", qemu, strings.Join(args, " "))
	readDone := make(chan struct{})
	go func() { vm.readConsole(stdout); close(readDone) }()
	go func() { <-readDone; vm.err = vm.cmd.Wait(); close(vm.done) }()
	t.Cleanup(func() {
		select {
		case <-vm.done:
			return
		default:
		}
		_ = vm.cmd.Process.Kill()
		<-vm.done
	})
	return vm
}

// readConsole collects the console output and the guest's reports.
func (vm *qemuVM) readConsole(r io.Reader) {
	br := bufio.NewReader(r)
	var cur guestReport
	for {
		line, err := br.ReadString('\n')
		vm.mu.Lock()
		vm.out.WriteString(line)
		vm.mu.Unlock()
		line = strings.TrimRight(line, "\r\n")
		if strings.Contains(line, "Kernel panic") {
			select {
			case vm.panics <- line:
			default:
			}
		}
		if i := strings.Index(line, guestMarker); i >= 0 {
			field := line[i+len(guestMarker):]
			switch {
			case field == "boot", field == "report":
				cur = guestReport{}
			case field == "done":
				if cur != nil {
					vm.reports <- cur
				}
				cur = nil
			case cur != nil:
				if k, v, ok := strings.Cut(field, "="); ok {
					if old, dup := cur[k]; dup && k == "error" {
						v = old + "," + v
					}
					cur[k] = v
				}
			}
		}
		if err != nil {
			return
		}
	}
}

func (vm *qemuVM) tail() string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	out := vm.out.String()
	if len(out) > 6000 {
		out = "…" + out[len(out)-6000:]
	}
	return out
}

func (vm *qemuVM) waitReport(t *testing.T, timeout time.Duration, what string) guestReport {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case r := <-vm.reports:
		return r
	case line := <-vm.panics:
		t.Fatalf("%s: guest kernel panic: %s\nconsole tail:\n%s", what, line, vm.tail())
	case <-vm.done:
		t.Fatalf("%s: QEMU exited before the guest reported (%v)\nconsole tail:\n%s", what, vm.err, vm.tail())
	case <-timer.C:
		t.Fatalf("%s: no guest report within %v\nconsole tail:\n%s", what, timeout, vm.tail())
	}
	return nil
}

// console types a line on the guest's serial console.
func (vm *qemuVM) console(t *testing.T, line string) {
	t.Helper()
	_, err := io.WriteString(vm.stdin, line+"\n")
	require.NoError(t, err, "write to the guest console")
}

// monitor runs one command on QEMU's human monitor and returns what the
// monitor printed up to the next prompt (its echo of the command included).
// For "quit" it waits for QEMU to close the connection instead.
func (vm *qemuVM) monitor(t *testing.T, command string) string {
	t.Helper()
	conn, err := net.DialTimeout("unix", vm.monitorPath, 5*time.Second)
	require.NoError(t, err, "connect to the QEMU monitor")
	defer conn.Close()
	require.NoError(t, conn.SetDeadline(time.Now().Add(30*time.Second)))
	readPrompt := func() string {
		var got []byte
		buf := make([]byte, 512)
		for !bytes.HasSuffix(got, []byte("(qemu) ")) {
			n, err := conn.Read(buf)
			got = append(got, buf[:n]...)
			require.NoError(t, err, "read from the QEMU monitor; got %q", got)
		}
		return string(got)
	}
	readPrompt()
	_, err = io.WriteString(conn, command+"\n")
	require.NoError(t, err)
	if command == "quit" {
		out, _ := io.ReadAll(conn)
		return string(out)
	}
	return strings.TrimSuffix(readPrompt(), "(qemu) ")
}

func (vm *qemuVM) waitExit(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-vm.done:
		require.NoError(t, vm.err, "QEMU exit status\nconsole tail:\n%s", vm.tail())
	case <-time.After(timeout):
		t.Fatalf("QEMU still running %v after poweroff\nconsole tail:\n%s", timeout, vm.tail())
	}
}
