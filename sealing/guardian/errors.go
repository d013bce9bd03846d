package guardian

import (
	"errors"
	"fmt"
	"net/http"
)

// Code names why a guardian refused a request. Each refusal a host can meet
// has its own code, so that the host's log can name the reason.
type Code string

// The refusal codes.
const (
	CodeBadRequest       Code = "bad_request"         // malformed or invalid request
	CodeUnknownHost      Code = "unknown_host"        // the host is not registered
	CodeBadNonce         Code = "bad_nonce"           // nonce unknown, expired or issued to another host
	CodeNonceReplayed    Code = "nonce_replayed"      // nonce already used
	CodeNotAttested      Code = "not_attested"        // evidence did not verify
	CodeBaselineMismatch Code = "baseline_mismatch"   // measurements differ from the group's baseline
	CodeNoBaseline       Code = "no_baseline"         // the host's group has no baseline recorded
	CodeCertExpired      Code = "certificate_expired" // health certificate too old
	CodeCertInvalid      Code = "certificate_invalid" // health certificate forged or malformed
	CodeWrongVM          Code = "wrong_vm"            // protector belongs to another VM
	CodeNotGranted       Code = "not_granted"         // protector holds no key of this guardian
	CodeBadProtector     Code = "bad_protector"       // protector malformed or does not open
	CodeUnauthorized     Code = "unauthorized"        // admin request without the admin token
	CodeNotFound         Code = "not_found"           // admin request on an unknown object
	CodeConflict         Code = "conflict"            // admin request would overwrite an object
	CodeUnavailable      Code = "unavailable"         // the replica cannot reach its store
	CodeInternal         Code = "internal"            // anything else
)

// Status is the HTTP status a refusal is sent with.
func (c Code) Status() int {
	switch c {
	case CodeBadRequest, CodeBadProtector:
		return http.StatusBadRequest
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeUnknownHost, CodeBadNonce, CodeNonceReplayed, CodeNotAttested, CodeBaselineMismatch,
		CodeNoBaseline, CodeCertExpired, CodeCertInvalid, CodeWrongVM, CodeNotGranted:
		return http.StatusForbidden
	case CodeNotFound:
		return http.StatusNotFound
	case CodeConflict:
		return http.StatusConflict
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}

// Error is a guardian's refusal, as sent on the wire.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

// Errorf makes a refusal.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Is matches refusals by code, so errors.Is(err, &Error{Code: c}) works.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code
}

// CodeOf is the refusal code in err's chain, or "" if err is no refusal.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}
