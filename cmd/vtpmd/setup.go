package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/provision"
	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/vtpm"
)

// setupConfig is the command line of `vtpmd setup`, which is swtpm_setup's.
type setupConfig struct {
	tpm2      bool
	stateDir  string // the state dir, or the state file if stateFile
	stateFile bool
	vmid      string
	logPath   string
	config    string
	caDir     string
	ekCertDir string

	createEK, createEKCert, createPlatformCert, createSPK, spkECC, lockNV bool

	overwrite, notOverwrite, reconfigure bool
	pcrBanks                             string // "" for the configuration's default

	// The state key, swtpm_setup's way: at most one source.
	keyfile, pwdfile       string
	keyfileFD, pwdfileFD   int
	cipher                 string
	createConfigFiles      bool
	createConfigFilesOpts  string
	printCapabilities      bool
	help, version          bool
	ignoredDeprecatedFlags []string
}

func parseSetupConfig(args []string) (*setupConfig, error) {
	c := &setupConfig{keyfileFD: -1, pwdfileFD: -1, cipher: "aes-128-cbc"}
	var tpmstate, keyfileFD, pwdfileFD, rsaKeySize, tpmExe, runas, ownerpass, srkpass string
	var allowSigning, decryption, display, takeOwnership, ownerWellKnown, srkWellKnown bool
	deprecated := func(name string) func(string) error {
		return func(string) error { c.ignoredDeprecatedFlags = append(c.ignoredDeprecatedFlags, name); return nil }
	}
	specs := []flagSpec{
		{long: "tpm2", set: setBool(&c.tpm2)},
		{long: "tpm-state", takesValue: true, set: setString(&tpmstate)},
		{long: "tpmstate", takesValue: true, set: setString(&tpmstate)},
		{long: "vmid", takesValue: true, set: setString(&c.vmid)},
		{long: "logfile", takesValue: true, set: setString(&c.logPath)},
		{long: "config", takesValue: true, set: setString(&c.config)},
		{long: "createek", set: setBool(&c.createEK)},
		{long: "create-ek-cert", set: setBool(&c.createEKCert)},
		{long: "create-platform-cert", set: setBool(&c.createPlatformCert)},
		{long: "create-spk", set: setBool(&c.createSPK)},
		{long: "ecc", set: setBool(&c.spkECC)},
		{long: "decryption", set: setBool(&decryption)},
		{long: "lock-nvram", set: setBool(&c.lockNV)},
		{long: "overwrite", set: setBool(&c.overwrite)},
		{long: "not-overwrite", set: setBool(&c.notOverwrite)},
		{long: "pcr-banks", takesValue: true, set: setString(&c.pcrBanks)},
		{long: "reconfigure", set: setBool(&c.reconfigure)},
		{long: "keyfile", takesValue: true, set: setString(&c.keyfile)},
		{long: "keyfile-fd", takesValue: true, set: setString(&keyfileFD)},
		{long: "pwdfile", takesValue: true, set: setString(&c.pwdfile)},
		{long: "pwdfile-fd", takesValue: true, set: setString(&pwdfileFD)},
		{long: "cipher", takesValue: true, set: setString(&c.cipher)},
		{long: "rsa-keysize", takesValue: true, set: setString(&rsaKeySize)},
		{long: "write-ek-cert-files", takesValue: true, set: setString(&c.ekCertDir)},
		{long: "create-config-files", takesValue: true, set: func(v string) error {
			c.createConfigFiles, c.createConfigFilesOpts = true, v
			return nil
		}},
		{long: "print-capabilities", set: setBool(&c.printCapabilities)},
		{long: "help", short: "h", set: setBool(&c.help)},
		{long: "version", set: setBool(&c.version)},
		// vtpmd's own: the directory of the local CA.
		{long: "ca-dir", takesValue: true, set: setString(&c.caDir)},
		// Deprecated in swtpm_setup, without effect there too.
		{long: "swtpm_ioctl", takesValue: true, set: deprecated("--swtpm_ioctl")},
		{long: "tcsd-system-ps-file", takesValue: true, set: deprecated("--tcsd-system-ps-file")},
		// Refused below.
		{long: "tpm", takesValue: true, set: setString(&tpmExe)},
		{long: "runas", takesValue: true, set: setString(&runas)},
		{long: "allow-signing", set: setBool(&allowSigning)},
		{long: "display", set: setBool(&display)},
		{long: "take-ownership", set: setBool(&takeOwnership)},
		{long: "ownerpass", takesValue: true, set: setString(&ownerpass)},
		{long: "owner-well-known", set: setBool(&ownerWellKnown)},
		{long: "srkpass", takesValue: true, set: setString(&srkpass)},
		{long: "srk-well-known", set: setBool(&srkWellKnown)},
	}
	if err := parseArgs("setup", setupOptionalValues(args), specs); err != nil {
		return nil, err
	}
	for _, refused := range []struct {
		given bool
		name  string
		why   string
	}{
		{tpmExe != "", "--tpm", "vtpmd setup runs the TPM in process, not a separate swtpm"},
		{runas != "", "--runas", "run vtpmd setup as that user instead"},
		{allowSigning, "--allow-signing", "vtpmd creates only the TCG default (decryption) EKs"},
		{display, "--display", "use tpm2-tools on the provisioned TPM instead"},
		{takeOwnership || ownerpass != "" || ownerWellKnown || srkpass != "" || srkWellKnown,
			"--take-ownership/--ownerpass/--owner-well-known/--srkpass/--srk-well-known", "they are for TPM 1.2, which vtpmd does not emulate"},
	} {
		if refused.given {
			return nil, fmt.Errorf("setup: option %s is not supported: %s", refused.name, refused.why)
		}
	}
	if c.help || c.version || c.printCapabilities || c.createConfigFiles {
		return c, nil
	}
	var err error
	if c.keyfileFD, err = parseFD("--keyfile-fd", keyfileFD); err != nil {
		return nil, err
	}
	if c.pwdfileFD, err = parseFD("--pwdfile-fd", pwdfileFD); err != nil {
		return nil, err
	}
	switch rsaKeySize {
	case "", "2048", "max":
	default:
		return nil, fmt.Errorf("setup: --rsa-keysize %s is not supported: the TPM engine has RSA 2048 as its largest key size", rsaKeySize)
	}
	switch c.cipher {
	case "aes-cbc", "aes-128-cbc", "aes-256-cbc":
	default:
		return nil, fmt.Errorf("setup: --cipher %q: give aes-128-cbc or aes-256-cbc", c.cipher)
	}
	if c.overwrite && c.notOverwrite {
		return nil, errors.New("setup: --overwrite and --not-overwrite exclude each other")
	}
	if c.reconfigure {
		for _, o := range []struct {
			given bool
			name  string
		}{
			{c.createEK, "--createek"}, {c.createEKCert, "--create-ek-cert"}, {c.createPlatformCert, "--create-platform-cert"},
			{c.createSPK, "--create-spk"}, {c.lockNV, "--lock-nvram"}, {c.overwrite, "--overwrite"}, {c.notOverwrite, "--not-overwrite"},
			{c.ekCertDir != "", "--write-ek-cert-files"},
		} {
			if o.given {
				return nil, fmt.Errorf("setup: --reconfigure changes the PCR banks of an existing TPM only; %s cannot go with it", o.name)
			}
		}
	}
	if c.spkECC && !c.createSPK {
		return nil, errors.New("setup: --ecc selects the storage primary key's type and needs --create-spk (the EKs are always RSA, ECC P-256 and ECC P-384)")
	}
	if tpmstate == "" {
		return nil, errors.New("setup: --tpm-state <dir> is required")
	}
	if !strings.HasPrefix(tpmstate, "dir://") && !strings.HasPrefix(tpmstate, "file://") {
		// As swtpm_setup: anything else is a directory.
		tpmstate = "dir://" + tpmstate
	}
	c.stateDir, c.stateFile, err = parseBackendURI("setup: --tpm-state", tpmstate)
	return c, err
}

