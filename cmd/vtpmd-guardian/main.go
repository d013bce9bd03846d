// Command vtpmd-guardian is the guardian service of vtpmd (`vtpmd guardian`
// runs it): it attests hosts and releases VM state keys to healthy ones. It
// is a binary of its own so that vtpmd's per-VM processes never link etcd.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "vtpmd-guardian:", err)
		os.Exit(1)
	}
}

const usage = `Usage: vtpmd-guardian <command> [options]   (or: vtpmd guardian ...)

The guardian attests vtpmd hosts (TPM quote and measured-boot event log
against the host group's baseline, or a registered host key) and releases
VM state keys only to attested hosts. Several replicas share their state
through etcd; a single one needs none.

Service:
  init        make the fabric's keys (sealed under a KEK file), its CA and
              the admin token
  serve       serve the guardian over HTTPS
  keys        print this fabric's name and public key (for 'grant' at
              another fabric's owner)

Administration (over HTTPS with the admin token, failing over between
--url replicas):
  host add <name> --group <group> (--identity <file> | --host-key <pem> |
           --ak <file> --ek <file>)
  host list
  host remove <name>
  baseline record <group> (--event-log <file> [--pcrs 0,1,...] |
           --pcr <index>=<hex>...)
  baseline list
  baseline remove <group>
  grant --protector <file> --fabric-keys <file> [--out <file>]
  audit [--last <n>]

'vtpmd-guardian <command> --help' describes each command's options.
`

// defaultDataDir holds the guardian's store, sealed keys, CA and token.
const defaultDataDir = "/var/lib/vtpmd-guardian"

// defaultKEKFile is kept apart from the data directory.
const defaultKEKFile = "/etc/vtpmd-guardian/kek"

// Files in the data directory.
const (
	sealedKeysFile = "keys.sealed"
	tokenFile      = "admin.token"
	caFile         = "ca.crt"
	storeDir       = "store"
	etcdDir        = "etcd"
)

func run(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stdout, usage)
		return errors.New("missing command")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "init":
		return runInit(rest, stdout)
	case "serve":
		return runServe(rest, stdout)
	case "keys":
		return runKeys(rest, stdout)
	case "host":
		return runSub("host", rest, stdout, map[string]adminCommand{"add": hostAdd, "list": hostList, "remove": hostRemove})
	case "baseline":
		return runSub("baseline", rest, stdout, map[string]adminCommand{"record": baselineRecord, "list": baselineList, "remove": baselineRemove})
	case "grant":
		return runAdmin("grant", rest, stdout, grant)
	case "audit":
		return runAdmin("audit", rest, stdout, audit)
	case "-h", "--help", "help":
		_, err := fmt.Fprint(stdout, usage)
		return err
	}
	return fmt.Errorf("unknown command %q (see vtpmd-guardian --help)", cmd)
}

// newFlags is a command's flag set, with --help (see parse).
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.Bool("help", false, "")
	return fs
}

// parse parses flags wherever they are among the arguments, and returns
// the others. --help prints usageText and ends with flag.ErrHelp.
func parse(fs *flag.FlagSet, args []string, usageText string, stdout io.Writer) ([]string, error) {
	var words []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprint(stdout, usageText)
			}
			return nil, fmt.Errorf("%s: %w", fs.Name(), err)
		}
		if h := fs.Lookup("help"); h != nil && h.Value.String() == "true" {
			fmt.Fprint(stdout, usageText)
			return nil, flag.ErrHelp
		}
		if fs.NArg() == 0 {
			return words, nil
		}
		words = append(words, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// dataPath is a file in the data directory.
func dataPath(dir, name string) string { return filepath.Join(dir, name) }

// splitList splits a comma-separated flag value.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
