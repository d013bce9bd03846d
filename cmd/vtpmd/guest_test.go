package main

// Guest assets for the QEMU boot test: Debian's cloud kernel (downloaded with
// apt-get and cached per kernel version) and a busybox initramfs built from Go.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// kernelMetaPackage is the Debian package whose dependency is the kernel we boot.
const kernelMetaPackage = "linux-image-cloud-amd64"

// guestMarker starts every machine-readable line the guest init prints.
const guestMarker = "VTPMD-TEST "

// guestKernel is an unpacked kernel in the cache directory.
type guestKernel struct {
	dir     string   // cache directory of this kernel version
	vmlinuz string   // path of the kernel image
	modules []string // paths of the (uncompressed) modules to insmod, in load order
}

// requireEnv fails the test in CI (CI=true), where a missing prerequisite is a
// broken setup, and skips it elsewhere.
func requireEnv(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s (CI=true, so this is a failure, not a skip; .ci/run should have installed it)", msg)
	}
	t.Skipf("%s (skipping outside CI)", msg)
}

// guestCacheDir is where downloaded kernels are kept between runs:
// $VTPMD_TEST_CACHE, else the user cache dir (XDG_CACHE_HOME or ~/.cache)
// plus vtpmd-test.
func guestCacheDir() (string, error) {
	if dir := os.Getenv("VTPMD_TEST_CACHE"); dir != "" {
		return dir, os.MkdirAll(dir, 0o755)
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "vtpmd-test")
	return dir, os.MkdirAll(dir, 0o755)
}

// tpmKernelOptions maps the kernel config options the guest needs to the
// module that provides each when it is built as a module.
var tpmKernelOptions = []struct{ option, module string }{
	{"CONFIG_TCG_TPM", "tpm"},
	{"CONFIG_TCG_TIS_CORE", "tpm_tis_core"},
	{"CONFIG_TCG_TIS", "tpm_tis"},
	{"CONFIG_TCG_CRB", "tpm_crb"},
}

// loadGuestKernel returns the cached kernel for the current candidate of
// linux-image-cloud-amd64, downloading and unpacking it first if needed.
func loadGuestKernel(t *testing.T) guestKernel {
	t.Helper()
	cache, err := guestCacheDir()
	if err != nil {
		requireEnv(t, "no cache directory for guest assets: %v", err)
	}
	key, resolveErr := kernelCacheKey()
	if resolveErr != nil {
		// Offline or no apt lists: fall back to a kernel cached earlier.
		key = newestCachedKernel(cache)
		if key == "" {
			requireEnv(t, "cannot resolve the kernel package behind %s (run apt-get update): %v", kernelMetaPackage, resolveErr)
		}
		t.Logf("using cached kernel %s: %v", key, resolveErr)
	}
	dir := filepath.Join(cache, key)
	if k, err := readCachedKernel(dir); err == nil {
		return k
	}
	t.Logf("downloading %s into %s", key, cache)
	if err := downloadKernel(cache, key); err != nil {
		requireEnv(t, "cannot prepare guest kernel %s: %v", key, err)
	}
	k, err := readCachedKernel(dir)
	if err != nil {
		requireEnv(t, "guest kernel %s unusable after download: %v", key, err)
	}
	return k
}

// kernelCacheKey asks apt which kernel package linux-image-cloud-amd64
// depends on and its version, and returns "<package>_<version>".
func kernelCacheKey() (string, error) {
	out, err := exec.Command("apt-cache", "depends", kernelMetaPackage).Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s: %w", kernelMetaPackage, err)
	}
	pkg := ""
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if name, ok := strings.CutPrefix(line, "Depends: "); ok && strings.HasPrefix(name, "linux-image-") {
			pkg = strings.TrimSpace(name)
			break
		}
	}
	if pkg == "" {
		return "", fmt.Errorf("apt-cache depends %s names no linux-image package:\n%s", kernelMetaPackage, out)
	}
	out, err = exec.Command("apt-cache", "show", "--no-all-versions", pkg).Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache show %s: %w", pkg, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return pkg + "_" + strings.ReplaceAll(strings.TrimSpace(v), ":", "%3a"), nil
		}
	}
	return "", fmt.Errorf("apt-cache show %s has no Version", pkg)
}

