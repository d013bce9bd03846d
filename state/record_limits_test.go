package state

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vtpmd/vtpmd/internal/wire"
)

// A record whose VM id or engine is longer than MarshalBinary writes is
// corrupt: it parsed, and then could not be written back (found by
// fuzz.FuzzParseRecord).
func TestRecordTextLimits(t *testing.T) {
	record := func(vmID, engine string) []byte {
		b := append([]byte(recordMagic), 1) // version 1: no flags nor deltas after the image
		b = wire.AppendString(b, vmID)
		b = binary.BigEndian.AppendUint64(b, 1) // generation
		b = binary.BigEndian.AppendUint64(b, 0) // created
		b = wire.AppendString(b, engine)
		return binary.BigEndian.AppendUint32(b, 0) // sealed image length
	}
	limit := strings.Repeat("v", maxRecordText)
	r, err := ParseRecord(record(limit, limit))
	require.NoError(t, err, "at the limit")
	_, err = r.MarshalBinary()
	require.NoError(t, err, "at the limit")

	_, err = ParseRecord(record(limit+"v", ""))
	assert.ErrorIs(t, err, ErrCorrupt, "VM id over the limit")
	_, err = ParseRecord(record("", limit+"v"))
	assert.ErrorIs(t, err, ErrCorrupt, "engine over the limit")
}
