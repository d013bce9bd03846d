package provision

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/vtpmd/vtpmd/vtpm"
)

// Device is the TPM being provisioned; *vtpm.Device is one.
type Device interface {
	// Execute runs one TPM command.
	Execute(ctx context.Context, cmd []byte) []byte
	// Init powers the TPM on from its stored state.
	Init(deleteVolatile bool) error
	// Startup sends TPM2_Startup.
	Startup(su vtpm.StartupType) error
	// Info describes the engine.
	Info() *vtpm.EngineInfo
}

// Handles and NV indices (see the package comment).
//
// The TCG EK Credential Profile (2.3, 2.2.1.4) puts the low range EKs'
// certificates, those of the default templates L-1 (RSA 2048) and L-2 (ECC
// NIST P-256), at 0x01c00002 and 0x01c0000a: where tpm2_getekcertificate
// and go-attestation look. The TCG Registry of Reserved TPM 2.0 Handles and
// Localities (2.3.1) reserves 0x81010000-0x8101ffff for EKs; the TPM v2.0
// Provisioning Guidance (table 2) puts the RSA EK at 0x81010001, and the
// ECC P-256 EK would go at 0x81010002; vtpmd stores only its certificate
// and leaves the key to be derived from template L-2 when used (as
// tpm2_createek and go-attestation do), because the engine's NV is 16 KiB
// and a third persistent EK would leave a guest about 1 KiB of it.
//
// swtpm_setup (0.7 and later; swtpm_setup.c tpm2_create_eks_and_certs)
// makes, with --createek alone as libvirt passes it and whether or not
// --ecc is given (that one picks the storage key's type), the RSA 2048 EK
// and the high range ECC NIST P-384 one (template H-3) with its certificate
// at 0x01c00016 (2.2.1.5), persisted at 0x81010016 (swtpm.c
// TPM2_EK_ECC_SECP384R1_HANDLE, the handle mirroring the index); swtpm
// 0.7.1 here does so. vtpmd makes that one too, so that a TPM it
// provisions for libvirt has what swtpm_setup's has, and adds the P-256 EK
// that TCG default tools look for.
const (
	RSAEKHandle        tpm2.TPMHandle = 0x81010001
	ECCP384EKHandle    tpm2.TPMHandle = 0x81010016
	SPKHandle          tpm2.TPMHandle = 0x81000001
	RSAEKCertIndex     tpm2.TPMHandle = 0x01c00002
	ECCEKCertIndex     tpm2.TPMHandle = 0x01c0000a
	ECCP384EKCertIndex tpm2.TPMHandle = 0x01c00016
	PlatformCertIndex  tpm2.TPMHandle = 0x01c08000
)

// Engine limits of the reference TPM: the largest NV index and the most
// bytes one TPM2_NV_Write takes.
const (
	maxNVIndexSize = 2048
	maxNVWrite     = 1024
)

// Options says what to provision.
type Options struct {
	// EK creates the endorsement keys (RSA 2048, ECC NIST P-256 and ECC
	// NIST P-384) and makes the RSA and P-384 ones persistent.
	EK bool
	// EKCerts issues their certificates and stores them in NV; implies EK.
	EKCerts bool
	// PlatformCert issues the platform certificate (for the RSA EK) and
	// stores it in NV; implies EKCerts, as with swtpm_setup.
	PlatformCert bool
	// SPK creates the storage primary key (RSA 2048, or ECC NIST P-384
	// with SPKECC, as swtpm_setup makes them) at 0x81000001.
	SPK, SPKECC bool
	// LockNV write-locks every NV index written, for good (the indices
	// have TPMA_NV_WRITEDEFINE).
	LockNV bool
	// PCRBanks are the PCR banks to leave active ("sha1", "sha256",
	// "sha384", "sha512"); nil leaves the banks as they are.
	PCRBanks []string
	// CA signs the certificates; required for EKCerts.
	CA *CA
	// VMID names the VM in the certificates' subject ("" gives "unknown",
	// as with swtpm_localca).
	VMID string
	// Platform describes the platform for the platform certificate.
	Platform Platform
	// Log receives one line per step.
	Log *slog.Logger
}

