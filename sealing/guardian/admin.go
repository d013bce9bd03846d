package guardian

import (
	"crypto/ecdh"
	"crypto/sha256"
	"io"
	"time"
)

// The admin endpoints of a guardian. Each needs the admin token as a bearer
// token (Client.Token); the name of the object follows the path where one is
// named.
const (
	PathAdminHosts     = "/v1/admin/hosts"     // POST AddHostRequest -> Host; GET -> HostList; DELETE /{name}
	PathAdminBaselines = "/v1/admin/baselines" // POST BaselineRequest -> Baseline; GET -> BaselineList; DELETE /{group}
	PathAdminGrants    = "/v1/admin/grants"    // POST GrantRequest -> GrantResponse; GET -> GrantList
	PathAdminAudit     = "/v1/admin/audit"     // GET [?last=N] -> AuditList
)

// DefaultBaselinePCRs are the PCRs a baseline covers unless told otherwise:
// the firmware's, up to the boot loader.
var DefaultBaselinePCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// AddHostRequest registers a host in a group.
type AddHostRequest struct {
	Name     string       `json:"name"`
	Group    string       `json:"group"`
	Identity HostIdentity `json:"identity"`
}

// Host is a registered host.
type Host struct {
	Name     string       `json:"name"`
	Group    string       `json:"group"`
	Identity HostIdentity `json:"identity"`
	Added    time.Time    `json:"added"`
}

// HostList lists the registered hosts.
type HostList struct {
	Hosts []Host `json:"hosts"`
}

// BaselineRequest records a group's baseline: from a known-good event log,
// replayed over PCRs (DefaultBaselinePCRs when empty), or as PCR values.
// Exactly one of EventLog and Values is set.
type BaselineRequest struct {
	Group    string         `json:"group"`
	EventLog []byte         `json:"event_log"`
	PCRs     []int          `json:"pcrs"`
	Values   map[int][]byte `json:"pcrs_sha256"`
}

// Baseline is a group's recorded SHA-256 PCR values. Events, when it was
// recorded from an event log, are each PCR's event digests in order, so a
// mismatch can name the first event that differs.
type Baseline struct {
	Group    string           `json:"group"`
	Values   map[int][]byte   `json:"pcrs_sha256"`
	Events   map[int][][]byte `json:"events_sha256,omitempty"`
	Recorded time.Time        `json:"recorded"`
}

// BaselineList lists the recorded baselines.
type BaselineList struct {
	Baselines []Baseline `json:"baselines"`
}

// GrantRequest asks the owner's guardian to let a fabric open a protector.
type GrantRequest struct {
	Protector *Protector `json:"protector"`
	Fabric    Recipient  `json:"fabric"`
}

// GrantResponse is the protector with the fabric's wrap added.
type GrantResponse struct {
	Protector *Protector `json:"protector"`
}

// Grant records that the owner let a fabric open a VM's protector.
type Grant struct {
	VMID    string    `json:"vm_id"`
	Fabric  string    `json:"fabric"`
	KeyID   string    `json:"key_id"`
	Granted time.Time `json:"granted"`
}

// GrantList lists the recorded grants.
type GrantList struct {
	Grants []Grant `json:"grants"`
}

// AuditEntry is one release, refusal or admin change, as a guardian logs
// it. Code is empty for a success.
type AuditEntry struct {
	Time    time.Time `json:"time"`
	Replica string    `json:"replica"`
	Op      string    `json:"op"`
	Host    string    `json:"host,omitempty"`
	VMID    string    `json:"vm_id,omitempty"`
	Code    Code      `json:"code,omitempty"`
	Message string    `json:"message,omitempty"`
}

// AuditList lists audit entries, oldest first.
type AuditList struct {
	Entries []AuditEntry `json:"entries"`
}

// DecodeAddHostRequest reads and checks an AddHostRequest.
func DecodeAddHostRequest(r io.Reader) (*AddHostRequest, error) { return decode[AddHostRequest](r) }

// DecodeBaselineRequest reads and checks a BaselineRequest.
func DecodeBaselineRequest(r io.Reader) (*BaselineRequest, error) {
	return decode[BaselineRequest](r)
}

// DecodeGrantRequest reads and checks a GrantRequest.
func DecodeGrantRequest(r io.Reader) (*GrantRequest, error) { return decode[GrantRequest](r) }

func (r *AddHostRequest) validate() error {
	if err := ValidName("host", r.Name); err != nil {
		return err
	}
	if err := ValidName("group", r.Group); err != nil {
		return err
	}
	return r.Identity.validate()
}

func (r *BaselineRequest) validate() error {
	if err := ValidName("group", r.Group); err != nil {
		return err
	}
	if (len(r.EventLog) == 0) == (len(r.Values) == 0) {
		return badRequest("baseline of group %q: give exactly one of event_log and pcrs_sha256", r.Group)
	}
	if len(r.EventLog) > maxEventLogSize {
		return badRequest("baseline of group %q: event log of %d bytes", r.Group, len(r.EventLog))
	}
	if len(r.Values) != 0 && len(r.PCRs) != 0 {
		return badRequest("baseline of group %q: pcrs selects what an event log is replayed over; values name their own PCRs", r.Group)
	}
	seen := map[int]bool{}
	for _, i := range r.PCRs {
		if i < 0 || i > maxPCRIndex || seen[i] {
			return badRequest("baseline of group %q: PCR %d out of 0..%d or given twice", r.Group, i, maxPCRIndex)
		}
		seen[i] = true
	}
	for i, v := range r.Values {
		if i < 0 || i > maxPCRIndex || len(v) != sha256.Size {
			return badRequest("baseline of group %q: PCR %d: %d bytes (want indices 0..%d, %d bytes)", r.Group, i, len(v), maxPCRIndex, sha256.Size)
		}
	}
	return nil
}

func (r *GrantRequest) validate() error {
	if r.Protector == nil {
		return badRequest("grant: no protector")
	}
	if err := ValidName("fabric", r.Fabric.Name); err != nil {
		return err
	}
	if _, err := ecdh.P256().NewPublicKey(r.Fabric.Public); err != nil {
		return badRequest("grant to fabric %q: public key: %v", r.Fabric.Name, err)
	}
	return r.Protector.validate()
}
