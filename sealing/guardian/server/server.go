package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// Config configures a guardian replica.
type Config struct {
	// Name names this replica in the audit log.
	Name string
	// Keys is the fabric's key bundle.
	Keys *Keys
	// Store holds the state the replicas share.
	Store Store
	// CertLifetime is how long a health certificate lasts (default
	// guardian.DefaultCertificateLifetime).
	CertLifetime time.Duration
	// NonceTTL is how long a nonce can be used (default 2 minutes).
	NonceTTL time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Log receives a line per request outcome (default slog.Default()).
	Log *slog.Logger
	// Observe, if set, sees every request body the handler decodes, by
	// path (the fuzz seeds are recorded with it).
	Observe func(path string, body []byte)
}

// DefaultNonceTTL is how long a nonce lasts unless configured otherwise.
const DefaultNonceTTL = 2 * time.Minute

// Server is a guardian replica's HTTP handler.
type Server struct {
	cfg Config
	mux *http.ServeMux
}

// New makes a replica's handler.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Keys == nil:
		return nil, errors.New("guardian server: no key bundle")
	case cfg.Store == nil:
		return nil, errors.New("guardian server: no store")
	}
	if err := guardian.ValidName("replica", cfg.Name); err != nil {
		return nil, err
	}
	if cfg.CertLifetime <= 0 {
		cfg.CertLifetime = guardian.DefaultCertificateLifetime
	}
	if cfg.NonceTTL <= 0 {
		cfg.NonceTTL = DefaultNonceTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	cfg.Log = cfg.Log.With("replica", cfg.Name, "fabric", cfg.Keys.Fabric)
	s := &Server{cfg: cfg, mux: http.NewServeMux()}
	s.mux.HandleFunc("GET "+guardian.PathHealth, s.health)
	s.mux.HandleFunc("GET "+guardian.PathKeys, s.keys)
	s.mux.HandleFunc("POST "+guardian.PathNonce, s.handle("nonce", s.nonce))
	s.mux.HandleFunc("POST "+guardian.PathAttest, s.handle("attest", s.attest))
	s.mux.HandleFunc("POST "+guardian.PathRelease, s.handle("release", s.release))
	s.admin("POST "+guardian.PathAdminHosts, "host add", s.addHost)
	s.admin("GET "+guardian.PathAdminHosts, "host list", s.listHosts)
	s.admin("DELETE "+guardian.PathAdminHosts+"/{name}", "host remove", s.removeHost)
	s.admin("POST "+guardian.PathAdminBaselines, "baseline record", s.recordBaseline)
	s.admin("GET "+guardian.PathAdminBaselines, "baseline list", s.listBaselines)
	s.admin("DELETE "+guardian.PathAdminBaselines+"/{name}", "baseline remove", s.removeBaseline)
	s.admin("POST "+guardian.PathAdminGrants, "grant", s.grant)
	s.admin("GET "+guardian.PathAdminGrants, "grant list", s.listGrants)
	s.admin("GET "+guardian.PathAdminAudit, "audit", s.listAudit)
	return s, nil
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// outcome is what one request did, for the audit log.
type outcome struct {
	op, host, vmID string
	detail         string // what succeeded, for the log
}

// handler answers a request: a value to send, or an error (a refusal, a
// store failure, or anything else).
type handler func(r *http.Request, o *outcome) (any, error)

func (s *Server) admin(pattern, op string, h handler) {
	s.mux.HandleFunc(pattern, s.handle(op, func(r *http.Request, o *outcome) (any, error) {
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !s.cfg.Keys.adminTokenOK(token) {
			return nil, guardian.Errorf(guardian.CodeUnauthorized, "%s needs the admin token (Authorization: Bearer)", op)
		}
		return h(r, o)
	}))
}

// handle runs h, answers with its value or its refusal, and audits every
// refusal and every change.
func (s *Server) handle(op string, h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		o := &outcome{op: op}
		resp, err := h(r, o)
		refusal := asRefusal(err)
		if refusal == nil {
			writeJSON(w, http.StatusOK, resp)
			if o.detail != "" {
				s.audit(r.Context(), o, nil)
			}
			return
		}
		if refusal.Code == guardian.CodeInternal || refusal.Code == guardian.CodeUnavailable {
			// Keep the cause in the log; the host sees only the code.
			s.cfg.Log.Error("guardian request failed", "op", op, "host", o.host, "vm", o.vmID, "err", err)
		}
		writeJSON(w, refusal.Code.Status(), refusal)
		s.audit(r.Context(), o, refusal)
	}
}

