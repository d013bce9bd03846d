// Package state stores each TPM's state image durably in its state
// directory. A write replaces the image atomically (a temporary file, fsync,
// rename, fsync of the directory), so a crash leaves either the old image or
// the new one, never a torn one. A lock file keeps two daemons from running
// the same state, with the fcntl semantics of swtpm's .lock.
package state
