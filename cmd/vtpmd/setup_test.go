package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/state"
)

// End-to-end tests of `vtpmd setup` (swtpm_setup), `vtpmd ioctl`
// (swtpm_ioctl) and of vtpmd installed under swtpm's names.

// libvirtSetupArgs is the command line libvirt gives swtpm_setup before a
// VM's first start (spec §4.5).
func libvirtSetupArgs(stateDir, vmid, logfile string) []string {
	return []string{"--tpm2", "--tpm-state", stateDir, "--vmid", vmid, "--logfile", logfile,
		"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}
}

// setupEnv is an environment whose configuration directory holds the files
// `vtpmd setup --create-config-files` writes: swtpm_setup.conf naming a
// swtpm-localca.conf whose CA lies beside the test's host key.
func setupEnv(t *testing.T) ([]string, string) {
	t.Helper()
	env := append(os.Environ(), "XDG_CONFIG_HOME="+t.TempDir())
	out, code := runDaemonCmdEnv(t, env, "setup", "--create-config-files", "root")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "swtpm-localca.conf")
	caDir := filepath.Join(filepath.Dir(os.Getenv("VTPMD_HOST_KEY")), "ca")
	return env, caDir
}

// runSetup runs `vtpmd setup args...` with env and returns its output and
// exit code.
func runSetupEnv(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	return runDaemonCmdEnv(t, env, append([]string{"setup"}, args...)...)
}

// storedRecord reads the state record of the VM in dir.
func storedRecord(t *testing.T, dir string) *state.Record {
	t.Helper()
	store, err := state.Open(dir, state.Options{ReadOnly: true})
	require.NoError(t, err)
	defer store.Close()
	rec, err := store.Get(vmIDFor(dir))
	require.NoError(t, err)
	return rec
}

// readPEMCert reads a PEM certificate file.
func readPEMCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	block, _ := pem.Decode(b)
	require.NotNil(t, block, path)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return cert
}

// localCA is the local CA's root and intermediate (issuer) certificates,
// as swtpm_localca lays them out in its directory.
type localCA struct{ root, issuer *x509.Certificate }

func readLocalCA(t *testing.T, caDir string) localCA {
	t.Helper()
	return localCA{
		root:   readPEMCert(t, filepath.Join(caDir, "swtpm-localca-rootca-cert.pem")),
		issuer: readPEMCert(t, filepath.Join(caDir, "issuercert.pem")),
	}
}

// verifyTCGCert parses a DER certificate and verifies that it chains to
// the CA's root through its intermediate. crypto/x509 does not handle the
// critical subject alternative name with a directoryName that the TCG
// profile prescribes, so it is checked here and left out of the
// verification, as a TCG-aware verifier does.
func verifyTCGCert(t *testing.T, der []byte, ca localCA, eku asn1.ObjectIdentifier) *x509.Certificate {
	t.Helper()
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	require.Len(t, cert.UnhandledCriticalExtensions, 1)
	require.Equal(t, "2.5.29.17", cert.UnhandledCriticalExtensions[0].String())
	require.Equal(t, []asn1.ObjectIdentifier{eku}, cert.UnknownExtKeyUsage)
	c := *cert
	c.UnhandledCriticalExtensions = nil
	roots, intermediates := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.root)
	intermediates.AddCert(ca.issuer)
	chains, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err)
	require.Len(t, chains, 1)
	require.Len(t, chains[0], 3, "EK certificate -> intermediate -> root")
	require.Equal(t, "swtpm-localca", chains[0][1].Subject.CommonName)
	require.Equal(t, "swtpm-localca-rootca", chains[0][2].Subject.CommonName)
	return cert
}

// requireCreateEK requires the EK that tpm2_createek -G alg derives from
// the TCG template to be the key cert certifies.
func requireCreateEK(t *testing.T, tt *toolsTPM, alg string, cert *x509.Certificate) {
	t.Helper()
	tt.run(t, "tpm2_createek", "-c", "ek.ctx", "-G", alg, "-u", "ek.pem", "-f", "pem")
	tt.flush(t)
	derived, ok := pemPublicKey(t, tt.read(t, "ek.pem")).(interface{ Equal(crypto.PublicKey) bool })
	require.True(t, ok)
	require.True(t, derived.Equal(cert.PublicKey), "the EK certificate certifies another key than tpm2_createek -G %s derives", alg)
}

