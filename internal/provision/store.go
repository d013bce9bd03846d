package provision

import (
	"fmt"
	"io/fs"

	"github.com/vtpmd/vtpmd/vtpm"
)

// Staged is the vtpm.Store of a TPM being provisioned: it keeps what the
// TPM saves in memory until Commit stores it, once, so that a provisioning
// that fails half way leaves the stored state as it was.
type Staged struct {
	// Store is where Commit stores the state, and where Load reads it
	// until the TPM has saved.
	Store vtpm.Store
	// Fresh makes Load report no state, so that the TPM is manufactured
	// anew over whatever Store holds (swtpm_setup --overwrite).
	Fresh bool

	image []byte
}

// Load implements vtpm.Store.
func (s *Staged) Load() ([]byte, error) {
	switch {
	case s.image != nil:
		return append([]byte(nil), s.image...), nil
	case s.Fresh:
		return nil, fmt.Errorf("a new TPM replaces the stored one: %w", fs.ErrNotExist)
	}
	return s.Store.Load()
}

// Save implements vtpm.Store; the image is kept until Commit.
func (s *Staged) Save(image []byte) error {
	s.image = append([]byte(nil), image...)
	return nil
}

// Commit stores the last image saved, if any.
func (s *Staged) Commit() error {
	if s.image == nil {
		return nil
	}
	return s.Store.Save(s.image)
}