// newestCachedKernel returns the most recently prepared cache entry, or "".
func newestCachedKernel(cache string) string {
	entries, err := os.ReadDir(cache)
	if err != nil {
		return ""
	}
	best, bestTime := "", int64(0)
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "linux-image-") {
			continue
		}
		info, err := os.Stat(filepath.Join(cache, e.Name(), "complete"))
		if err != nil {
			continue
		}
		if ts := info.ModTime().UnixNano(); ts > bestTime {
			best, bestTime = e.Name(), ts
		}
	}
	return best
}

// readCachedKernel opens a complete cache entry.
func readCachedKernel(dir string) (guestKernel, error) {
	if _, err := os.Stat(filepath.Join(dir, "complete")); err != nil {
		return guestKernel{}, err
	}
	k := guestKernel{dir: dir, vmlinuz: filepath.Join(dir, "vmlinuz")}
	if _, err := os.Stat(k.vmlinuz); err != nil {
		return guestKernel{}, err
	}
	list, err := os.ReadFile(filepath.Join(dir, "modules.list"))
	if err != nil {
		return guestKernel{}, err
	}
	for _, name := range strings.Fields(string(list)) {
		k.modules = append(k.modules, filepath.Join(dir, "modules", name+".ko"))
	}
	return k, nil
}

// downloadKernel fetches the package with apt-get download, unpacks it with
// dpkg-deb and stores the kernel image, its config and the TPM modules (if
// the TPM drivers are modules) as cache/key. The entry appears atomically.
func downloadKernel(cache, key string) error {
	pkg, _, _ := strings.Cut(key, "_")
	work, err := os.MkdirTemp(cache, "download-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	get := exec.Command("apt-get", "download", pkg)
	get.Dir = work
	if out, err := get.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get download %s: %w\n%s", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s left %d .deb files", pkg, len(debs))
	}
	root := filepath.Join(work, "root")
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], root).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg-deb -x: %w\n%s", err, out)
	}
	out := filepath.Join(work, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return err
	}
	images, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	configs, _ := filepath.Glob(filepath.Join(root, "boot", "config-*"))
	if len(images) != 1 || len(configs) != 1 {
		return fmt.Errorf("%s: expected one boot/vmlinuz-* and one boot/config-*, found %v %v", pkg, images, configs)
	}
	if err := copyFile(images[0], filepath.Join(out, "vmlinuz")); err != nil {
		return err
	}
	if err := copyFile(configs[0], filepath.Join(out, "config")); err != nil {
		return err
	}
	config, err := readKernelConfig(configs[0])
	if err != nil {
		return err
	}
	var wanted []string
	for _, o := range tpmKernelOptions {
		switch config[o.option] {
		case "y":
		case "m":
			wanted = append(wanted, o.module)
		default:
			return fmt.Errorf("%s: kernel has %s=%q, the guest needs it", pkg, o.option, config[o.option])
		}
	}
	order, err := collectModules(root, wanted, filepath.Join(out, "modules"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "modules.list"), []byte(strings.Join(order, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "complete"), []byte(key+"\n"), 0o644); err != nil {
		return err
	}
	dest := filepath.Join(cache, key)
	if err := os.Rename(out, dest); err != nil {
		if _, statErr := os.Stat(filepath.Join(dest, "complete")); statErr == nil {
			return nil // a concurrent run prepared it first
		}
		return err
	}
	return nil
}

// readKernelConfig parses a kernel .config into option -> value.
func readKernelConfig(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	config := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if name, value, ok := strings.Cut(sc.Text(), "="); ok && strings.HasPrefix(name, "CONFIG_") {
			config[name] = value
		}
	}
	return config, sc.Err()
}

