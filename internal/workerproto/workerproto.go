// Package workerproto is the protocol between the supervisor of `vtpmd
// serve` and its workers, over the two socketpairs each worker inherits:
// typed messages and one codec (WriteMessage, ReadMessage), and Assign's
// pair, which carries descriptors too.
//
// A frame is a 4-byte big-endian length, then that many bytes: a type byte
// and the message's fields (strings and byte strings with a 2- or 4-byte
// length before them, integers big-endian).
//
// A worker starts as a spare, with no VM: the supervisor starts it ahead
// of need, so that a VM's start finds its process running and its engine
// warm. The first message on the channel, Assign, makes it a VM's worker
// for good: the VM's listening sockets come with its frame as SCM_RIGHTS
// (WriteAssign, ReadAssign).
//
// Then the supervisor sends Key, or, for a host with a guardian, Guardian:
// the worker obtains the key from the guardian itself when its TPM starts,
// so that the key is never in the supervisor. The worker says Ready once it
// serves its sockets, and a guardian worker tells how each attempt to
// obtain the key went (KeyStatus). The supervisor may send StatsRequest at
// any time (a metrics scrape); the worker answers with Stats, its TPM
// command counts and guardian calls, so that the per-command path costs no
// message. Nothing else is answered.
//
// On the records channel the worker asks and the supervisor answers, one
// request at a time, and nothing else is sent: Get is answered by Record,
// NotFound or Error; Put by Ack or Error; GetProtector by Protector,
// NotFound or Error; PutProtector by Ack (stored), Protector (the VM has
// one already: that one) or Error. Ack means the record is durably stored:
// only then may the worker release the TPM response whose state it holds.
// Keeping the two apart lets the worker wait for an answer in a plain
// blocking read.
package workerproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"

	"github.com/vtpmd/vtpmd/internal/wire"
	"github.com/vtpmd/vtpmd/state"
)

// Type is a message's type byte.
type Type uint8

// Message types.
const (
	TypeKey      Type = 1  // supervisor → worker: the VM's state key
	TypeReady    Type = 2  // worker → supervisor: serving
	TypeGet      Type = 3  // worker → supervisor: the VM's state record, please
	TypeRecord   Type = 4  // supervisor → worker: the record
	TypeNotFound Type = 5  // supervisor → worker: the VM has no record yet
	TypePut      Type = 6  // worker → supervisor: store this record durably
	TypeAck      Type = 7  // supervisor → worker: stored
	TypeError    Type = 8  // supervisor → worker: the request failed
	TypeStatsReq Type = 9  // supervisor → worker: your command counts, please
	TypeStats    Type = 10 // worker → supervisor: the command counts

	TypeGuardian     Type = 11 // supervisor → worker: obtain the key from the guardian
	TypeGetProtector Type = 12 // worker → supervisor: the VM's key protector, please
	TypeProtector    Type = 13 // supervisor → worker: the key protector
	TypePutProtector Type = 14 // worker → supervisor: store this new key protector
	TypeKeyStatus    Type = 15 // worker → supervisor: how obtaining the key went
	TypeAssign       Type = 16 // supervisor → worker: serve this VM (with its sockets)
)

// MaxFrame bounds a frame: a sealed 16 KiB NV image and its record fit
// with room to spare.
const MaxFrame = 64 << 10

// KeySize is the size of a state key's secret.
const KeySize = 32

// ErrMalformed is wrapped by every error of DecodeMessage and of ReadMessage
// for a frame that arrived whole but does not decode.
var ErrMalformed = errors.New("malformed worker message")

// Message is one message of the protocol.
type Message interface {
	// Type is the message's type byte.
	Type() Type
	appendFields(b []byte) ([]byte, error)
}

// Key hands the worker its VM's state key.
type Key struct {
	// VMID is the VM id the state is sealed under.
	VMID string
	// KeyID names the key in sealed envelopes.
	KeyID string
	// Secret is the key itself, KeySize bytes.
	Secret []byte
}

// Guardian tells the worker to obtain its VM's state key from the guardian
// when the TPM starts.
type Guardian struct {
	// VMID is the VM id the state is sealed under.
	VMID string
	// Config is the host's guardian configuration (JSON, as
	// host.ParseConfig reads it, its paths absolute).
	Config []byte
}