// EK is an endorsement key made by Run.
type EK struct {
	// Kind is "rsa2048", "secp256r1" or "secp384r1", as in swtpm's EK
	// file names.
	Kind string
	// Handle is where the key is persistent, or 0 if it is not.
	Handle    tpm2.TPMHandle
	CertIndex tpm2.TPMHandle
	Public    crypto.PublicKey
	// Cert is the DER certificate stored at CertIndex, if issued.
	Cert []byte
}

// Result is what Run made.
type Result struct {
	EKs          []EK
	PlatformCert []byte
	// PCRBanks are the active PCR banks, when Options.PCRBanks was set.
	PCRBanks []string
	// NVIndices are the NV indices written.
	NVIndices []tpm2.TPMHandle
}

// Start powers a TPM on (manufacturing it if its store is empty) and sends
// TPM2_Startup(CLEAR), ready for Run or Reconfigure.
func Start(dev Device) error {
	if err := dev.Init(true); err != nil {
		return err
	}
	return dev.Startup(vtpm.StartupClear)
}

// Run provisions a started TPM as opts says and shuts it down in order
// (TPM2_Shutdown(CLEAR)), as swtpm_setup leaves it. It expects a TPM
// without EKs or certificates: a new one.
func Run(ctx context.Context, dev Device, opts Options) (*Result, error) {
	if opts.PlatformCert {
		opts.EKCerts = true
	}
	if opts.EKCerts {
		opts.EK = true
		if opts.CA == nil {
			return nil, errors.New("provision: certificates need a CA")
		}
	}
	p := newProvisioner(ctx, dev, opts.Log)
	res := &Result{}
	if opts.PCRBanks != nil {
		banks, err := p.allocatePCRs(opts.PCRBanks)
		if err != nil {
			return nil, err
		}
		res.PCRBanks = banks
	}
	if opts.EK {
		for _, k := range []struct {
			kind      string
			template  tpm2.TPMTPublic
			handle    tpm2.TPMHandle // 0: not persistent
			certIndex tpm2.TPMHandle
		}{
			{"rsa2048", tpm2.RSAEKTemplate, RSAEKHandle, RSAEKCertIndex},
			{"secp256r1", tpm2.ECCEKTemplate, 0, ECCEKCertIndex},
			{"secp384r1", ECCP384EKTemplate, ECCP384EKHandle, ECCP384EKCertIndex},
		} {
			pub, err := p.createPrimary(tpm2.TPMRHEndorsement, k.template, k.handle)
			if err != nil {
				return nil, fmt.Errorf("create the %s EK: %w", k.kind, err)
			}
			p.log.Info("created EK", "type", k.kind, "handle", fmt.Sprintf("%#x", uint32(k.handle)))
			res.EKs = append(res.EKs, EK{Kind: k.kind, Handle: k.handle, CertIndex: k.certIndex, Public: pub})
		}
	}
	if opts.SPK {
		template, kind := tpm2.RSASRKTemplate, "rsa2048"
		if opts.SPKECC {
			template, kind = eccP384SPKTemplate, "secp384r1"
		}
		if _, err := p.createPrimary(tpm2.TPMRHOwner, template, SPKHandle); err != nil {
			return nil, fmt.Errorf("create the storage primary key: %w", err)
		}
		p.log.Info("created storage primary key", "type", kind, "handle", fmt.Sprintf("%#x", uint32(SPKHandle)))
	}
	tpmInfo := TPMInfoOf(dev.Info())
	if opts.EKCerts {
		for i := range res.EKs {
			ek := &res.EKs[i]
			cert, err := opts.CA.IssueEK(ek.Public, tpmInfo, opts.VMID)
			if err != nil {
				return nil, fmt.Errorf("issue the %s EK certificate: %w", ek.Kind, err)
			}
			if err := p.writeNV(ek.CertIndex, cert, ek.Kind+" EK certificate"); err != nil {
				return nil, err
			}
			ek.Cert = cert
			res.NVIndices = append(res.NVIndices, ek.CertIndex)
		}
	}
	if opts.PlatformCert {
		cert, err := opts.CA.IssuePlatform(res.EKs[0].Public, opts.Platform, opts.VMID)
		if err != nil {
			return nil, fmt.Errorf("issue the platform certificate: %w", err)
		}
		if err := p.writeNV(PlatformCertIndex, cert, "platform certificate"); err != nil {
			return nil, err
		}
		res.PlatformCert = cert
		res.NVIndices = append(res.NVIndices, PlatformCertIndex)
	}
	if opts.LockNV {
		for _, index := range res.NVIndices {
			if err := p.lockNV(index); err != nil {
				return nil, err
			}
		}
		if len(res.NVIndices) > 0 {
			p.log.Info("write-locked NV", "indices", handleList(res.NVIndices))
		}
	}
	return res, p.shutdown()
}