// pcrBanksOutput is what `tpm2_getcap pcrs` prints when the given banks
// of the engine's four are active.
func pcrBanksOutput(active ...string) string {
	out := "selected-pcrs:\n"
	for _, bank := range []string{"sha1", "sha256", "sha384", "sha512"} {
		pcrs := ""
		if slices.Contains(active, bank) {
			pcrs = "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23 "
		}
		out += "  - " + bank + ": [ " + pcrs + "]\n"
	}
	return out
}

var (
	oidEKCertificate       = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidPlatformCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 2}
)

// TestSetupLibvirt provisions a TPM with libvirt's swtpm_setup command line,
// serves it with `vtpmd socket` and checks it with tpm2-tools: the EK
// certificates chain to the local CA and certify the EKs tpm2_createek
// derives; a second run with --not-overwrite changes nothing.
func TestSetupLibvirt(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd setup is vtpmd's own")
	}
	env, caDir := setupEnv(t)
	dir := sockDir(t)
	logfile := filepath.Join(t.TempDir(), "setup.log")
	const vmid = "vm1:6c1f3b9e-42d7-4b0e-9d55-2f0c8f3a7e11"
	start := time.Now()
	out, code := runSetupEnv(t, env, libvirtSetupArgs(dir, vmid, logfile)...)
	require.Equal(t, 0, code, out)
	t.Logf("vtpmd setup took %v", time.Since(start))
	logText, err := os.ReadFile(logfile)
	require.NoError(t, err)
	require.Contains(t, string(logText), "successfully authored TPM state")
	ca := readLocalCA(t, caDir)
	for _, key := range []string{"signkey.pem", "swtpm-localca-rootca-privkey.pem"} {
		fi, err := os.Stat(filepath.Join(caDir, key))
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), key)
	}

	tt := startToolsTPM(t, dir, "")
	tt.run(t, "tpm2_getrandom", "8")
	// The EKs: RSA 2048 and ECC P-256 from the TCG default templates, and
	// swtpm_setup's ECC P-384 (high range).
	require.Equal(t, "- 0x81010001\n- 0x81010016\n", tt.run(t, "tpm2_getcap", "handles-persistent"))

	// tpm2_getekcertificate reads the low range certificates: RSA, then
	// ECC P-256. Each is the one at its TCG index, chains to the local CA
	// and certifies the key tpm2_createek derives from the TCG template.
	tt.run(t, "tpm2_getekcertificate", "-o", "rsa.der", "-o", "ecc.der")
	var certified *rsa.PublicKey
	for _, ek := range []struct {
		file, index, alg string
		usage            x509.KeyUsage
	}{
		{"rsa.der", "0x01c00002", "rsa", x509.KeyUsageKeyEncipherment},
		{"ecc.der", "0x01c0000a", "ecc", x509.KeyUsageKeyAgreement},
		{"", "0x01c00016", "ecc384", x509.KeyUsageKeyAgreement},
	} {
		tt.run(t, "tpm2_nvread", "-C", "o", "-o", "nv.der", ek.index)
		der := tt.read(t, "nv.der")
		if ek.file != "" {
			require.Equal(t, der, tt.read(t, ek.file), "tpm2_getekcertificate's %s certificate", ek.alg)
		}
		cert := verifyTCGCert(t, der, ca, oidEKCertificate)
		assert.Equal(t, vmid, cert.Subject.CommonName, ek.alg)
		assert.Equal(t, ek.usage, cert.KeyUsage, ek.alg)
		requireCreateEK(t, tt, ek.alg, cert)
		if ek.alg == "rsa" {
			certified = cert.PublicKey.(*rsa.PublicKey)
		}
	}
	require.Equal(t, 2048, certified.N.BitLen())

	// The platform certificate, for the RSA EK.
	tt.run(t, "tpm2_nvread", "-C", "o", "-o", "platform.der", "0x01c08000")
	platform := verifyTCGCert(t, tt.read(t, "platform.der"), ca, oidPlatformCertificate)
	require.True(t, certified.Equal(platform.PublicKey))

	// --lock-nvram: every certificate written and locked for good.
	tt.write(t, "byte.bin", []byte{1})
	for _, index := range []string{"0x01c00002", "0x01c0000a", "0x01c00016", "0x01c08000"} {
		pub := tt.run(t, "tpm2_nvreadpublic", index)
		require.Contains(t, pub, "ppwrite|writelocked|writedefine|ppread|ownerread|authread|no_da|written|platformcreate", index)
		require.Contains(t, tt.fails(t, "tpm2_nvwrite", "-C", "p", "-i", "byte.bin", index), "0x148", index)
	}

	// sha256 is the only active PCR bank (swtpm_setup's default).
	require.Equal(t, pcrBanksOutput("sha256"), tt.run(t, "tpm2_getcap", "pcrs"))
	tt.stop(t)

	// A second run with --not-overwrite changes nothing.
	before := storedRecord(t, dir)
	out, code = runSetupEnv(t, env, libvirtSetupArgs(dir, vmid, logfile)...)
	require.Equal(t, 0, code, out)
	after := storedRecord(t, dir)
	require.Equal(t, before.Generation, after.Generation)
	require.Equal(t, before.Sealed, after.Sealed)

	// Without --not-overwrite or --overwrite, existing state is an error.
	args := slices.DeleteFunc(libvirtSetupArgs(dir, vmid, logfile), func(s string) bool { return s == "--not-overwrite" })
	out, code = runSetupEnv(t, env, args...)
	require.Equal(t, 1, code, out)
	require.Contains(t, out, "already exists")
	require.Equal(t, before.Generation, storedRecord(t, dir).Generation)

	// --overwrite makes a new TPM, with a new EK, over it.
	out, code = runSetupEnv(t, env, append(args, "--overwrite")...)
	require.Equal(t, 0, code, out)
	require.Greater(t, storedRecord(t, dir).Generation, before.Generation)
	tt = startToolsTPM(t, dir, "")
	tt.run(t, "tpm2_nvread", "-C", "o", "-o", "new.der", "0x01c00002")
	newDER := tt.read(t, "new.der")
	newCert := verifyTCGCert(t, newDER, ca, oidEKCertificate)
	require.NotEqual(t, certified.N.Text(16), newCert.PublicKey.(*rsa.PublicKey).N.Text(16))
	tt.stop(t)

	// --reconfigure changes the PCR banks of the existing TPM only.
	out, code = runSetupEnv(t, env, "--tpm2", "--tpm-state", dir, "--pcr-banks", "sha1,sha256", "--reconfigure")
	require.Equal(t, 0, code, out)
	tt = startToolsTPM(t, dir, "")
	require.Equal(t, pcrBanksOutput("sha1", "sha256"), tt.run(t, "tpm2_getcap", "pcrs"))
	tt.run(t, "tpm2_nvread", "-C", "o", "-o", "same.der", "0x01c00002")
	require.Equal(t, newDER, tt.read(t, "same.der"))
	tt.stop(t)
}

