package fuzz

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/transport"
	"github.com/vtpmd/vtpmd/vtpm"
)

// FuzzServer drives one live vtpm.Device behind a transport.Server, over
// in-process socketpairs, with a sequence of control requests and TPM
// commands decoded from the input (see the op* constants). It checks that
// nothing panics or hangs, that every control reply is well formed (or the
// connection closes where swtpm closes it), that every TPM response is
// well formed in the framing of its command, that a state blob read with
// GET_STATEBLOB is taken back by SET_STATEBLOB, and that an NV index written
// before the sequence still holds its value after it.
//
// The engine is one per process, so the device is opened once and each
// input starts from the same stored state: the index defined and written,
// the TPM stopped. Commands that may delete or change that index are
// rewritten to TPM2_GetRandom before they are sent.
func FuzzServer(f *testing.F) {
	for _, in := range captureSequences(loadCaptures(f)) {
		f.Add(in)
	}
	// A 512 KiB + 1 blob, announced and sent after the request: refused,
	// and drained so that the connection goes on.
	var big seqBuilder
	big.begin(flagStartup)
	big.ctrl(0, transport.SetStateBlobRequest{Type: 1, Length: transport.MaxStateBlob + 1}.Marshal())
	big.ctrl(0, transport.GetCapabilityRequest{}.Marshal())
	f.Add(big.bytes())
	f.Fuzz(func(t *testing.T, in []byte) {
		h := openHarness(t)
		s := h.newSession(t, in)
		defer s.close()
		s.run()
		s.finish()
	})
}

// The input: one flags byte, then ops. Each op starts with a byte whose low
// three bits are its kind; the other bits are the op's options.
const (
	flagStartup      = 1 << 0 // TPM2_Startup(CLEAR) before the sequence
	flagQEMU         = 1 << 1 // no data channel until the sequence passes one with SET_DATAFD
	flagBlobKeys     = 1 << 2 // state blobs encrypted with a migration key (and a state key set)
	flagStorage      = 1 << 3 // a storage lock (always granted) ...
	flagStorageFails = 1 << 4 // ... that is never granted
	flagReleaseLock  = 1 << 5 // release the lock after the savestate blob (release-lock-outgoing)

	opCtrl      = 0 // u16 length, request bytes: one control request
	opData      = 1 // u16 length, command bytes: a plain TPM command
	opFramed    = 2 // u8 locality, u16 length, command bytes: with the send-command header
	opOversized = 3 // u16 extra: a command larger than the engine takes, sent in full
	opReplay    = 4 // SET_STATEBLOB of the last blob GET_STATEBLOB returned
	opReconnect = 5 // a new control connection
	// Kinds 6 and 7 are plain TPM commands too.

	// Options of opCtrl.
	ctrlFD        = 1 << 3 // pass a descriptor with the request
	ctrlHalfClose = 1 << 4 // close the write side after the request instead of sending the rest
	ctrlPipeFD    = 1 << 5 // the descriptor is a pipe, not a socket
	// Options of opOversized and opReplay.
	sizeFramed    = 1 << 3 // oversized: with the send-command header
	sizeLying     = 0xf8   // oversized: all option bits set: the size field says 0xffffffff and only the extra bytes come
	replayVolat   = 1 << 3 // replay: as the volatile blob
	replayChunked = 1 << 4 // replay: header and blob in two writes, as QEMU
)

const (
	// maxCtrlWrite is the most a client sends in the write that carries a
	// request: swtpm reads each request with one read into a 4 KiB body.
	maxCtrlWrite = 4096
	// maxStream bounds the hash data or blob bytes the harness sends after
	// a request; larger announcements are cut short by closing the write side.
	maxStream = 1 << 20
	// ioTimeout bounds every wait for the server: a hang is a failure.
	ioTimeout = 20 * time.Second
	maxOps    = 512
	// maxLying bounds the oversized commands whose size field lies: each
	// costs the server's pause of 200 ms before it gives up on the rest.
	maxLying = 2
	// maxStreamed bounds the bytes streamed after requests in one input;
	// past it a request's announced rest is cut short by a half close.
	maxStreamed = 4 << 20

	nvIndex = 0x01f0ed00
	ccRand  = 0x17b
)

var nvValue = []byte("vtpmd fuzz: NV index that survives")

// Commands rewritten to TPM2_GetRandom: they delete or change the NV
// index, or the hierarchy it lives in, either always or when one of the
// command's first two handles is the index.
var (
	ccAlways = map[uint32]bool{
		0x11f: true, // NV_UndefineSpaceSpecial
		0x121: true, // HierarchyControl
		0x124: true, // ChangeEPS
		0x125: true, // ChangePPS
		0x126: true, // Clear
		0x127: true, // ClearControl
	}
	ccOnIndex = map[uint32]bool{
		0x122: true, // NV_UndefineSpace
		0x134: true, // NV_Increment
		0x135: true, // NV_SetBits
		0x136: true, // NV_Extend
		0x137: true, // NV_Write
		0x13b: true, // NV_ChangeAuth
	}
)

