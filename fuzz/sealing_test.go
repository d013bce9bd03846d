package fuzz

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vtpmd/vtpmd/sealing"
)

// fuzzKey is a fixed state key, so that sealed seeds open in every run.
func fuzzKey(tb testing.TB) *sealing.Key {
	k, err := sealing.NewKey("fuzz:0123456789abcdef", bytes.Repeat([]byte{0x5a}, 32))
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

const (
	fuzzVM  = "vm-fuzz"
	fuzzGen = 42
)

// FuzzSealedEnvelope: sealing.Parse never panics, fails only with
// ErrMalformed, and reads back the header Seal wrote; Open never accepts an
// envelope that is not one of the key's own for this VM, kind and
// generation; any bytes sealed open again.
func FuzzSealedEnvelope(f *testing.F) {
	key := fuzzKey(f)
	for _, plain := range [][]byte{nil, []byte("TPM state image"), bytes.Repeat([]byte{1}, 4096)} {
		sealed, err := sealing.Seal(key, fuzzVM, sealing.KindTPMState, fuzzGen, plain)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(sealed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		env, err := sealing.Parse(b)
		if err != nil {
			if env != nil || !errors.Is(err, sealing.ErrMalformed) {
				t.Fatalf("Parse: %v (envelope %v)", err, env != nil)
			}
		}
		plain, err := sealing.Open(key, fuzzVM, sealing.KindTPMState, fuzzGen, b)
		if err == nil {
			// Only an authentic envelope opens: its header says so.
			if env == nil || env.KeyID != key.ID || env.Kind != sealing.KindTPMState || env.Generation != fuzzGen {
				t.Fatalf("Open accepted %x, header %+v", head(b), env)
			}
		} else if !errors.Is(err, sealing.ErrMalformed) && !errors.Is(err, sealing.ErrWrongKey) && !errors.Is(err, sealing.ErrAuth) {
			t.Fatalf("Open: unexpected error %v", err)
		}
		// The input as a plaintext: sealed for a generation it may name.
		gen := uint64(len(b))
		sealed, err := sealing.Seal(key, fuzzVM, sealing.KindTPMState, gen, b)
		if err != nil {
			t.Fatal(err)
		}
		env, err = sealing.Parse(sealed)
		if err != nil || env.KeyID != key.ID || env.Kind != sealing.KindTPMState || env.Generation != gen {
			t.Fatalf("Parse(Seal()): %+v, %v", env, err)
		}
		got, err := sealing.Open(key, fuzzVM, sealing.KindTPMState, gen, sealed)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("Open(Seal(%x)) = %x, %v", head(b), head(got), err)
		}
		if plain != nil && !bytes.Equal(plain, got) && bytes.Equal(b, sealed) {
			t.Fatal("the same envelope opened to two plaintexts")
		}
	})
}

func sealingEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{[]byte{}}},
		{"magic-only", []any{[]byte("VTSE")}},
		{"header-no-body", []any{append(hexBytes("56545345 01 01 00 000000000000002a"), make([]byte, 12)...)}},
		{"key-id-255", []any{append(append(hexBytes("56545345 01 01 ff"), make([]byte, 255)...), make([]byte, 8+12+16)...)}},
		{"version-2", []any{append(hexBytes("56545345 02 01 00 000000000000002a"), make([]byte, 12+16)...)}},
	}
}

// FuzzSwtpmKey: sealing.ParseSwtpmKey never panics on a --key value, and
// the key it gives has the length its mode says. The files and descriptors
// the value names are replaced by a temporary file and a pipe that hold
// material, so that the fuzzer reads and removes nothing else.
func FuzzSwtpmKey(f *testing.F) {
	hexKey := []byte("0x000102030405060708090a0b0c0d0e0f\n")
	for _, s := range []struct {
		value    string
		material []byte
	}{
		{"file=KEY,format=hex", hexKey},
		{"file=KEY,format=hex,mode=aes-cbc,remove=true", hexKey},
		{"file=KEY,format=binary,mode=aes-256-cbc", bytes.Repeat([]byte{7}, 32)},
		{"fd=3,mode=aes-128-cbc", hexKey},
		{"pwdfile=PWD", []byte("secret passphrase")},
		{"pwdfd=4,kdf=sha512,mode=aes-256-cbc", []byte("secret passphrase")},
		{"pwdfile=PWD,kdf=pbkdf2", []byte{}},
	} {
		f.Add(s.value, s.material)
	}
	f.Fuzz(func(t *testing.T, value string, material []byte) {
		dir := t.TempDir()
		var rewritten []string
		var pipes []*keyPipe
		defer func() {
			for _, p := range pipes {
				p.close()
			}
		}()
		for i, part := range strings.Split(value, ",") {
			name, v, hasValue := strings.Cut(part, "=")
			switch {
			case hasValue && v == "":
			case name == "file" || name == "pwdfile":
				// Bare, the name reads as the path "true": replaced too.
				path := filepath.Join(dir, "key"+strconv.Itoa(i))
				if err := os.WriteFile(path, material, 0o600); err != nil {
					t.Fatal(err)
				}
				part = name + "=" + path
			case !hasValue:
			case name == "fd" || name == "pwdfd":
				// Only a number is read as a descriptor.
				if n, err := strconv.Atoi(v); err == nil && n >= 0 {
					p := newKeyPipe(t, material)
					pipes = append(pipes, p)
					part = name + "=" + strconv.Itoa(p.fd)
				}
			}
			rewritten = append(rewritten, part)
		}
		key, err := sealing.ParseSwtpmKey("--key", strings.Join(rewritten, ","))
		if err != nil {
			if key != nil {
				t.Fatalf("key and error %v", err)
			}
			if !strings.HasPrefix(err.Error(), "--key") {
				t.Fatalf("error %q does not name the option", err)
			}
			return
		}
		if want := map[bool]int{false: 16, true: 32}[key.CBC256]; len(key.Raw) != want {
			t.Fatalf("%d-byte key for CBC256=%v", len(key.Raw), key.CBC256)
		}
	})
}

// keyPipe is a pipe whose read end, a descriptor of its own, ParseSwtpmKey
// reads and closes.
type keyPipe struct {
	fd  int
	ino uint64
}

func newKeyPipe(t *testing.T, material []byte) *keyPipe {
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	// The key material is at most 4 KiB and fits the pipe; more is cut.
	if len(material) > 0 {
		_, _ = syscall.Write(p[1], material[:min(len(material), 4097)])
	}
	syscall.Close(p[1])
	if err := syscall.SetNonblock(p[0], false); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(p[0], &st); err != nil {
		t.Fatal(err)
	}
	return &keyPipe{fd: p[0], ino: st.Ino}
}

// close closes the read end unless ParseSwtpmKey did (its number may be in
// use again by then: only a descriptor that is still this pipe is closed).
func (p *keyPipe) close() {
	var st syscall.Stat_t
	if syscall.Fstat(p.fd, &st) == nil && st.Ino == p.ino && st.Mode&syscall.S_IFMT == syscall.S_IFIFO {
		syscall.Close(p.fd)
	}
}
