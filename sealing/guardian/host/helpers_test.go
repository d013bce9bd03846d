package host

import (
	"bytes"
	"encoding/json"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

func jsonBody(v any) (io.Reader, error) {
	b, err := json.Marshal(v)
	return bytes.NewReader(b), err
}

func mustJSON(t *testing.T, v any) io.Reader {
	t.Helper()
	r, err := jsonBody(v)
	require.NoError(t, err)
	return r
}