// harness is the process's device, with the stored state every input
// starts from.
type harness struct {
	dev      *vtpm.Device
	store    *memStore
	baseline []byte
	nvName   tpm2.TPM2BName
	err      error
}

var (
	harnessOnce sync.Once
	theHarness  harness
)

func openHarness(t testing.TB) *harness {
	harnessOnce.Do(func() { theHarness.err = theHarness.setup() })
	if theHarness.err != nil {
		t.Fatal(theHarness.err)
	}
	return &theHarness
}

// setup manufactures the TPM, defines and writes the NV index and keeps
// the stopped TPM's stored image. The device stays open for the process.
func (h *harness) setup() error {
	h.store = &memStore{}
	dev, err := vtpm.Open(vtpm.Config{Store: h.store})
	if err != nil {
		return err
	}
	h.dev = dev
	if err := dev.Init(false); err != nil {
		return err
	}
	if err := dev.Startup(vtpm.StartupClear); err != nil {
		return err
	}
	tpm := deviceTPM{dev}
	_, err = tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    nvIndex,
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{AuthRead: true, AuthWrite: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
			DataSize:   uint16(len(nvValue)),
		}),
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("define NV index: %w", err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(nvIndex)}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("read NV public: %w", err)
	}
	h.nvName = pub.NVName
	index := tpm2.NamedHandle{Handle: nvIndex, Name: h.nvName}
	if _, err := (tpm2.NVWrite{AuthHandle: index, NVIndex: index, Data: tpm2.TPM2BMaxNVBuffer{Buffer: nvValue}}).Execute(tpm); err != nil {
		return fmt.Errorf("write NV index: %w", err)
	}
	if err := h.checkNV(); err != nil {
		return err
	}
	if err := dev.Stop(); err != nil {
		return err
	}
	h.baseline = append([]byte(nil), h.store.image...)
	return nil
}

// reset brings the device back to the baseline: stopped, nothing pending,
// default buffer size and locality, then INIT of the baseline image.
func (h *harness) reset(startup bool) error {
	dev := h.dev
	if err := dev.Stop(); err != nil {
		return err
	}
	for _, part := range []vtpm.StatePart{vtpm.PartPermanent, vtpm.PartVolatile} {
		if err := dev.SetState(part, nil); err != nil {
			return err
		}
	}
	if _, err := dev.BufferSize(vtpm.MaxBufferSize); err != nil {
		return err
	}
	if err := dev.SetLocality(0); err != nil {
		return err
	}
	if err := dev.SetState(vtpm.PartPermanent, h.baseline); err != nil {
		return fmt.Errorf("set baseline: %w", err)
	}
	if err := dev.Init(false); err != nil {
		return err
	}
	if startup {
		return dev.Startup(vtpm.StartupClear)
	}
	return nil
}

// verify restarts the TPM from what it stored, as a new process would,
// and reads the NV index.
func (h *harness) verify() error {
	dev := h.dev
	if err := dev.Stop(); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	for _, part := range []vtpm.StatePart{vtpm.PartPermanent, vtpm.PartVolatile} {
		if err := dev.SetState(part, nil); err != nil {
			return err
		}
	}
	if err := dev.Init(true); err != nil {
		return fmt.Errorf("init from the stored state: %w", err)
	}
	if err := dev.Startup(vtpm.StartupClear); err != nil {
		return err
	}
	return h.checkNV()
}

func (h *harness) checkNV() error {
	index := tpm2.NamedHandle{Handle: nvIndex, Name: h.nvName}
	rsp, err := tpm2.NVRead{AuthHandle: index, NVIndex: index, Size: uint16(len(nvValue))}.Execute(deviceTPM{h.dev})
	if err != nil {
		return fmt.Errorf("read NV index: %w", err)
	}
	if !bytes.Equal(rsp.Data.Buffer, nvValue) {
		return fmt.Errorf("NV index holds %q, want %q", rsp.Data.Buffer, nvValue)
	}
	return nil
}

// deviceTPM runs go-tpm's commands on the device directly.
type deviceTPM struct{ dev *vtpm.Device }

func (d deviceTPM) Send(cmd []byte) ([]byte, error) {
	return append([]byte(nil), d.dev.Execute(context.Background(), cmd)...), nil
}

// memStore keeps the state image in memory.
type memStore struct{ image []byte }

func (m *memStore) Load() ([]byte, error) {
	if m.image == nil {
		return nil, fs.ErrNotExist
	}
	return append([]byte(nil), m.image...), nil
}

func (m *memStore) Save(image []byte) error {
	m.image = append(m.image[:0], image...)
	return nil
}

