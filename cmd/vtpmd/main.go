// Command vtpmd serves virtual TPM 2.0 devices to virtual machines. Its
// `socket` command is a drop-in for `swtpm socket --tpm2`.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/vtpmd/vtpmd/vtpm"
)

// version is vtpmd's version, reported where swtpm reports its own.
const version = "0.1.0"

func main() {
	if err := run(os.Args, os.Stdout); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			// The command printed its own messages.
			os.Exit(int(code))
		}
		fmt.Fprintln(os.Stderr, "vtpmd:", err)
		os.Exit(1)
	}
}

// run dispatches on the command. Installed under swtpm's name, vtpmd takes
// swtpm's command line.
func run(args []string, stdout io.Writer) error {
	switch filepath.Base(args[0]) {
	case "swtpm":
		if len(args) > 1 && args[1] == "socket" {
			return runSocket(args[2:], stdout)
		}
	case "swtpm_setup":
		return runSetup(args[1:], stdout)
	case "swtpm_ioctl":
		return runIoctlTool(args[1:], os.Stdin, stdout, os.Stderr)
	}
	if len(args) < 2 {
		fmt.Fprint(stdout, usage)
		return fmt.Errorf("missing command")
	}
	switch args[1] {
	case "socket":
		return runSocket(args[2:], stdout)
	case "qemu":
		return runQEMU(args[2:], stdout)
	case "setup":
		return runSetup(args[2:], stdout)
	case "ioctl":
		return runIoctlTool(args[2:], os.Stdin, stdout, os.Stderr)
	case "serve":
		return runServe(args[2:], stdout)
	case "ctl":
		return runCtl(args[2:], stdout)
	case "guardian":
		return execGuardian(args[2:])
	case "worker":
		return runWorker(args[2:])
	case "host":
		return runHost(args[2:], stdout)
	case "-v", "--version", "version":
		_, err := fmt.Fprintf(stdout, "TPM emulator version %s, vtpmd (TPM 2.0 engine: %s)\n", version, vtpm.EngineVersion)
		return err
	case "-h", "--help", "help":
		_, err := fmt.Fprint(stdout, usage)
		return err
	case "chardev", "cuse":
		return fmt.Errorf("%s: Unsupported TPM interface; vtpmd serves the socket interface", args[1])
	}
	return fmt.Errorf("unknown command %q (see vtpmd --help)", args[1])
}

const usage = `Usage: vtpmd <command> [options]

Commands:
  socket     serve one TPM 2.0 over swtpm's control and data channels
             (the command line of 'swtpm socket'; see 'vtpmd socket --help')
  setup      provision a new TPM 2.0: EKs, certificates, PCR banks
             (the command line of 'swtpm_setup'; see 'vtpmd setup --help')
  ioctl      send one control command to a served TPM
             (the command line of 'swtpm_ioctl'; see 'vtpmd ioctl --help')
  qemu [name]
             serve one TPM with the default layout and print the QEMU
             arguments that use it
  serve      serve the TPMs of many VMs, a worker process each, managed
             through an admin API (see 'vtpmd serve --help')
  ctl        the admin client of 'vtpmd serve' (see 'vtpmd ctl --help')
  guardian   the guardian service and its administration: runs the
             vtpmd-guardian binary (see 'vtpmd guardian --help')
  host identity [--config F]
             print this host's identity for the guardian's registration
  --version  print the version

Installed as 'swtpm', 'swtpm_setup' or 'swtpm_ioctl', vtpmd takes their
command lines.
`

const socketUsage = `Usage: vtpmd socket --tpm2 [options]

Serves one TPM 2.0 with swtpm's protocol. Options (as swtpm's):
--tpm2           : emulate a TPM 2.0 (required; TPM 1.2 is not emulated)
--tpmstate dir=<dir>|backend-uri=dir://<dir>|backend-uri=file://<file>[,mode=0600][,lock][,fsync]
                 : the TPM's state directory (or $TPM_PATH), or state file (a regular
                   file or a block device); always locked, written 0600, synced
--ctrl type=unixio,path=<path>[,mode=0600][,uid=][,gid=][,terminate]
--ctrl type=unixio,fd=<listening fd>|clientfd=<connected fd>
--ctrl type=tcp,port=<port>[,bindaddr=127.0.0.1][,ifname=][,terminate] | type=tcp,fd=<fd>
                 : the control channel
--server type=unixio,path=<path>[,mode=0600][,uid=][,gid=][,disconnect] | type=unixio,fd=<listening fd>
--server type=tcp,port=<port>[,bindaddr=][,ifname=][,disconnect] | type=tcp,fd=<connected fd>
                 : the data channel (QEMU passes it with CMD_SET_DATAFD instead)
-p|--port <port> : the same as --server type=tcp,port=<port>,disconnect
-f|--fd <fd>     : the same as --server type=tcp,fd=<fd>
-t|--terminate   : end when the data connection closes
--flags [not-need-init][,startup-clear|startup-state|startup-none][,disable-auto-shutdown]
--locality reject-locality-4
--log file=<path>|fd=<fd>[,level=n][,prefix=<prefix>][,truncate]
--pid file=<path>|fd=<fd>
-d|--daemon      : run in the background once serving
--guardian-config <file>
                 : obtain the state key from the guardian this file configures (else
                   $VTPMD_GUARDIAN_CONFIG, else /etc/vtpmd/guardian.json if it exists)
--print-capabilities, --print-states, -h|--help
`

// execGuardian runs vtpmd-guardian in this process's place: the guardian is
// a binary of its own so that vtpmd never links etcd. It is looked for next
// to vtpmd, then on PATH.
func execGuardian(args []string) error {
	const name = "vtpmd-guardian"
	path, err := os.Executable()
	if err == nil {
		path = filepath.Join(filepath.Dir(path), name)
		_, err = os.Stat(path)
	}
	if err != nil {
		if path, err = exec.LookPath(name); err != nil {
			return fmt.Errorf("guardian: %s is neither next to vtpmd nor on PATH (make install installs it)", name)
		}
	}
	return fmt.Errorf("guardian: run %s: %w", path, syscall.Exec(path, append([]string{name}, args...), os.Environ()))
}
