//go:build tools

// Package deps pins the modules that work in progress imports, so that
// go mod tidy keeps them while that work lands. It goes once each module is
// imported by real code.
package deps

import (
	_ "github.com/google/go-attestation/attest"
	_ "github.com/google/go-tpm-tools/client"
	_ "github.com/mdlayher/vsock"
	_ "github.com/prometheus/client_golang/prometheus"
)