// session is one input's run: a Server (a new one after CMD_SHUTDOWN, as
// swtpm's process would be) and the client ends of its connections.
type session struct {
	t     *testing.T
	h     *harness
	in    []byte
	flags byte

	ctx    context.Context
	cancel context.CancelFunc
	srv    *transport.Server
	wg     sync.WaitGroup
	ctrl   *net.UnixConn // nil until a control op needs one
	data   *net.UnixConn // nil while there is no data channel

	lastBlob     []byte
	lastBlobType uint32
	lying        int   // oversized commands with a lying size field so far
	streamed     int64 // bytes streamed after requests so far
	foreign      bool  // a blob from the input was accepted: the NV index may be gone
	buf          []byte
}

func (h *harness) newSession(t *testing.T, in []byte) *session {
	s := &session{t: t, h: h, in: in, buf: make([]byte, 64<<10)}
	if len(s.in) > 0 {
		s.flags, s.in = s.in[0], s.in[1:]
	}
	if err := h.reset(s.flags&flagStartup != 0); err != nil {
		t.Fatalf("reset the device: %v", err)
	}
	s.start()
	return s
}

// start runs a new Server; without flagQEMU its data channel is connected
// at once, as with --server.
func (s *session) start() {
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.srv = &transport.Server{TPM: s.h.dev, DataChannel: s.flags&flagQEMU == 0}
	if s.flags&flagBlobKeys != 0 {
		s.srv.BlobKeys = fuzzBlobKeys
	}
	if s.flags&flagStorage != 0 {
		s.srv.Storage = &fakeStorage{fails: s.flags&flagStorageFails != 0}
		s.srv.ReleaseLockOutgoing = s.flags&flagReleaseLock != 0
	}
	if s.flags&flagQEMU == 0 {
		client, server := s.socketPair()
		s.data = client
		s.wg.Add(1)
		go func() { defer s.wg.Done(); s.srv.ServeDataConn(s.ctx, server) }()
	}
}

// fuzzBlobKeys are the swtpm keys of flagBlobKeys.
var fuzzBlobKeys = transport.BlobKeys{
	Migration: bytes.Repeat([]byte{0x4d}, 32),
	State:     bytes.Repeat([]byte{0x53}, 16),
}

// fakeStorage is a storage lock that is granted at once, or never.
type fakeStorage struct {
	fails  bool
	locked bool
}

func (f *fakeStorage) Lock(retries int) error {
	if f.fails {
		return errors.New("the state is locked by another process")
	}
	f.locked = true
	return nil
}

func (f *fakeStorage) Unlock() error {
	f.locked = false
	return nil
}

// storageFails says that the server cannot take its storage lock.
func (s *session) storageFails() bool {
	return s.flags&(flagStorage|flagStorageFails) == flagStorage|flagStorageFails
}

// stop ends the Server and its connections and waits for it.
func (s *session) stop() {
	if s.ctrl != nil {
		s.ctrl.Close()
		s.ctrl = nil
	}
	if s.data != nil {
		s.data.Close()
		s.data = nil
	}
	s.cancel()
	s.wg.Wait()
}

func (s *session) close() {
	if s.cancel != nil {
		s.stop()
	}
}

func (s *session) socketPair() (*net.UnixConn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		s.t.Fatal(err)
	}
	return fdConn(s.t, fds[0]).(*net.UnixConn), fdConn(s.t, fds[1])
}

