package vtpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime/debug"
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
	imageMagic   = "VTPM"
	imageVersion = 1
	imageHeader  = 4 + 2 + 2 + 4 + 2 // magic, version, flags, NV size, engine length
	imageDigest  = sha256.Size       // SHA-256 of all before it, against corruption

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

// MarshalBinary encodes the image. It fails only if NV has the wrong size.
func (img *Image) MarshalBinary() ([]byte, error) {
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
	out := make([]byte, 0, imageHeader+len(img.Engine)+NVSize+imageDigest)
	out = append(out, imageMagic...)
	out = binary.BigEndian.AppendUint16(out, imageVersion)
	out = binary.BigEndian.AppendUint16(out, flags)
	out = binary.BigEndian.AppendUint32(out, NVSize)
	out = binary.BigEndian.AppendUint16(out, uint16(len(img.Engine)))
	out = append(out, img.Engine...)
	out = append(out, img.NV...)
	digest := sha256.Sum256(out)
	return append(out, digest[:]...), nil
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
	if v := binary.BigEndian.Uint16(b[4:]); v != imageVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrBadImage, v, imageVersion)
	}
	flags := binary.BigEndian.Uint16(b[6:])
	if flags&^knownFlags != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", ErrBadImage, flags&^knownFlags)
	}
	if n := binary.BigEndian.Uint32(b[8:]); n != NVSize {
		return nil, fmt.Errorf("%w: NV size %d, this engine has %d", ErrBadImage, n, NVSize)
	}
	engineLen := int(binary.BigEndian.Uint16(b[12:]))
	if want := imageHeader + engineLen + NVSize + imageDigest; len(b) != want {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrBadImage, len(b), want)
	}
	body := b[:len(b)-imageDigest]
	if digest := sha256.Sum256(body); !bytes.Equal(digest[:], b[len(body):]) {
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