// GetProtector asks for the VM's key protector.
type GetProtector struct{ VMID string }

// Protector is a VM's key protector (opaque to the supervisor).
type Protector struct{ Data []byte }

// PutProtector asks the supervisor to store the VM's new key protector
// durably.
type PutProtector struct {
	VMID string
	Data []byte
}

// KeyStatus says how the worker's last attempt to obtain its VM's key
// went: Err is "" when the guardian released it.
type KeyStatus struct{ Err string }

// Socket is the role of a listening socket that comes with Assign.
type Socket uint8

// Socket roles.
const (
	SocketCtrl      Socket = 1 // the control channel's unix socket
	SocketData      Socket = 2 // the data channel's unix socket
	SocketVsockCtrl Socket = 3 // the control channel's vsock socket
	SocketVsockData Socket = 4 // the data channel's vsock socket
)

// Assign makes a spare worker the worker of a VM.
type Assign struct {
	// Name is the VM's name, for the worker's logs.
	Name string
	// Sockets are the roles of the listening sockets that come with the
	// frame, in the order of its descriptors; each role at most once.
	Sockets []Socket
	// VsockCID is the one guest let in on the vsock sockets.
	VsockCID uint32
	// StartupClear powers the TPM on and sends TPM2_Startup(CLEAR) before
	// serving (swtpm's --flags not-need-init,startup-clear).
	StartupClear bool
}

// Ready says the worker serves its sockets.
type Ready struct{}

// Get asks for the VM's state record.
type Get struct{ VMID string }

// Record answers Get with the stored record.
type Record struct{ Record *state.Record }

// NotFound answers Get when the VM has no record yet.
type NotFound struct{}

// Put asks the supervisor to store the record durably.
type Put struct{ Record *state.Record }

// Ack answers Put: the record of that generation is stored.
type Ack struct{ Generation uint64 }

// Error answers a request that failed.
type Error struct{ Message string }

// StatsRequest asks the worker for its Stats.
type StatsRequest struct{}

// Stats are a worker's TPM command counts since it started, by command
// code, and its calls to the guardian.
type Stats struct {
	Commands []CommandStats
	Guardian []GuardianCalls
	// Direct is how many of the commands ran in the direct data loop.
	Direct uint64
}

// GuardianCalls counts a worker's calls to the guardian of one op
// ("nonce", "attest", "release", "keys") with one result ("ok", a refusal
// code, or "unreachable").
type GuardianCalls struct {
	Op, Result string
	Count      uint64
}

// CommandStats are the counts of one TPM command code: how many, their
// total latency, and how many fell in each latency bucket (not cumulative;
// the commands beyond the last bucket are Count minus their sum).
type CommandStats struct {
	Code    uint32
	Count   uint64
	Nanos   uint64
	Buckets []uint64
}

// maxBuckets bounds CommandStats.Buckets.
const maxBuckets = 64

// Type implementations.
func (Key) Type() Type          { return TypeKey }
func (Ready) Type() Type        { return TypeReady }
func (Get) Type() Type          { return TypeGet }
func (Record) Type() Type       { return TypeRecord }
func (NotFound) Type() Type     { return TypeNotFound }
func (Put) Type() Type          { return TypePut }
func (Ack) Type() Type          { return TypeAck }
func (Error) Type() Type        { return TypeError }
func (StatsRequest) Type() Type { return TypeStatsReq }
func (Stats) Type() Type        { return TypeStats }
func (Guardian) Type() Type     { return TypeGuardian }
func (GetProtector) Type() Type { return TypeGetProtector }
func (Protector) Type() Type    { return TypeProtector }
func (PutProtector) Type() Type { return TypePutProtector }
func (KeyStatus) Type() Type    { return TypeKeyStatus }
func (Assign) Type() Type       { return TypeAssign }

// String never shows the secret.
func (k Key) String() string { return fmt.Sprintf("key %s for VM %s", k.KeyID, k.VMID) }

// GoString never shows the secret.
func (k Key) GoString() string { return k.String() }

func (k Key) appendFields(b []byte) ([]byte, error) {
	if len(k.Secret) != KeySize {
		return nil, fmt.Errorf("key message: the secret has %d bytes, want %d", len(k.Secret), KeySize)
	}
	b, err := appendString(b, k.VMID)
	if err != nil {
		return nil, err
	}
	if b, err = appendString(b, k.KeyID); err != nil {
		return nil, err
	}
	return append(b, k.Secret...), nil
}

