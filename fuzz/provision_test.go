package fuzz

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/provision"
)

// FuzzSetupConfig feeds one file to the readers of swtpm_setup.conf,
// swtpm-localca.conf and swtpm-localca.options, as vtpmd setup reads them,
// and the setup file's active_pcr_banks (and the input itself) to
// ParsePCRBanks. Nothing may panic; what is read is free of comments and
// of the ${VAR} references the environment resolves; the PCR
// banks parsed are known, unique and parse again to themselves.
func FuzzSetupConfig(f *testing.F) {
	dir := f.TempDir()
	f.Setenv("VTPMD_FUZZ_CONF", "/var/lib/swtpm-localca")
	for _, s := range []string{
		"# swtpm_setup.conf\ncreate_certs_tool = /usr/share/swtpm/swtpm-localca\n" +
			"create_certs_tool_config = ${XDG_CONFIG_HOME}/swtpm-localca.conf\n" +
			"create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256,sha384\n",
		"statedir = ${VTPMD_FUZZ_CONF}\nsigningkey = /var/lib/swtpm-localca/signkey.pem\n" +
			"issuercert = /var/lib/swtpm-localca/issuercert.pem\ncertserial = /var/lib/swtpm-localca/certserial\n",
		"signingkey = pkcs11:token=x\nissuercert = /ca.pem\n",
		"signingkey = /k.pem\nsigningkey_password = secret\nissuercert = /ca.pem\n",
		"--platform-manufacturer Fedora\n--platform-version 2.1\n--platform-model QEMU\n",
		"--platform-manufacturer\n",
		"active_pcr_banks = SHA1, sha256 ,sha1\n",
		"no equals sign\n",
		"key = value # comment = x\n  \n#only a comment\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, content string) {
		path := filepath.Join(dir, "conf")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		checkBanks(t, content)

		conf, err := provision.ReadSetupConf(path)
		if err == nil {
			if conf.Path != path {
				t.Fatalf("setup conf read from %q says %q", path, conf.Path)
			}
			for _, v := range []string{conf.CreateCertsTool, conf.CreateCertsToolConfig, conf.CreateCertsToolOptions, conf.ActivePCRBanks} {
				checkConfValue(t, v)
			}
			_ = conf.CheckCertsTool()
			checkBanks(t, conf.ActivePCRBanks)
		}

		files, ok, err := provision.ReadLocalCAConf(path)
		switch {
		case err != nil && ok:
			t.Fatalf("local CA conf: ok with error %v", err)
		case err == nil && !ok:
			t.Fatal("local CA conf: a file given and read, but not ok")
		case ok:
			if files.SigningKey == "" || files.IssuerCert == "" || files.Dir == "" ||
				strings.HasPrefix(files.SigningKey, "pkcs11:") || strings.HasPrefix(files.SigningKey, "tpmkey:") {
				t.Fatalf("local CA conf accepted: %+v", files)
			}
			for _, v := range []string{files.SigningKey, files.IssuerCert, files.CertSerial} {
				checkConfValue(t, v)
			}
		}

		def := provision.DefaultPlatform("fuzz")
		p, err := provision.ReadLocalCAOptions(path, def)
		if err == nil {
			for _, v := range []string{p.Manufacturer, p.Model, p.Version} {
				if v == "" || v != strings.TrimSpace(v) || strings.ContainsAny(v, "\n") {
					t.Fatalf("platform %+v", p)
				}
			}
		}
	})
}

// checkConfValue checks a value read from a key = value line. It is
// trimmed before its references are resolved, as swtpm does, so a
// reference to an unset variable may leave blanks at its ends.
func checkConfValue(t *testing.T, v string) {
	if strings.ContainsAny(v, "#\n") {
		t.Fatalf("value %q holds a comment or a newline", v)
	}
	if strings.Contains(v, "${VTPMD_FUZZ_CONF}") {
		t.Fatalf("value %q keeps a reference to a set variable", v)
	}
}

func checkBanks(t *testing.T, s string) {
	banks, err := provision.ParsePCRBanks(s)
	if err != nil {
		return
	}
	if len(banks) == 0 {
		t.Fatalf("ParsePCRBanks(%q): no bank and no error", s)
	}
	for i, b := range banks {
		if !slices.Contains([]string{"sha1", "sha256", "sha384", "sha512"}, b) || slices.Contains(banks[:i], b) {
			t.Fatalf("ParsePCRBanks(%q) = %q", s, banks)
		}
	}
	again, err := provision.ParsePCRBanks(strings.Join(banks, ","))
	if err != nil || !slices.Equal(again, banks) {
		t.Fatalf("ParsePCRBanks(%q) = %q, which parses to %q, %v", s, banks, again, err)
	}
}
