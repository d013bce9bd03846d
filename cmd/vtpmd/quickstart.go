package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// runQEMU is `vtpmd qemu [name]`: one TPM with the default layout, ready for
// QEMU, whose arguments it prints. Like swtpm, it ends when QEMU shuts the
// TPM down.
func runQEMU(args []string, stdout io.Writer) error {
	name := "default"
	switch len(args) {
	case 0:
	case 1:
		name = args[0]
	default:
		return fmt.Errorf("usage: vtpmd qemu [name]")
	}
	if name == "" || name != filepath.Base(name) || name[0] == '.' {
		return fmt.Errorf("qemu: bad name %q: use a plain file name", name)
	}
	stateDir, runDir := defaultDirs()
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	sock := filepath.Join(runDir, name+".sock")
	fmt.Fprintf(stdout, "vtpmd serves TPM %q (state in %s). Start QEMU with:\n\n", name, filepath.Join(stateDir, name))
	fmt.Fprintf(stdout, "  qemu-system-x86_64 ... -chardev socket,id=chrtpm,path=%s -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0\n\n", sock)
	fmt.Fprintf(stdout, "(-device tpm-tis,tpmdev=tpm0 for a TIS TPM.) vtpmd ends when QEMU shuts the TPM down.\n")
	return runSocket([]string{
		"--tpm2",
		"--tpmstate", "dir=" + filepath.Join(stateDir, name) + ",mode=0600",
		"--ctrl", "type=unixio,path=" + sock + ",mode=0600",
		"--log", "fd=2,level=1",
	}, stdout)
}

// defaultDirs returns where state and sockets live by default: system
// directories for root, the user's XDG directories otherwise.
func defaultDirs() (stateDir, runDir string) {
	if os.Geteuid() == 0 {
		return "/var/lib/vtpmd", "/run/vtpmd"
	}
	data := os.Getenv("XDG_DATA_HOME")
	if data == "" {
		home, _ := os.UserHomeDir()
		data = filepath.Join(home, ".local", "share")
	}
	run := os.Getenv("XDG_RUNTIME_DIR")
	if run == "" {
		run = filepath.Join(os.TempDir(), fmt.Sprintf("vtpmd-%d", os.Getuid()))
	}
	return filepath.Join(data, "vtpmd"), filepath.Join(run, "vtpmd")
}
