// Package transport speaks swtpm's wire protocol: the control channel, with
// one typed struct per message and a single codec, and the data channel that
// carries TPM commands, over unix sockets, TCP, a descriptor passed with
// CMD_SET_DATAFD, or a connected descriptor. A Server serves one TPM, given
// as the small TPM interface, to one control client at a time, the way
// swtpm does, so QEMU, libvirt, swtpm_ioctl and the swtpm TCTI work
// unchanged. The package knows the wire only: the TPM behind it and how its
// state is kept are the caller's.
//
// A TPM that offers a direct loop (*vtpm.Device's RunDirect) has its data
// connection served in C: poll, read, execute, write, with no Go code per
// command, the way swtpm serves it. It comes back to Go to store a changed
// state before that command's response, for anything unusual, and when the
// control channel needs the TPM.
package transport
