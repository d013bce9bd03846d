// Command vtpmd serves virtual TPM 2.0 devices to virtual machines.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "vtpmd: not yet implemented")
	os.Exit(1)
}