func (a Assign) appendFields(b []byte) ([]byte, error) {
	if err := checkSockets(a.Sockets); err != nil {
		return nil, err
	}
	b, err := appendString(b, a.Name)
	if err != nil {
		return nil, err
	}
	flags := byte(0)
	if a.StartupClear {
		flags = 1
	}
	b = binary.BigEndian.AppendUint32(append(b, flags), a.VsockCID)
	b = append(b, byte(len(a.Sockets)))
	for _, s := range a.Sockets {
		b = append(b, byte(s))
	}
	return b, nil
}

// checkSockets: known roles, each at most once.
func checkSockets(sockets []Socket) error {
	var seen [SocketVsockData + 1]bool
	for _, s := range sockets {
		if s < SocketCtrl || s > SocketVsockData {
			return fmt.Errorf("assign: unknown socket role %d", s)
		}
		if seen[s] {
			return fmt.Errorf("assign: socket role %d twice", s)
		}
		seen[s] = true
	}
	return nil
}

func (g Guardian) appendFields(b []byte) ([]byte, error) {
	b, err := appendString(b, g.VMID)
	if err != nil {
		return nil, err
	}
	return appendString(b, string(g.Config))
}

func (g GetProtector) appendFields(b []byte) ([]byte, error) { return appendString(b, g.VMID) }
func (p Protector) appendFields(b []byte) ([]byte, error)    { return append(b, p.Data...), nil }
func (k KeyStatus) appendFields(b []byte) ([]byte, error)    { return appendString(b, k.Err) }

func (p PutProtector) appendFields(b []byte) ([]byte, error) {
	b, err := appendString(b, p.VMID)
	if err != nil {
		return nil, err
	}
	return append(b, p.Data...), nil
}

func (Ready) appendFields(b []byte) ([]byte, error)    { return b, nil }
func (NotFound) appendFields(b []byte) ([]byte, error) { return b, nil }
func (g Get) appendFields(b []byte) ([]byte, error)    { return appendString(b, g.VMID) }
func (r Record) appendFields(b []byte) ([]byte, error) { return appendRecord(b, r.Record) }
func (p Put) appendFields(b []byte) ([]byte, error)    { return appendRecord(b, p.Record) }
func (a Ack) appendFields(b []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint64(b, a.Generation), nil
}
func (e Error) appendFields(b []byte) ([]byte, error)      { return appendString(b, e.Message) }
func (StatsRequest) appendFields(b []byte) ([]byte, error) { return b, nil }

func (s Stats) appendFields(b []byte) ([]byte, error) {
	if len(s.Commands) > 0xffff {
		return nil, fmt.Errorf("worker stats: %d command codes is too many", len(s.Commands))
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.Commands)))
	for _, c := range s.Commands {
		if len(c.Buckets) > maxBuckets {
			return nil, fmt.Errorf("worker stats: %d buckets is over the limit of %d", len(c.Buckets), maxBuckets)
		}
		b = binary.BigEndian.AppendUint32(b, c.Code)
		b = binary.BigEndian.AppendUint64(b, c.Count)
		b = binary.BigEndian.AppendUint64(b, c.Nanos)
		b = append(b, byte(len(c.Buckets)))
		for _, n := range c.Buckets {
			b = binary.BigEndian.AppendUint64(b, n)
		}
	}
	if len(s.Guardian) > 0xffff {
		return nil, fmt.Errorf("worker stats: %d guardian call counts is too many", len(s.Guardian))
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.Guardian)))
	for _, g := range s.Guardian {
		var err error
		if b, err = appendString(b, g.Op); err != nil {
			return nil, err
		}
		if b, err = appendString(b, g.Result); err != nil {
			return nil, err
		}
		b = binary.BigEndian.AppendUint64(b, g.Count)
	}
	b = binary.BigEndian.AppendUint64(b, s.Direct)
	return b, nil
}

func appendString(b []byte, s string) ([]byte, error) {
	if len(s) > 0xffff {
		return nil, fmt.Errorf("worker message: a string of %d bytes is too long", len(s))
	}
	return wire.AppendString(b, s), nil
}