func fdConn(t *testing.T, fd int) net.Conn {
	f := os.NewFile(uintptr(fd), "socketpair")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (s *session) ctrlConn() *net.UnixConn {
	if s.ctrl == nil {
		client, server := s.socketPair()
		s.ctrl = client
		s.wg.Add(1)
		go func() { defer s.wg.Done(); s.srv.ServeControlConn(s.ctx, server) }()
	}
	return s.ctrl
}

func (s *session) dropCtrl() {
	if s.ctrl != nil {
		s.ctrl.Close()
		s.ctrl = nil
	}
}

// input reading: a short input ends the sequence.
func (s *session) next(n int) ([]byte, bool) {
	if len(s.in) < n {
		return nil, false
	}
	b := s.in[:n]
	s.in = s.in[n:]
	return b, true
}

func (s *session) u8() (byte, bool) {
	b, ok := s.next(1)
	if !ok {
		return 0, false
	}
	return b[0], true
}

func (s *session) u16() (int, bool) {
	b, ok := s.next(2)
	if !ok {
		return 0, false
	}
	return int(binary.BigEndian.Uint16(b)), true
}

// chunk reads a u16 length and up to that many bytes.
func (s *session) chunk() ([]byte, bool) {
	n, ok := s.u16()
	if !ok {
		return nil, false
	}
	b := s.in[:min(n, len(s.in))]
	s.in = s.in[len(b):]
	return b, true
}

func (s *session) run() {
	for range maxOps {
		op, ok := s.u8()
		if !ok {
			return
		}
		switch op & 7 {
		case opCtrl:
			msg, ok := s.chunk()
			if !ok {
				return
			}
			s.ctrlOp(op, msg)
		case opFramed:
			loc, ok := s.u8()
			if !ok {
				return
			}
			cmd, ok := s.chunk()
			if !ok {
				return
			}
			s.dataOp(framedCommand(loc, cmd), true)
		case opOversized:
			extra, ok := s.u16()
			if !ok {
				return
			}
			s.oversizedOp(op, extra)
		case opReplay:
			s.replayOp(op)
		case opReconnect:
			s.dropCtrl()
		default:
			cmd, ok := s.chunk()
			if !ok {
				return
			}
			s.dataOp(plainCommand(cmd), false)
		}
	}
}

// plainCommand makes cmd a command the server frames by its size field:
// at least a header, the size field saying its length, and not taken for a
// send-command header.
func plainCommand(cmd []byte) []byte {
	c := make([]byte, max(len(cmd), tpmHeaderSize))
	copy(c, cmd)
	if binary.BigEndian.Uint32(c) == sendCommand {
		binary.BigEndian.PutUint16(c, 0x8001)
	}
	binary.BigEndian.PutUint32(c[2:], uint32(len(c)))
	return filterCommand(c)
}

// framedCommand wraps cmd in the send-command header. An empty command
// gets one byte: swtpm, and the server, wait for 10 bytes before they look
// at a header, and the framed header alone is 9.
func framedCommand(loc byte, cmd []byte) []byte {
	if len(cmd) == 0 {
		cmd = []byte{0}
	}
	return framed(loc, filterCommand(cmd))
}

// filterCommand rewrites a command that could delete or change the NV
// index to TPM2_GetRandom. It returns a copy.
func filterCommand(cmd []byte) []byte {
	c := append([]byte(nil), cmd...)
	if len(c) < tpmHeaderSize {
		return c
	}
	cc := binary.BigEndian.Uint32(c[6:])
	onIndex := false
	for _, off := range []int{10, 14} {
		if len(c) >= off+4 && binary.BigEndian.Uint32(c[off:]) == nvIndex {
			onIndex = true
		}
	}
	if ccAlways[cc] || ccOnIndex[cc] && onIndex {
		binary.BigEndian.PutUint32(c[6:], ccRand)
	}
	return c
}

// ctrlOp sends one control request and checks what comes back.
func (s *session) ctrlOp(op byte, msg []byte) {
	t := s.t
	first := msg[:min(len(msg), maxCtrlWrite)]
	more := msg[len(first):]
	var code transport.Command
	if len(first) >= 4 {
		code = commandOf(first)
	}
	conn := s.ctrlConn()

	// The descriptor, if any, travels with the request.
	var oob []byte
	var candidate *net.UnixConn // our end of a socket passed with SET_DATAFD
	if op&ctrlFD != 0 && len(first) > 0 {
		var passed *os.File
		if op&ctrlPipeFD != 0 {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			passed = r
		} else {
			client, server := s.socketPair()
			candidate = client
			f, err := server.(*net.UnixConn).File()
			server.Close()
			if err != nil {
				t.Fatal(err)
			}
			passed = f
		}
		oob = syscall.UnixRights(int(passed.Fd()))
		defer passed.Close()
	}
	defer func() {
		if candidate != nil && candidate != s.data {
			candidate.Close()
		}
	}()
	s.deadline(conn)
	if _, _, err := conn.WriteMsgUnix(first, oob, nil); err != nil {
		t.Fatalf("write control request %x: %v", head(first), err)
	}

	if len(first) < 4 || len(first) < transport.MinRequestSize(code) {
		// Short: swtpm waits for the rest, then closes unanswered.
		_ = conn.CloseWrite()
		s.expectClosed(conn, fmt.Sprintf("short request %x", first))
		s.dropCtrl()
		return
	}
	req, derr := transport.DecodeRequest(first)
	running := s.h.dev.Running()
	var rest int64 // bytes the server reads after the request
	switch r := req.(type) {
	case transport.HashDataRequest:
		// The hash data are read only while the TPM runs.
		if running {
			rest = int64(r.Length) - int64(len(r.Data))
		}
	case transport.SetStateBlobRequest:
		rest = int64(r.Length) - int64(len(r.Data))
	case nil:
		if code == transport.CmdSetStateBlob {
			// A refused blob is drained as long as it comes.
			rest = max(0, int64(binary.BigEndian.Uint32(first[12:]))-int64(len(first)-16))
		}
	}
	halfClosed := false
	if op&ctrlHalfClose != 0 || rest > maxStream || s.streamed+rest > maxStreamed {
		_ = conn.CloseWrite()
		halfClosed = true
	} else if rest > 0 {
		s.streamed += rest
		stream := make([]byte, rest)
		copy(stream, more)
		if _, err := conn.Write(stream); err != nil {
			t.Fatalf("write %d bytes after %x: %v", rest, head(first), err)
		}
	}

	reply := s.readCtrlReply(conn, code, first)
	var refused transport.Result
	switch {
	case code == transport.CmdSetStateBlob && running:
		// Refused for the running TPM first, whatever the blob (spec §1.5.10).
		if !bytes.Equal(reply, transport.ResultReply{Result: transport.ResultBadOrdinal}.Marshal()) {
			t.Fatalf("SET_STATEBLOB %x while running: reply %x", head(first), reply)
		}
	case errors.As(derr, &refused) && !bytes.Equal(reply, transport.ResultReply{Result: refused}.Marshal()):
		t.Fatalf("request %x refused with %#x, reply %x", head(first), uint32(refused), reply)
	}
	result := transport.Result(binary.BigEndian.Uint32(reply))
	switch r := req.(type) {
	case transport.ShutdownRequest:
		// The process ends: the connection closes and a new one starts.
		s.expectClosed(conn, "CMD_SHUTDOWN")
		s.stop()
		s.start()
		return
	case transport.SetDataFDRequest:
		if result == transport.ResultSuccess {
			if candidate == nil || s.data != nil {
				t.Fatalf("SET_DATAFD succeeded with descriptor %v and a data channel %v", candidate != nil, s.data != nil)
			}
			s.data = candidate
		}
	case transport.GetStateBlobRequest:
		// The whole blob, to replay; a part of it from an offset is not one.
		if result == transport.ResultSuccess && len(reply) > 16 && r.Offset == 0 {
			s.lastBlob, s.lastBlobType = append([]byte(nil), reply[16:]...), r.Type
		}
	case transport.SetStateBlobRequest:
		if result == transport.ResultSuccess && r.Length > 10 && (r.Type == 1 || r.Type == 2) {
			s.foreign = true
		}
	}
	if halfClosed {
		s.expectClosed(conn, fmt.Sprintf("request %x and a half close", head(first)))
		s.dropCtrl()
	}
}

func head(b []byte) []byte { return b[:min(len(b), 20)] }

func (s *session) deadline(c net.Conn) {
	if err := c.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		s.t.Fatal(err)
	}
}

