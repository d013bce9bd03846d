package fuzz

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/options"
)

// FuzzOptions: options.Parse never panics on a sub-option string and a list
// of allowed names (comma-separated here); what it accepts holds each
// given name with its value, and Bool, Int, Mode and OneOf read the values
// as swtpm does.
func FuzzOptions(f *testing.F) {
	const endpoint = "type,path,mode,uid,gid,port,bindaddr,ifname,fd,clientfd,terminate,disconnect"
	for _, s := range []struct{ option, value, allowed string }{
		{"--ctrl", "type=unixio,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock,mode=0600,terminate", endpoint},
		{"--ctrl", "type=tcp,port=2322,bindaddr=127.0.0.1", endpoint},
		{"--ctrl", "type=unixio,clientfd=5", endpoint},
		{"--server", "type=tcp,port=2321,disconnect", endpoint},
		{"--server", "type=unixio,path=/tmp/vtpm.sock,mode=0770,uid=0,gid=0", endpoint},
		{"--server", "port=2321,ifname=eth0,bindaddr=fe80::1", endpoint},
		{"--tpmstate", "dir=/var/lib/libvirt/swtpm/uuid/tpm2,mode=0600", "dir,backend-uri,mode,lock,fsync"},
		{"--tpmstate", "backend-uri=dir:///var/lib/swtpm,lock=TRUE,fsync=0", "dir,backend-uri,mode,lock,fsync"},
		{"--log", "file=/var/log/swtpm/libvirt/qemu/vm-swtpm.log,level=20,prefix=vtpm,truncate", "file,fd,level,prefix,truncate"},
		{"--pid", "file=/run/libvirt/qemu/swtpm/1-vm-swtpm.pid", "file,fd"},
		{"--flags", "not-need-init,startup-clear,disable-auto-shutdown", "not-need-init,startup-clear,startup-state,startup-none,startup-deactivated,disable-auto-shutdown"},
		{"--locality", "reject-locality-4", "reject-locality-4,allow-set-locality"},
		{"--ctrl", "mode=0999,port=-1,fd=+3,terminate=yes", endpoint},
	} {
		f.Add(s.option, s.value, s.allowed)
	}
	f.Fuzz(checkOptions)
}

func checkOptions(t *testing.T, option, s, allowedList string) {
	allowed := strings.Split(allowedList, ",")
	v, err := options.Parse(option, s, allowed...)
	if err != nil {
		if !strings.HasPrefix(err.Error(), option+": ") {
			t.Fatalf("error %q does not name the option %q", err, option)
		}
		return
	}
	given := map[string]string{}
	for _, part := range strings.Split(s, ",") {
		name, value, hasValue := strings.Cut(part, "=")
		if !hasValue {
			value = "true"
		}
		if name == "" || !slices.Contains(allowed, name) {
			t.Fatalf("%q accepted with sub-option %q", s, part)
		}
		if _, dup := given[name]; dup {
			t.Fatalf("%q accepted with %q twice", s, name)
		}
		given[name] = value
	}
	for _, name := range append(allowed, "absent\x00name") {
		value, ok := given[name]
		if v.Has(name) != ok || v.String(name) != value {
			t.Fatalf("%q: %q is %v/%q, want %v/%q", s, name, v.Has(name), v.String(name), ok, value)
		}
		wantBool := strings.EqualFold(value, "true") || value == "1"
		for _, def := range []bool{false, true} {
			if got := v.Bool(name, def); ok && got != wantBool || !ok && got != def {
				t.Fatalf("%q: Bool(%q, %v) = %v", s, name, def, got)
			}
		}
		n, err := v.Int(name, 7)
		switch {
		case !ok && (err != nil || n != 7):
			t.Fatalf("%q: absent Int(%q) = %d, %v", s, name, n, err)
		case ok && err == nil:
			if m, aerr := strconv.Atoi(value); aerr != nil || m != n || n < 0 {
				t.Fatalf("%q: Int(%q) = %d for %q", s, name, n, value)
			}
		case ok && !strings.HasPrefix(err.Error(), option+": "):
			t.Fatalf("Int error %q does not name the option %q", err, option)
		}
		mode, err := v.Mode(name, 0o640)
		switch {
		case !ok && (err != nil || mode != 0o640):
			t.Fatalf("%q: absent Mode(%q) = %o, %v", s, name, mode, err)
		case ok && err == nil:
			if m, perr := strconv.ParseUint(value, 8, 32); perr != nil || os.FileMode(m) != mode || mode > 0o777 {
				t.Fatalf("%q: Mode(%q) = %o for %q", s, name, mode, value)
			}
		case ok && !strings.HasPrefix(err.Error(), option+": "):
			t.Fatalf("Mode error %q does not name the option %q", err, option)
		}
		choice, err := v.OneOf(name, "default", allowed...)
		switch {
		case !ok && (err != nil || choice != "default"):
			t.Fatalf("%q: absent OneOf(%q) = %q, %v", s, name, choice, err)
		case ok && (err == nil) != slices.Contains(allowed, value):
			t.Fatalf("%q: OneOf(%q) = %q, %v", s, name, choice, err)
		}
	}
}

func optionsEdgeSeeds() []seed {
	return []seed{
		{"empty", []any{"--ctrl", "", "type,path"}},
		{"comma-only", []any{"--ctrl", ",", "type,path"}},
		{"empty-name", []any{"--ctrl", "=x", "type,path,"}},
		{"empty-value", []any{"--ctrl", "path=", "type,path"}},
		{"equals-in-value", []any{"--ctrl", "path=a=b,type", "type,path"}},
		{"repeated", []any{"--ctrl", "type=unixio,type=tcp", "type,path"}},
		{"mode-too-large", []any{"--ctrl", "mode=1000", "mode"}},
		{"mode-huge", []any{"--ctrl", "mode=77777777777777777777777", "mode"}},
		{"int-huge", []any{"--ctrl", "port=99999999999999999999", "port"}},
		{"int-negative", []any{"--ctrl", "port=-1", "port"}},
		{"bool-one", []any{"--tpmstate", "lock=1,fsync=TrUe", "lock,fsync"}},
		{"non-utf8", []any{"--ctrl", "path=\xff\xfe,mode=0600", "path,mode"}},
	}
}
