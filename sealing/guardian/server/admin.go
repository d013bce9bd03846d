package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

func (s *Server) addHost(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeAddHostRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	o.host = req.Name
	if err := checkIdentity(&req.Identity); err != nil {
		return nil, guardian.Errorf(guardian.CodeBadRequest, "host %q: %v", req.Name, err)
	}
	h := guardian.Host{Name: req.Name, Group: req.Group, Identity: req.Identity, Added: s.cfg.Now().UTC()}
	b, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if err := s.cfg.Store.Create(r.Context(), hostPrefix+h.Name, b, 0); errors.Is(err, ErrExists) {
		return nil, guardian.Errorf(guardian.CodeConflict, "host %q is registered already: remove it first", h.Name)
	} else if err != nil {
		return nil, stored(err)
	}
	o.detail = fmt.Sprintf("registered host in group %s (%s mode)", h.Group, h.Identity.Mode)
	return h, nil
}

// checkIdentity checks that a host's keys parse as what attestation will
// need: a signing AK and an EK in TPM mode, an ECDSA P-256 key otherwise.
func checkIdentity(id *guardian.HostIdentity) error {
	if id.Mode == guardian.ModeHostKey {
		_, err := parseHostKey(id.HostKey)
		return err
	}
	if _, err := attest.ParseAKPublic(id.AKPublic); err != nil {
		return fmt.Errorf("AK: %w", err)
	}
	if _, err := tpm2.DecodePublic(id.EKPublic); err != nil {
		return fmt.Errorf("EK: %w", err)
	}
	return nil
}

func (s *Server) listHosts(r *http.Request, _ *outcome) (any, error) {
	hosts, err := listJSON[guardian.Host](r.Context(), s.cfg.Store, hostPrefix, 0)
	return guardian.HostList{Hosts: hosts}, err
}

func (s *Server) remove(r *http.Request, o *outcome, what, prefix string) (any, error) {
	name := r.PathValue("name")
	if err := guardian.ValidName(what, name); err != nil {
		return nil, err
	}
	if err := s.cfg.Store.Delete(r.Context(), prefix+name); errors.Is(err, ErrNotFound) {
		return nil, guardian.Errorf(guardian.CodeNotFound, "no %s %q", what, name)
	} else if err != nil {
		return nil, stored(err)
	}
	o.detail = fmt.Sprintf("removed %s %s", what, name)
	return struct{}{}, nil
}

func (s *Server) removeHost(r *http.Request, o *outcome) (any, error) {
	o.host = r.PathValue("name")
	return s.remove(r, o, "host", hostPrefix)
}

func (s *Server) removeBaseline(r *http.Request, o *outcome) (any, error) {
	return s.remove(r, o, "baseline of group", baselinePrefix)
}

func (s *Server) recordBaseline(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeBaselineRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	b := guardian.Baseline{Group: req.Group, Values: req.Values, Recorded: s.cfg.Now().UTC()}
	if len(req.EventLog) > 0 {
		log, err := attest.ParseEventLog(req.EventLog)
		if err != nil {
			return nil, guardian.Errorf(guardian.CodeBadRequest, "baseline of group %q: event log: %v", req.Group, err)
		}
		pcrs := req.PCRs
		if len(pcrs) == 0 {
			pcrs = guardian.DefaultBaselinePCRs
		}
		if b.Values, b.Events, err = replay(log, pcrs); err != nil {
			return nil, guardian.Errorf(guardian.CodeBadRequest, "baseline of group %q: event log: %v", req.Group, err)
		}
	}
	v, err := json.Marshal(b)
	if err != nil {
		return nil, err
	}
	if err := s.cfg.Store.Put(r.Context(), baselinePrefix+b.Group, v); err != nil {
		return nil, stored(err)
	}
	o.detail = fmt.Sprintf("recorded the baseline of group %s over PCRs %v", b.Group, slices.Sorted(maps.Keys(b.Values)))
	return b, nil
}

func (s *Server) listBaselines(r *http.Request, _ *outcome) (any, error) {
	baselines, err := listJSON[guardian.Baseline](r.Context(), s.cfg.Store, baselinePrefix, 0)
	return guardian.BaselineList{Baselines: baselines}, err
}

// grant lets a fabric open a protector this guardian owns: the owner's
// guardian unwraps the key and wraps it to the fabric, and records that.
func (s *Server) grant(r *http.Request, o *outcome) (any, error) {
	req, err := guardian.DecodeGrantRequest(s.body(r))
	if err != nil {
		return nil, err
	}
	p := req.Protector
	o.vmID = p.VMID
	key, role, err := p.Unwrap(s.cfg.Keys.Encryption, p.VMID)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if role != guardian.RoleOwner {
		return nil, guardian.Errorf(guardian.CodeNotGranted, "fabric %q was granted VM %q by its owner; only the owner's guardian grants", s.cfg.Keys.Fabric, p.VMID)
	}
	if err := p.Grant(key, req.Fabric); err != nil {
		return nil, guardian.Errorf(guardian.CodeBadProtector, "grant VM %q to fabric %q: %v", p.VMID, req.Fabric.Name, err)
	}
	g := guardian.Grant{VMID: p.VMID, Fabric: req.Fabric.Name, KeyID: guardian.KeyID(req.Fabric.Public), Granted: s.cfg.Now().UTC()}
	b, err := json.Marshal(g)
	if err != nil {
		return nil, err
	}
	if err := s.cfg.Store.Put(r.Context(), grantPrefix+g.Fabric+"/"+g.VMID, b); err != nil {
		return nil, stored(err)
	}
	o.detail = fmt.Sprintf("granted fabric %s (key %s)", g.Fabric, g.KeyID)
	return guardian.GrantResponse{Protector: p}, nil
}

func (s *Server) listGrants(r *http.Request, _ *outcome) (any, error) {
	grants, err := listJSON[guardian.Grant](r.Context(), s.cfg.Store, grantPrefix, 0)
	return guardian.GrantList{Grants: grants}, err
}

// listAudit answers the last entries (?last=N, default all), oldest first.
func (s *Server) listAudit(r *http.Request, _ *outcome) (any, error) {
	last := 0
	if v := r.URL.Query().Get("last"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return nil, guardian.Errorf(guardian.CodeBadRequest, "audit: last=%q is not a count", v)
		}
		last = n
	}
	entries, err := listJSON[guardian.AuditEntry](r.Context(), s.cfg.Store, auditPrefix, last)
	return guardian.AuditList{Entries: entries}, err
}