// setupOptionalValues joins the optional value of --create-config-files to
// it: libvirt passes "--create-config-files skip-if-exist", and a bare
// "--create-config-files" is allowed too.
func setupOptionalValues(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] != "--create-config-files" {
			out = append(out, args[i])
			continue
		}
		value := ""
		if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			value = args[i+1]
			i++
		}
		out = append(out, "--create-config-files="+value)
	}
	return out
}

func parseFD(option, s string) (int, error) {
	if s == "" {
		return -1, nil
	}
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 0 {
		return -1, fmt.Errorf("setup: %s %q is not a file descriptor", option, s)
	}
	return fd, nil
}

// stateKey reads the state key that --keyfile, --keyfile-fd, --pwdfile or
// --pwdfile-fd name, as swtpm's --key would read it (so that `vtpmd socket
// --key` with the same source opens the state), or nil if none is given.
func (c *setupConfig) stateKey() (*sealing.SwtpmKey, error) {
	var sources []string
	if c.keyfile != "" {
		sources = append(sources, "file="+c.keyfile)
	}
	if c.keyfileFD >= 0 {
		sources = append(sources, "fd="+strconv.Itoa(c.keyfileFD))
	}
	if c.pwdfile != "" {
		sources = append(sources, "pwdfile="+c.pwdfile)
	}
	if c.pwdfileFD >= 0 {
		sources = append(sources, "pwdfd="+strconv.Itoa(c.pwdfileFD))
	}
	switch {
	case len(sources) == 0:
		return nil, nil
	case len(sources) > 1:
		return nil, errors.New("setup: give one of --keyfile, --keyfile-fd, --pwdfile and --pwdfile-fd")
	case strings.ContainsRune(c.keyfile+c.pwdfile, ','):
		return nil, errors.New("setup: the key file's path must not contain a comma")
	}
	return sealing.ParseSwtpmKey("--key", sources[0]+",mode="+c.cipher)
}

