// Package provision manufactures a virtual TPM the way swtpm_setup does,
// but in process, on a vtpm.Device: the endorsement keys (RSA 2048 and ECC
// NIST P-256 from the TCG default templates, and ECC NIST P-384 from the
// high range template H-3 as swtpm_setup makes it; all persistent), their
// certificates and a platform certificate signed by a local CA and stored
// at the TCG NV indices, the active PCR banks (TPM2_PCR_Allocate and a
// power cycle), and write-locked NV.
//
// It also holds the local CA (created on first use as swtpm_localca lays it
// out: a root CA and an intermediate CA that signs; or an operator's own,
// named by a swtpm-localca.conf), and reads the configuration files that
// swtpm_setup and swtpm_localca read.
//
// Handles and indices are those of the TCG EK Credential Profile for TPM
// Family 2.0 and the TCG Registry of Reserved TPM 2.0 Handles, and
// swtpm_setup's for the P-384 EK (see RSAEKHandle): the RSA 2048 EK at 0x81010001 with its certificate at
// 0x01c00002, the ECC P-256 EK's certificate at 0x01c0000a (the key is
// derived from its template when used, not persistent), the ECC P-384 EK at 0x81010016 with its certificate at
// 0x01c00016, the platform certificate at 0x01c08000 and, when asked, the
// storage primary key at 0x81000001. Certificates carry the fields
// swtpm_localca gives them.
package provision
