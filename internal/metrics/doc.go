// Package metrics is what the worker and the supervisor of `vtpmd serve`
// share for the Prometheus metrics: the latency buckets, the worker's TPM
// command recorder, and the command names.
//
// A worker counts its TPM commands in a Commands, in memory: a lock and a
// few additions per command, no system call and no message. The commands its
// direct data loop runs in C never reach Go: the loop counts them itself in
// a table of the same buckets (Bounds; transport.DirectStats), which the
// worker adds to its Commands' snapshot (Commands.Stats) when asked. The supervisor
// asks each worker for a snapshot (workerproto.Stats) when it is scraped,
// and exposes them with the VM's name as vtpmd_tpm_command_duration_seconds
// (see package serve). A worker's counts start at zero, so a VM's series
// reset when its worker restarts, as a restarted process's do; Prometheus'
// rate() and increase() allow for that.
//
// A worker with a guardian counts its calls to it (GuardianCalls) the same
// way: vtpmd_guardian_calls_total by op and result, whose labels are a
// fixed set (ValidGuardianCall), whatever a guardian or a worker sends.
//
// The command label is one of the TPM 2.0 command names, or "other" for any
// code that is none of them, so that a guest sending made-up command codes
// cannot make the series grow.
package metrics
