// Package workload defines the TPM operations the benchmark times. Each VM's
// TPM is set up once (NV indices defined, primary keys created and their
// contexts saved); before an operation's phase the keys it needs are loaded
// and its commands are marshalled, so the timed loop only sends raw bytes, as
// a hypervisor forwarding a guest's commands does, and checks that every
// response code is 0.
package workload

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// RoundTripper sends one TPM command and returns its response, which is
// valid until the next call.
type RoundTripper interface {
	RoundTrip(cmd []byte) ([]byte, error)
}

// RCError is a TPM response with a non-zero response code.
type RCError struct {
	Command uint32
	RC      uint32
}

func (e *RCError) Error() string {
	return fmt.Sprintf("command %#x: response code %#x", e.Command, e.RC)
}

// check returns an RCError unless resp carries response code 0.
func check(cmd, resp []byte) error {
	if len(resp) < 10 {
		return fmt.Errorf("command %#x: %d-byte response", binary.BigEndian.Uint32(cmd[6:]), len(resp))
	}
	if rc := binary.BigEndian.Uint32(resp[6:]); rc != 0 {
		return &RCError{Command: binary.BigEndian.Uint32(cmd[6:]), RC: rc}
	}
	return nil
}

// Runner performs one operation on one TPM: the unit that is timed.
type Runner interface {
	// Run performs the operation once. It fails on a non-zero response code.
	Run(rt RoundTripper) error
}

type key int

const (
	keyECCSign key = iota
	keyRSASign
	keyStorage
	keyCount
)

// Op is a timed operation.
type Op struct {
	// Name is the short name used on the command line and in reports.
	Name string
	// Title describes the commands one operation sends.
	Title string
	needs []key
	nv    []nvIndex
	build func(h handles) (Runner, error)
}

// handles are the transient handles of the keys loaded for a phase.
type handles [keyCount]tpm2.NamedHandle

// NV indices, defined at setup with an empty auth value.
type nvIndex uint32

const (
	nvData    nvIndex = 0x01500010 // ordinary, 64 bytes
	nvCounter nvIndex = 0x01500011 // counter
	nvDataLen         = 64
)

// pcrIndex is the PCR extended and read: 16, the debug PCR, resettable and
// extendable from locality 0.
const pcrIndex = 16

var ops = []Op{
	{Name: "getrandom", Title: "GetRandom(32)", build: simple(tpm2.GetRandom{BytesRequested: 32})},
	{Name: "pcrextend", Title: "PCR_Extend(16, SHA-256)", build: simple(tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcrIndex), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: pattern(32)}}},
	})},
	{Name: "pcrread", Title: "PCR_Read(SHA-256: 16)", build: simple(tpm2.PCRRead{
		PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrIndex)},
		}},
	})},
	{Name: "nvwrite", Title: "NV_Write(64 bytes, new data each time)", nv: []nvIndex{nvData}, build: buildNVWrite},
	{Name: "nvincrement", Title: "NV_Increment(counter)", nv: []nvIndex{nvCounter}, build: simple(tpm2.NVIncrement{
		AuthHandle: nvHandle(nvCounter),
		NVIndex:    nvHandle(nvCounter),
	})},
	{Name: "signecc", Title: "Sign(ECC P-256, ECDSA-SHA256)", needs: []key{keyECCSign}, build: func(h handles) (Runner, error) {
		return marshalRunner(signCommand(h[keyECCSign]))
	}},
	{Name: "signrsa", Title: "Sign(RSA-2048, RSASSA-SHA256)", needs: []key{keyRSASign}, build: func(h handles) (Runner, error) {
		return marshalRunner(signCommand(h[keyRSASign]))
	}},
	{Name: "createprimary", Title: "CreatePrimary(ECC P-256) + FlushContext", build: buildCreatePrimary},
	{Name: "createload", Title: "Create(ECC P-256) + Load + FlushContext", needs: []key{keyStorage}, build: buildCreateLoad},
}

// All returns every operation, in report order.
func All() []Op { return append([]Op(nil), ops...) }

// Names returns the names of every operation.
func Names() []string {
	var names []string
	for _, op := range ops {
		names = append(names, op.Name)
	}
	return names
}

// Select returns the operations named in a comma-separated list ("all" for
// every one), in report order.
func Select(list string) ([]Op, error) {
	if list == "" || list == "all" {
		return All(), nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		found := false
		for _, op := range ops {
			found = found || op.Name == n
		}
		if !found {
			return nil, fmt.Errorf("unknown operation %q (have %s)", n, strings.Join(Names(), ", "))
		}
		want[n] = true
	}
	var sel []Op
	for _, op := range ops {
		if want[op.Name] {
			sel = append(sel, op)
		}
	}
	return sel, nil
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 1)
	}
	return b
}

