package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/transport"
)

// passphrasePipe returns the read end of a pipe holding passphrase, as
// libvirt passes --key pwdfd= and --migration-key pwdfd=.
func passphrasePipe(t *testing.T, passphrase string) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	_, err = w.WriteString(passphrase)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	return r
}

// startKeyed starts a daemon the way libvirt does with an encryption
// secret: the passphrase for both keys through pipes (descriptors 3 and 4).
func startKeyed(t *testing.T, dir, name, stateSecret, migrationSecret string) (ctrl, data string, d *daemon) {
	t.Helper()
	ctrl, data = filepath.Join(dir, name+".ctrl"), filepath.Join(dir, name+".data")
	d = startDaemonFiles(t, []string{"socket", "--tpm2", "--tpmstate", "dir=" + filepath.Join(dir, name),
		"--ctrl", "type=unixio,path=" + ctrl, "--server", "type=unixio,path=" + data, "--flags", "not-need-init,startup-clear",
		"--key", "pwdfd=3,mode=aes-256-cbc", "--migration-key", "pwdfd=4,mode=aes-256-cbc"},
		[]*os.File{passphrasePipe(t, stateSecret), passphrasePipe(t, migrationSecret)}, ctrl, data)
	return ctrl, data, d
}

// libvirt's <encryption secret=...>: --key and --migration-key from pipes.
// The state is sealed under the key; blobs leave encrypted with the
// migration key and open only where the same key is set.
func TestLibvirtEncryptionKeys(t *testing.T) {
	dir := sockDir(t)
	srcCtrl, srcData, src := startKeyed(t, dir, "src", "secret", "secret")
	config := ctrlRequest(t, srcCtrl, transport.GetConfigRequest{}).(transport.GetConfigReply)
	assert.Equal(t, transport.ConfigFlagFileKey|transport.ConfigFlagMigrationKey, config.Flags)

	marker := bytes.Repeat([]byte("vtpmd-marker!"), 2)
	dialTPM := func(path string) connTPM {
		c, err := net.Dial("unix", path)
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		return connTPM{c}
	}
	const index = tpm2.TPMHandle(0x01500030)
	src0 := dialTPM(srcData)
	_, err := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
		NVIndex: index, NameAlg: tpm2.TPMAlgSHA256, DataSize: uint16(len(marker)),
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
	})}.Execute(src0)
	require.NoError(t, err)
	_, err = tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(index), Data: tpm2.TPM2BMaxNVBuffer{Buffer: marker}}.Execute(src0)
	require.NoError(t, err)

	var blobs [][]byte
	for _, typ := range []uint32{1, 2} {
		r := ctrlRequest(t, srcCtrl, transport.GetStateBlobRequest{Flags: 1, Type: typ}).(transport.GetStateBlobReply)
		require.Equal(t, transport.ResultSuccess, r.Result)
		assert.Equal(t, []byte{0x00, 0x16}, r.Data[4:6], "blob flags: migration data, encrypted with a 256-bit migration key")
		assert.False(t, bytes.Contains(r.Data, marker), "no plaintext in the blob")
		blobs = append(blobs, r.Data)
	}
	assert.Empty(t, scanFor(t, filepath.Join(dir, "src"), marker))

	setBlobs := func(ctrl string) []transport.Result {
		t.Helper()
		require.Equal(t, transport.ResultSuccess, resultOf(t, ctrl, transport.StopRequest{}))
		var results []transport.Result
		for i, blob := range blobs {
			results = append(results, resultOf(t, ctrl, transport.SetStateBlobRequest{Type: uint32(i + 1), Length: uint32(len(blob)), Data: blob}))
		}
		return results
	}
	// A destination with another migration key refuses the blobs.
	otherCtrl, _, _ := startKeyed(t, dir, "other", "secret", "another secret")
	assert.Equal(t, []transport.Result{transport.ResultDecryptError, transport.ResultDecryptError}, setBlobs(otherCtrl))

	dstCtrl, dstData, _ := startKeyed(t, dir, "dst", "secret", "secret")
	assert.Equal(t, []transport.Result{transport.ResultSuccess, transport.ResultSuccess}, setBlobs(dstCtrl))
	require.Equal(t, transport.ResultSuccess, resultOf(t, dstCtrl, transport.InitRequest{Flags: transport.InitFlagDeleteVolatile}))
	got, err := tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(index), Size: uint16(len(marker))}.Execute(dialTPM(dstData))
	require.NoError(t, err)
	assert.Equal(t, marker, got.Data.Buffer, "the NV index on the destination")

	// The source's state opens only with its --key.
	ioctlOK(t, srcCtrl, "-s")
	src.waitExit(t, 5*time.Second)
	out, code := runDaemonCmdEnv(t, os.Environ(), "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "src"),
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "x.ctrl"), "--flags", "not-need-init",
		"--key", "pwdfile="+writeTemp(t, "wrong secret")+",mode=aes-256-cbc")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, out, "sealed with another key")
}

func writeTemp(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}