// collectModules finds the named modules (and, through their .modinfo
// "depends=", the modules they need) under root/lib/modules, writes them
// uncompressed into dest as <name>.ko and returns the names in load order.
func collectModules(root string, names []string, dest string) ([]string, error) {
	if len(names) == 0 {
		return nil, nil
	}
	files := map[string]string{} // normalised module name -> file
	err := filepath.WalkDir(filepath.Join(root, "lib", "modules"), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		base := d.Name()
		for _, ext := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
			if name, ok := strings.CutSuffix(base, ext); ok {
				files[normaliseModule(name)] = path
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		name = normaliseModule(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		state[name] = 1
		src, ok := files[name]
		if !ok {
			return fmt.Errorf("module %s not found under %s/lib/modules", name, root)
		}
		data, err := readModule(src)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("%s: %w", src, err)
		}
		for _, dep := range deps {
			if err := visit(dep); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(dest, name+".ko"), data, 0o644); err != nil {
			return err
		}
		state[name] = 2
		order = append(order, name)
		return nil
	}
	for _, name := range names {
		if err := visit(name); err != nil {
			return nil, err
		}
	}
	return order, nil
}

func normaliseModule(name string) string { return strings.ReplaceAll(name, "-", "_") }

// readModule returns a module file's contents, decompressed: busybox insmod
// in the guest takes plain .ko files only.
func readModule(path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, err
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(path, ".xz"):
		return decompressWith(path, [][]string{{"xz", "-dc"}, {"busybox", "xzcat"}})
	case strings.HasSuffix(path, ".zst"):
		return decompressWith(path, [][]string{{"zstd", "-dc"}})
	default:
		return os.ReadFile(path)
	}
}

func decompressWith(path string, tools [][]string) ([]byte, error) {
	var errs []error
	for _, tool := range tools {
		bin, err := exec.LookPath(tool[0])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out, err := exec.Command(bin, append(tool[1:], path)...).Output()
		if err == nil {
			return out, nil
		}
		errs = append(errs, fmt.Errorf("%s %s: %w", tool[0], path, err))
	}
	return nil, fmt.Errorf("cannot decompress %s: %w", path, errors.Join(errs...))
}

// moduleDepends reads the "depends=" entry of a module's .modinfo section.
func moduleDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, entry := range bytes.Split(info, []byte{0}) {
		if deps, ok := bytes.CutPrefix(entry, []byte("depends=")); ok {
			var out []string
			for _, d := range strings.Split(string(deps), ",") {
				if d != "" {
					out = append(out, d)
				}
			}
			return out, nil
		}
	}
	return nil, nil
}

func copyFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o644)
}

// guestInit is the initramfs /init. It prints one "VTPMD-TEST key=value" line
// per check, "VTPMD-TEST done" at the end, then waits for command lines on
// the serial console: "reboot" (reboot -f), "setup" and "state" (the TPM
// state reports of the migration test, each from "VTPMD-TEST report" to
// "VTPMD-TEST done"; the guest then waits for the next line), or anything
// else/timeout (poweroff -f).
const guestInit = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Keep kernel messages from interleaving with the report lines.
echo 1 > /proc/sys/kernel/printk
say() { echo "VTPMD-TEST $*"; }
say boot
for m in $(cat /modules.list); do
	insmod /lib/modules/$m.ko || say error=insmod-$m