// asRefusal maps an error to what the client is told: a refusal as it is,
// a store failure as CodeUnavailable (so hosts fail over), all else as
// CodeInternal.
func asRefusal(err error) *guardian.Error {
	if err == nil {
		return nil
	}
	var refusal *guardian.Error
	if errors.As(err, &refusal) {
		return refusal
	}
	var unavailable storeError
	if errors.As(err, &unavailable) {
		return guardian.Errorf(guardian.CodeUnavailable, "the guardian's store is unavailable at this replica")
	}
	return guardian.Errorf(guardian.CodeInternal, "internal error")
}

// storeError is a store failure other than the expected outcomes.
type storeError struct{ err error }

func (e storeError) Error() string { return "guardian store: " + e.err.Error() }
func (e storeError) Unwrap() error { return e.err }

// stored classifies a store error: the expected outcomes pass as they are.
func stored(err error) error {
	if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrExists) || errors.Is(err, ErrChanged) {
		return err
	}
	return storeError{err}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client went away
}

// body reads a request body for a decoder, letting Observe see it.
func (s *Server) body(r *http.Request) io.Reader {
	if s.cfg.Observe == nil {
		return r.Body
	}
	b, _ := io.ReadAll(io.LimitReader(r.Body, guardian.MaxRequestSize+1))
	s.cfg.Observe(r.URL.Path, b)
	return strings.NewReader(string(b))
}

// audit records an outcome in the store and the log. A failure to store it
// is logged; the answer has gone already.
func (s *Server) audit(ctx context.Context, o *outcome, refusal *guardian.Error) {
	e := guardian.AuditEntry{Time: s.cfg.Now().UTC(), Replica: s.cfg.Name, Op: o.op, Host: o.host, VMID: o.vmID, Message: o.detail}
	attrs := []any{"op", o.op, "host", o.host, "vm", o.vmID}
	if refusal != nil {
		e.Code, e.Message = refusal.Code, refusal.Message
		s.cfg.Log.Warn("guardian refused", append(attrs, "code", refusal.Code, "reason", refusal.Message)...)
	} else {
		s.cfg.Log.Info("guardian "+o.detail, attrs...)
	}
	b, err := json.Marshal(e)
	if err == nil {
		// Ordered by the time of writing (the wall clock, even when Now is
		// another), made unique by the replica and a random tail.
		key := fmt.Sprintf("%s%020d-%s-%s", auditPrefix, time.Now().UnixNano(), s.cfg.Name, randomHex(4))
		err = s.cfg.Store.Create(context.WithoutCancel(ctx), key, b, 0)
	}
	if err != nil {
		s.cfg.Log.Error("guardian audit entry not stored", append(attrs, "err", err)...)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand does not fail
	return hex.EncodeToString(b)
}

// Key prefixes in the store.
const (
	hostPrefix     = "hosts/"
	baselinePrefix = "baselines/"
	grantPrefix    = "grants/"
	noncePrefix    = "nonces/"
	auditPrefix    = "audit/"
)

// getJSON reads a stored object.
func (s *Server) getJSON(ctx context.Context, key string, v any) error {
	b, err := s.cfg.Store.Get(ctx, key)
	if err != nil {
		return stored(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("stored %s: %w", key, err)
	}
	return nil
}

// listJSON reads the stored objects under prefix.
func listJSON[T any](ctx context.Context, st Store, prefix string, last int) ([]T, error) {
	kvs, err := st.List(ctx, prefix, last)
	if err != nil {
		return nil, stored(err)
	}
	out := make([]T, 0, len(kvs))
	for _, kv := range kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("stored %s: %w", kv.Key, err)
		}
		out = append(out, v)
	}
	return out, nil
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.cfg.Store.Ping(ctx); err != nil {
		s.cfg.Log.Warn("guardian store unreachable", "err", err)
		writeJSON(w, http.StatusServiceUnavailable, guardian.Errorf(guardian.CodeUnavailable, "replica %s cannot reach its store", s.cfg.Name))
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok", "replica": s.cfg.Name, "fabric": s.cfg.Keys.Fabric})
}

func (s *Server) keys(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, guardian.KeysResponse{Name: s.cfg.Keys.Fabric, Encryption: s.cfg.Keys.Encryption.Public()})
}
