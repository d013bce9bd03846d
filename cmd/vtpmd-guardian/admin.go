package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

const adminOptions = `Connection (every administration command):
--url <urls>          the guardian replicas, comma-separated, tried in turn
                      (default $VTPMD_GUARDIAN_URL, else https://localhost:8443)
--ca-file <file>      the guardian CA (default <data dir>/ca.crt)
--token-file <file>   the admin token (default <data dir>/admin.token)
--data-dir <dir>      where init put them (default ` + defaultDataDir + `)
--timeout <d>         give up after this long (default 1m)
`

// adminCommand declares a command's flags on fs and returns its usage and
// what it does with the guardian client and its arguments.
type adminCommand func(fs *flag.FlagSet) (usage string, do func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error)

func runSub(group string, args []string, stdout io.Writer, cmds map[string]adminCommand) error {
	names := slices.Sorted(maps.Keys(cmds))
	if len(args) == 0 || args[0] == "--help" || args[0] == "-h" {
		fmt.Fprintf(stdout, "Usage: vtpmd-guardian %s %s ... ('vtpmd-guardian %s <command> --help' for each)\n", group, strings.Join(names, "|"), group)
		if len(args) == 0 {
			return fmt.Errorf("%s: missing command (%s)", group, strings.Join(names, ", "))
		}
		return nil
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		return fmt.Errorf("%s: unknown command %q (%s)", group, args[0], strings.Join(names, ", "))
	}
	return runAdmin(group+" "+args[0], args[1:], stdout, cmd)
}

func runAdmin(name string, args []string, stdout io.Writer, cmd adminCommand) error {
	fs := newFlags(name)
	urls := fs.String("url", os.Getenv("VTPMD_GUARDIAN_URL"), "")
	dataDir := fs.String("data-dir", defaultDataDir, "")
	caPath := fs.String("ca-file", "", "")
	tokenPath := fs.String("token-file", "", "")
	timeout := fs.Duration("timeout", time.Minute, "")
	usage, do := cmd(fs)
	words, err := parse(fs, args, usage+adminOptions, stdout)
	if err != nil {
		return err
	}
	if *urls == "" {
		*urls = "https://localhost:8443"
	}
	if *caPath == "" {
		*caPath = dataPath(*dataDir, caFile)
	}
	if *tokenPath == "" {
		*tokenPath = dataPath(*dataDir, tokenFile)
	}
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(*caPath)
	if err != nil {
		return fmt.Errorf("%s: guardian CA: %w", name, err)
	}
	if !pool.AppendCertsFromPEM(ca) {
		return fmt.Errorf("%s: guardian CA %s: no PEM certificate", name, *caPath)
	}
	c := &guardian.Client{
		URLs: splitList(*urls),
		HTTP: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}},
	}
	token, tokenErr := os.ReadFile(*tokenPath)
	c.Token = strings.TrimSpace(string(token))
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	err = do(ctx, c, words, stdout)
	if guardian.CodeOf(err) == guardian.CodeUnauthorized && tokenErr != nil {
		err = fmt.Errorf("%w (admin token: %v)", err, tokenErr)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// one checks that exactly one argument was given, naming it.
func one(words []string, what string) (string, error) {
	if len(words) != 1 {
		return "", fmt.Errorf("give one %s (got %d arguments)", what, len(words))
	}
	return words[0], nil
}

func none(words []string) error {
	if len(words) > 0 {
		return fmt.Errorf("unexpected argument %q", words[0])
	}
	return nil
}

func table(stdout io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func hostAdd(fs *flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	group := fs.String("group", "", "")
	identity := fs.String("identity", "", "")
	hostKey := fs.String("host-key", "", "")
	ak := fs.String("ak", "", "")
	ek := fs.String("ek", "", "")
	return `Usage: vtpmd-guardian host add <name> --group <group> <identity>

Registers a host in a group (hosts of a group share a baseline). The
identity is one of:
--identity <file>     the host's identity as JSON ({"mode":"tpm","ek_public",
                      "ak_public"} or {"mode":"hostkey","host_key"}), as the
                      host prints it
--host-key <file>     a PEM public key (ECDSA P-256): host-key mode
--ak <file> --ek <file>
                      the TPM's AK and EK public areas (TPMT_PUBLIC): TPM mode
`, func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
			name, err := one(words, "host name")
			if err != nil {
				return err
			}
			id, err := readIdentity(*identity, *hostKey, *ak, *ek)
			if err != nil {
				return err
			}
			var h guardian.Host
			if err := c.Call(ctx, http.MethodPost, guardian.PathAdminHosts, &guardian.AddHostRequest{Name: name, Group: *group, Identity: *id}, &h); err != nil {
				return err
			}
			_, err = fmt.Fprintf(stdout, "registered host %s in group %s (%s mode)\n", h.Name, h.Group, h.Identity.Mode)
			return err
		}
}

// maxIdentityFile bounds an identity file.
const maxIdentityFile = 64 << 10

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxIdentityFile+1))
	if err == nil && len(b) > maxIdentityFile {
		err = fmt.Errorf("%s is larger than %d bytes", path, maxIdentityFile)
	}
	return b, err
}

