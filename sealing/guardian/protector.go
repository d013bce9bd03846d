package guardian

import (
	"crypto/rand"
	"fmt"
	"slices"
)

// Protector roles: the owner's guardian, and fabrics the owner granted.
const (
	RoleOwner   = "owner"
	RoleGranted = "granted"
)

// ProtectorVersion is the protector format this build writes and reads.
const ProtectorVersion = 1

// Limits on a protector, so a hostile one cannot cost much to parse.
const (
	maxProtectorSize = 64 << 10
	maxWraps         = 16
	maxNameLen       = 253
	maxVMIDLen       = 4096
	// wrappedSize is an HPKE P-256 encapsulated key, the key, and the tag.
	wrappedSize = 65 + StateKeySize + 16
)

// Protector is a VM's state key wrapped to one or more guardians. It is
// stored beside the VM's state and is worthless without a guardian's release.
type Protector struct {
	Version int    `json:"version"`
	VMID    string `json:"vm_id"`
	Wraps   []Wrap `json:"wraps"`
}

// Wrap is the state key wrapped to one guardian's public encryption key.
type Wrap struct {
	// Guardian names the guardian (the owner's, or a granted fabric's).
	Guardian string `json:"guardian"`
	// Role is RoleOwner or RoleGranted.
	Role string `json:"role"`
	// KeyID is the KeyID of the guardian's public encryption key.
	KeyID string `json:"key_id"`
	// Wrapped is the HPKE ciphertext of the key, bound to the VM id.
	Wrapped []byte `json:"wrapped"`
}

// Recipient is a guardian that a key can be wrapped to.
type Recipient struct {
	// Name names the guardian or fabric.
	Name string `json:"name"`
	// Public is its public encryption key.
	Public []byte `json:"public"`
}

// NewStateKey draws a fresh VM state key.
func NewStateKey() ([]byte, error) {
	key := make([]byte, StateKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("draw a state key: %w", err)
	}
	return key, nil
}

// NewProtector wraps a new VM's state key to its owner's guardian.
func NewProtector(vmID string, stateKey []byte, owner Recipient) (*Protector, error) {
	p := &Protector{Version: ProtectorVersion, VMID: vmID}
	if err := p.add(stateKey, owner, RoleOwner); err != nil {
		return nil, err
	}
	return p, p.validate()
}

// Grant adds a fabric the owner allows to run the VM. The owner's guardian
// calls it with the key it unwrapped; a fabric granted before is replaced.
func (p *Protector) Grant(stateKey []byte, fabric Recipient) error {
	p.Wraps = slices.DeleteFunc(p.Wraps, func(w Wrap) bool { return w.Role == RoleGranted && w.Guardian == fabric.Name })
	if err := p.add(stateKey, fabric, RoleGranted); err != nil {
		return err
	}
	return p.validate()
}

func (p *Protector) add(stateKey []byte, to Recipient, role string) error {
	if len(stateKey) != StateKeySize {
		return fmt.Errorf("protector of VM %q: state key has %d bytes, want %d", p.VMID, len(stateKey), StateKeySize)
	}
	wrapped, err := seal(to.Public, protectorInfo+p.VMID, stateKey)
	if err != nil {
		return fmt.Errorf("protector of VM %q: wrap to guardian %q: %w", p.VMID, to.Name, err)
	}
	p.Wraps = append(p.Wraps, Wrap{Guardian: to.Name, Role: role, KeyID: KeyID(to.Public), Wrapped: wrapped})
	return nil
}

// Unwrap opens the state key with a guardian's key, for the VM vmID. A
// protector of another VM fails with CodeWrongVM, one that holds no wrap for
// this guardian with CodeNotGranted.
func (p *Protector) Unwrap(guardian *EncryptionKey, vmID string) (key []byte, role string, err error) {
	if p.VMID != vmID {
		return nil, "", Errorf(CodeWrongVM, "the protector belongs to VM %q, not to VM %q", p.VMID, vmID)
	}
	id := KeyID(guardian.Public())
	i := slices.IndexFunc(p.Wraps, func(w Wrap) bool { return w.KeyID == id })
	if i < 0 {
		return nil, "", Errorf(CodeNotGranted, "the protector of VM %q holds no key for this guardian (key %s)", vmID, id)
	}
	key, err = guardian.open(protectorInfo+vmID, p.Wraps[i].Wrapped)
	if err != nil || len(key) != StateKeySize {
		// Bound to the VM id: a protector relabelled for another VM ends here.
		return nil, "", Errorf(CodeWrongVM, "the protector does not open for VM %q: made for another VM, or altered", vmID)
	}
	return key, p.Wraps[i].Role, nil
}

// Marshal encodes the protector for storage.
func (p *Protector) Marshal() ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	return marshal(p)
}

// ParseProtector decodes a stored protector, strictly.
func ParseProtector(b []byte) (*Protector, error) {
	if len(b) > maxProtectorSize {
		return nil, Errorf(CodeBadProtector, "protector of %d bytes exceeds %d", len(b), maxProtectorSize)
	}
	var p Protector
	if err := unmarshalStrict(b, &p); err != nil {
		return nil, Errorf(CodeBadProtector, "protector: %v", err)
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

func (p *Protector) validate() error {
	bad := func(format string, args ...any) error {
		return Errorf(CodeBadProtector, "protector: "+format, args...)
	}
	switch {
	case p.Version != ProtectorVersion:
		return bad("version %d, this build reads %d", p.Version, ProtectorVersion)
	case p.VMID == "" || len(p.VMID) > maxVMIDLen:
		return bad("VM id of %d bytes", len(p.VMID))
	case len(p.Wraps) == 0 || len(p.Wraps) > maxWraps:
		return bad("%d wrapped keys, want 1 to %d", len(p.Wraps), maxWraps)
	}
	owners := 0
	seen := map[string]bool{}
	for i, w := range p.Wraps {
		switch {
		case w.Guardian == "" || len(w.Guardian) > maxNameLen:
			return bad("wrap %d: guardian name of %d bytes", i, len(w.Guardian))
		case w.Role != RoleOwner && w.Role != RoleGranted:
			return bad("wrap %d: role %q", i, w.Role)
		case len(w.KeyID) != 16:
			return bad("wrap %d: key id %q", i, w.KeyID)
		case len(w.Wrapped) != wrappedSize:
			return bad("wrap %d: %d wrapped bytes, want %d", i, len(w.Wrapped), wrappedSize)
		case seen[w.KeyID]:
			return bad("wrap %d: key %s twice", i, w.KeyID)
		}
		seen[w.KeyID] = true
		if w.Role == RoleOwner {
			owners++
		}
	}
	if owners != 1 {
		return bad("%d owners, want 1", owners)
	}
	return nil
}