// runSetup is `vtpmd setup`: swtpm_setup, in process.
func runSetup(args []string, stdout io.Writer) error {
	c, err := parseSetupConfig(args)
	if err != nil {
		return err
	}
	switch {
	case c.help:
		_, err := fmt.Fprint(stdout, setupUsage)
		return err
	case c.version:
		_, err := fmt.Fprintf(stdout, "TPM emulator setup tool version %s (vtpmd)\n", version)
		return err
	case c.printCapabilities:
		return printSetupCapabilities(stdout)
	case c.createConfigFiles:
		return createConfigFiles(c.createConfigFilesOpts, stdout)
	case !c.tpm2:
		return errors.New("setup: vtpmd sets up TPM 2.0 only: pass --tpm2")
	}
	log, closeLog, err := setupLogger(c.logPath)
	if err != nil {
		return err
	}
	defer closeLog()
	start := time.Now()
	log.Info("starting vTPM manufacturing", "state", c.stateDir, "uid", os.Getuid(), "gid", os.Getgid())
	for _, flag := range c.ignoredDeprecatedFlags {
		log.Info("option is deprecated and has no effect, as in swtpm_setup", "option", flag)
	}
	if err := setup(c, log); err != nil {
		log.Error("vTPM manufacturing failed", "err", err)
		return err
	}
	log.Info("successfully authored TPM state", "elapsed", time.Since(start).Round(time.Microsecond))
	return nil
}

func setup(c *setupConfig, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()

	conf, err := provision.ReadSetupConf(c.config)
	if err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	banks, err := c.activePCRBanks(conf)
	if err != nil {
		return err
	}
	certs := c.createEKCert || c.createPlatformCert
	var ca *provision.CA
	platform := provision.DefaultPlatform(version)
	if certs {
		if ca, platform, err = openSetupCA(c, conf, log); err != nil {
			return err
		}
	}
	key, err := c.stateKey()
	if err != nil {
		return err
	}
	keys, err := stateKeys(c.stateDir, c.stateFile, key, "", log)
	if err != nil {
		return err
	}
	if !c.stateFile {
		if err := os.MkdirAll(c.stateDir, 0o700); err != nil {
			return fmt.Errorf("setup: %w", err)
		}
	}
	vmState, err := openVMState(ctx, c.stateDir, c.stateFile, keys, true)
	if err != nil {
		return err
	}
	defer vmState.Unlock()

	_, loadErr := vmState.Load()
	if loadErr != nil && vmState.Key() == nil {
		return fmt.Errorf("setup: %w", loadErr) // no key from the guardian: whether state exists is unknown
	}
	exists := !errors.Is(loadErr, fs.ErrNotExist)
	switch {
	case c.reconfigure && !exists:
		return fmt.Errorf("setup: --reconfigure: there is no TPM state in %s", c.stateDir)
	case c.reconfigure && loadErr != nil:
		return fmt.Errorf("setup: --reconfigure: %w", loadErr)
	case c.reconfigure:
	case exists && c.notOverwrite:
		log.Info("not overwriting the existing TPM state", "state", c.stateDir)
		return nil
	case exists && !c.overwrite:
		msg := "TPM state already exists in " + c.stateDir
		if loadErr != nil {
			msg += " (it does not open: " + loadErr.Error() + ")"
		}
		return fmt.Errorf("setup: %s; give --overwrite to replace it or --not-overwrite to keep it", msg)
	case exists:
		log.Info("overwriting the existing TPM state", "state", c.stateDir)
	}

	staged := &provision.Staged{Store: vmState, Fresh: exists && !c.reconfigure}
	dev, err := vtpm.Open(vtpm.Config{Store: staged, Logger: log})
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := provision.Start(dev); err != nil {
		return err
	}
	var res *provision.Result
	if c.reconfigure {
		if banks == nil {
			return errors.New("setup: --reconfigure needs the PCR banks to activate (--pcr-banks, or active_pcr_banks in swtpm_setup.conf)")
		}
		if _, err := provision.Reconfigure(ctx, dev, banks, log); err != nil {
			return err
		}
	} else {
		res, err = provision.Run(ctx, dev, provision.Options{
			EK:           c.createEK,
			EKCerts:      c.createEKCert,
			PlatformCert: c.createPlatformCert,
			SPK:          c.createSPK,
			SPKECC:       c.spkECC,
			LockNV:       c.lockNV,
			PCRBanks:     banks,
			CA:           ca,
			VMID:         c.vmid,
			Platform:     platform,
			Log:          log,
		})
		if err != nil {
			return err
		}
	}
	if err := dev.Close(); err != nil {
		return err
	}
	if err := staged.Commit(); err != nil {
		return err
	}
	if err := vmState.Unlock(); err != nil {
		return err
	}
	if res != nil && c.ekCertDir != "" {
		for _, ek := range res.EKs {
			path := filepath.Join(c.ekCertDir, "ek-"+ek.Kind+".crt")
			if err := os.WriteFile(path, ek.Cert, 0o640); err != nil {
				return fmt.Errorf("setup: --write-ek-cert-files: %w", err)
			}
		}
	}
	return nil
}