// readCtrlReply reads one reply to command c and checks that it is well
// formed: it decodes, and is what its decoded form marshals to.
func (s *session) readCtrlReply(conn net.Conn, c transport.Command, req []byte) []byte {
	t := s.t
	s.deadline(conn)
	got := 0
	want := 4
	for got < want {
		n, err := conn.Read(s.buf[got:])
		got += n
		if err != nil {
			t.Fatalf("reply to %x: %d bytes, then %v", head(req), got, err)
		}
		if got >= 4 {
			want = replySize(c, s.buf[:got])
		}
		if want > len(s.buf) {
			s.buf = append(s.buf, make([]byte, want-len(s.buf))...)
		}
	}
	reply := s.buf[:got]
	if got > want {
		t.Fatalf("reply to %x: %d bytes, its layout says %d: %x", head(req), got, want, head(reply))
	}
	rep, err := transport.DecodeReply(c, reply)
	if err != nil {
		t.Fatalf("reply %x to %x: %v", head(reply), head(req), err)
	}
	if !bytes.Equal(rep.Marshal(), reply) {
		t.Fatalf("reply %x to %x is not what %#v marshals to", head(reply), head(req), rep)
	}
	return append([]byte(nil), reply...)
}

// replySize is the length of the reply to c that starts with b (at least 4
// bytes): 4 for errors, else the command's layout (spec §1.2).
func replySize(c transport.Command, b []byte) int {
	result := binary.BigEndian.Uint32(b)
	switch {
	case c == transport.CmdGetStateBlob:
		if len(b) == 4 && result != 0 {
			return 4 // refused before the handler ran
		}
		if len(b) < 16 {
			return 16
		}
		return 16 + int(binary.BigEndian.Uint32(b[12:]))
	case result != 0:
		return 4
	case c == transport.CmdGetCapability, c == transport.CmdGetTPMEstablished, c == transport.CmdGetConfig:
		return 8
	case c == transport.CmdSetBufferSize:
		return 16
	case c == transport.CmdGetInfo:
		if len(b) < 12 {
			return 12
		}
		return 12 + int(binary.BigEndian.Uint32(b[8:]))
	}
	return 4
}

// expectClosed reads until the server closes the connection: nothing may
// come first.
func (s *session) expectClosed(conn net.Conn, what string) {
	s.deadline(conn)
	n, err := io.ReadFull(conn, s.buf[:1])
	if n != 0 || !errors.Is(err, io.EOF) {
		s.t.Fatalf("after %s: want the connection closed, got %d bytes (%x), %v", what, n, s.buf[:n], err)
	}
}

// dataOp sends one TPM command and checks the response.
func (s *session) dataOp(wire []byte, isFramed bool) {
	if s.data == nil {
		return
	}
	s.deadline(s.data)
	if _, err := s.data.Write(wire); err != nil {
		s.t.Fatalf("write TPM command %x: %v", head(wire), err)
	}
	s.readResponse(wire, isFramed)
}