// nvHandle names an NV index for a password session. The Name of a handle is
// not part of a command authorised with a password, so any value serves.
func nvHandle(i nvIndex) tpm2.AuthHandle {
	name := binary.BigEndian.AppendUint32(nil, uint32(i))
	return tpm2.AuthHandle{Handle: tpm2.TPMHandle(i), Name: tpm2.TPM2BName{Buffer: name}, Auth: tpm2.PasswordAuth(nil)}
}

func signCommand(k tpm2.NamedHandle) tpm2.Sign {
	return tpm2.Sign{
		KeyHandle:  tpm2.AuthHandle{Handle: k.Handle, Name: k.Name, Auth: tpm2.PasswordAuth(nil)},
		Digest:     tpm2.TPM2BDigest{Buffer: pattern(32)},
		InScheme:   tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}
}

// errCaptured stops go-tpm's Execute once the command is marshalled.
var errCaptured = errors.New("command captured")

// capture is a go-tpm transport that keeps the command instead of sending it.
type capture struct{ cmd []byte }

func (c *capture) Send(cmd []byte) ([]byte, error) {
	c.cmd = append([]byte(nil), cmd...)
	return nil, errCaptured
}

// command is any go-tpm command.
type command[R any] interface {
	Execute(t transport.TPM, s ...tpm2.Session) (*R, error)
}

// Marshal returns the bytes go-tpm sends for cmd (with password sessions,
// which make them the same every time).
func Marshal[R any](cmd command[R]) ([]byte, error) {
	var c capture
	if _, err := cmd.Execute(&c); !errors.Is(err, errCaptured) {
		return nil, fmt.Errorf("marshal %T: %v", cmd, err)
	}
	return c.cmd, nil
}

func marshalRunner[R any](cmd command[R]) (Runner, error) {
	b, err := Marshal(cmd)
	if err != nil {
		return nil, err
	}
	return Raw(b), nil
}

func simple[R any](cmd command[R]) func(handles) (Runner, error) {
	return func(handles) (Runner, error) { return marshalRunner(cmd) }
}

// Raw is one pre-marshalled command.
type Raw []byte

// Run sends the command and checks its response code.
func (r Raw) Run(rt RoundTripper) error {
	resp, err := rt.RoundTrip(r)
	if err != nil {
		return err
	}
	return check(r, resp)
}

// Echo sends a command to an echo server and checks that it came back.
type Echo []byte

// Run sends the bytes and compares the reply's length.
func (e Echo) Run(rt RoundTripper) error {
	resp, err := rt.RoundTrip(e)
	if err != nil {
		return err
	}
	if len(resp) != len(e) {
		return fmt.Errorf("echo: %d bytes back, sent %d", len(resp), len(e))
	}
	return nil
}

// EchoOp is what the echo floor sends: the GetRandom command's bytes. The
// echo server sends them back, and their size field frames the reply.
func EchoOp() (Runner, error) {
	b, err := Marshal[tpm2.GetRandomResponse](tpm2.GetRandom{BytesRequested: 32})
	return Echo(b), err
}

// flushCommand returns TPM2_FlushContext of handle h.
func flushCommand(h uint32) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x65, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[10:], h)
	return b
}

// flushAfter runs a command that creates an object, then flushes the object
// by the handle in the response.
type flushAfter struct {
	cmd   []byte
	flush []byte
}

func (f *flushAfter) Run(rt RoundTripper) error {
	resp, err := rt.RoundTrip(f.cmd)
	if err != nil {
		return err
	}
	if err := check(f.cmd, resp); err != nil {
		return err
	}
	if len(resp) < 14 {
		return fmt.Errorf("response without a handle: %d bytes", len(resp))
	}
	copy(f.flush[10:14], resp[10:14])
	return Raw(f.flush).Run(rt)
}

// nvWrite writes 64 bytes that differ from the last write: a count in its
// first 8 bytes. Writing the same bytes again leaves NV unchanged, and both
// engines then skip storing it.
type nvWrite struct {
	cmd   []byte
	data  int // offset of the data in cmd
	count uint64
}

func buildNVWrite(handles) (Runner, error) {
	cmd, err := Marshal[tpm2.NVWriteResponse](tpm2.NVWrite{
		AuthHandle: nvHandle(nvData),
		NVIndex:    nvHandle(nvData),
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: pattern(nvDataLen)},
	})
	if err != nil {
		return nil, err
	}
	// The parameters end with the data and a 2-byte offset.
	return &nvWrite{cmd: cmd, data: len(cmd) - 2 - nvDataLen}, nil
}

