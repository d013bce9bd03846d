//go:build !linux

package serve

import (
	"fmt"
	"os"
)

func listenVsock(port uint32) (*os.File, error) {
	return nil, fmt.Errorf("listen on vsock port %d: vsock is supported on Linux only", port)
}