func (s *session) readResponse(wire []byte, isFramed bool) {
	t := s.t
	conn := s.data
	s.deadline(conn)
	prefix, trailer := 0, 0
	if isFramed {
		prefix, trailer = 4, 4
	}
	got, want := 0, prefix+tpmHeaderSize+trailer
	for got < want {
		n, err := conn.Read(s.buf[got:])
		got += n
		if err != nil {
			t.Fatalf("response to %x: %d bytes, then %v", head(wire), got, err)
		}
		if got >= prefix+tpmHeaderSize {
			size := int(binary.BigEndian.Uint32(s.buf[prefix+2:]))
			if size < tpmHeaderSize || size > vtpm.MaxBufferSize {
				t.Fatalf("response to %x: size field %d: %x", head(wire), size, head(s.buf[:got]))
			}
			want = prefix + size + trailer
		}
	}
	out := s.buf[:got]
	if got > want {
		t.Fatalf("response to %x: %d bytes, want %d: %x", head(wire), got, want, head(out))
	}
	resp := out[prefix : len(out)-trailer]
	if tag := binary.BigEndian.Uint16(resp); tag != 0x8001 && tag != 0x8002 {
		t.Fatalf("response to %x: tag %#x", head(wire), tag)
	}
	if isFramed && (int(binary.BigEndian.Uint32(out)) != len(resp) || binary.BigEndian.Uint32(out[len(out)-4:]) != 0) {
		t.Fatalf("framed response to %x: %x", head(wire), head(out))
	}
}

// oversizedOp sends a command larger than the engine takes, whole (or,
// with all option bits set, announced as 4 GiB): it is dropped and answered
// with TPM_RC_COMMAND_SIZE.
func (s *session) oversizedOp(op byte, extra int) {
	size := vtpm.MaxBufferSize + 1 + extra%vtpm.MaxBufferSize
	cmd := make([]byte, size)
	binary.BigEndian.PutUint16(cmd, 0x8001)
	binary.BigEndian.PutUint32(cmd[2:], uint32(size))
	binary.BigEndian.PutUint32(cmd[6:], ccRand)
	isFramed := op&sizeFramed != 0
	var wire []byte
	switch {
	case op&sizeLying == sizeLying && s.lying < maxLying:
		// The server drains what comes and gives up after a pause.
		s.lying++
		wire = append(framed(0, nil), make([]byte, 1+extra%64)...)
		binary.BigEndian.PutUint32(wire[5:], 0xffffffff)
	case isFramed:
		wire = framed(byte(extra), cmd)
	default:
		wire = cmd
	}
	s.dataOp(wire, isFramed)
}

// replayOp sets the last state blob read back: a stopped TPM must take its
// own blob, a running one refuses it, and so does a server that cannot
// lock the storage.
func (s *session) replayOp(op byte) {
	if s.lastBlob == nil {
		return
	}
	typ := uint32(transport.BlobPermanent)
	if op&replayVolat != 0 {
		typ = uint32(transport.BlobVolatile)
	}
	conn := s.ctrlConn()
	hdr := transport.SetStateBlobRequest{Type: typ, Length: uint32(len(s.lastBlob))}.Marshal()
	running := s.h.dev.Running()
	s.deadline(conn)
	if op&replayChunked != 0 {
		if _, err := conn.Write(hdr); err != nil {
			s.t.Fatal(err)
		}
		if _, err := conn.Write(s.lastBlob); err != nil {
			s.t.Fatal(err)
		}
	} else if _, err := conn.Write(append(hdr, s.lastBlob...)); err != nil {
		s.t.Fatal(err)
	}
	reply := s.readCtrlReply(conn, transport.CmdSetStateBlob, hdr)
	want := transport.ResultSuccess
	switch {
	case running:
		want = transport.ResultBadOrdinal
	case s.storageFails():
		want = transport.ResultIOError
	}
	if got := transport.Result(binary.BigEndian.Uint32(reply)); got != want {
		s.t.Fatalf("SET_STATEBLOB of the type %d blob GET_STATEBLOB gave, as type %d, TPM running %v: result %#x, want %#x",
			s.lastBlobType, typ, running, uint32(got), uint32(want))
	}
}

// finish closes the connections in order, checks that nothing more came on
// them, ends the server and checks the NV index.
func (s *session) finish() {
	for _, c := range []*net.UnixConn{s.ctrl, s.data} {
		if c == nil {
			continue
		}
		_ = c.CloseWrite()
		s.expectClosed(c, "the end of the sequence")
	}
	s.stop()
	s.cancel = nil
	if s.foreign {
		return
	}
	if err := s.h.verify(); err != nil {
		s.t.Fatalf("after the sequence: %v", err)
	}
}

// seqBuilder writes FuzzServer inputs.
type seqBuilder struct{ b []byte }

func (sb *seqBuilder) begin(flags byte) { sb.b = append(sb.b[:0], flags) }

func (sb *seqBuilder) ctrl(opts byte, msg []byte) {
	sb.b = append(sb.b, opCtrl|opts)
	sb.b = binary.BigEndian.AppendUint16(sb.b, uint16(min(len(msg), 0xffff)))
	sb.b = append(sb.b, msg[:min(len(msg), 0xffff)]...)
}