// TestSetupStateFile provisions into a state file, as libvirt does for a
// TPM whose state lives in a file or on a block device (--tpm-state
// file://), and serves it with `vtpmd socket --tpmstate backend-uri=file://`.
func TestSetupStateFile(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd setup is vtpmd's own")
	}
	env, _ := setupEnv(t)
	dir := sockDir(t)
	file := fileBackend.statePath(dir)
	logfile := filepath.Join(t.TempDir(), "setup.log")
	certDir := t.TempDir()
	out, code := runSetupEnv(t, env, append(libvirtSetupArgs("file://"+file, "vm5:file", logfile), "--write-ek-cert-files", certDir)...)
	require.Equal(t, 0, code, out)
	fi, err := os.Stat(file)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	out, code = runDaemonCmd(t, "socket", "--tpm2", "--print-states", "--tpmstate", "backend-uri=file://"+file)
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, `"permall"`)

	// --not-overwrite leaves the file as it is.
	before, err := os.ReadFile(file)
	require.NoError(t, err)
	out, code = runSetupEnv(t, env, libvirtSetupArgs("file://"+file, "vm5:file", logfile)...)
	require.Equal(t, 0, code, out)
	after, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.Equal(t, before, after)

	// The EK certificates, in NV and as --write-ek-cert-files wrote them
	// (swtpm_setup's file names).
	tt := startToolsTPMOn(t, fileBackend, dir, "")
	for index, name := range map[string]string{"0x01c00002": "ek-rsa2048.crt", "0x01c0000a": "ek-secp256r1.crt", "0x01c00016": "ek-secp384r1.crt"} {
		tt.run(t, "tpm2_nvread", "-C", "o", "-o", "ek.der", index)
		cert, err := x509.ParseCertificate(tt.read(t, "ek.der"))
		require.NoError(t, err, index)
		assert.Equal(t, "vm5:file", cert.Subject.CommonName, index)
		written, err := os.ReadFile(filepath.Join(certDir, name))
		require.NoError(t, err)
		assert.Equal(t, cert.Raw, written, name)
	}
	entries, err := os.ReadDir(certDir)
	require.NoError(t, err)
	assert.Len(t, entries, 3)
}

