package host

import (
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// Prover makes a host's attestation evidence.
type Prover interface {
	// Identity is what an administrator registers for this host.
	Identity() (*guardian.HostIdentity, error)
	// Evidence proves the host's health, bound to the guardian's nonce and
	// the transport key. The caller fills in the request's Host.
	Evidence(nonce, transportKey []byte) (*guardian.AttestRequest, error)
}
