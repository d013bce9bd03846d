// Package host is a vtpmd host's side of the guardian: the evidence that
// proves the host healthy (a TPM quote over its measured boot, or a
// signature by its host key), the HostIdentity an administrator registers,
// and the KeySource that attests and obtains each VM's state key from the
// guardian when the VM's TPM starts.
package host
