package serve

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// The admin API, HTTP and JSON on the admin socket:
//
//	GET    /v1/vms              list every VM            200 [Status]
//	POST   /v1/vms              create {"name", "data",  201 Status
//	                            "startup_clear"}
//	GET    /v1/vms/{name}       one VM                   200 Status
//	POST   /v1/vms/{name}/start start its worker         200 Status
//	POST   /v1/vms/{name}/stop  stop its worker          200 Status
//	DELETE /v1/vms/{name}       delete a stopped VM      200 {}
//	GET    /metrics             Prometheus metrics       200 text
//
// A create may add "vsock_cid", "vsock_ctrl_port" and "vsock_data_port".
//
// Errors are {"error": "..."} with 400 (bad name or body), 404 (unknown
// VM), 409 (duplicate create, a vsock port of another VM or process,
// delete of a running VM, start of a stopping one) or 500; a refused
// request changes nothing.

// maxBody bounds a request body.
const maxBody = 64 << 10

// Handler serves the admin API.
func (s *Supervisor) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.MetricsHandler())
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		list, err := s.List()
		reply(w, http.StatusOK, list, err)
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		req, err := DecodeCreateRequest(http.MaxBytesReader(w, r.Body, maxBody))
		if err != nil {
			reply(w, 0, nil, err)
			return
		}
		st, err := s.Create(req)
		reply(w, http.StatusCreated, st, err)
	})
	mux.HandleFunc("GET /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		st, err := s.VM(r.PathValue("name"))
		reply(w, http.StatusOK, st, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/start", func(w http.ResponseWriter, r *http.Request) {
		st, err := s.Start(r.PathValue("name"))
		reply(w, http.StatusOK, st, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/stop", func(w http.ResponseWriter, r *http.Request) {
		st, err := s.Stop(r.PathValue("name"))
		reply(w, http.StatusOK, st, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, struct{}{}, s.Delete(r.PathValue("name")))
	})
	return mux
}

// DecodeCreateRequest reads a create request: one JSON object with no
// fields but the known ones. Its errors wrap ErrBadRequest.
func DecodeCreateRequest(body io.Reader) (CreateRequest, error) {
	var req CreateRequest
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, fmt.Errorf("%w: the body is not a create request ({\"name\": ..., \"data\": true|false, \"startup_clear\": true|false, \"vsock_cid\", \"vsock_ctrl_port\", \"vsock_data_port\": 0 to 4294967295}): %v", ErrBadRequest, err)
	}
	if dec.More() {
		return req, fmt.Errorf("%w: more than one JSON value in the body", ErrBadRequest)
	}
	return req, nil
}

// apiError is the body of an error reply.
type apiError struct {
	Error string `json:"error"`
}

// reply writes v with code, or err with the code its kind maps to.
func reply(w http.ResponseWriter, code int, v any, err error) {
	if err != nil {
		code = http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrBadRequest):
			code = http.StatusBadRequest
		case errors.Is(err, ErrUnknownVM):
			code = http.StatusNotFound
		case errors.Is(err, ErrConflict):
			code = http.StatusConflict
		}
		v = apiError{Error: err.Error()}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
