package host

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

func unmarshalJSON(b []byte, v any) error { return json.Unmarshal(b, v) }

// unmarshalJSONStrict decodes exactly one JSON value with no unknown fields.
func unmarshalJSONStrict(b []byte, v any) error {
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