func readIdentity(identity, hostKey, ak, ek string) (*guardian.HostIdentity, error) {
	switch {
	case identity != "" && hostKey == "" && ak == "" && ek == "":
		f, err := os.Open(identity)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return guardian.DecodeHostIdentity(f)
	case hostKey != "" && identity == "" && ak == "" && ek == "":
		b, err := readSmall(hostKey)
		if err != nil {
			return nil, err
		}
		block, _ := pem.Decode(b)
		if block == nil || block.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("host key %s: not a PEM PUBLIC KEY (give the host's public key, never its private key)", hostKey)
		}
		return &guardian.HostIdentity{Mode: guardian.ModeHostKey, HostKey: block.Bytes}, nil
	case ak != "" && ek != "" && identity == "" && hostKey == "":
		akPub, err := readSmall(ak)
		if err != nil {
			return nil, err
		}
		ekPub, err := readSmall(ek)
		if err != nil {
			return nil, err
		}
		return &guardian.HostIdentity{Mode: guardian.ModeTPM, AKPublic: akPub, EKPublic: ekPub}, nil
	}
	return nil, errors.New("give one identity: --identity, --host-key, or --ak with --ek")
}

func hostList(*flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	return "Usage: vtpmd-guardian host list\n\nLists the registered hosts.\n", func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
		if err := none(words); err != nil {
			return err
		}
		var l guardian.HostList
		if err := c.Call(ctx, http.MethodGet, guardian.PathAdminHosts, nil, &l); err != nil {
			return err
		}
		var rows [][]string
		for _, h := range l.Hosts {
			rows = append(rows, []string{h.Name, h.Group, h.Identity.Mode, h.Added.Format(time.RFC3339)})
		}
		return table(stdout, "NAME\tGROUP\tMODE\tADDED", rows)
	}
}

func removeCommand(what, path string) adminCommand {
	return func(*flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
		return fmt.Sprintf("Usage: vtpmd-guardian %s remove <name>\n\nRemoves a %s.\n", what, what), func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
			name, err := one(words, what+" name")
			if err != nil {
				return err
			}
			if err := c.Call(ctx, http.MethodDelete, path+"/"+url.PathEscape(name), nil, &struct{}{}); err != nil {
				return err
			}
			_, err = fmt.Fprintf(stdout, "removed %s %s\n", what, name)
			return err
		}
	}
}

var (
	hostRemove     = removeCommand("host", guardian.PathAdminHosts)
	baselineRemove = removeCommand("baseline", guardian.PathAdminBaselines)
)

// pcrValues is a repeatable --pcr <index>=<hex>.
type pcrValues map[int][]byte

func (p pcrValues) String() string { return fmt.Sprint(map[int][]byte(p)) }

func (p pcrValues) Set(s string) error {
	i, v, ok := strings.Cut(s, "=")
	n, err := strconv.Atoi(i)
	if !ok || err != nil {
		return fmt.Errorf("%q: want <index>=<hex>", s)
	}
	if p[n], err = hex.DecodeString(v); err != nil {
		return fmt.Errorf("PCR %d: %w", n, err)
	}
	return nil
}

func baselineRecord(fs *flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	eventLog := fs.String("event-log", "", "")
	pcrList := fs.String("pcrs", "", "")
	values := pcrValues{}
	fs.Var(values, "pcr", "")
	return `Usage: vtpmd-guardian baseline record <group> (--event-log <file> [--pcrs <list>] | --pcr <index>=<hex>...)

Records the measurements a group's hosts must show, replacing the group's
baseline if it has one:
--event-log <file>   a known-good host's TCG event log (on Linux,
                     /sys/kernel/security/tpm0/binary_bios_measurements),
                     replayed into SHA-256 PCR values; a mismatch later
                     names the PCR and its first differing event
--pcrs <list>        the PCRs to replay (comma-separated; default 0-7)
--pcr <index>=<hex>  a SHA-256 PCR value (repeat for each PCR)
`, func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
			group, err := one(words, "group")
			if err != nil {
				return err
			}
			req := &guardian.BaselineRequest{Group: group}
			if len(values) > 0 {
				req.Values = values
			}
			if *eventLog != "" {
				if req.EventLog, err = os.ReadFile(*eventLog); err != nil {
					return fmt.Errorf("event log: %w", err)
				}
			}
			for _, s := range splitList(*pcrList) {
				n, err := strconv.Atoi(s)
				if err != nil {
					return fmt.Errorf("--pcrs %q: not a PCR index", s)
				}
				req.PCRs = append(req.PCRs, n)
			}
			var b guardian.Baseline
			if err := c.Call(ctx, http.MethodPost, guardian.PathAdminBaselines, req, &b); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "recorded the baseline of group %s\n", b.Group)
			return printPCRs(stdout, b.Values)
		}
}