done
i=0
while [ ! -e /dev/tpmrm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/tpm/tpm0 ]; then say tpm0=present; else say tpm0=absent; fi
say tpm_version_major=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)
say driver=$(basename "$(readlink /sys/class/tpm/tpm0/device/driver 2>/dev/null)")
pcrs() {
	for i in "$@"; do
		say pcr-sha256-$i=$(cat /sys/class/tpm/tpm0/pcr-sha256/$i 2>/dev/null)
	done
}
pcrs 0 1 2 3 4 5 6 7
# tpmcmd FILE...: send the raw command in each FILE through one open
# /dev/tpmrm0 (so that transient handles stay valid from one to the next) in
# one write, read each response with one read and print the responses as hex,
# separated by commas.
tpmcmd() {
	exec 3<>/dev/tpmrm0 || return
	sep=
	for f in "$@"; do
		printf '%s' "$sep"
		dd if="$f" bs=4096 count=1 2>/dev/null >&3
		dd bs=4096 count=1 2>/dev/null <&3 | od -An -v -tx1 | tr -d ' \n'
		sep=,
	done
	exec 3<&-
}
say getrandom=$(tpmcmd /getrandom.bin)
say readclock=$(tpmcmd /readclock.bin)
say done
while :; do
	cmd=
	read -t 600 cmd
	case "$cmd" in
	reboot) reboot -f ;;
	setup)
		say report
		say nvdefine=$(tpmcmd /nvdefine.bin)
		say nvwrite=$(tpmcmd /nvwrite.bin)
		say extend10=$(tpmcmd /extend10.bin)
		say extend16=$(tpmcmd /extend16.bin)
		say persist=$(tpmcmd /createprimary.bin /evictcontrol.bin)
		say done
		;;
	state)
		say report
		pcrs 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
		say nvread=$(tpmcmd /nvread.bin)
		say readpublic=$(tpmcmd /readpublic.bin)
		say getrandom=$(tpmcmd /getrandom.bin)
		say readclock=$(tpmcmd /readclock.bin)
		say done
		;;
	*) poweroff -f ;;
	esac
done
`

// Raw TPM commands the guest sends through /dev/tpmrm0.
var (
	// TPM2_GetRandom(bytesRequested = getRandomBytes)
	guestGetRandom = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, getRandomBytes}
	// TPM2_ReadClock
	guestReadClock = []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81}
)

const getRandomBytes = 16

// buildInitramfs writes a gzip-compressed newc cpio archive with busybox, the
// init script, the raw TPM commands and the kernel's TPM modules to path.
func buildInitramfs(t *testing.T, k guestKernel, path string) {
	t.Helper()
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		busybox = "/bin/busybox"
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		requireEnv(t, "busybox (package busybox-static) is needed for the guest: %v", err)
	}
	if f, err := elf.NewFile(bytes.NewReader(bb)); err != nil {
		requireEnv(t, "%s is not an ELF binary: %v", busybox, err)
	} else {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				requireEnv(t, "%s is dynamically linked; install busybox-static", busybox)
			}
		}
	}
	a := &cpioWriter{}
	for _, dir := range []string{"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"} {
		a.add(dir, 0o040755, nil, 0, 0)
	}
	a.add("dev/console", 0o020600, nil, 5, 1)
	a.add("bin/busybox", 0o100755, bb, 0, 0)
	a.add("init", 0o100755, []byte(guestInit), 0, 0)
	a.add("getrandom.bin", 0o100644, guestGetRandom, 0, 0)
	a.add("readclock.bin", 0o100644, guestReadClock, 0, 0)
	for _, c := range guestStateCommands {
		a.add(c.file, 0o100644, c.cmd, 0, 0)
	}
	var names []string
	for _, m := range k.modules {
		data, err := os.ReadFile(m)
		require.NoError(t, err)
		name := strings.TrimSuffix(filepath.Base(m), ".ko")
		names = append(names, name)
		a.add("lib/modules/"+name+".ko", 0o100644, data, 0, 0)
	}
	a.add("modules.list", 0o100644, []byte(strings.Join(names, "\n")+"\n"), 0, 0)
	var out bytes.Buffer
	zw, err := gzip.NewWriterLevel(&out, gzip.BestSpeed)
	require.NoError(t, err)
	_, err = zw.Write(a.finish())
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	require.NoError(t, os.WriteFile(path, out.Bytes(), 0o644))
}

// cpioWriter builds an archive in the "newc" format the kernel unpacks.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) add(name string, mode uint32, data []byte, rdevMajor, rdevMinor int) {
	w.ino++
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) finish() []byte {
	w.ino = -1 // the trailer has inode 0
	w.add("TRAILER!!!", 0, nil, 0, 0)
	return w.buf.Bytes()
}

// sortedKeys is a small helper for stable failure messages.
func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