func (sb *seqBuilder) data(cmd []byte) {
	if len(cmd) >= framedHeaderSize && binary.BigEndian.Uint32(cmd) == sendCommand {
		sb.b = append(sb.b, opFramed, cmd[4])
		cmd = cmd[framedHeaderSize:]
	} else {
		sb.b = append(sb.b, opData)
	}
	sb.b = binary.BigEndian.AppendUint16(sb.b, uint16(min(len(cmd), 0xffff)))
	sb.b = append(sb.b, cmd[:min(len(cmd), 0xffff)]...)
}

func (sb *seqBuilder) op(op byte, args ...byte) {
	sb.b = append(sb.b, op)
	sb.b = append(sb.b, args...)
}

func (sb *seqBuilder) bytes() []byte { return append([]byte(nil), sb.b...) }

// seqWindow is how many client messages of a capture one seed replays.
const seqWindow = 64

// captureSequences turns the captures into FuzzServer inputs, a window of
// client messages each. A QEMU capture's first window passes the data
// channel with SET_DATAFD, as QEMU does; other windows get one at start,
// and a started TPM when they do not begin the capture.
func captureSequences(caps []capture) [][]byte {
	var out [][]byte
	for _, c := range caps {
		var sent []message
		for _, m := range c.messages {
			if m.toServer {
				sent = append(sent, m)
			}
		}
		for start := 0; start < len(sent); start += seqWindow {
			var sb seqBuilder
			var flags byte
			if start > 0 {
				flags = flagStartup
			}
			window := sent[start:min(len(sent), start+seqWindow)]
			for _, m := range window {
				if m.ctrl && len(m.data) >= 4 && commandOf(m.data) == transport.CmdSetDataFD && start == 0 {
					flags |= flagQEMU
				}
			}
			sb.begin(flags)
			for _, m := range window {
				switch {
				case !m.ctrl:
					sb.data(m.data)
				case len(m.data) >= 4 && commandOf(m.data) == transport.CmdSetDataFD:
					sb.ctrl(ctrlFD, m.data)
				default:
					sb.ctrl(0, m.data)
				}
			}
			out = append(out, sb.bytes())
		}
	}
	return out
}