// Reconfigure leaves exactly the given PCR banks active on a started TPM,
// with a power cycle if they change, and shuts it down in order. It returns
// the active banks.
func Reconfigure(ctx context.Context, dev Device, banks []string, log *slog.Logger) ([]string, error) {
	p := newProvisioner(ctx, dev, log)
	active, err := p.allocatePCRs(banks)
	if err != nil {
		return nil, err
	}
	return active, p.shutdown()
}

// provisioner runs go-tpm's typed commands on a Device.
type provisioner struct {
	ctx context.Context
	dev Device
	log *slog.Logger
	// nvNames are the names of the NV indices written.
	nvNames map[tpm2.TPMHandle]tpm2.TPM2BName
}

func newProvisioner(ctx context.Context, dev Device, log *slog.Logger) *provisioner {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &provisioner{ctx: ctx, dev: dev, log: log, nvNames: map[tpm2.TPMHandle]tpm2.TPM2BName{}}
}

// Send implements go-tpm's transport.TPM.
func (p *provisioner) Send(cmd []byte) ([]byte, error) {
	if err := p.ctx.Err(); err != nil {
		return nil, err
	}
	return append([]byte(nil), p.dev.Execute(p.ctx, cmd)...), nil
}

// createPrimary creates a primary key under hierarchy from template, makes
// it persistent at handle unless handle is 0, and returns its public key.
func (p *provisioner) createPrimary(hierarchy tpm2.TPMHandle, template tpm2.TPMTPublic, handle tpm2.TPMHandle) (crypto.PublicKey, error) {
	created, err := tpm2.CreatePrimary{PrimaryHandle: hierarchy, InPublic: tpm2.New2B(template)}.Execute(p)
	if err != nil {
		return nil, err
	}
	flush := func() { _, _ = tpm2.FlushContext{FlushHandle: created.ObjectHandle}.Execute(p) }
	if handle == 0 {
		flush()
		return publicKey(&created.OutPublic)
	}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name},
		PersistentHandle: handle,
	}.Execute(p)
	flush()
	if err != nil {
		return nil, fmt.Errorf("make it persistent at %#x: %w", uint32(handle), err)
	}
	return publicKey(&created.OutPublic)
}

// publicKey converts a TPM public area into a crypto public key.
func publicKey(b *tpm2.TPM2BPublic) (crypto.PublicKey, error) {
	pub, err := b.Contents()
	if err != nil {
		return nil, err
	}
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		detail, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, err
		}
		unique, err := pub.Unique.RSA()
		if err != nil {
			return nil, err
		}
		return tpm2.RSAPub(detail, unique)
	case tpm2.TPMAlgECC:
		detail, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, err
		}
		unique, err := pub.Unique.ECC()
		if err != nil {
			return nil, err
		}
		return tpm2.ECDSAPub(detail, unique)
	}
	return nil, fmt.Errorf("unexpected key type %#x", pub.Type)
}

// nvAttributes are the attributes of the certificate indices, as the TCG
// EK Credential Profile and swtpm_setup give them: written with platform
// authorization, readable by owner, platform and index authorization
// (empty), locked for good by TPM2_NV_WriteLock.
var nvAttributes = tpm2.TPMANV{
	PPWrite:        true,
	WriteDefine:    true,
	PPRead:         true,
	OwnerRead:      true,
	AuthRead:       true,
	NoDA:           true,
	PlatformCreate: true,
	NT:             tpm2.TPMNTOrdinary,
}

