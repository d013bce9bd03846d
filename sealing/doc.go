// Package sealing owns the keys that protect TPM state at rest, and the
// envelope that seals it. Every write is sealed with AES-256-GCM under the
// VM's state key with a fresh random nonce; the associated data binds the
// VM id, the generation and the kind of blob, so a sealed blob moved to
// another VM, or an older generation put in place of a newer one, does not
// open. A versioned header names the key by its id. Keys come from a
// KeySource: swtpm's --key options, a host-local key kept outside every state
// directory, or (later) the guardian. There is no plaintext fallback.
package sealing