// activePCRBanks resolves the PCR banks to activate: --pcr-banks, else
// active_pcr_banks of swtpm_setup.conf, else sha256; "-" leaves the banks
// as they are (nil).
func (c *setupConfig) activePCRBanks(conf *provision.SetupConf) ([]string, error) {
	spec := c.pcrBanks
	if spec == "" {
		spec = conf.ActivePCRBanks
	}
	if spec == "" {
		spec = "sha256"
	}
	if spec == "-" {
		return nil, nil
	}
	banks, err := provision.ParsePCRBanks(spec)
	if err != nil {
		return nil, fmt.Errorf("setup: --pcr-banks: %w", err)
	}
	return banks, nil
}

// openSetupCA opens the local CA and reads the platform description: the
// CA in --ca-dir, else the one the swtpm-localca.conf named by
// swtpm_setup.conf describes (swtpm_localca's own, when it exists), else
// vtpmd's beside the host key (in "ca").
func openSetupCA(c *setupConfig, conf *provision.SetupConf, log *slog.Logger) (*provision.CA, provision.Platform, error) {
	platform := provision.DefaultPlatform(version)
	if err := conf.CheckCertsTool(); err != nil {
		return nil, platform, fmt.Errorf("setup: %w", err)
	}
	var files provision.CAFiles
	switch {
	case c.caDir != "":
		files = provision.DefaultCAFiles(c.caDir)
	case conf.CreateCertsToolConfig != "":
		var err error
		if files, _, err = provision.ReadLocalCAConf(conf.CreateCertsToolConfig); err != nil {
			return nil, platform, fmt.Errorf("setup: %w", err)
		}
	default:
		dir, err := defaultCADir()
		if err != nil {
			return nil, platform, err
		}
		files = provision.DefaultCAFiles(dir)
	}
	if conf.CreateCertsToolOptions != "" {
		var err error
		if platform, err = provision.ReadLocalCAOptions(conf.CreateCertsToolOptions, platform); err != nil {
			return nil, platform, fmt.Errorf("setup: %w", err)
		}
	}
	ca, err := provision.OpenCA(files)
	if err != nil {
		return nil, platform, fmt.Errorf("setup: %w", err)
	}
	if ca.Created {
		log.Info("created a local CA", "key", files.SigningKey, "certificate", files.IssuerCert)
	}
	log.Info("certificates are signed by", "ca", ca.Certificate().Subject.String(), "certificate", files.IssuerCert)
	return ca, platform, nil
}

// defaultCADir is vtpmd's local CA beside the host key.
func defaultCADir() (string, error) {
	hostKey, err := hostKeyPath()
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(hostKey), "ca"), nil
}

