package provision

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// The configuration files of swtpm_setup and swtpm_localca, as vtpmd reads
// them: "key = value" lines, "#" comments, ${VAR} replaced by the
// environment.

// Configuration file names.
const (
	SetupConfName     = "swtpm_setup.conf"
	LocalCAConfName   = "swtpm-localca.conf"
	LocalCAOptsName   = "swtpm-localca.options"
	systemConfigDir   = "/etc"
	localCAToolPath   = "/usr/share/swtpm/swtpm-localca"
	defaultPCRBanks   = "sha256"
	defaultPlatformMf = "vtpmd"
	defaultPlatformMd = "QEMU"
)

// SetupConf holds the keys of swtpm_setup.conf.
type SetupConf struct {
	// Path is the file read, "" if none was found.
	Path string
	// CreateCertsTool is the program swtpm_setup runs to make
	// certificates; vtpmd signs them itself and accepts only swtpm's local
	// CA (swtpm_localca), whose configuration it honours.
	CreateCertsTool string
	// CreateCertsToolConfig is the swtpm-localca.conf to use.
	CreateCertsToolConfig string
	// CreateCertsToolOptions is the swtpm-localca.options to use.
	CreateCertsToolOptions string
	// ActivePCRBanks is the default of --pcr-banks.
	ActivePCRBanks string
}

// UserConfigDir is where per-user configuration files live:
// $XDG_CONFIG_HOME, or $HOME/.config.
func UserConfigDir() (string, error) {
	if dir := os.Getenv("XDG_CONFIG_HOME"); dir != "" {
		return dir, nil
	}
	home := os.Getenv("HOME")
	if home == "" {
		return "", errors.New("neither XDG_CONFIG_HOME nor HOME is set")
	}
	return filepath.Join(home, ".config"), nil
}

// findConfig returns the first existing file named name in the user's
// configuration directory, then /etc; "" if there is none.
func findConfig(name string) string {
	var dirs []string
	if dir, err := UserConfigDir(); err == nil {
		dirs = append(dirs, dir)
	}
	for _, dir := range append(dirs, systemConfigDir) {
		path := filepath.Join(dir, name)
		if _, err := os.Stat(path); err == nil {
			return path
		}
	}
	return ""
}

// ReadSetupConf reads swtpm_setup.conf: the file given (which must exist),
// or else the first of $XDG_CONFIG_HOME/swtpm_setup.conf,
// $HOME/.config/swtpm_setup.conf and /etc/swtpm_setup.conf. Without any, it
// returns an empty SetupConf.
func ReadSetupConf(path string) (*SetupConf, error) {
	if path == "" {
		path = findConfig(SetupConfName)
		if path == "" {
			return &SetupConf{}, nil
		}
	}
	kv, err := readKeyValues(path)
	if err != nil {
		return nil, err
	}
	return &SetupConf{
		Path:                   path,
		CreateCertsTool:        kv["create_certs_tool"],
		CreateCertsToolConfig:  kv["create_certs_tool_config"],
		CreateCertsToolOptions: kv["create_certs_tool_options"],
		ActivePCRBanks:         kv["active_pcr_banks"],
	}, nil
}

// CheckCertsTool refuses a create_certs_tool that is not swtpm's local CA:
// vtpmd cannot run another program in its place.
func (c *SetupConf) CheckCertsTool() error {
	if c.CreateCertsTool == "" {
		return nil
	}
	switch filepath.Base(c.CreateCertsTool) {
	case "swtpm_localca", "swtpm-localca", "vtpmd":
		return nil
	}
	return fmt.Errorf("%s: create_certs_tool = %s: vtpmd signs the certificates with its built-in local CA and cannot run another tool; "+
		"name swtpm_localca (whose swtpm-localca.conf and .options vtpmd honours) or remove the key", c.Path, c.CreateCertsTool)
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// readKeyValues reads "key = value" lines. A value's ${VAR} references are
// replaced by the environment.
func readKeyValues(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	kv := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: want key = value, got %q", path, n, line)
		}
		value = envRef.ReplaceAllStringFunc(strings.TrimSpace(value), func(ref string) string {
			return os.Getenv(envRef.FindStringSubmatch(ref)[1])
		})
		kv[strings.TrimSpace(key)] = value
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return kv, nil
}

