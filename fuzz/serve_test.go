package fuzz

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/serve"
	"github.com/vtpmd/vtpmd/internal/workerproto"
	"github.com/vtpmd/vtpmd/state"
)

// FuzzParseVM: state.ParseVM (the registry of `vtpmd serve`) never panics,
// fails only with ErrCorrupt, and what it parses marshals back to the same
// bytes.
func FuzzParseVM(f *testing.F) {
	for _, v := range []state.VM{
		{Name: "vm1", ID: "00112233445566778899aabbccddeeff", Created: time.Unix(1700000000, 5).UTC(), Ctrl: "/run/vtpmd/vm1.ctrl", Running: true},
		{Name: "vm2", ID: "x", Ctrl: "/c", Data: "/d", StartupClear: true},
		{Name: "vm3", ID: "y", Ctrl: "/c", VsockCID: 3, VsockCtrl: 2321, VsockData: 2322},
		{},
	} {
		b, err := v.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("VTVM\x01"))
	f.Add(hexBytes("5654564d 01 0000 0000 0000000000000000 0000 0000 04"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := state.ParseVM(b)
		if err != nil {
			if v != nil || !errors.Is(err, state.ErrCorrupt) {
				t.Fatalf("ParseVM: %v (entry %v)", err, v != nil)
			}
			return
		}
		out, err := v.MarshalBinary()
		if err != nil {
			t.Fatalf("marshal a parsed VM entry: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("parsed %x, marshal gives %x", head(b), head(out))
		}
	})
}

// FuzzWorkerMessage: the supervisor↔worker codec of `vtpmd serve`.
// DecodeMessage never panics, fails only with ErrMalformed, does not alias
// its input, and what it decodes marshals back to the same frame;
// ReadMessage on the framed input agrees with it.
func FuzzWorkerMessage(f *testing.F) {
	rec := &state.Record{VMID: "0123", Generation: 7, Created: time.Unix(1700000000, 0).UTC(), Engine: "e", Sealed: make([]byte, 16500)}
	for _, m := range []workerproto.Message{
		workerproto.Key{VMID: "0123", KeyID: "host:abcd", Secret: bytes.Repeat([]byte{7}, workerproto.KeySize)},
		workerproto.Ready{}, workerproto.Get{VMID: "0123"}, workerproto.Record{Record: rec}, workerproto.NotFound{},
		workerproto.Put{Record: rec}, workerproto.Ack{Generation: 7},
		workerproto.Put{Record: &state.Record{VMID: "0123", Generation: 8, Created: rec.Created, Engine: "e", Sealed: []byte("sealed change"), Delta: true}},
		workerproto.Record{Record: &state.Record{VMID: "0123", Generation: 7, Created: rec.Created, Engine: "e", Sealed: []byte("whole"), Deltas: [][]byte{[]byte("change 8")}}}, workerproto.Error{Message: "disk full"},
		workerproto.StatsRequest{}, workerproto.Stats{Commands: []workerproto.CommandStats{{Code: 0x17b, Count: 2, Nanos: 7, Buckets: []uint64{1, 1}}, {}},
			Guardian: []workerproto.GuardianCalls{{Op: "release", Result: "ok", Count: 3}, {Op: "attest", Result: "baseline_mismatch", Count: 1}}, Direct: 2},
		workerproto.Guardian{VMID: "0123", Config: []byte(`{"urls":["https://g1:8443"],"ca_file":"/etc/vtpmd/guardian-ca.pem","host":"h1"}`)},
		workerproto.GetProtector{VMID: "0123"}, workerproto.Protector{Data: []byte(`{"version":1,"vm_id":"0123"}`)},
		workerproto.PutProtector{VMID: "0123", Data: []byte(`{"version":1,"vm_id":"0123"}`)},
		workerproto.KeyStatus{}, workerproto.KeyStatus{Err: "guardian unreachable for POST /v1/release"},
		workerproto.Assign{Name: "vm1", Sockets: []workerproto.Socket{workerproto.SocketCtrl, workerproto.SocketData}},
		workerproto.Assign{Name: "web-01", Sockets: []workerproto.Socket{workerproto.SocketCtrl, workerproto.SocketVsockCtrl, workerproto.SocketVsockData}, VsockCID: 42, StartupClear: true},
	} {
		b, err := workerproto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[4:])
	}
	f.Add([]byte{})
	f.Add([]byte{99})
	f.Add([]byte{byte(workerproto.TypeAck), 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := workerproto.DecodeMessage(b)
		framed := append([]byte{byte(len(b) >> 24), byte(len(b) >> 16), byte(len(b) >> 8), byte(len(b))}, b...)
		rm, rerr := workerproto.ReadMessage(bytes.NewReader(framed))
		if err != nil {
			if m != nil || !errors.Is(err, workerproto.ErrMalformed) {
				t.Fatalf("DecodeMessage: %v (message %v)", err, m != nil)
			}
			if rerr == nil {
				t.Fatalf("ReadMessage took what DecodeMessage refused: %T", rm)
			}
			return
		}
		if rerr != nil && len(b) <= workerproto.MaxFrame {
			t.Fatalf("ReadMessage refused what DecodeMessage took: %v", rerr)
		}
		switch m := m.(type) {
		case workerproto.Key:
			if aliases(m.Secret, b) {
				t.Fatal("the key aliases the input")
			}
		case workerproto.Put:
			if aliases(m.Record.Sealed, b) {
				t.Fatal("the record aliases the input")
			}
		case workerproto.Protector:
			if aliases(m.Data, b) {
				t.Fatal("the protector aliases the input")
			}
		case workerproto.PutProtector:
			if aliases(m.Data, b) {
				t.Fatal("the protector aliases the input")
			}
		case workerproto.Guardian:
			if aliases(m.Config, b) {
				t.Fatal("the config aliases the input")
			}
		}
		out, err := workerproto.Marshal(m)
		if err != nil {
			if len(b) > workerproto.MaxFrame {
				return
			}
			t.Fatalf("marshal a decoded %T: %v", m, err)
		}
		_, put := m.(workerproto.Put)
		_, record := m.(workerproto.Record)
		if (put || record) && recordV1(b[1:]) {
			again, err := workerproto.DecodeMessage(out[4:])
			if err != nil || !reflect.DeepEqual(again, m) {
				t.Fatalf("a version 1 record marshals to %x, which decodes to %+v (%v)", head(out[4:]), again, err)
			}
			return
		}
		if !bytes.Equal(out, framed) {
			t.Fatalf("decoded %x, marshal gives %x", head(b), head(out[4:]))
		}
	})
}

