// Package guardian is the contract between vtpmd hosts and the guardian, the
// attestation service that releases VM state keys only to healthy hosts, on
// the model of Windows Server's Host Guardian Service.
//
// A VM's state key never leaves a host in the clear. When a VM is created the
// host draws a fresh key and wraps it with HPKE (DHKEM P-256, HKDF-SHA256,
// AES-256-GCM) to each guardian's public encryption key, with the VM id bound
// into the HPKE info: that wrapped form is the key Protector, stored beside the
// VM's state. To start the VM the host attests: it asks a guardian for a
// fresh nonce, answers with a TPM quote over its PCRs and its measured-boot
// event log (TPM mode) or a signature by its registered host key (host-key
// mode), both bound to the nonce and to a transport public key the host has
// just generated. A guardian that accepts the evidence issues a short-lived
// HealthCertificate for that transport key. The host then sends the
// certificate and the protector; the guardian unwraps the key and wraps it
// again to the transport key, so only the attested process can open it.
//
// This package holds what both sides share: the messages and their strict
// decoders, the protector and certificate formats, and the host's Client,
// which fails over between guardian replicas. The service itself lives in
// sealing/guardian/server, the host's evidence in sealing/guardian/host.
package guardian
