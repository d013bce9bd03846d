package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// End-to-end tests with tpm2-tools through libtss2-tcti-swtpm, the way a user
// drives a swtpm from the host: `--server type=unixio,path=X --ctrl
// type=unixio,path=X.ctrl --flags not-need-init,startup-clear` and
// TPM2TOOLS_TCTI=swtpm:path=X.
//
// The reference TPM (like libtpms) has only 3 slots for loaded objects and
// tpm2-tools leaves every object it loads from a context file in the TPM, so
// the tests flush transient objects after each step, as real scripts do.

// toolsTPM is a daemon serving tcti-swtpm, plus a work directory for the
// files the tools read and write.
type toolsTPM struct {
	*daemon
	stateDir string
	sock     string // tcti-swtpm path; the control socket is sock+".ctrl"
	work     string
	// Paths the daemon listens on (differ from sock only when capturing).
	dataListen, ctrlListen string
}

// startToolsTPM starts the daemon for tcti-swtpm on stateDir (a new short
// directory if empty) with the sockets inside it.
func startToolsTPM(t *testing.T, stateDir, capture string) *toolsTPM {
	t.Helper()
	return startToolsTPMOn(t, dirBackend, stateDir, capture)
}

// startToolsTPMOn is startToolsTPM with the state on backend b (stateDir
// holds the sockets, and the state file with fileBackend).
func startToolsTPMOn(t *testing.T, b stateBackend, stateDir, capture string) *toolsTPM {
	t.Helper()
	if stateDir == "" {
		stateDir = sockDir(t)
	}
	log := captureLog(t, capture)
	tt := &toolsTPM{stateDir: stateDir, sock: filepath.Join(stateDir, "tpm"), work: t.TempDir()}
	tt.dataListen = captureSocket(t, log, tt.sock, "data")
	tt.ctrlListen = captureSocket(t, log, tt.sock+".ctrl", "ctrl")
	tt.daemon = startDaemon(t, []string{"socket", "--tpm2",
		"--tpmstate", b.tpmstate(stateDir),
		"--server", "type=unixio,path=" + tt.dataListen,
		"--ctrl", "type=unixio,path=" + tt.ctrlListen,
		"--flags", "not-need-init,startup-clear"}, tt.dataListen, tt.ctrlListen)
	return tt
}

// exec runs one tpm2-tools command in the work directory with the TCTI set
// in its environment and returns stdout, stderr and the error.
func (tt *toolsTPM) exec(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = tt.work
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+tt.sock)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s timed out\n%s", strings.Join(args, " "), stderr.String())
	}
	return stdout.String(), stderr.String(), err
}

// run runs a tpm2-tools command that must succeed and returns its stdout.
func (tt *toolsTPM) run(t *testing.T, args ...string) string {
	t.Helper()
	stdout, stderr, err := tt.exec(t, args...)
	require.NoError(t, err, "%s\nstdout: %s\nstderr: %s", strings.Join(args, " "), stdout, stderr)
	return stdout
}

// fails runs a tpm2-tools command that must fail with exit status 1 and
// returns its stderr.
func (tt *toolsTPM) fails(t *testing.T, args ...string) string {
	t.Helper()
	return tt.failsWith(t, 1, args...)
}

// failsWith runs a tpm2-tools command that must fail with the exit status
// code and returns its stderr.
func (tt *toolsTPM) failsWith(t *testing.T, code int, args ...string) string {
	t.Helper()
	stdout, stderr, err := tt.exec(t, args...)
	var exitErr *exec.ExitError
	require.True(t, errors.As(err, &exitErr), "%s should fail (err %v)\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, stdout, stderr)
	require.Equal(t, code, exitErr.ExitCode(), "%s\nstderr: %s", strings.Join(args, " "), stderr)
	return stderr
}

// flush flushes all transient objects, freeing the 3 object slots.
func (tt *toolsTPM) flush(t *testing.T) {
	t.Helper()
	tt.run(t, "tpm2_flushcontext", "-t")
}

func (tt *toolsTPM) path(name string) string { return filepath.Join(tt.work, name) }

func (tt *toolsTPM) write(t *testing.T, name string, data []byte) {
	t.Helper()
	require.NoError(t, os.WriteFile(tt.path(name), data, 0o600))
}

func (tt *toolsTPM) read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(tt.path(name))
	require.NoError(t, err)
	return b
}