// ReadLocalCAConf reads the CA's files from a swtpm-localca.conf: the file
// given, or else the first of $XDG_CONFIG_HOME/swtpm-localca.conf,
// $HOME/.config/swtpm-localca.conf and /etc/swtpm-localca.conf. It returns
// ok false when there is none. Settings vtpmd cannot honour (an encrypted
// or PKCS#11 signing key) are refused.
func ReadLocalCAConf(path string) (files CAFiles, ok bool, err error) {
	if path == "" {
		if path = findConfig(LocalCAConfName); path == "" {
			return CAFiles{}, false, nil
		}
	}
	kv, err := readKeyValues(path)
	if err != nil {
		return CAFiles{}, false, err
	}
	files = CAFiles{Dir: kv["statedir"], SigningKey: kv["signingkey"], IssuerCert: kv["issuercert"], CertSerial: kv["certserial"]}
	switch {
	case strings.HasPrefix(files.SigningKey, "pkcs11:"):
		return CAFiles{}, false, fmt.Errorf("%s: signingkey is a PKCS#11 URI; vtpmd signs with a PEM key file only", path)
	case strings.HasPrefix(files.SigningKey, "tpmkey:"):
		return CAFiles{}, false, fmt.Errorf("%s: signingkey is a TPM 1.2 key; vtpmd signs with a PEM key file only", path)
	case kv["signingkey_password"] != "":
		return CAFiles{}, false, fmt.Errorf("%s: signingkey_password: vtpmd needs an unencrypted signing key", path)
	case files.SigningKey == "" || files.IssuerCert == "":
		return CAFiles{}, false, fmt.Errorf("%s: signingkey and issuercert must be set", path)
	}
	if files.Dir == "" {
		files.Dir = filepath.Dir(files.SigningKey)
	}
	return files, true, nil
}

// DefaultPlatform describes the platform when no swtpm-localca.options
// does.
func DefaultPlatform(version string) Platform {
	return Platform{Manufacturer: defaultPlatformMf, Model: defaultPlatformMd, Version: version}
}

// ReadLocalCAOptions reads the platform description from a
// swtpm-localca.options (lines "--platform-manufacturer Fedora" and so on):
// the file given, or else the first found as for ReadLocalCAConf. Fields it
// does not set keep their value in p. Options vtpmd does not know are
// refused.
func ReadLocalCAOptions(path string, p Platform) (Platform, error) {
	if path == "" {
		if path = findConfig(LocalCAOptsName); path == "" {
			return p, nil
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return p, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		opt, value, _ := strings.Cut(line, " ")
		opt, value = strings.TrimSpace(opt), strings.TrimSpace(value)
		if value == "" {
			return p, fmt.Errorf("%s:%d: option %s needs a value", path, n, opt)
		}
		switch opt {
		case "--platform-manufacturer":
			p.Manufacturer = value
		case "--platform-model":
			p.Model = value
		case "--platform-version":
			p.Version = value
		default:
			return p, fmt.Errorf("%s:%d: option %s is not supported by vtpmd (only --platform-manufacturer, --platform-model and --platform-version)", path, n, opt)
		}
	}
	return p, sc.Err()
}

// ConfigFiles says how CreateConfigFiles treats existing files.
type ConfigFiles struct {
	// Overwrite replaces existing files.
	Overwrite bool
	// SkipIfExist does nothing, successfully, when any file exists.
	SkipIfExist bool
}

// ErrConfigExists is returned (wrapped) when a configuration file exists
// and neither Overwrite nor SkipIfExist is set.
var ErrConfigExists = errors.New("configuration file exists")

// CreateConfigFiles writes swtpm_setup.conf, swtpm-localca.conf and
// swtpm-localca.options into dir, as `swtpm_setup --create-config-files`
// does, for vtpmd's local CA in caDir. It returns the files written (none
// when SkipIfExist found one).
func CreateConfigFiles(dir, caDir string, platform Platform, how ConfigFiles) ([]string, error) {
	setupConf := filepath.Join(dir, SetupConfName)
	caConf := filepath.Join(dir, LocalCAConfName)
	caOpts := filepath.Join(dir, LocalCAOptsName)
	ca := DefaultCAFiles(caDir)
	files := []struct{ path, content string }{
		{setupConf, "# Written by vtpmd setup --create-config-files. vtpmd signs the certificates\n" +
			"# itself, with the local CA that create_certs_tool_config names.\n" +
			"create_certs_tool = " + localCAToolPath + "\n" +
			"create_certs_tool_config = " + caConf + "\n" +
			"create_certs_tool_options = " + caOpts + "\n" +
			"# Comma-separated list (no spaces) of PCR banks to activate by default\n" +
			"active_pcr_banks = " + defaultPCRBanks + "\n"},
		{caConf, "statedir = " + ca.Dir + "\n" +
			"signingkey = " + ca.SigningKey + "\n" +
			"issuercert = " + ca.IssuerCert + "\n" +
			"certserial = " + ca.CertSerial + "\n"},
		{caOpts, "--platform-manufacturer " + platform.Manufacturer + "\n" +
			"--platform-version " + platform.Version + "\n" +
			"--platform-model " + platform.Model + "\n"},
	}
	if !how.Overwrite {
		for _, f := range files {
			_, err := os.Stat(f.path)
			switch {
			case err == nil && how.SkipIfExist:
				return nil, nil
			case err == nil:
				return nil, fmt.Errorf("%s: %w; refusing to overwrite it", f.path, ErrConfigExists)
			case !errors.Is(err, fs.ErrNotExist):
				return nil, err
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var written []string
	for _, f := range files {
		if err := os.WriteFile(f.path, []byte(f.content), 0o644); err != nil {
			return written, err
		}
		written = append(written, f.path)
	}
	return written, nil
}