// TestSetupEncryptedState provisions with libvirt's encryption options
// (--pwdfile-fd, --cipher aes-256-cbc) and serves the state with swtpm's
// --key pwdfd= of the same passphrase; another passphrase does not open it.
func TestSetupEncryptedState(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd setup is vtpmd's own")
	}
	env, _ := setupEnv(t)
	dir := sockDir(t)
	cmd := exec.Command(daemonPath, append([]string{"setup", "--pwdfile-fd", "3", "--cipher", "aes-256-cbc"},
		libvirtSetupArgs(dir, "vm2:x", filepath.Join(t.TempDir(), "log"))...)...)
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{passphrasePipe(t, "libvirt secret")}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)

	serve := func(secret string) *daemon {
		ctrl := filepath.Join(dir, "ctrl")
		return startDaemonFiles(t, []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
			"--ctrl", "type=unixio,path=" + ctrl, "--key", "pwdfd=3,mode=aes-256-cbc",
			"--flags", "not-need-init,startup-clear"}, []*os.File{passphrasePipe(t, secret)}, ctrl)
	}
	d := serve("libvirt secret")
	require.Equal(t, "tpmEstablished is 0\n", ioctlOK(t, filepath.Join(dir, "ctrl"), "-e"))
	d.stop(t)

	// Another passphrase does not open it.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	wrong := exec.CommandContext(ctx, daemonPath, "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl"), "--key", "pwdfd=3,mode=aes-256-cbc",
		"--flags", "not-need-init")
	wrong.ExtraFiles = []*os.File{passphrasePipe(t, "another secret")}
	out, err = wrong.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "does not open")
}

// TestSetupRefusesWhatItCannotDo checks that options vtpmd cannot honour
// fail with a message instead of being ignored.
func TestSetupRefusesWhatItCannotDo(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd setup is vtpmd's own")
	}
	env, _ := setupEnv(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tpm2", "--tpm-state", dir, "--allow-signing"}, "--allow-signing is not supported"},
		{[]string{"--tpm2", "--tpm-state", dir, "--rsa-keysize", "3072"}, "--rsa-keysize 3072 is not supported"},
		{[]string{"--tpm-state", dir}, "pass --tpm2"},
		{[]string{"--tpm2", "--tpm-state", dir, "--take-ownership"}, "TPM 1.2"},
		{[]string{"--tpm2", "--tpm-state", dir, "--tpm", "/usr/bin/swtpm socket"}, "--tpm is not supported"},
		{[]string{"--tpm2", "--tpm-state", dir, "--pcr-banks", "sha3-256"}, "unknown PCR bank"},
		{[]string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--pcr-banks", "sha256"}, "there is no TPM state"},
		{[]string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--createek"}, "cannot go with it"},
		{[]string{"--tpm2", "--tpm-state", dir, "--overwrite", "--not-overwrite"}, "exclude each other"},
		{[]string{"--tpm2", "--tpm-state", dir, "--profile", "name=default"}, `unknown option "--profile"`},
		{[]string{"--create-config-files", "bogus"}, `unknown option "bogus"`},
	} {
		out, code := runSetupEnv(t, env, tc.args...)
		assert.Equal(t, 1, code, "%v: %s", tc.args, out)
		assert.Contains(t, out, tc.want, "%v", tc.args)
	}
	// A certificate tool other than swtpm's local CA cannot be run.
	conf := filepath.Join(t.TempDir(), "swtpm_setup.conf")
	require.NoError(t, os.WriteFile(conf, []byte("create_certs_tool = /usr/local/bin/my-ca\n"), 0o644))
	out, code := runSetupEnv(t, env, "--tpm2", "--tpm-state", dir, "--config", conf, "--create-ek-cert")
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "cannot run another tool")

	// --create-config-files: an existing file is an error, unless
	// skip-if-exist.
	out, code = runSetupEnv(t, env, "--create-config-files", "root")
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "refusing to overwrite")
	out, code = runSetupEnv(t, env, "--create-config-files", "root,skip-if-exist")
	assert.Equal(t, 0, code, out)
	assert.Empty(t, out)
}

