package guardian

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxRequestSize bounds every request body; event logs are the largest part.
const MaxRequestSize = 4 << 20

// marshal is the one JSON encoding of every message and format.
func marshal(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	return b, nil
}

// unmarshalStrict decodes exactly one JSON value with no unknown fields.
func unmarshalStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("data after the JSON value")
	}
	return nil
}

// StrictJSON is unmarshalStrict for the files hosts read (their guardian
// config), so that they are as strict as the messages.
func StrictJSON(b []byte, v any) error { return unmarshalStrict(b, v) }

// validator is a message that checks its own fields.
type validator interface{ validate() error }

// decode reads a request body of at most MaxRequestSize bytes into v
// strictly, and validates it. Every failure is a CodeBadRequest refusal.
func decode[T any, P interface {
	*T
	validator
}](r io.Reader) (*T, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxRequestSize+1))
	if err != nil {
		return nil, Errorf(CodeBadRequest, "read request: %v", err)
	}
	if len(b) > MaxRequestSize {
		return nil, Errorf(CodeBadRequest, "request exceeds %d bytes", MaxRequestSize)
	}
	v := new(T)
	if err := unmarshalStrict(b, v); err != nil {
		return nil, Errorf(CodeBadRequest, "%T: %v", *v, err)
	}
	if err := P(v).validate(); err != nil {
		return nil, err
	}
	return v, nil
}
