// Package server is the guardian service: an http.Handler that issues
// attestation nonces, checks hosts' evidence (a TPM quote with its
// measured-boot event log against the host group's baseline, or a host
// key's signature), issues health certificates, and releases VM state keys
// by re-wrapping a protector's key to the certificate's transport key. Its
// admin endpoints register hosts, record baselines, grant fabrics and read
// the audit log.
//
// Replicas share their state through a Store: the local pebble store for a
// single guardian, or etcd (sealing/guardian/etcdstore) for several. A
// replica keeps nothing of its own but its key bundle, which is stored
// sealed under a key-encryption key (SealKeys, OpenKeys) and held in the
// clear only in the replica's memory. Unwrapped state keys are never
// stored or logged: they live for the length of one release.
package server