func TestSetupPrintCapabilities(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd setup is vtpmd's own")
	}
	out, code := runDaemonCmd(t, "setup", "--print-capabilities")
	require.Equal(t, 0, code, out)
	require.Equal(t, `{ "type": "swtpm_setup", "features": [ "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", `+
		`"cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048" ], `+
		`"version": "`+version+`" }`+"\n", out)
}

// swtpmNames returns a directory holding links named swtpm, swtpm_setup and
// swtpm_ioctl to the test's vtpmd, and an environment with it first on
// PATH: vtpmd installed under swtpm's names.
func swtpmNames(t *testing.T, env []string) (string, []string) {
	t.Helper()
	bin := t.TempDir()
	for _, name := range []string{"swtpm", "swtpm_setup", "swtpm_ioctl"} {
		require.NoError(t, os.Symlink(daemonPath, filepath.Join(bin, name)))
	}
	out := slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, "PATH=") })
	return bin, append(out, "PATH="+bin+":"+os.Getenv("PATH"))
}

// runIn runs a command with env and returns its combined output and exit
// code.
func runIn(t *testing.T, env []string, name string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if !strings.Contains(name, "/") {
		// Look the name up in env's PATH, not the test's.
		for _, kv := range env {
			if path, ok := strings.CutPrefix(kv, "PATH="); ok {
				for _, dir := range filepath.SplitList(path) {
					if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
						name = filepath.Join(dir, name)
						break
					}
				}
			}
		}
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return string(out), exitErr.ExitCode()
	}
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out), 0
}

