package vtpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"runtime/debug"
	"slices"
)

// Image is a TPM's durable state: the engine's NV image plus the platform
// state that the engine does not keep itself.
type Image struct {
	// Engine names the engine build whose NV layout NV has.
	Engine string
	// Established is the TPM-established flag of the TIS access register.
	Established bool
	// Resume says that vtpmd itself sent TPM2_Shutdown(STATE) before taking
	// the image, so loading it ends with TPM2_Startup(STATE): the guest
	// resumes where it was, as from swtpm's volatile state.
	Resume bool
	// NV is the engine's NV image, NVSize bytes.
	NV []byte
}

const (
	imageMagic  = "VTPM"
	imageHeader = 4 + 2 + 2 + 4 + 2 // magic, version, flags, NV size, engine length
	// Version 2 ends with a CRC-32C of all before it, against corruption:
	// a durable write checks its image, and the CRC costs a tenth of the
	// SHA-256 that version 1 (still read) ended with; neither keeps out a
	// forger, which is for the sealed envelope (and a keyed state blob's
	// HMAC) to do.
	imageVersion   = 2
	imageVersion1  = 1
	imageCRCSize   = 4
	imageSHA256Len = sha256.Size

	flagEstablished = 1 << 0
	flagResume      = 1 << 1
	knownFlags      = flagEstablished | flagResume
)

// ErrBadImage is wrapped by every error of ParseImage.
var ErrBadImage = errors.New("bad TPM state image")

// EngineVersion names this build's engine: the go-tpm-tools module version
// and the NV size, which together fix the NV layout.
var EngineVersion = engineVersion()

func engineVersion() string {
	version := "unknown"
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/google/go-tpm-tools" {
				version = dep.Version
			}
		}
	}
	return fmt.Sprintf("go-tpm-tools %s nv%d", version, NVSize)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary encodes the image. It fails only if NV has the wrong size.
func (img *Image) MarshalBinary() ([]byte, error) { return img.AppendBinary(nil) }

// AppendBinary appends the image's encoding to b.
func (img *Image) AppendBinary(b []byte) ([]byte, error) {
	if len(img.NV) != NVSize {
		return nil, fmt.Errorf("marshal TPM state image: NV is %d bytes, want %d", len(img.NV), NVSize)
	}
	var flags uint16
	if img.Established {
		flags |= flagEstablished
	}
	if img.Resume {
		flags |= flagResume
	}
	start := len(b)
	out := slices.Grow(b, imageHeader+len(img.Engine)+NVSize+imageCRCSize)
	out = append(out, imageMagic...)
	out = binary.BigEndian.AppendUint16(out, imageVersion)
	out = binary.BigEndian.AppendUint16(out, flags)
	out = binary.BigEndian.AppendUint32(out, NVSize)
	out = binary.BigEndian.AppendUint16(out, uint16(len(img.Engine)))
	out = append(out, img.Engine...)
	out = append(out, img.NV...)
	return appendImageCheck(out, imageVersion, out[start:]), nil
}

// ParseImage decodes an image and checks that this build's engine can load
// it. The returned image does not alias b.
func ParseImage(b []byte) (*Image, error) {
	if len(b) < imageHeader {
		return nil, fmt.Errorf("%w: %d bytes is shorter than the header", ErrBadImage, len(b))
	}
	if string(b[:4]) != imageMagic {
		return nil, fmt.Errorf("%w: no %q magic", ErrBadImage, imageMagic)
	}
	version := binary.BigEndian.Uint16(b[4:])
	check := imageCRCSize
	switch version {
	case imageVersion:
	case imageVersion1:
		check = imageSHA256Len
	default:
		return nil, fmt.Errorf("%w: version %d, this build reads %d and %d", ErrBadImage, version, imageVersion1, imageVersion)
	}
	flags := binary.BigEndian.Uint16(b[6:])
	if flags&^knownFlags != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", ErrBadImage, flags&^knownFlags)
	}
	if n := binary.BigEndian.Uint32(b[8:]); n != NVSize {
		return nil, fmt.Errorf("%w: NV size %d, this engine has %d", ErrBadImage, n, NVSize)
	}
	engineLen := int(binary.BigEndian.Uint16(b[12:]))
	if want := imageHeader + engineLen + NVSize + check; len(b) != want {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrBadImage, len(b), want)
	}
	body := b[:len(b)-check]
	if !bytes.Equal(appendImageCheck(nil, version, body), b[len(body):]) {
		return nil, fmt.Errorf("%w: digest mismatch (the image is corrupt)", ErrBadImage)
	}
	rest := body[imageHeader:]
	img := &Image{
		Engine:      string(rest[:engineLen]),
		Established: flags&flagEstablished != 0,
		Resume:      flags&flagResume != 0,
		NV:          append([]byte(nil), rest[engineLen:]...),
	}
	if img.Engine != EngineVersion {
		return nil, fmt.Errorf("%w: written by engine %q, this build runs %q", ErrBadImage, img.Engine, EngineVersion)
	}
	return img, nil
}

// appendImageCheck appends to dst the check value that ends an image of the
// version with this body (body may be dst's own tail).
func appendImageCheck(dst []byte, version uint16, body []byte) []byte {
	if version == imageVersion1 {
		sum := sha256.Sum256(body)
		return append(dst, sum[:]...)
	}
	return binary.BigEndian.AppendUint32(dst, crc32.Checksum(body, castagnoli))
}
