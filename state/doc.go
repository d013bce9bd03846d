// Package state stores TPM state records in a pebble database: one record
// per VM, holding the VM's sealed state image, a generation that grows with
// every write, and metadata (the VM id, the creation time and the engine's
// image format). Beside it, under their own key prefix, the VM's deltas:
// records of later generations that hold only a sealed change, which Get
// returns with the record; a whole record's Put drops them in its own
// batch. A write is one pebble batch committed with Sync before it
// returns, so a caller that releases a TPM response only after Put returns
// never acknowledges a change that a crash could lose. Concurrent Puts share
// pebble's group commit: one WAL fsync serves every batch queued behind it.
// The database's own lock keeps two daemons from opening the same store.
// The package stores sealed bytes only; sealing them is the caller's. The
// store of `vtpmd serve` also holds the registry of its VMs (VM entries,
// under their own key prefix): a VM and its state record are deleted in one
// batch. FileStore keeps one VM's record in a single file or block device
// instead (swtpm's file:// backend), in two checksummed slots written in
// turn, so that a torn write costs only the slot being written.
package state
