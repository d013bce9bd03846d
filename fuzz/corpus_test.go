package fuzz

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// The hand-written seeds live in testdata/fuzz/<target>/<name>, in the
// format go test reads. They are generated from the table below so that
// they stay reviewable; regenerate them after changing it with
//
//	go test ./fuzz -run TestSeedCorpus -update-corpus
//
// Seeds taken from the captures, and the ones too large to commit, are
// added with f.Add by each target instead.
var updateCorpus = flag.Bool("update-corpus", false, "rewrite the hand-written seed files under testdata/fuzz")

// seed is one named corpus entry: the values of the target's arguments.
type seed struct {
	name   string
	values []any
}

// handSeeds returns the hand-written seeds of every target.
func handSeeds() map[string][]seed {
	return map[string][]seed{
		"FuzzDecodeRequest":   requestEdgeSeeds(),
		"FuzzDecodeReply":     replyEdgeSeeds(),
		"FuzzReadDataCommand": dataEdgeSeeds(),
		"FuzzStateBlob":       blobEdgeSeeds(),
		"FuzzParseImage":      imageEdgeSeeds(),
		"FuzzOptions":         optionsEdgeSeeds(),
		"FuzzServer":          serverEdgeSeeds(),
		"FuzzSealedEnvelope":  sealingEdgeSeeds(),
		"FuzzParseRecord":     recordEdgeSeeds(),
		"FuzzReadFileRecord":  stateFileEdgeSeeds(),
		"FuzzApplyDelta":      deltaEdgeSeeds(),
	}
}

// corpusFile encodes values as a go test fuzz v1 file.
func corpusFile(values []any) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, v := range values {
		switch v := v.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%s)\n", strconv.Quote(string(v)))
		case string:
			fmt.Fprintf(&b, "string(%s)\n", strconv.Quote(v))
		case uint32:
			fmt.Fprintf(&b, "uint32(%d)\n", v)
		default:
			return nil, fmt.Errorf("corpus value of type %T", v)
		}
	}
	return b.Bytes(), nil
}

// TestSeedCorpus checks that testdata/fuzz holds exactly the hand-written
// seeds (crashers kept as regression inputs are left alone: their names
// are not in the table and do not start with "seed-").
func TestSeedCorpus(t *testing.T) {
	for target, seeds := range handSeeds() {
		dir := filepath.Join("testdata", "fuzz", target)
		want := map[string][]byte{}
		for _, s := range seeds {
			name := "seed-" + s.name
			if _, dup := want[name]; dup {
				t.Fatalf("%s: seed %s twice", target, name)
			}
			b, err := corpusFile(s.values)
			if err != nil {
				t.Fatalf("%s/%s: %v", target, name, err)
			}
			want[name] = b
		}
		if *updateCorpus {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			old, _ := filepath.Glob(filepath.Join(dir, "seed-*"))
			for _, p := range old {
				if _, keep := want[filepath.Base(p)]; !keep {
					if err := os.Remove(p); err != nil {
						t.Fatal(err)
					}
				}
			}
			for name, b := range want {
				if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			continue
		}
		names := make([]string, 0, len(want))
		for name := range want {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			got, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil || !bytes.Equal(got, want[name]) {
				t.Errorf("%s/%s is missing or stale; run go test ./fuzz -run TestSeedCorpus -update-corpus", target, name)
			}
		}
		files, _ := filepath.Glob(filepath.Join(dir, "seed-*"))
		for _, p := range files {
			if _, ok := want[filepath.Base(p)]; !ok {
				t.Errorf("%s is not in the seed table; run go test ./fuzz -run TestSeedCorpus -update-corpus", p)
			}
		}
	}
}

// hexBytes decodes hex written with optional spaces, for readable seeds.
func hexBytes(s string) []byte {
	s = strings.ReplaceAll(s, " ", "")
	b := make([]byte, len(s)/2)
	for i := range b {
		v, err := strconv.ParseUint(s[2*i:2*i+2], 16, 8)
		if err != nil {
			panic(fmt.Sprintf("bad hex seed %q: %v", s, err))
		}
		b[i] = byte(v)
	}
	if len(s)%2 != 0 {
		panic(fmt.Sprintf("odd hex seed %q", s))
	}
	return b
}