// createConfigFiles is --create-config-files [overwrite][,root][,skip-if-exist].
func createConfigFiles(opts string, stdout io.Writer) error {
	var how provision.ConfigFiles
	root := false
	if opts != "" {
		for _, o := range strings.Split(opts, ",") {
			switch o {
			case "overwrite":
				how.Overwrite = true
			case "skip-if-exist":
				how.SkipIfExist = true
			case "root":
				root = true
			default:
				return fmt.Errorf("setup: --create-config-files: unknown option %q (overwrite, root, skip-if-exist)", o)
			}
		}
	}
	if os.Geteuid() == 0 && !root {
		return errors.New("setup: --create-config-files: requiring the 'root' option since the configuration files would shadow those in /etc")
	}
	dir, err := provision.UserConfigDir()
	if err != nil {
		return fmt.Errorf("setup: --create-config-files: %w", err)
	}
	caDir, err := defaultCADir()
	if err != nil {
		return err
	}
	written, err := provision.CreateConfigFiles(dir, caDir, provision.DefaultPlatform(version), how)
	if err != nil {
		return fmt.Errorf("setup: --create-config-files: %w", err)
	}
	for _, path := range written {
		fmt.Fprintf(stdout, "Writing %s.\n", path)
	}
	return nil
}

// setupFeatures are the swtpm_setup features vtpmd has.
var setupFeatures = []string{
	"tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "cmdarg-write-ek-cert-files",
	"cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048",
}

func printSetupCapabilities(w io.Writer) error {
	quoted, err := json.Marshal(setupFeatures)
	if err != nil {
		return err
	}
	// swtpm_setup's spacing.
	list := strings.ReplaceAll(string(quoted[1:len(quoted)-1]), `","`, `", "`)
	_, err = fmt.Fprintf(w, "{ \"type\": \"swtpm_setup\", \"features\": [ %s ], \"version\": %q }\n", list, version)
	return err
}

// setupLogger logs to --logfile (appending, as swtpm_setup does) or to
// stderr.
func setupLogger(path string) (*slog.Logger, func(), error) {
	if path == "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil)), func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("setup: --logfile: %w", err)
	}
	return slog.New(slog.NewTextHandler(f, nil)).With("prog", "vtpmd setup"), func() { f.Close() }, nil
}

const setupUsage = `Usage: vtpmd setup --tpm2 --tpm-state <dir>|file://<file> [options]

Provisions a new TPM 2.0 in process, with swtpm_setup's options:
--tpm2                   : set up a TPM 2.0 (required; TPM 1.2 is not emulated)
--tpm-state|--tpmstate <dir>|dir://<dir>|file://<file>
                         : the TPM's state directory, or state file (a regular
                           file or a block device)
--createek               : create the EKs: RSA 2048 and ECC P-256 (TCG default
                           templates; the RSA one persistent at 0x81010001)
                           and ECC P-384 (swtpm_setup's, at 0x81010016)
--create-ek-cert         : also their certificates (NV 0x01c00002, 0x01c0000a,
                           0x01c00016)
--create-platform-cert   : also the platform certificate (NV 0x01c08000)
--create-spk [--ecc]     : create the storage primary key (0x81000001), RSA or ECC
--decryption             : EKs for key encipherment (the default)
--lock-nvram             : write-lock the NV indices written
--vmid <id>              : the VM's name in the certificates
--pcr-banks <list>|-     : PCR banks to activate (sha1,sha256,sha384,sha512); '-' keeps all
--reconfigure            : change the PCR banks of an existing TPM
--overwrite | --not-overwrite
                         : replace an existing TPM, or leave it and succeed
--pwdfile <file> | --pwdfile-fd <fd> | --keyfile <file> | --keyfile-fd <fd>
--cipher aes-128-cbc|aes-256-cbc
                         : the state key, as swtpm's --key pwdfile=|pwdfd=|file=|fd=,mode=
--rsa-keysize 2048|max   : the RSA EK size (2048 only)
--write-ek-cert-files <dir>
                         : also write the EK certificates there (ek-rsa2048.crt,
                           ek-secp256r1.crt, ek-secp384r1.crt)
--logfile <file>         : log there instead of to stderr
--config <file>          : swtpm_setup.conf to read (default: $XDG_CONFIG_HOME, ~/.config, /etc)
--ca-dir <dir>           : the local CA to use or create (default: the CA that
                           swtpm_setup.conf's swtpm-localca.conf names, else "ca"
                           beside vtpmd's host key)
--create-config-files [overwrite][,root][,skip-if-exist]
                         : write swtpm_setup.conf, swtpm-localca.conf and
                           swtpm-localca.options for the user
--print-capabilities, --version, -h|--help

Installed as 'swtpm_setup', vtpmd takes this command line.
`
