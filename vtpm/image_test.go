package vtpm

import (
	"bytes"
	"crypto/sha256"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestImageRoundTrip(t *testing.T) {
	img := &Image{Engine: EngineVersion, Established: true, Resume: true, NV: bytes.Repeat([]byte{0xa5}, NVSize)}
	b, err := img.MarshalBinary()
	require.NoError(t, err)
	got, err := ParseImage(b)
	require.NoError(t, err)
	assert.Equal(t, img, got)

	_, err = (&Image{Engine: EngineVersion, NV: make([]byte, 10)}).MarshalBinary()
	assert.Error(t, err)
}

// Version 1 images, which ended with a SHA-256 in place of the CRC-32C,
// are still read.
func TestParseImageVersion1(t *testing.T) {
	img := &Image{Engine: EngineVersion, Resume: true, NV: bytes.Repeat([]byte{0x3c}, NVSize)}
	b, err := img.MarshalBinary()
	require.NoError(t, err)
	v1 := append([]byte(nil), b[:len(b)-imageCRCSize]...)
	v1[5] = 1
	sum := sha256.Sum256(v1)
	v1 = append(v1, sum[:]...)
	got, err := ParseImage(v1)
	require.NoError(t, err)
	assert.Equal(t, img, got)

	v1[100] ^= 1
	_, err = ParseImage(v1)
	assert.ErrorContains(t, err, "digest mismatch")
}

func TestParseImageRejects(t *testing.T) {
	good, err := (&Image{Engine: EngineVersion, NV: make([]byte, NVSize)}).MarshalBinary()
	require.NoError(t, err)
	flip := func(i int) []byte {
		b := append([]byte(nil), good...)
		b[i] ^= 0x01
		return b
	}
	other, err := (&Image{Engine: "go-tpm-tools v0.0.1 nv16384", NV: make([]byte, NVSize)}).MarshalBinary()
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "shorter than the header"},
		{"magic", flip(0), "magic"},
		{"version", flip(5), "version"},
		{"unknown flag", flip(6), "unknown flags"},
		{"NV size", flip(10), "NV size"},
		{"truncated", good[:len(good)-1], "bytes, want"},
		{"corrupt NV", flip(100), "digest mismatch"},
		{"other engine", other, "written by engine"},
	} {
		_, err := ParseImage(tc.in)
		require.ErrorIs(t, err, ErrBadImage, tc.name)
		assert.Contains(t, err.Error(), tc.want, tc.name)
	}
}
