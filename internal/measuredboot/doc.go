// Package measuredboot writes a TCG PC Client measured-boot event log in the
// crypto-agile format (a Spec ID Event03 header in the SHA-1 format, then
// TCG_PCR_EVENT2 entries with SHA-256 digests) and replays it into a TPM's
// SHA-256 PCRs, as platform firmware would. Tests use it to give a host TPM
// (a vtpmd instance or the simulator) a boot that a guardian can attest.
package measuredboot
