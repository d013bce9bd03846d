// Package worker is one worker process of `vtpmd serve`: the process that
// holds one VM's TPM engine and serves the VM's sockets itself, so that the
// data path has no extra hop.
//
// The supervisor starts a worker as `vtpmd worker` (the same binary) with
// GOMAXPROCS=1 (the worker takes a second P while its durable writes come
// fast, see pacer), from a thread that has no_new_privs set (so the worker
// has it from its first instruction), with PR_SET_PDEATHSIG (SIGKILL) so
// that it dies with the supervisor, in a process group of its own, and with
// only these descriptors: /dev/null, the log, and the two socketpairs to
// the supervisor (the channel and the records channel). Harden then makes
// the process undumpable and without core dumps, since it will hold a VM's
// key, and checks that the supervisor is still its parent.
//
// A worker starts as a spare, with no VM: the supervisor keeps one or more
// started ahead of need (--spare-workers), so that a VM's start finds the
// process past Go's start and the engine's first (OpenSSL's set-up, which
// the spare pays by starting the engine once, vtpm.Describe). Its first
// message, workerproto.Assign, names the VM and brings its listening
// control socket (and data and vsock sockets, if the VM has them) as
// SCM_RIGHTS; from then on the worker serves that VM only, and its log
// lines name it.
//
// The worker reads its VM's state key from the channel (it never appears in
// argv, the environment or the logs), or, on a host with a guardian, the
// guardian config, and then obtains the key from the guardian itself when
// its TPM starts (host.KeySource, its key protector kept by the supervisor),
// so that the key lives in this process only. It opens a vtpm.Device whose
// Store is a vmstate.Sealed on a remote record store, and serves the sockets
// with a transport.Server. Sealed seals every new state image in the worker,
// as the next generation with the VM id bound in; the remote store sends the
// sealed record to the supervisor on the records channel, which commits it
// to the one pebble store (sharing its fsync with the other workers'
// records) and acknowledges it. Only then does Save return, so no TPM
// response leaves before its state is stored. Loading asks the supervisor
// for the VM's record the same way. With StartupClear the worker powers the
// TPM on and starts it before it serves. Assigned vsock sockets are served
// too, to the VM's guest CID only. The worker counts its TPM commands by
// command code with their latency, and its guardian calls by op and result,
// in memory, and sends the counts when the supervisor asks (package
// metrics). Its data connections are served by the transport's direct loop,
// in C, which counts the commands it runs in the worker's
// transport.DirectStats before each response goes, without coming back to Go
// for it.
//
// The worker ends on SIGTERM (the supervisor stops the VM), after
// CMD_SHUTDOWN (QEMU is done with the TPM; the supervisor starts a fresh
// worker on the same sockets), or when the supervisor is gone. On the first
// two it shuts the TPM down in order and stores its state first; on the
// last it ends at once, and a TPM command whose state was on its way to the
// supervisor gets no answer (the supervisor may or may not have stored it).
package worker