func printPCRs(stdout io.Writer, values map[int][]byte) error {
	var rows [][]string
	for _, i := range slices.Sorted(maps.Keys(values)) {
		rows = append(rows, []string{strconv.Itoa(i), hex.EncodeToString(values[i])})
	}
	return table(stdout, "PCR\tSHA-256", rows)
}

func baselineList(*flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	return "Usage: vtpmd-guardian baseline list\n\nLists the recorded baselines.\n", func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
		if err := none(words); err != nil {
			return err
		}
		var l guardian.BaselineList
		if err := c.Call(ctx, http.MethodGet, guardian.PathAdminBaselines, nil, &l); err != nil {
			return err
		}
		for _, b := range l.Baselines {
			fmt.Fprintf(stdout, "group %s (recorded %s)\n", b.Group, b.Recorded.Format(time.RFC3339))
			if err := printPCRs(stdout, b.Values); err != nil {
				return err
			}
		}
		return nil
	}
}

func grant(fs *flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	protectorPath := fs.String("protector", "", "")
	fabricKeys := fs.String("fabric-keys", "", "")
	out := fs.String("out", "", "")
	return `Usage: vtpmd-guardian grant --protector <file> --fabric-keys <file> [--out <file>]

Lets another fabric's guardian release a VM's key, so that the VM can run
there: this fabric's guardian (the VM's owner) opens the protector and adds
the key wrapped to the other fabric.
--protector <file>    the VM's key protector
--fabric-keys <file>  the other fabric's keys, as its 'vtpmd-guardian keys'
                      prints them
--out <file>          where to write the new protector (default: replace
                      --protector)
`, func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
			if err := none(words); err != nil {
				return err
			}
			b, err := readSmall(*protectorPath)
			if err != nil {
				return fmt.Errorf("protector: %w", err)
			}
			p, err := guardian.ParseProtector(b)
			if err != nil {
				return fmt.Errorf("protector %s: %w", *protectorPath, err)
			}
			kb, err := readSmall(*fabricKeys)
			if err != nil {
				return fmt.Errorf("fabric keys: %w", err)
			}
			var keys guardian.KeysResponse
			if err := json.Unmarshal(kb, &keys); err != nil {
				return fmt.Errorf("fabric keys %s: %w", *fabricKeys, err)
			}
			var resp guardian.GrantResponse
			if err := c.Call(ctx, http.MethodPost, guardian.PathAdminGrants, &guardian.GrantRequest{Protector: p, Fabric: guardian.Recipient{Name: keys.Name, Public: keys.Encryption}}, &resp); err != nil {
				return err
			}
			data, err := resp.Protector.Marshal()
			if err != nil {
				return err
			}
			dest := *out
			if dest == "" {
				dest = *protectorPath
			}
			if err := replaceFile(dest, data); err != nil {
				return err
			}
			_, err = fmt.Fprintf(stdout, "granted fabric %s on VM %s: protector written to %s\n", keys.Name, resp.Protector.VMID, dest)
			return err
		}
}

// replaceFile writes data to path whole (a temporary file renamed into
// place), mode 0600.
func replaceFile(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".protector-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err = errors.Join(err, tmp.Chmod(0o600), tmp.Sync(), tmp.Close()); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Rename(tmp.Name(), path)
}

func audit(fs *flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
	last := fs.Int("last", 50, "")
	return `Usage: vtpmd-guardian audit [--last <n>]

Prints the audit log, oldest first: every key release and refusal, every
attestation and every administrative change, with the replica that
handled it.
--last <n>   only the last n entries (default 50; 0 for all)
`, func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
			if err := none(words); err != nil {
				return err
			}
			var l guardian.AuditList
			if err := c.Call(ctx, http.MethodGet, guardian.PathAdminAudit+"?last="+strconv.Itoa(*last), nil, &l); err != nil {
				return err
			}
			var rows [][]string
			for _, e := range l.Entries {
				code := string(e.Code)
				if code == "" {
					code = "ok"
				}
				rows = append(rows, []string{e.Time.Format(time.RFC3339), e.Replica, e.Op, dash(e.Host), dash(e.VMID), code, e.Message})
			}
			return table(stdout, "TIME\tREPLICA\tOP\tHOST\tVM\tRESULT\tDETAIL", rows)
		}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func runKeys(args []string, stdout io.Writer) error {
	return runAdmin("keys", args, stdout, func(*flag.FlagSet) (string, func(context.Context, *guardian.Client, []string, io.Writer) error) {
		return `Usage: vtpmd-guardian keys

Prints this fabric's name and public encryption key as JSON: the file that
another fabric's owner gives to 'vtpmd-guardian grant --fabric-keys'.
`, func(ctx context.Context, c *guardian.Client, words []string, stdout io.Writer) error {
				if err := none(words); err != nil {
					return err
				}
				k, err := c.Keys(ctx)
				if err != nil {
					return err
				}
				var b bytes.Buffer
				enc := json.NewEncoder(&b)
				enc.SetIndent("", "  ")
				if err := enc.Encode(k); err != nil {
					return err
				}
				_, err = stdout.Write(b.Bytes())
				return err
			}
	})
}