func appendRecord(b []byte, r *state.Record) ([]byte, error) {
	if r == nil {
		return nil, errors.New("worker message: no record")
	}
	rec, err := r.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return append(b, rec...), nil
}

// Marshal encodes m as a whole frame, length included.
func Marshal(m Message) ([]byte, error) {
	b, err := m.appendFields([]byte{0, 0, 0, 0, byte(m.Type())})
	if err != nil {
		return nil, err
	}
	if len(b)-4 > MaxFrame {
		return nil, fmt.Errorf("worker message of type %d: %d bytes is over the limit of %d", m.Type(), len(b)-4, MaxFrame)
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b, nil
}

// WriteMessage writes m as one frame in one write. The frame is wiped
// afterwards: it may hold a key.
func WriteMessage(w io.Writer, m Message) error {
	b, err := Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	clear(b)
	return err
}

// ReadMessage reads one frame and decodes it. A connection that ends
// between frames gives io.EOF.
func ReadMessage(r io.Reader) (Message, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("%w: frame of %d bytes (limit %d)", ErrMalformed, n, MaxFrame)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	m, err := DecodeMessage(b)
	clear(b) // the message does not alias it, and it may hold a key
	return m, err
}

// DecodeMessage decodes one frame's contents (the type byte and the
// fields, without the length). Every error wraps ErrMalformed; the message
// does not alias b.
func DecodeMessage(b []byte) (Message, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty frame", ErrMalformed)
	}
	d := &decoder{Fields: wire.NewFields(b[1:])}
	var m Message
	switch t := Type(b[0]); t {
	case TypeKey:
		k := Key{VMID: d.Str(), KeyID: d.Str()}
		k.Secret = append([]byte(nil), d.Take(KeySize)...)
		m = k
	case TypeReady:
		m = Ready{}
	case TypeGet:
		m = Get{VMID: d.Str()}
	case TypeRecord, TypePut:
		rec, err := state.ParseRecord(d.Rest())
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrMalformed, err)
		}
		if t == TypeRecord {
			m = Record{Record: rec}
		} else {
			m = Put{Record: rec}
		}
	case TypeNotFound:
		m = NotFound{}
	case TypeAck:
		m = Ack{Generation: d.U64()}
	case TypeError:
		m = Error{Message: d.Str()}
	case TypeStatsReq:
		m = StatsRequest{}
	case TypeStats:
		m = d.stats()
	case TypeGuardian:
		m = Guardian{VMID: d.Str(), Config: []byte(d.Str())}
	case TypeGetProtector:
		m = GetProtector{VMID: d.Str()}
	case TypeProtector:
		m = Protector{Data: append([]byte{}, d.Rest()...)}
	case TypePutProtector:
		m = PutProtector{VMID: d.Str(), Data: append([]byte{}, d.Rest()...)}
	case TypeKeyStatus:
		m = KeyStatus{Err: d.Str()}
	case TypeAssign:
		m = d.assign()
	default:
		return nil, fmt.Errorf("%w: unknown type %d", ErrMalformed, t)
	}
	switch {
	case d.Short():
		return nil, fmt.Errorf("%w: type %d cut short at %d bytes", ErrMalformed, b[0], len(b))
	case d.bad != "":
		return nil, fmt.Errorf("%w: type %d: %s", ErrMalformed, b[0], d.bad)
	case d.Left() != 0:
		return nil, fmt.Errorf("%w: %d bytes after a message of type %d", ErrMalformed, d.Left(), b[0])
	}
	return m, nil
}

// decoder reads a message's fields, and why they do not decode when they
// are not short.
type decoder struct {
	*wire.Fields
	bad string
}

// assign decodes Assign.
func (d *decoder) assign() Assign {
	a := Assign{Name: d.Str()}
	flags := d.Take(1)
	a.VsockCID = d.U32()
	n := d.Take(1)
	if d.Short() {
		return Assign{}
	}
	if flags[0] > 1 {
		d.bad = fmt.Sprintf("unknown flags %#x", flags[0])
		return Assign{}
	}
	a.StartupClear = flags[0] == 1
	for _, r := range d.Take(int(n[0])) {
		a.Sockets = append(a.Sockets, Socket(r))
	}
	if err := checkSockets(a.Sockets); err != nil {
		d.bad = err.Error()
	}
	return a
}

