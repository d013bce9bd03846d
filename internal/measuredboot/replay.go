package measuredboot

import (
	"fmt"
	"io"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Replay extends each event's digest into the SHA-256 bank of the TPM on
// rw, as firmware does during boot. The TPM must be freshly started (PCRs
// at zero) for its PCRs to match the log.
func Replay(rw io.ReadWriter, events []Event) error {
	tpm := transport.FromReadWriter(rw)
	for i, e := range events {
		if err := e.check(); err != nil {
			return fmt.Errorf("replay event %d: %w", i, err)
		}
		if e.Type == EvNoAction {
			continue
		}
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(e.PCR), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
				HashAlg: tpm2.TPMAlgSHA256,
				Digest:  e.digest(),
			}}},
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("replay event %d (type %#x) into PCR %d: %w", i, uint32(e.Type), e.PCR, err)
		}
	}
	return nil
}