// FuzzCreateRequest: the admin API's create body (`vtpmd ctl create`).
// DecodeCreateRequest never panics, fails only with ErrBadRequest, and what
// it decodes encodes back to a body that decodes to the same request.
func FuzzCreateRequest(f *testing.F) {
	for _, s := range []string{
		`{"name":"vm1"}`, `{"name":"vm1","data":true,"startup_clear":true}`,
		`{"name":"vm1","bogus":1}`, `{"name":"a"}{"name":"b"}`, `{}`, `[]`, `null`, ``, `{"name":`,
		`{"name":"` + strings.Repeat("x", 100) + `"}`, `{"data":"yes"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := serve.DecodeCreateRequest(bytes.NewReader(b))
		if err != nil {
			if !errors.Is(err, serve.ErrBadRequest) {
				t.Fatalf("DecodeCreateRequest: %v", err)
			}
			return
		}
		out, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("encode a decoded request: %v", err)
		}
		again, err := serve.DecodeCreateRequest(bytes.NewReader(out))
		if err != nil || again != req {
			t.Fatalf("%s decodes to %+v, %v; want %+v", out, again, err, req)
		}
		// A decoded name is only a string: the supervisor validates it.
		_ = serve.ValidName(req.Name)
	})
}

// FuzzReadAssign: the worker's first read, workerproto.ReadAssign, of any
// bytes sent with 0 to 5 descriptors over a socketpair, as the supervisor
// sends Assign. It never panics; it returns sockets only with an Assign
// that names as many roles and marshals back to the frame sent; otherwise
// it fails and keeps none of the descriptors that came.
func FuzzReadAssign(f *testing.F) {
	for _, a := range []workerproto.Assign{
		{Name: "vm1", Sockets: []workerproto.Socket{workerproto.SocketCtrl, workerproto.SocketData}},
		{Name: "web-01", Sockets: []workerproto.Socket{workerproto.SocketCtrl, workerproto.SocketVsockCtrl, workerproto.SocketVsockData}, VsockCID: 42, StartupClear: true},
	} {
		b, err := workerproto.Marshal(a)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(len(a.Sockets)))
		f.Add(b, uint8(len(a.Sockets)+1))
	}
	ready, err := workerproto.Marshal(workerproto.Ready{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ready, uint8(1))
	f.Add([]byte{0, 0, 0}, uint8(0))
	null, err := os.Open(os.DevNull)
	if err != nil {
		f.Fatal(err)
	}
	defer null.Close()
	f.Fuzz(func(t *testing.T, b []byte, nfds uint8) {
		if len(b) == 0 || len(b) > 4096 {
			return // sendmsg sends no rights without data; a frame is small
		}
		fds := make([]int, nfds%6)
		for i := range fds {
			fds[i] = int(null.Fd())
		}
		pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		var conns [2]*net.UnixConn
		for i, fd := range pair {
			file := os.NewFile(uintptr(fd), "pair")
			c, err := net.FileConn(file)
			file.Close()
			if err != nil {
				t.Fatal(err)
			}
			conns[i] = c.(*net.UnixConn)
			defer c.Close()
		}
		var rights []byte
		if len(fds) > 0 {
			rights = syscall.UnixRights(fds...)
		}
		if _, _, err := conns[0].WriteMsgUnix(b, rights, nil); err != nil {
			t.Fatal(err)
		}
		conns[0].Close()
		before := openFiles(t)
		a, files, err := workerproto.ReadAssign(conns[1])
		if err != nil {
			if files != nil {
				t.Fatalf("ReadAssign failed (%v) and returned %d sockets", err, len(files))
			}
			if after := openFiles(t); after != before {
				t.Fatalf("ReadAssign failed (%v) and left %d descriptors open", err, after-before)
			}
			return
		}
		defer func() {
			for _, file := range files {
				file.Close()
			}
		}()
		if len(files) != len(a.Sockets) {
			t.Fatalf("%d sockets for %d roles", len(files), len(a.Sockets))
		}
		out, err := workerproto.Marshal(a)
		if err != nil || !bytes.HasPrefix(b, out) {
			t.Fatalf("read %+v from %x, which marshals to %x (%v)", a, head(b), head(out), err)
		}
	})
}

// openFiles counts this process's open descriptors.
func openFiles(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
