package sealing

import (
	"bytes"
	"context"
	"crypto/pbkdf2"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testKey(t *testing.T, vmID string) *Key {
	t.Helper()
	k, err := (&HostKey{Path: filepath.Join(t.TempDir(), "host.key")}).StateKey(context.Background(), vmID)
	require.NoError(t, err)
	return k
}

func TestSealOpen(t *testing.T) {
	key := testKey(t, "vm1")
	plain := []byte("TPM state image")
	sealed, err := Seal(key, "vm1", KindTPMState, 7, plain)
	require.NoError(t, err)
	assert.False(t, bytes.Contains(sealed, plain), "no plaintext in the envelope")
	got, err := Open(key, "vm1", KindTPMState, 7, sealed)
	require.NoError(t, err)
	assert.Equal(t, plain, got)

	again, err := Seal(key, "vm1", KindTPMState, 7, plain)
	require.NoError(t, err)
	assert.NotEqual(t, sealed, again, "a fresh nonce on every write")

	_, err = Open(key, "vm2", KindTPMState, 7, sealed)
	assert.ErrorIs(t, err, ErrAuth, "another VM")
	_, err = Open(key, "vm1", KindTPMState, 6, sealed)
	assert.ErrorIs(t, err, ErrAuth, "another generation")
	_, err = Open(key, "vm1", Kind(2), 7, sealed)
	assert.ErrorIs(t, err, ErrAuth, "another kind")
	other := testKey(t, "vm1")
	_, err = Open(other, "vm1", KindTPMState, 7, sealed)
	assert.ErrorIs(t, err, ErrWrongKey, "another host's key")
	for i := range sealed {
		flipped := append([]byte(nil), sealed...)
		flipped[i] ^= 0x40
		_, err := Open(key, "vm1", KindTPMState, 7, flipped)
		assert.Error(t, err, "byte %d altered", i)
	}
	_, err = Open(key, "vm1", KindTPMState, 7, sealed[:20])
	assert.ErrorIs(t, err, ErrMalformed)

	bare := &Key{ID: key.ID} // not made by NewKey: an error, not a panic
	_, err = Seal(bare, "vm1", KindTPMState, 8, plain)
	assert.Error(t, err)
	_, err = Open(bare, "vm1", KindTPMState, 7, sealed)
	assert.Error(t, err)
}

func TestHostKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "host.key")
	h := &HostKey{Path: path}
	k1, err := h.StateKey(context.Background(), "vm1")
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	k1again, err := h.StateKey(context.Background(), "vm1")
	require.NoError(t, err)
	assert.Equal(t, k1.secret, k1again.secret, "the same key from the same host key")
	k2, err := h.StateKey(context.Background(), "vm2")
	require.NoError(t, err)
	assert.NotEqual(t, k1.secret, k2.secret, "each VM its own key")
	assert.Equal(t, k1.ID, k2.ID, "the id names the host key")

	require.NoError(t, os.Chmod(path, 0o644))
	_, err = h.StateKey(context.Background(), "vm1")
	assert.ErrorContains(t, err, "mode 0644")
	require.NoError(t, os.Chmod(path, 0o600))
	require.NoError(t, os.WriteFile(path, []byte("short"), 0o600))
	_, err = h.StateKey(context.Background(), "vm1")
	assert.ErrorContains(t, err, "has 5 bytes")
}

func TestKeysStayOutOfLogs(t *testing.T) {
	key := testKey(t, "vm1")
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "key", key)
	text := buf.String() + fmt.Sprintf("%v %+v %#v %s", key, key, key, key)
	assert.NotContains(t, text, hex.EncodeToString(key.secret))
	assert.NotContains(t, text, string(key.secret))
	sk := &SwtpmKey{Raw: bytes.Repeat([]byte{0xab}, 16)}
	assert.NotContains(t, fmt.Sprintf("%v %+v %#v %s", sk, sk, sk, sk), "abab")
}

func TestParseSwtpmKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
		return p
	}
	hexKey := "000102030405060708090a0b0c0d0e0f"
	k, err := ParseSwtpmKey("--key", "file="+write("k", "0x"+hexKey+"\n"))
	require.NoError(t, err)
	assert.Equal(t, hexKey, hex.EncodeToString(k.Raw))
	assert.False(t, k.CBC256)

	k, err = ParseSwtpmKey("--key", "file="+write("kb", string(bytes.Repeat([]byte{7}, 32)))+",format=binary,mode=aes-256-cbc,remove=true")
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{7}, 32), k.Raw)
	_, err = os.Stat(filepath.Join(dir, "kb"))
	assert.ErrorIs(t, err, os.ErrNotExist, "remove=true")

	// swtpm: PBKDF2-HMAC-SHA512, salt "swtpm", 1000 iterations, the raw
	// passphrase (newline included); or the first bytes of SHA-512.
	k, err = ParseSwtpmKey("--key", "pwdfile="+write("p", "secret\n")+",mode=aes-256-cbc")
	require.NoError(t, err)
	want, err := pbkdf2.Key(sha512.New, "secret\n", []byte("swtpm"), 1000, 32)
	require.NoError(t, err)
	assert.Equal(t, want, k.Raw)
	k, err = ParseSwtpmKey("--key", "pwdfile="+write("p2", "secret")+",kdf=sha512")
	require.NoError(t, err)
	sum := sha512.Sum512([]byte("secret"))
	assert.Equal(t, sum[:16], k.Raw)

	r, w, err := os.Pipe()
	require.NoError(t, err)
	_, err = w.WriteString("from a pipe")
	require.NoError(t, err)
	w.Close()
	k, err = ParseSwtpmKey("--key", fmt.Sprintf("pwdfd=%d,mode=aes-256-cbc", r.Fd()))
	require.NoError(t, err)
	want, err = pbkdf2.Key(sha512.New, "from a pipe", []byte("swtpm"), 1000, 32)
	require.NoError(t, err)
	assert.Equal(t, want, k.Raw)

	for _, bad := range []struct{ value, want string }{
		{"file=" + write("short", "0011"), "the key has 2 bytes"},
		{"file=" + write("nothex", "zz"), "not a hex string"},
		{"file=/nonexistent", "no such file"},
		{"mode=aes-256-cbc", "give exactly one of"},
		{"file=a,pwdfile=b", "give exactly one of"},
		{"pwdfile=" + write("p3", "x") + ",format=hex", "format= is for"},
		{"file=" + write("k3", hexKey) + ",kdf=sha512", "kdf= is for"},
		{"file=" + write("k4", hexKey) + ",mode=aes-192-cbc", `mode="aes-192-cbc" is not one of`},
		{"bogus=1", "unknown sub-option"},
	} {
		_, err := ParseSwtpmKey("--key", bad.value)
		assert.ErrorContains(t, err, bad.want, bad.value)
	}
}

// Many processes starting at once (vtpmd serve's workers, several daemons)
// agree on one host key; none sees a partial one.
func TestHostKeyConcurrentCreate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "host.key")
	keys := make([]*Key, 32)
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	for i := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			keys[i], errs[i] = (&HostKey{Path: path}).StateKey(context.Background(), "vm1")
		}()
	}
	wg.Wait()
	for i := range keys {
		require.NoError(t, errs[i])
		assert.Equal(t, keys[0].secret, keys[i].secret)
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary files left")
}
