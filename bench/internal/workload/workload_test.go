package workload

import (
	"encoding/hex"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMarshalCapturesCommandBytes(t *testing.T) {
	b, err := Marshal[tpm2.GetRandomResponse](tpm2.GetRandom{BytesRequested: 32})
	require.NoError(t, err)
	assert.Equal(t, "80010000000c0000017b0020", hex.EncodeToString(b))
	assert.Equal(t, "80010000000e000001650000002a", hex.EncodeToString(flushCommand(0x2a)))
}

func TestSelect(t *testing.T) {
	all, err := Select("all")
	require.NoError(t, err)
	assert.Len(t, all, len(Names()))
	sel, err := Select("signecc, getrandom")
	require.NoError(t, err)
	require.Len(t, sel, 2)
	assert.Equal(t, "getrandom", sel[0].Name, "report order, not the list's")
	_, err = Select("getrandom,nosuchop")
	assert.ErrorContains(t, err, "nosuchop")
}

func TestNeeded(t *testing.T) {
	sel, err := Select("signrsa,nvwrite,createload,getrandom")
	require.NoError(t, err)
	keys, nvs := needed(sel)
	assert.Equal(t, []key{keyRSASign, keyStorage}, keys)
	assert.Equal(t, []nvIndex{nvData}, nvs)
}

// fakeTPM answers every command with a success response carrying handle h.
type fakeTPM struct{ sent [][]byte }

func (f *fakeTPM) RoundTrip(cmd []byte) ([]byte, error) {
	f.sent = append(f.sent, append([]byte(nil), cmd...))
	return []byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0, 0, 0x80, 0, 0, 7}, nil
}

func TestNVWriteChangesItsData(t *testing.T) {
	r, err := buildNVWrite(handles{})
	require.NoError(t, err)
	f := &fakeTPM{}
	require.NoError(t, r.Run(f))
	require.NoError(t, r.Run(f))
	require.Len(t, f.sent, 2)
	assert.Equal(t, len(f.sent[0]), len(f.sent[1]))
	assert.NotEqual(t, f.sent[0], f.sent[1], "each write stores new data")
}

func TestCreatePrimaryFlushesTheReturnedHandle(t *testing.T) {
	r, err := buildCreatePrimary(handles{})
	require.NoError(t, err)
	f := &fakeTPM{}
	require.NoError(t, r.Run(f))
	require.Len(t, f.sent, 2)
	assert.Equal(t, "80010000000e0000016580000007", hex.EncodeToString(f.sent[1]))
}