// writeNV defines index with platform authorization and writes data to it.
func (p *provisioner) writeNV(index tpm2.TPMHandle, data []byte, what string) error {
	if len(data) > maxNVIndexSize {
		return fmt.Errorf("the %s has %d bytes; an NV index of the TPM holds at most %d", what, len(data), maxNVIndexSize)
	}
	public := tpm2.TPMSNVPublic{
		NVIndex:    index,
		NameAlg:    tpm2.TPMAlgSHA256,
		Attributes: nvAttributes,
		DataSize:   uint16(len(data)),
	}
	_, err := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHPlatform, PublicInfo: tpm2.New2B(public)}.Execute(p)
	if errors.Is(err, tpm2.TPMRCNVSpace) {
		return fmt.Errorf("define NV index %#x for the %s (%d bytes): the TPM's NV memory is full: %w", uint32(index), what, len(data), err)
	}
	if err != nil {
		return fmt.Errorf("define NV index %#x for the %s: %w", uint32(index), what, err)
	}
	for off := 0; off < len(data); off += maxNVWrite {
		chunk := data[off:min(off+maxNVWrite, len(data))]
		name, err := tpm2.NVName(&public)
		if err != nil {
			return err
		}
		_, err = tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHPlatform,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: *name},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: chunk},
			Offset:     uint16(off),
		}.Execute(p)
		if err != nil {
			return fmt.Errorf("write the %s to NV index %#x: %w", what, uint32(index), err)
		}
		public.Attributes.Written = true
	}
	name, err := tpm2.NVName(&public)
	if err != nil {
		return err
	}
	p.nvNames[index] = *name
	p.log.Info("stored "+what, "index", fmt.Sprintf("%#x", uint32(index)), "size", len(data))
	return nil
}

func (p *provisioner) lockNV(index tpm2.TPMHandle) error {
	_, err := tpm2.NVWriteLock{AuthHandle: tpm2.TPMRHPlatform, NVIndex: tpm2.NamedHandle{Handle: index, Name: p.nvNames[index]}}.Execute(p)
	if err != nil {
		return fmt.Errorf("write-lock NV index %#x: %w", uint32(index), err)
	}
	return nil
}

func (p *provisioner) shutdown() error {
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(p); err != nil {
		return fmt.Errorf("shut the TPM down: %w", err)
	}
	return nil
}

// PCR bank names and their hash algorithms.
var pcrBankAlgs = map[string]tpm2.TPMIAlgHash{
	"sha1":   tpm2.TPMAlgSHA1,
	"sha256": tpm2.TPMAlgSHA256,
	"sha384": tpm2.TPMAlgSHA384,
	"sha512": tpm2.TPMAlgSHA512,
}

func bankName(alg tpm2.TPMIAlgHash) string {
	for name, a := range pcrBankAlgs {
		if a == alg {
			return name
		}
	}
	return fmt.Sprintf("alg-%#x", uint16(alg))
}

// ParsePCRBanks parses a comma-separated list of PCR bank names, as
// --pcr-banks and active_pcr_banks give it.
func ParsePCRBanks(s string) ([]string, error) {
	var banks []string
	for _, name := range strings.Split(s, ",") {
		name = strings.ToLower(strings.TrimSpace(name))
		if _, ok := pcrBankAlgs[name]; !ok {
			return nil, fmt.Errorf("unknown PCR bank %q (known: sha1, sha256, sha384, sha512)", name)
		}
		if !slices.Contains(banks, name) {
			banks = append(banks, name)
		}
	}
	return banks, nil
}

// pcrBanks reads the TPM's PCR banks: every implemented one, with whether
// it is active (any PCR selected).
func (p *provisioner) pcrBanks() ([]tpm2.TPMSPCRSelection, error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}.Execute(p)
	if err != nil {
		return nil, fmt.Errorf("read the PCR banks: %w", err)
	}
	sel, err := rsp.CapabilityData.Data.AssignedPCR()
	if err != nil {
		return nil, fmt.Errorf("read the PCR banks: %w", err)
	}
	return sel.PCRSelections, nil
}

func activeBanks(sels []tpm2.TPMSPCRSelection) []string {
	var names []string
	for _, s := range sels {
		if slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
			names = append(names, bankName(s.Hash))
		}
	}
	return names
}