// requireNoTransient asserts that no transient object is left loaded.
func (tt *toolsTPM) requireNoTransient(t *testing.T) {
	t.Helper()
	require.Empty(t, tt.run(t, "tpm2_getcap", "handles-transient"))
}

// pcrExtended is the value of a PCR that was zero after one extend with
// digest: SHA256(32 zero bytes || digest).
func pcrExtended(digest []byte) []byte {
	h := sha256.New()
	h.Write(make([]byte, 32))
	h.Write(digest)
	return h.Sum(nil)
}

// pemPublicKey parses a PEM public key written by tpm2_readpublic -f pem.
func pemPublicKey(t *testing.T, data []byte) crypto.PublicKey {
	t.Helper()
	block, _ := pem.Decode(data)
	require.NotNil(t, block, "no PEM in %q", data)
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	require.NoError(t, err)
	return pub
}

func TestTPM2Tools(t *testing.T) {
	tt := startToolsTPM(t, "", "tpm2-tools.txt")

	t.Run("GetRandom", func(t *testing.T) {
		hexRE := regexp.MustCompile(`^[0-9a-f]{32}$`)
		a := tt.run(t, "tpm2_getrandom", "16", "--hex")
		b := tt.run(t, "tpm2_getrandom", "16", "--hex")
		require.Regexp(t, hexRE, a)
		require.Regexp(t, hexRE, b)
		require.NotEqual(t, a, b)
		raw := tt.run(t, "tpm2_getrandom", "32")
		require.Len(t, raw, 32)
	})

	t.Run("PCRExtendRead", func(t *testing.T) {
		tt.run(t, "tpm2_pcrreset", "16")
		zero := strings.Repeat("0", 64)
		require.Equal(t, "  sha256:\n    16: 0x"+zero+"\n", tt.run(t, "tpm2_pcrread", "sha256:16"))

		digest := sha256.Sum256([]byte("vtpmd e2e"))
		require.Empty(t, tt.run(t, "tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest[:])))
		want := pcrExtended(digest[:])
		require.Equal(t, "  sha256:\n    16: 0x"+strings.ToUpper(hex.EncodeToString(want))+"\n",
			tt.run(t, "tpm2_pcrread", "sha256:16", "-o", "pcr16.bin"))
		require.Equal(t, want, tt.read(t, "pcr16.bin"))

		// A second extend chains on the first.
		second := sha256.Sum256(append(want, digest[:]...))
		tt.run(t, "tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest[:]))
		require.Equal(t, "  sha256:\n    16: 0x"+strings.ToUpper(hex.EncodeToString(second[:]))+"\n",
			tt.run(t, "tpm2_pcrread", "sha256:16"))

		// PCR 0 is not resettable from locality 0.
		stderr := tt.fails(t, "tpm2_pcrreset", "0")
		require.Contains(t, stderr, "0x907")
		tt.run(t, "tpm2_pcrreset", "16")
		require.Equal(t, "  sha256:\n    16: 0x"+zero+"\n", tt.run(t, "tpm2_pcrread", "sha256:16"))
	})

	t.Run("CreatePrimary", func(t *testing.T) {
		out := tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "rsa", "-c", "rsa.ctx")
		require.Contains(t, out, "type:\n  value: rsa\n  raw: 0x1\n")
		require.Contains(t, out, "bits: 2048\n")
		require.Contains(t, out, "attributes:\n  value: fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt\n  raw: 0x30072\n")
		require.Regexp(t, `\nrsa: [0-9a-f]{512}\n$`, out)
		require.Equal(t, "- 0x80000000\n", tt.run(t, "tpm2_getcap", "handles-transient"))
		tt.flush(t)
		tt.requireNoTransient(t)

		out = tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "ecc.ctx")
		require.Contains(t, out, "type:\n  value: ecc\n  raw: 0x23\n")
		require.Contains(t, out, "curve-id:\n  value: NIST p256\n  raw: 0x3\n")
		require.Regexp(t, `\nx: [0-9a-f]{64}\ny: [0-9a-f]{64}\n$`, out)
		tt.flush(t)

		// The same template in the same hierarchy gives the same key.
		first := tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "ecc2.ctx")
		tt.flush(t)
		require.Equal(t, out, first)
	})

	t.Run("RSAKeySizes", func(t *testing.T) {
		require.Empty(t, tt.run(t, "tpm2_testparms", "rsa2048"))
		require.Empty(t, tt.run(t, "tpm2_testparms", "ecc256"))
		// Unsupported: tpm2_testparms exits with 5 (tool_rc_unsupported), the
		// key creation fails with TPM_RC_VALUE for parameter 2.
		unsupported := []string{"rsa4096"}
		if testingPeer() {
			// libtpms has RSA 3072.
			require.Empty(t, tt.run(t, "tpm2_testparms", "rsa3072"))
		} else {
			// Engine difference: the reference TPM of vtpmd has no RSA 3072.
			unsupported = append(unsupported, "rsa3072")
		}
		for _, alg := range unsupported {
			stderr := tt.failsWith(t, 5, "tpm2_testparms", alg)
			require.Contains(t, stderr, "ERROR: Unsupported algorithm specification\n")
			stderr = tt.fails(t, "tpm2_createprimary", "-C", "o", "-G", alg, "-c", alg+".ctx")
			require.Contains(t, stderr, "Esys_CreatePrimary(0x2C4)")
		}
		tt.requireNoTransient(t)
	})

	t.Run("CreateLoadSignVerify", func(t *testing.T) {
		tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "rsa", "-c", "parent.ctx", "-Q")
		tt.flush(t)
		tt.write(t, "msg.txt", []byte("message signed by the TPM\n"))
		tt.write(t, "other.txt", []byte("another message\n"))
		digest := sha256.Sum256(tt.read(t, "msg.txt"))

		for _, alg := range []string{"rsa2048", "ecc256"} {
			t.Run(alg, func(t *testing.T) {
				tt.run(t, "tpm2_create", "-C", "parent.ctx", "-G", alg, "-u", alg+".pub", "-r", alg+".priv", "-Q")
				tt.flush(t)
				out := tt.run(t, "tpm2_load", "-C", "parent.ctx", "-u", alg+".pub", "-r", alg+".priv", "-c", alg+".ctx")
				require.Regexp(t, `^name: 000b[0-9a-f]{64}\n$`, out)
				tt.flush(t)
				tt.run(t, "tpm2_readpublic", "-c", alg+".ctx", "-f", "pem", "-o", alg+".pem", "-Q")
				tt.flush(t)

				require.Empty(t, tt.run(t, "tpm2_sign", "-c", alg+".ctx", "-g", "sha256", "-o", alg+".sig", "msg.txt"))
				tt.flush(t)
				require.Empty(t, tt.run(t, "tpm2_verifysignature", "-c", alg+".ctx", "-g", "sha256", "-m", "msg.txt", "-s", alg+".sig"))
				tt.flush(t)
				tt.fails(t, "tpm2_verifysignature", "-c", alg+".ctx", "-g", "sha256", "-m", "other.txt", "-s", alg+".sig")
				tt.flush(t)

				// The plain signature checks out with Go's crypto.
				tt.run(t, "tpm2_sign", "-c", alg+".ctx", "-g", "sha256", "-f", "plain", "-o", alg+".plain", "msg.txt")
				tt.flush(t)
				sig := tt.read(t, alg+".plain")
				switch pub := pemPublicKey(t, tt.read(t, alg+".pem")).(type) {
				case *rsa.PublicKey:
					require.Equal(t, 2048, pub.N.BitLen())
					require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig))
				case *ecdsa.PublicKey:
					require.Equal(t, "P-256", pub.Curve.Params().Name)
					require.True(t, ecdsa.VerifyASN1(pub, digest[:], sig), "ECDSA signature % x", sig)
				default:
					t.Fatalf("unexpected public key %T", pub)
				}
				tt.requireNoTransient(t)
			})
		}
	})

	t.Run("QuoteCheckQuote", func(t *testing.T) {
		tt.run(t, "tpm2_pcrreset", "16")
		digest := sha256.Sum256([]byte("quoted"))
		tt.run(t, "tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest[:]))
		pcr16 := strings.ToUpper(hex.EncodeToString(pcrExtended(digest[:])))

		tt.run(t, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
		out := tt.run(t, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa",
			"-u", "ak.pem", "-f", "pem", "-n", "ak.name")
		require.Regexp(t, `^loaded-key:\n  name: 000b[0-9a-f]{64}\n  qualified name: 000b[0-9a-f]{64}\n$`, out)
		tt.flush(t)

		nonce := "0102030405060708"
		out = tt.run(t, "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:16,23", "-q", nonce,
			"-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256")
		tt.flush(t)
		pcrs := "pcrs:\n  sha256:\n    16: 0x" + pcr16 + "\n    23: 0x" + strings.Repeat("0", 64) + "\n"
		require.Contains(t, out, pcrs)
		require.Regexp(t, `^quoted: ff544347`, out) // TPM_GENERATED_VALUE, then TPM_ST_ATTEST_QUOTE
		require.Contains(t, out, "signature:\n  alg: rsassa\n")

		out = tt.run(t, "tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig", "-f", "quote.pcrs",
			"-g", "sha256", "-q", nonce)
		require.True(t, strings.HasPrefix(out, pcrs), out)
		// A different nonce must not verify.
		tt.fails(t, "tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig", "-f", "quote.pcrs",
			"-g", "sha256", "-q", "0102030405060709")
		tt.requireNoTransient(t)
	})

	t.Run("NVDefineWriteRead", func(t *testing.T) {
		const index = "0x1500016"
		require.Equal(t, "nv-index: "+index+"\n",
			tt.run(t, "tpm2_nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite", index))
		require.Equal(t, "- "+index+"\n", tt.run(t, "tpm2_getcap", "handles-nv-index"))
		data := []byte("0123456789abcdef0123456789ABCDEF")
		tt.write(t, "nv.in", data)
		require.Empty(t, tt.run(t, "tpm2_nvwrite", "-C", "o", "-i", "nv.in", index))
		require.Equal(t, string(data), tt.run(t, "tpm2_nvread", "-C", "o", "-s", "32", index))
		require.Equal(t, string(data[4:12]), tt.run(t, "tpm2_nvread", "-C", "o", "-s", "8", "--offset", "4", index))
		// Partial write at an offset.
		tt.write(t, "nv.part", []byte("XY"))
		tt.run(t, "tpm2_nvwrite", "-C", "o", "-i", "nv.part", "--offset", "30", index)
		require.Equal(t, string(data[:30])+"XY", tt.run(t, "tpm2_nvread", "-C", "o", "-s", "32", index))
		require.Empty(t, tt.run(t, "tpm2_nvundefine", "-C", "o", index))
		require.Empty(t, tt.run(t, "tpm2_getcap", "handles-nv-index"))
	})

	t.Run("EvictControl", func(t *testing.T) {
		tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "srk.ctx", "-Q")
		tt.run(t, "tpm2_readpublic", "-c", "srk.ctx", "-o", "srk.pub", "-Q")
		tt.flush(t)
		require.Equal(t, "persistent-handle: 0x81000001\naction: persisted\n",
			tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", "0x81000001"))
		tt.flush(t)
		require.Equal(t, "- 0x81000001\n", tt.run(t, "tpm2_getcap", "handles-persistent"))
		tt.run(t, "tpm2_readpublic", "-c", "0x81000001", "-o", "srk.persisted.pub", "-Q")
		require.Equal(t, tt.read(t, "srk.pub"), tt.read(t, "srk.persisted.pub"))
		// The persistent key works as a parent.
		tt.run(t, "tpm2_create", "-C", "0x81000001", "-G", "ecc256", "-u", "child.pub", "-r", "child.priv", "-Q")
		tt.flush(t)
		require.Equal(t, "persistent-handle: 0x81000001\naction: evicted\n",
			tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "0x81000001"))
		require.Empty(t, tt.run(t, "tpm2_getcap", "handles-persistent"))
		tt.requireNoTransient(t)
	})

	t.Run("CreateEK", func(t *testing.T) {
		// The EK comes from the endorsement primary seed: same key each time.
		tt.run(t, "tpm2_createek", "-c", "ek1.ctx", "-G", "rsa", "-u", "ek1.pub")
		tt.flush(t)
		tt.run(t, "tpm2_createek", "-c", "ek2.ctx", "-G", "rsa", "-u", "ek2.pub")
		tt.flush(t)
		require.Equal(t, tt.read(t, "ek1.pub"), tt.read(t, "ek2.pub"))
		tt.run(t, "tpm2_createek", "-c", "ekecc.ctx", "-G", "ecc", "-u", "ekecc.pub")
		tt.flush(t)
		require.NotEqual(t, tt.read(t, "ek1.pub"), tt.read(t, "ekecc.pub"))
		// Persisted at the usual handle.
		tt.run(t, "tpm2_createek", "-c", "0x81010001", "-G", "rsa", "-u", "ek3.pub")
		require.Equal(t, tt.read(t, "ek1.pub"), tt.read(t, "ek3.pub"))
		require.Equal(t, "- 0x81010001\n", tt.run(t, "tpm2_getcap", "handles-persistent"))
		tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "0x81010001")
		require.Empty(t, tt.run(t, "tpm2_getcap", "handles-persistent"))
		tt.requireNoTransient(t)
	})

	t.Run("SelfTest", func(t *testing.T) {
		require.Empty(t, tt.run(t, "tpm2_selftest", "-f"))
		require.Empty(t, tt.run(t, "tpm2_selftest"))
		require.Equal(t, "status:   success\n", tt.run(t, "tpm2_gettestresult"))
	})

	t.Run("Clear", func(t *testing.T) {
		const index = "0x1500020"
		tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "before.ctx", "-Q")
		tt.run(t, "tpm2_readpublic", "-c", "before.ctx", "-o", "owner-before.pub", "-Q")
		tt.run(t, "tpm2_evictcontrol", "-C", "o", "-c", "before.ctx", "0x81000002")
		tt.flush(t)
		tt.run(t, "tpm2_createek", "-c", "ek-before.ctx", "-G", "ecc", "-u", "ek-before.pub")
		tt.flush(t)
		tt.run(t, "tpm2_nvdefine", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", index)
		require.Equal(t, "- 0x81000002\n", tt.run(t, "tpm2_getcap", "handles-persistent"))
		require.Equal(t, "- "+index+"\n", tt.run(t, "tpm2_getcap", "handles-nv-index"))

		require.Empty(t, tt.run(t, "tpm2_clear"))

		// Owner objects and indices are gone, the storage seed changed, the
		// endorsement seed did not.
		require.Empty(t, tt.run(t, "tpm2_getcap", "handles-persistent"))
		require.Empty(t, tt.run(t, "tpm2_getcap", "handles-nv-index"))
		tt.run(t, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "after.ctx", "-Q")
		tt.run(t, "tpm2_readpublic", "-c", "after.ctx", "-o", "owner-after.pub", "-Q")
		tt.flush(t)
		require.NotEqual(t, tt.read(t, "owner-before.pub"), tt.read(t, "owner-after.pub"))
		tt.run(t, "tpm2_createek", "-c", "ek-after.ctx", "-G", "ecc", "-u", "ek-after.pub")
		tt.flush(t)
		require.Equal(t, tt.read(t, "ek-before.pub"), tt.read(t, "ek-after.pub"))
		tt.requireNoTransient(t)
	})
}
