package fuzz

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// parserPrefixes are the name prefixes of the entry points that take bytes
// or strings from outside: every exported function or method so named must
// be called by a fuzz target. A name matches when it is the prefix or the
// prefix followed by an upper-case letter or a digit (ReadDataCommand, not
// Readiness).
var parserPrefixes = []string{"Decode", "Parse", "Unwrap", "Read", "Unmarshal"}

// knownParsers must be found by the scan; they keep it from passing
// because it found nothing.
var knownParsers = []string{
	"github.com/vtpmd/vtpmd/transport.DecodeRequest",
	"github.com/vtpmd/vtpmd/transport.DecodeReply",
	"github.com/vtpmd/vtpmd/transport.ReadDataCommand",
	"github.com/vtpmd/vtpmd/transport.UnwrapStateBlob",
	"github.com/vtpmd/vtpmd/vtpm.ParseImage",
	"github.com/vtpmd/vtpmd/internal/options.Parse",
	"github.com/vtpmd/vtpmd/state.ParseVM",
	"github.com/vtpmd/vtpmd/internal/workerproto.DecodeMessage",
	"github.com/vtpmd/vtpmd/internal/workerproto.ReadMessage",
}

func isParserName(name string) bool {
	for _, p := range parserPrefixes {
		if rest, ok := strings.CutPrefix(name, p); ok {
			if rest == "" {
				return true
			}
			r := []rune(rest)[0]
			if unicode.IsUpper(r) || unicode.IsDigit(r) {
				return true
			}
		}
	}
	return false
}

// entryPoint is an exported parser function, or a method ("Type.Name").
type entryPoint struct {
	pkg    string // import path
	name   string // Name or Type.Name
	method string // the method name, for methods
	pos    string
}

func (e entryPoint) String() string { return e.pkg + "." + e.name }

// TestEveryParserHasATarget scans the module's non-test sources for parser
// entry points and fails for each one that no fuzz target calls: a function
// must appear as pkg.Name in a fuzz/*_test.go file, a method as .Name in a
// fuzz test file that imports its package. Packages fuzz/ cannot import
// (main packages, other trees' internal packages) are listed and skipped.
func TestEveryParserHasATarget(t *testing.T) {
	root, module := moduleRoot(t)
	entries, skipped := scanParsers(t, root, module)
	for _, s := range skipped {
		t.Logf("not importable from fuzz/, not checked: %s", s)
	}
	found := map[string]bool{}
	for _, e := range entries {
		found[e.String()] = true
	}
	for _, k := range knownParsers {
		if !found[k] {
			t.Errorf("the scan did not find %s: is the scan broken, or was it renamed?", k)
		}
	}

	funcs, methods := fuzzReferences(t)
	for _, e := range entries {
		var ok bool
		if e.method != "" {
			ok = methods[e.pkg+"."+e.method]
		} else {
			ok = funcs[e.String()]
		}
		if !ok {
			t.Errorf("%s (%s) has no fuzz target: add one in fuzz/ that calls it", e, e.pos)
		}
	}
}

func moduleRoot(t *testing.T) (dir, module string) {
	t.Helper()
	dir, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if m, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			if uq, err := strconv.Unquote(strings.TrimSpace(m)); err == nil {
				return dir, uq
			}
			return dir, strings.TrimSpace(m)
		}
	}
	t.Fatal("no module line in go.mod")
	return "", ""
}

// importableFromFuzz applies Go's internal-package rule to fuzz/.
func importableFromFuzz(pkg, module string) bool {
	fuzzPkg := module + "/fuzz"
	for p := pkg; p != "." && p != "/" && p != ""; p = path.Dir(p) {
		if path.Base(p) == "internal" && !strings.HasPrefix(fuzzPkg+"/", path.Dir(p)+"/") {
			return false
		}
	}
	return true
}

func scanParsers(t *testing.T, root, module string) (entries []entryPoint, skipped []string) {
	t.Helper()
	fset := token.NewFileSet()
	skippedPkgs := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			base := d.Name()
			if rel != "." && (strings.HasPrefix(base, ".") || strings.HasPrefix(base, "_") || base == "testdata" || base == "vendor") {
				return filepath.SkipDir
			}
			if rel == "fuzz" {
				return filepath.SkipDir
			}
			if rel != "." {
				if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
					return filepath.SkipDir // another module
				}
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		pkg := module
		if dir := filepath.ToSlash(filepath.Dir(rel)); dir != "." {
			pkg = module + "/" + dir
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || !fn.Name.IsExported() || !isParserName(fn.Name.Name) {
				continue
			}
			e := entryPoint{pkg: pkg, name: fn.Name.Name, pos: fset.Position(fn.Pos()).String()}
			if fn.Recv != nil {
				recv := receiverType(fn.Recv)
				if recv == "" || !ast.IsExported(recv) {
					continue
				}
				e.name, e.method = recv+"."+fn.Name.Name, fn.Name.Name
			}
			if f.Name.Name == "main" || !importableFromFuzz(pkg, module) {
				if !skippedPkgs[e.String()] {
					skippedPkgs[e.String()] = true
					skipped = append(skipped, e.String())
				}
				continue
			}
			entries = append(entries, e)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].String() < entries[j].String() })
	sort.Strings(skipped)
	return entries, skipped
}

func receiverType(fl *ast.FieldList) string {
	if len(fl.List) == 0 {
		return ""
	}
	typ := fl.List[0].Type
	for {
		switch x := typ.(type) {
		case *ast.StarExpr:
			typ = x.X
		case *ast.IndexExpr:
			typ = x.X
		case *ast.IndexListExpr:
			typ = x.X
		case *ast.Ident:
			return x.Name
		default:
			return ""
		}
	}
}

// fuzzReferences collects what the fuzz test files call: "importpath.Name"
// for package-qualified identifiers, and "importpath.Method" for every
// selector name in a file that imports the package.
func fuzzReferences(t *testing.T) (funcs, methods map[string]bool) {
	t.Helper()
	funcs, methods = map[string]bool{}, map[string]bool{}
	paths, err := filepath.Glob("*_test.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, p := range paths {
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		imports := map[string]string{} // local name -> import path
		for _, imp := range f.Imports {
			ip, _ := strconv.Unquote(imp.Path.Value)
			name := path.Base(ip)
			if imp.Name != nil {
				name = imp.Name.Name
			}
			imports[name] = ip
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if id, ok := sel.X.(*ast.Ident); ok {
				if ip, ok := imports[id.Name]; ok {
					funcs[ip+"."+sel.Sel.Name] = true
				}
			}
			for _, ip := range imports {
				methods[ip+"."+sel.Sel.Name] = true
			}
			return true
		})
	}
	return funcs, methods
}

func TestParserNames(t *testing.T) {
	for name, want := range map[string]bool{
		"Parse": true, "ParseImage": true, "ReadDataCommand": true, "Decode2": true,
		"Readiness": false, "Parser": false, "Load": false, "UnwrapStateBlob": true, "UnmarshalBinary": true,
	} {
		if got := isParserName(name); got != want {
			t.Errorf("isParserName(%q) = %v", name, got)
		}
	}
	for pkg, want := range map[string]bool{
		"github.com/vtpmd/vtpmd/internal/options":       true,
		"github.com/vtpmd/vtpmd/bench/internal/client":  false,
		"github.com/vtpmd/vtpmd/transport":              true,
		"github.com/vtpmd/vtpmd/fuzz/internal/whatever": true,
	} {
		if got := importableFromFuzz(pkg, "github.com/vtpmd/vtpmd"); got != want {
			t.Errorf("importableFromFuzz(%q) = %v", pkg, got)
		}
	}
}
