package workload

import (
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// sender lets go-tpm's typed commands run over a RoundTripper.
type sender struct{ rt RoundTripper }

func (s sender) Send(cmd []byte) ([]byte, error) {
	resp, err := s.rt.RoundTrip(cmd)
	if err != nil {
		return nil, err
	}
	return append([]byte(nil), resp...), nil
}

// TPM is one TPM set up for a set of operations: its NV indices defined and
// its primary keys created, their contexts saved so that each phase can load
// the keys it needs. The engines hold only three loaded objects, too few to
// keep every key loaded.
type TPM struct {
	saved [keyCount]*tpm2.TPMSContext
	names [keyCount]tpm2.TPM2BName
}

// Setup prepares a TPM, reached through rt, for the operations in sel.
func Setup(rt RoundTripper, sel []Op) (*TPM, error) {
	t := sender{rt}
	keys, nvs := needed(sel)
	for _, n := range nvs {
		attrs := tpm2.TPMANV{AuthWrite: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary}
		size := uint16(nvDataLen)
		if n == nvCounter {
			attrs.NT, size = tpm2.TPMNTCounter, 8
		}
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: tpm2.TPMIRHNVIndex(n), NameAlg: tpm2.TPMAlgSHA256, Attributes: attrs, DataSize: size}),
		}.Execute(t)
		if err != nil && !errors.Is(err, tpm2.TPMRCNVDefined) {
			return nil, fmt.Errorf("define NV index %#x: %w", uint32(n), err)
		}
	}
	tpm := &TPM{}
	for _, k := range keys {
		cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyTemplate(k))}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("create %v: %w", k, err)
		}
		saved, err := tpm2.ContextSave{SaveHandle: cp.ObjectHandle}.Execute(t)
		if _, ferr := (tpm2.FlushContext{FlushHandle: cp.ObjectHandle}).Execute(t); err == nil && ferr != nil {
			err = ferr
		}
		if err != nil {
			return nil, fmt.Errorf("save %v: %w", k, err)
		}
		tpm.saved[k], tpm.names[k] = &saved.Context, cp.Name
	}
	return tpm, nil
}

// Phase is an operation ready to run on one TPM, with the keys it needs
// loaded.
type Phase struct {
	Runner
	loaded []tpm2.TPMHandle
}

// Prepare loads the keys op needs and marshals its commands.
func (tpm *TPM) Prepare(rt RoundTripper, op Op) (*Phase, error) {
	t := sender{rt}
	p := &Phase{}
	var h handles
	for _, k := range op.needs {
		if tpm.saved[k] == nil {
			p.Close(rt)
			return nil, fmt.Errorf("%s: %v was not set up", op.Name, k)
		}
		rsp, err := tpm2.ContextLoad{Context: *tpm.saved[k]}.Execute(t)
		if err != nil {
			p.Close(rt)
			return nil, fmt.Errorf("%s: load %v: %w", op.Name, k, err)
		}
		h[k] = tpm2.NamedHandle{Handle: rsp.LoadedHandle, Name: tpm.names[k]}
		p.loaded = append(p.loaded, rsp.LoadedHandle)
	}
	r, err := op.build(h)
	if err != nil {
		p.Close(rt)
		return nil, err
	}
	p.Runner = r
	return p, nil
}

// Close flushes the keys the phase loaded.
func (p *Phase) Close(rt RoundTripper) error {
	var errs []error
	for _, h := range p.loaded {
		if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(sender{rt}); err != nil {
			errs = append(errs, fmt.Errorf("flush %#x: %w", uint32(h), err))
		}
	}
	p.loaded = nil
	return errors.Join(errs...)
}