// stats decodes Stats. The counts are taken as sent: they only feed the
// metrics.
func (d *decoder) stats() Stats {
	n := d.Take(2)
	if n == nil {
		return Stats{}
	}
	var s Stats
	for range binary.BigEndian.Uint16(n) {
		c := CommandStats{Code: d.U32(), Count: d.U64(), Nanos: d.U64()}
		nb := d.Take(1)
		if d.Short() {
			return Stats{}
		}
		if nb[0] > maxBuckets {
			d.bad = fmt.Sprintf("%d latency buckets is over the limit of %d", nb[0], maxBuckets)
			return Stats{}
		}
		for range nb[0] {
			c.Buckets = append(c.Buckets, d.U64())
		}
		if d.Short() {
			return Stats{}
		}
		s.Commands = append(s.Commands, c)
	}
	if n = d.Take(2); n == nil {
		return Stats{}
	}
	for range binary.BigEndian.Uint16(n) {
		s.Guardian = append(s.Guardian, GuardianCalls{Op: d.Str(), Result: d.Str(), Count: d.U64()})
		if d.Short() {
			return Stats{}
		}
	}
	s.Direct = d.U64()
	return s
}

// WriteAssign sends a on conn in one sendmsg(2), with files, the listening
// sockets of a.Sockets in that order, as SCM_RIGHTS.
func WriteAssign(conn *net.UnixConn, a Assign, files []*os.File) error {
	if len(files) != len(a.Sockets) {
		return fmt.Errorf("assign VM %q: %d sockets for %d roles", a.Name, len(files), len(a.Sockets))
	}
	frame, err := Marshal(a)
	if err != nil {
		return err
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	n, _, err := conn.WriteMsgUnix(frame, syscall.UnixRights(fds...), nil)
	runtime.KeepAlive(files)
	switch {
	case err != nil:
		return fmt.Errorf("assign VM %q: %w", a.Name, err)
	case n != len(frame):
		return fmt.Errorf("assign VM %q: sent %d of %d bytes", a.Name, n, len(frame))
	}
	return nil
}

// ReadAssign reads the Assign that WriteAssign sent and the sockets that
// came with it, in the order of its Sockets. Anything else (another
// message, a frame with no or other descriptors) is an error, and closes
// whatever descriptors came.
func ReadAssign(conn *net.UnixConn) (Assign, []*os.File, error) {
	var hdr [4]byte
	oob := make([]byte, syscall.CmsgSpace(4*int(SocketVsockData)))
	// The descriptors come with the frame's first byte.
	n, oobn, flags, _, err := conn.ReadMsgUnix(hdr[:], oob)
	if err != nil {
		return Assign{}, nil, fmt.Errorf("read the VM's assignment: %w", err)
	}
	files, err := parseRights(oob[:oobn])
	fail := func(err error) (Assign, []*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return Assign{}, nil, fmt.Errorf("read the VM's assignment: %w", err)
	}
	switch {
	case err != nil:
		return fail(err)
	case flags&syscall.MSG_CTRUNC != 0:
		return fail(fmt.Errorf("%w: more descriptors than sockets", ErrMalformed))
	case n == 0:
		return fail(io.EOF)
	}
	if _, err := io.ReadFull(conn, hdr[n:]); err != nil {
		return fail(err)
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size == 0 || size > MaxFrame {
		return fail(fmt.Errorf("%w: frame of %d bytes (limit %d)", ErrMalformed, size, MaxFrame))
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(conn, body); err != nil {
		return fail(err)
	}
	m, err := DecodeMessage(body)
	if err != nil {
		return fail(err)
	}
	a, ok := m.(Assign)
	switch {
	case !ok:
		return fail(fmt.Errorf("%w: a message of type %d before the assignment", ErrMalformed, m.Type()))
	case len(files) != len(a.Sockets):
		return fail(fmt.Errorf("%w: %d sockets came for %d roles", ErrMalformed, len(files), len(a.Sockets)))
	}
	return a, files, nil
}

// parseRights returns the descriptors of SCM_RIGHTS control messages.
func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := syscall.ParseUnixRights(&m)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, fmt.Errorf("control message: %w", err)
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "assigned socket"))
		}
	}
	return files, nil
}
