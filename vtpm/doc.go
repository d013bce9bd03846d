// Package vtpm runs one TPM 2.0 for one virtual machine on the go-tpm-tools
// simulator, and gives it the platform a hypervisor expects: power cycles on
// every VM reset, an automatic orderly TPM2_Shutdown before each of them, the
// TPM-established flag, the locality-4 hash interface and a buffer size.
//
// The engine keeps all of its state in C globals, so a process holds at most
// one Device. Its durable state is the engine's 16 KiB NV image, wrapped in an
// Image that records the engine build and the platform flags. After every
// command the Device compares the NV image with the last one stored and hands
// a changed image to its Store before the response is released, so no
// acknowledged change is lost; RunDirect lets a data loop in C run commands
// through the engine on those same terms. The package knows nothing of sockets or of how
// images are sealed: the transport and the Store do that.
package vtpm