func (w *nvWrite) Run(rt RoundTripper) error {
	w.count++
	binary.BigEndian.PutUint64(w.cmd[w.data:], w.count)
	return Raw(w.cmd).Run(rt)
}

func buildCreatePrimary(handles) (Runner, error) {
	cmd, err := Marshal[tpm2.CreatePrimaryResponse](tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	})
	if err != nil {
		return nil, err
	}
	return &flushAfter{cmd: cmd, flush: flushCommand(0)}, nil
}

// createLoad runs TPM2_Create, then TPM2_Load of what it returned, then
// TPM2_FlushContext of the loaded object. The Load command is the fixed
// prefix (header, parent, password session) followed by the outPrivate and
// outPublic of the Create response, copied as they are.
type createLoad struct {
	create []byte
	load   []byte // the prefix; grown once to hold a whole command
	prefix int
	flush  []byte
}

func buildCreateLoad(h handles) (Runner, error) {
	parent := h[keyStorage]
	create, err := Marshal[tpm2.CreateResponse](tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: parent.Handle, Name: parent.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(eccSignTemplate(false)),
	})
	if err != nil {
		return nil, err
	}
	load := make([]byte, 0, 4096)
	load = binary.BigEndian.AppendUint16(load, 0x8002)
	load = binary.BigEndian.AppendUint32(load, 0) // size, set per command
	load = binary.BigEndian.AppendUint32(load, uint32(tpm2.TPMCCLoad))
	load = binary.BigEndian.AppendUint32(load, uint32(parent.Handle))
	load = binary.BigEndian.AppendUint32(load, 9) // authorization size
	load = binary.BigEndian.AppendUint32(load, uint32(tpm2.TPMRSPW))
	load = append(load, 0, 0, 0, 0, 0) // nonce, attributes, empty password
	return &createLoad{create: create, load: load, prefix: len(load), flush: flushCommand(0)}, nil
}

func (c *createLoad) Run(rt RoundTripper) error {
	resp, err := rt.RoundTrip(c.create)
	if err != nil {
		return err
	}
	if err := check(c.create, resp); err != nil {
		return err
	}
	// Response: header, parameterSize, outPrivate, outPublic, ...
	off := 14
	for range 2 {
		if off+2 > len(resp) {
			return fmt.Errorf("create response too short: %d bytes", len(resp))
		}
		off += 2 + int(binary.BigEndian.Uint16(resp[off:]))
	}
	if off > len(resp) || c.prefix+off-14 > cap(c.load) {
		return fmt.Errorf("create response malformed: %d bytes", len(resp))
	}
	load := append(c.load[:c.prefix], resp[14:off]...)
	binary.BigEndian.PutUint32(load[2:], uint32(len(load)))
	resp, err = rt.RoundTrip(load)
	if err != nil {
		return err
	}
	if err := check(load, resp); err != nil {
		return err
	}
	if len(resp) < 14 {
		return fmt.Errorf("load response without a handle: %d bytes", len(resp))
	}
	copy(c.flush[10:14], resp[10:14])
	return Raw(c.flush).Run(rt)
}

func eccSignTemplate(primary bool) tpm2.TPMTPublic {
	t := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, NoDA: true, SignEncrypt: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
	if primary {
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: []byte("vtpmbench sign")},
		})
	}
	return t
}

func rsaSignTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgRSA,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, NoDA: true, SignEncrypt: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTRSAScheme{
				Scheme:  tpm2.TPMAlgRSASSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			KeyBits: 2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: []byte("vtpmbench sign")}),
	}
}

func keyTemplate(k key) tpm2.TPMTPublic {
	switch k {
	case keyECCSign:
		return eccSignTemplate(true)
	case keyRSASign:
		return rsaSignTemplate()
	}
	return tpm2.ECCSRKTemplate
}

func (k key) String() string {
	return [...]string{"ECC signing key", "RSA signing key", "ECC storage key"}[k]
}

// needed lists, sorted, the keys and NV indices a set of operations uses.
func needed(sel []Op) ([]key, []nvIndex) {
	ks, ns := map[key]bool{}, map[nvIndex]bool{}
	for _, op := range sel {
		for _, k := range op.needs {
			ks[k] = true
		}
		for _, n := range op.nv {
			ns[n] = true
		}
	}
	var keys []key
	for k := range ks {
		keys = append(keys, k)
	}
	var nvs []nvIndex
	for n := range ns {
		nvs = append(nvs, n)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	sort.Slice(nvs, func(i, j int) bool { return nvs[i] < nvs[j] })
	return keys, nvs
}