// allocatePCRs leaves exactly banks active: TPM2_PCR_Allocate, then a power
// cycle for it to take effect. Nothing is sent when they are active already.
func (p *provisioner) allocatePCRs(banks []string) ([]string, error) {
	if len(banks) == 0 {
		return nil, errors.New("no PCR bank to activate")
	}
	current, err := p.pcrBanks()
	if err != nil {
		return nil, err
	}
	var implemented []string
	for _, s := range current {
		implemented = append(implemented, bankName(s.Hash))
	}
	for _, b := range banks {
		if _, ok := pcrBankAlgs[b]; !ok {
			return nil, fmt.Errorf("unknown PCR bank %q (known: sha1, sha256, sha384, sha512)", b)
		}
		if !slices.Contains(implemented, b) {
			return nil, fmt.Errorf("the TPM has no %s PCR bank (it has %s)", b, strings.Join(implemented, ","))
		}
	}
	allocation := tpm2.TPMLPCRSelection{}
	changed := false
	for _, s := range current {
		want := slices.Contains(banks, bankName(s.Hash))
		bitmap := make([]byte, len(s.PCRSelect))
		if want {
			for i := range bitmap {
				bitmap[i] = 0xff
			}
		}
		if !slices.Equal(bitmap, s.PCRSelect) {
			changed = true
		}
		allocation.PCRSelections = append(allocation.PCRSelections, tpm2.TPMSPCRSelection{Hash: s.Hash, PCRSelect: bitmap})
	}
	if !changed {
		active := activeBanks(current)
		p.log.Info("PCR banks already active", "banks", strings.Join(active, ","))
		return active, nil
	}
	if err := p.pcrAllocate(allocation); err != nil {
		return nil, err
	}
	// The allocation takes effect at the next TPM2_Startup.
	if err := p.shutdown(); err != nil {
		return nil, err
	}
	if err := Start(p.dev); err != nil {
		return nil, fmt.Errorf("power cycle after PCR_Allocate: %w", err)
	}
	after, err := p.pcrBanks()
	if err != nil {
		return nil, err
	}
	active := activeBanks(after)
	for _, b := range banks {
		if !slices.Contains(active, b) {
			return nil, fmt.Errorf("PCR bank %s is not active after PCR_Allocate and a power cycle (active: %s)", b, strings.Join(active, ","))
		}
	}
	if len(active) != len(banks) {
		return nil, fmt.Errorf("PCR banks %s are active after PCR_Allocate of %s", strings.Join(active, ","), strings.Join(banks, ","))
	}
	p.log.Info("activated PCR banks", "banks", strings.Join(active, ","), "implemented", strings.Join(implemented, ","))
	return active, nil
}

// pcrAllocate sends TPM2_PCR_Allocate with platform authorization (go-tpm
// has no typed command for it).
func (p *provisioner) pcrAllocate(allocation tpm2.TPMLPCRSelection) error {
	const ccPCRAllocate = 0x12b
	cmd := []byte{0x80, 0x02, 0, 0, 0, 0}
	cmd = binary.BigEndian.AppendUint32(cmd, ccPCRAllocate)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRHPlatform))
	// One password session with an empty password.
	cmd = binary.BigEndian.AppendUint32(cmd, 9)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRSPW))
	cmd = append(cmd, 0, 0, 0, 0, 0)
	cmd = append(cmd, tpm2.Marshal(allocation)...)
	binary.BigEndian.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := p.Send(cmd)
	if err != nil {
		return err
	}
	if len(rsp) < 10 {
		return fmt.Errorf("PCR_Allocate: short response % x", rsp)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:]); rc != 0 {
		return fmt.Errorf("PCR_Allocate: %w", tpm2.TPMRC(rc))
	}
	// header | parameterSize | allocationSuccess | maxPCR | sizeNeeded | sizeAvailable
	if len(rsp) < 15 || rsp[14] != 1 {
		return fmt.Errorf("PCR_Allocate did not succeed: response % x", rsp)
	}
	return nil
}

func handleList(hs []tpm2.TPMHandle) string {
	var s []string
	for _, h := range hs {
		s = append(s, fmt.Sprintf("%#x", uint32(h)))
	}
	return strings.Join(s, ",")
}