// localCAConfig writes a swtpm_setup.conf for Debian's swtpm_localca with
// its CA in a temporary directory, and returns its path.
func localCAConfig(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	caConf := filepath.Join(dir, "swtpm-localca.conf")
	caOpts := filepath.Join(dir, "swtpm-localca.options")
	conf := filepath.Join(dir, "swtpm_setup.conf")
	require.NoError(t, os.WriteFile(caConf, fmt.Appendf(nil,
		"statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca), 0o644))
	require.NoError(t, os.WriteFile(caOpts, []byte("--platform-manufacturer vtpmd-test\n--platform-version 1.0\n--platform-model QEMU\n"), 0o644))
	require.NoError(t, os.WriteFile(conf, fmt.Appendf(nil,
		"create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n", caConf, caOpts), 0o644))
	return conf
}

// TestDebianSwtpmSetupWithVtpmd runs Debian's own swtpm_setup (0.7.1) with
// vtpmd installed as swtpm, on a state dir and on a state file, then serves
// the state it provisioned with `vtpmd socket`.
func TestDebianSwtpmSetupWithVtpmd(t *testing.T) {
	if testingPeer() {
		t.Skip("checks vtpmd as swtpm")
	}
	if _, err := os.Stat("/usr/bin/swtpm_setup"); err != nil {
		t.Skip("swtpm-tools is not installed")
	}
	forEachBackend(t, testDebianSwtpmSetupWithVtpmd)
}

func testDebianSwtpmSetupWithVtpmd(t *testing.T, b stateBackend) {
	swtpmSetup := "/usr/bin/swtpm_setup"
	_, env := swtpmNames(t, os.Environ())
	dir := sockDir(t)
	tpmState := dir
	if b == fileBackend {
		tpmState = "file://" + b.statePath(dir)
	}
	logfile := filepath.Join(t.TempDir(), "swtpm_setup.log")
	args := append(libvirtSetupArgs(tpmState, "vm3:debian", logfile), "--config", localCAConfig(t))
	out, code := runIn(t, env, swtpmSetup, args...)
	logText, _ := os.ReadFile(logfile)
	require.Equal(t, 0, code, "%s\n%s", out, logText)
	// swtpm_setup drove vtpmd (the engine's GET_INFO), not Debian's swtpm.
	require.Contains(t, string(logText), "--tpm-model vtpmd")
	require.Contains(t, string(logText), "Successfully authored TPM state.")

	tt := startToolsTPMOn(t, b, dir, "")
	tt.run(t, "tpm2_getrandom", "8")
	// swtpm_setup's EKs: RSA 2048 and ECC P-384 (high range), which
	// vtpmd makes too.
	require.Equal(t, "- 0x81010001\n- 0x81010016\n", tt.run(t, "tpm2_getcap", "handles-persistent"))
	for _, ek := range []struct{ index, alg string }{{"0x01c00002", "rsa"}, {"0x01c00016", "ecc384"}} {
		tt.run(t, "tpm2_nvread", "-C", "o", "-o", "ek.der", ek.index)
		cert, err := x509.ParseCertificate(tt.read(t, "ek.der"))
		require.NoError(t, err)
		assert.Equal(t, "vm3:debian", cert.Subject.CommonName)
		requireCreateEK(t, tt, ek.alg, cert)
	}
}

// TestLibvirtSequenceWithVtpmd replays the commands libvirt runs for a
// VM's TPM, with vtpmd installed as swtpm, swtpm_setup and swtpm_ioctl.
func TestLibvirtSequenceWithVtpmd(t *testing.T) {
	if testingPeer() {
		t.Skip("checks vtpmd as swtpm")
	}
	env, _ := setupEnv(t)
	_, env = swtpmNames(t, env)
	out, code := runIn(t, env, "swtpm", "socket", "--print-capabilities")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"cmdarg-pwd-fd"`)
	out, code = runIn(t, env, "swtpm_setup", "--print-capabilities")
	require.Equal(t, 0, code, out)
	for _, f := range []string{"tpm-2.0", "cmdarg-pwdfile-fd", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks"} {
		require.Contains(t, out, `"`+f+`"`)
	}

	dir := sockDir(t)
	logDir := t.TempDir()
	out, code = runIn(t, env, "swtpm_setup", libvirtSetupArgs(dir, "vm4:uuid", filepath.Join(logDir, "vm4-swtpm.log"))...)
	require.Equal(t, 0, code, out)
	out, code = runIn(t, env, "swtpm_setup", "--tpm2", "--tpm-state", dir, "--logfile", filepath.Join(logDir, "vm4-swtpm.log"),
		"--pcr-banks", "sha256", "--reconfigure")
	require.Equal(t, 0, code, out)

	sock := filepath.Join(dir, "vm4-swtpm.sock")
	pidfile := filepath.Join(dir, "vm4-swtpm.pid")
	out, code = runIn(t, env, "swtpm", "socket", "--daemon", "--ctrl", "type=unixio,path="+sock+",mode=0600",
		"--tpmstate", "dir="+dir+",mode=0600", "--log", "file="+filepath.Join(logDir, "vm4-swtpm.log"),
		"--terminate", "--tpm2", "--pid", "file="+pidfile)
	require.Equal(t, 0, code, out)
	require.FileExists(t, pidfile)
	out, code = runIn(t, env, "swtpm_ioctl", "--unix", sock, "--info", "2")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"model":"vtpmd"`)
	out, code = runIn(t, env, "swtpm_ioctl", "--unix", sock, "-s")
	require.Equal(t, 0, code, out)
	require.Empty(t, out)
	require.Eventually(t, func() bool {
		_, err := os.Stat(pidfile)
		return errors.Is(err, os.ErrNotExist)
	}, 5*time.Second, 10*time.Millisecond, "the daemon did not end after swtpm_ioctl -s")
}

// vtpmdIoctl runs `vtpmd ioctl --unix ctrl args...`.
func vtpmdIoctl(t *testing.T, ctrl string, stdin []byte, args ...string) ioctlResult {
	t.Helper()
	return runControlTool(t, stdin, daemonPath, append([]string{"ioctl", "--unix", ctrl}, args...)...)
}

// TestIoctlToolMatchesSwtpmIoctl runs each command with swtpm_ioctl and
// with `vtpmd ioctl` against the same daemon and requires the same output
// and exit status.
func TestIoctlToolMatchesSwtpmIoctl(t *testing.T) {
	if testingPeer() {
		t.Skip("vtpmd ioctl is vtpmd's own")
	}
	s := startSocketTPM(t, "", "not-need-init,startup-clear", "")
	same := func(args ...string) ioctlResult {
		t.Helper()
		want := runIoctl(t, s.ctrl, nil, args...)
		got := vtpmdIoctl(t, s.ctrl, nil, args...)
		require.Equal(t, want, got, "swtpm_ioctl %v", args)
		return got
	}
	same("-c")
	same("-g")
	same("-e")
	for _, flags := range []string{"0", "1", "2", "3", "4", "0x3"} {
		same("--info", flags)
	}
	same("-b", "0")
	same("-l", "3")
	same("-l", "0")
	same("-h", "1234")
	require.Equal(t, "tpmEstablished is 1\n", same("-e").stdout)
	same("-r", "3")
	same("-v")
	same("-C")

	// --save: the same kind of file.
	dir := t.TempDir()
	for _, typ := range []string{"permanent", "volatile", "savestate"} {
		want := runIoctl(t, s.ctrl, nil, "--save", typ, filepath.Join(dir, "swtpm-"+typ))
		got := vtpmdIoctl(t, s.ctrl, nil, "--save", typ, filepath.Join(dir, "vtpmd-"+typ))
		require.Equal(t, want, got, typ)
		a, err := os.Stat(filepath.Join(dir, "swtpm-"+typ))
		require.NoError(t, err)
		b, err := os.Stat(filepath.Join(dir, "vtpmd-"+typ))
		require.NoError(t, err)
		require.Equal(t, a.Mode(), b.Mode(), typ)
		if typ != "savestate" {
			checkStateBlobFile(t, filepath.Join(dir, "vtpmd-"+typ))
		}
	}

	// Argument errors, before connecting.
	same("-l", "5")
	same("-l", "abc")
	same("-r", "abc")
	same("-b", "abc")
	same("--info", "abc")
	same("--save", "bogus", filepath.Join(dir, "x"))
	same("--save", "permanent")
	same("--load", "permanent", filepath.Join(dir, "missing"))
	same()
	same("-c", "-g")

	// Stopped: results from the daemon, including GET_STATEBLOB's bare
	// result.
	same("--stop")
	same("--stop")
	same("-e")
	same("--save", "permanent", filepath.Join(dir, "stopped"))
	same("-b", "4000")

	// Load what vtpmd ioctl saved, then -i: the TPM resumes.
	require.Equal(t, ioctlResult{}, vtpmdIoctl(t, s.ctrl, nil, "--load", "permanent", filepath.Join(dir, "vtpmd-permanent")))
	require.Equal(t, ioctlResult{}, vtpmdIoctl(t, s.ctrl, nil, "--load", "volatile", filepath.Join(dir, "vtpmd-volatile")))
	require.Equal(t, ioctlResult{}, vtpmdIoctl(t, s.ctrl, nil, "-i"))
	requireGetRandom(t, s.data)
	require.Equal(t, "tpmEstablished is 0\n", vtpmdIoctl(t, s.ctrl, nil, "-e").stdout) // reset by -r 3 before --save

	// -h - hashes stdin in swtpm_ioctl's chunks.
	data := bytes.Repeat([]byte{0xa5}, 10000)
	want := runIoctl(t, s.ctrl, data, "-h", "-")
	pcrSwtpm := readPCR(t, s.data, 17)
	got := vtpmdIoctl(t, s.ctrl, data, "-h", "-")
	require.Equal(t, want, got)
	require.Equal(t, pcrSwtpm, readPCR(t, s.data, 17))
	require.Equal(t, pcr17After(data), readPCR(t, s.data, 17))

	// Without a socket.
	noSocket := filepath.Join(dir, "none")
	require.Equal(t, runIoctl(t, noSocket, nil, "-c"), vtpmdIoctl(t, noSocket, nil, "-c"))

	// -s ends the daemon.
	require.Equal(t, ioctlResult{}, vtpmdIoctl(t, s.ctrl, nil, "-s"))
	s.waitExit(t, 5*time.Second)
	require.NoError(t, s.err)
}