func serverEdgeSeeds() []seed {
	seq := func(flags byte, build func(sb *seqBuilder)) []any {
		var sb seqBuilder
		sb.begin(flags)
		build(&sb)
		return []any{sb.bytes()}
	}
	initReq := transport.InitRequest{}.Marshal()
	stop := transport.StopRequest{}.Marshal()
	getRandom := hexBytes("8001 0000000c 0000017b 0008")
	return []seed{
		{"empty", []any{[]byte{}}},
		{"qemu-start", seq(flagQEMU, func(sb *seqBuilder) {
			sb.ctrl(0, transport.GetCapabilityRequest{}.Marshal())
			sb.ctrl(ctrlFD, transport.SetDataFDRequest{}.Marshal())
			sb.ctrl(0, stop)
			sb.ctrl(0, transport.SetBufferSizeRequest{Size: 4096}.Marshal())
			sb.ctrl(0, initReq)
			sb.data(hexBytes("8001 0000000c 00000144 0000"))
			sb.data(getRandom)
		})},
		{"setdatafd-without-fd", seq(flagQEMU, func(sb *seqBuilder) {
			sb.ctrl(0, transport.SetDataFDRequest{}.Marshal())
			sb.ctrl(ctrlFD|ctrlPipeFD, transport.SetDataFDRequest{}.Marshal())
			sb.ctrl(ctrlFD, transport.SetDataFDRequest{}.Marshal())
			sb.ctrl(ctrlFD, transport.SetDataFDRequest{}.Marshal())
			sb.data(getRandom)
		})},
		{"truncated-fd-message", seq(flagQEMU, func(sb *seqBuilder) {
			sb.ctrl(ctrlFD, hexBytes("0000"))
			sb.ctrl(ctrlFD, hexBytes("000000"))
			sb.ctrl(0, transport.GetCapabilityRequest{}.Marshal())
		})},
		{"short-requests", seq(flagStartup, func(sb *seqBuilder) {
			sb.ctrl(0, hexBytes("00000002"))
			sb.ctrl(0, hexBytes("0000000c 00000000"))
			sb.ctrl(0, hexBytes("00000012 00000000 00000003"))
			sb.ctrl(0, nil)
			sb.ctrl(0, transport.GetInfoRequest{Flags: 3}.Marshal())
		})},
		{"hash-data-len-ffffffff", seq(flagStartup, func(sb *seqBuilder) {
			sb.ctrl(0, transport.HashStartRequest{}.Marshal())
			sb.ctrl(0, hexBytes("00000007 ffffffff 31323334"))
			sb.ctrl(0, transport.HashStartRequest{}.Marshal())
			sb.ctrl(0, hexBytes("00000007 00001000 31323334"))
			sb.ctrl(0, hexBytes("00000007 00000000"))
			sb.ctrl(0, transport.HashEndRequest{}.Marshal())
			sb.data(hexBytes("8001 00000014 0000017e 00000001 000b 03 000002"))
		})},
		{"hash-data-stopped", seq(0, func(sb *seqBuilder) {
			sb.ctrl(0, stop)
			sb.ctrl(0, hexBytes("00000007 00000010 31323334"))
			sb.ctrl(0, transport.GetCapabilityRequest{}.Marshal())
		})},
		{"set-stateblob-len-00080001", seq(0, func(sb *seqBuilder) {
			sb.ctrl(0, stop)
			sb.ctrl(0, hexBytes("0000000d 00000000 00000001 00080001"))
			sb.ctrl(ctrlHalfClose, hexBytes("0000000d 00000000 00000001 00080001 0201"))
			sb.ctrl(0, hexBytes("0000000d 00000000 00000001 00000002 0201 00"))
			sb.ctrl(0, hexBytes("0000000d 00000000 00000001 00000000"))
			sb.ctrl(0, hexBytes("0000000d 00000000 00000003 0000000a 0201000a00000000000a"))
			sb.ctrl(ctrlHalfClose, hexBytes("0000000d 00000000 00000002 00001000 0201000a00000000000a"))
			sb.ctrl(0, initReq)
		})},
		{"stateblob-round-trip", seq(flagStartup, func(sb *seqBuilder) {
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 1}.Marshal())
			sb.op(opReplay)
			sb.ctrl(0, stop)
			sb.op(opReplay | replayChunked)
			sb.ctrl(0, initReq)
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 2}.Marshal())
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 3}.Marshal())
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 2, Offset: 100000}.Marshal())
			sb.ctrl(0, stop)
			sb.op(opReplay | replayVolat)
			sb.ctrl(0, transport.InitRequest{Flags: transport.InitFlagDeleteVolatile}.Marshal())
			sb.data(getRandom)
		})},
		{"oversized-commands", seq(flagStartup, func(sb *seqBuilder) {
			sb.op(opOversized, 0, 0)
			sb.op(opOversized|sizeFramed, 0x0f, 0xff)
			sb.data(hexBytes("8001 ffffffff 0000017b 0008"))
			sb.data(nil)
			sb.data(append(framed(0, nil), 0))
			sb.data(framed(4, getRandom))
			sb.op(opOversized|sizeLying, 0, 3)
			sb.data(getRandom)
		})},
		{"nv-attacks", seq(flagStartup, func(sb *seqBuilder) {
			sb.data(hexBytes("8002 0000001b 00000126 4000000c 00000009 40000009 000000 0000"))
			sb.data(hexBytes("8002 0000001f 00000122 40000001 01f0ed00 00000009 40000009 000000 0000"))
			sb.data(hexBytes("8002 00000024 00000137 01f0ed00 01f0ed00 00000009 40000009 000000 0000 0003 616263 0000"))
		})},
		{"storage-and-keys", seq(flagStartup|flagBlobKeys|flagStorage|flagReleaseLock, func(sb *seqBuilder) {
			sb.ctrl(0, transport.GetCapabilityRequest{}.Marshal())
			sb.ctrl(0, transport.GetConfigRequest{}.Marshal())
			sb.ctrl(0, transport.LockStorageRequest{Retries: 300}.Marshal())
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 1}.Marshal())
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 3}.Marshal())
			sb.ctrl(0, stop)
			sb.op(opReplay)
			sb.ctrl(0, transport.SetStateBlobRequest{Flags: 2, Type: 2, Length: 12}.Marshal())
			sb.ctrl(0, initReq)
			sb.data(getRandom)
		})},
		{"storage-lock-fails", seq(flagStartup|flagStorage|flagStorageFails, func(sb *seqBuilder) {
			sb.data(getRandom)
			sb.ctrl(0, transport.LockStorageRequest{Retries: 1}.Marshal())
			sb.ctrl(0, transport.GetStateBlobRequest{Type: 1}.Marshal())
			sb.ctrl(0, stop)
			sb.op(opReplay)
			sb.ctrl(0, initReq)
		})},
		{"shutdown-restart", seq(flagStartup, func(sb *seqBuilder) {
			sb.ctrl(0, transport.ShutdownRequest{}.Marshal())
			sb.ctrl(0, transport.GetTPMEstablishedRequest{}.Marshal())
			sb.ctrl(0, initReq)
			sb.data(getRandom)
			sb.op(opReconnect)
			sb.ctrl(ctrlHalfClose, transport.GetConfigRequest{}.Marshal())
			sb.ctrl(0, transport.StoreVolatileRequest{}.Marshal())
			sb.ctrl(0, transport.SetLocalityRequest{Locality: 4}.Marshal())
			sb.ctrl(0, transport.ResetTPMEstablishedRequest{Locality: 3}.Marshal())
			sb.ctrl(0, transport.CancelTPMCmdRequest{}.Marshal())
			sb.ctrl(0, transport.LockStorageRequest{Retries: 300}.Marshal())
			sb.ctrl(0, hexBytes("000000ff"))
		})},
	}
}
