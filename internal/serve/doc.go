// Package serve is the supervisor of `vtpmd serve`: one daemon that serves
// the TPMs of many VMs, each TPM in a worker process of its own (package
// worker), so that a crash, or a guest exploiting the engine, reaches no
// other VM.
//
// # The supervisor
//
// It runs with an embedded default configuration (state in
// /var/lib/vtpmd/serve, sockets in /run/vtpmd for root; the XDG data and
// runtime directories otherwise), which an optional JSON config file and
// flags override. It opens one pebble state store (package state) for
// every VM, holding each VM's sealed state record and, under its own key
// prefix, the registry of VMs: name, VM id, creation time, control socket,
// optional data socket, and the desired state (running or stopped). It
// derives each VM's state key from the host key (sealing.HostKey), unless
// a guardian is configured (see below), and keeps the generation witnesses
// beside the host key, as `vtpmd socket` does. The VM id is new for every create, so a VM created again under a
// deleted one's name starts afresh.
//
// The admin API is HTTP and JSON on a unix socket of mode 0600 (see
// Handler): create, start, stop, delete, list and status. Names are 1 to
// 64 of [a-zA-Z0-9._-], not starting with '.'. A malformed request (bad
// name or body: 400), an unknown VM (404), a duplicate create or the
// delete of a running VM (409) get an HTTP error with a JSON explanation,
// and change nothing. `vtpmd ctl` is its client (Client).
//
// # The workers
//
// Starting a VM creates its control socket <run dir>/<name>.ctrl (and data
// socket <name>.data, with a <name>.data.ctrl link to the control socket
// for the swtpm TCTI), mode 0600 (0660 of socket_group, --socket-group, for
// a QEMU of another user), in the supervisor, and gives the VM a worker:
// the same binary as `vtpmd worker`, handed the listening sockets over its
// channel (workerproto.Assign, SCM_RIGHTS), so that every worker of the
// VM, also one started after a crash, serves the same paths and a client
// can connect again. The worker is a spare when one is idle: the
// supervisor keeps spare_workers (--spare-workers, default 1) workers
// started ahead with no VM, and starts a replacement in the background
// once the VM that took one is ready (not while its start runs, whose CPU
// the replacement's start would share), so that a start does not wait for
// a process's start and the engine's first. An idle spare that ends
// (killed) is reaped and replaced at once; one that ends as a start takes
// it is replaced by a worker started then. A spare serves the one VM it is assigned. The
// worker serves them itself with a transport.Server (no extra hop). It runs
// with GOMAXPROCS=1 (a second P while its durable writes come fast),
// no_new_privs, PR_SET_PDEATHSIG, no core dumps, in its own process group,
// with no descriptors but its own, and, with worker_user set
// (--worker-user), as that unprivileged user with no supplementary groups.
// Like a freshly started swtpm, a new worker's TPM waits for CMD_INIT,
// unless the VM was created with startup_clear (--startup-clear), when every
// worker powers it on and sends TPM2_Startup(CLEAR) itself, as swtpm's
// --flags not-need-init,startup-clear: for tpm2-tools on the data socket.
//
// Supervisor and worker speak package workerproto over two socketpairs. On
// the channel the supervisor hands the worker its VM's state key (never in
// argv, the environment or a log) and asks for statistics; on the records
// channel the worker asks for its VM's sealed record and sends every new
// one, and waits for each answer in poll(2) and read(2) on the TPM's own
// thread. The worker seals (vmstate.Sealed: a generation per write, the VM
// id bound into the seal); the supervisor checks that the record is the
// worker's own VM's and newer than the one stored, commits it with
// state.Store.Put, whose fsync concurrent workers share (group commit),
// records the generation witness, and only then acknowledges it. While
// commits come one at a time the supervisor runs on one P, and on all again
// at the first two that overlap (commitPacer), unless the environment sets
// GOMAXPROCS. The worker's Save returns only on that acknowledgement, so no
// TPM response leaves before its state is stored. A worker can reach no
// other VM's state or key.
//
// # The guardian
//
// With a guardian config (guardian_config, --guardian-config, else
// $VTPMD_GUARDIAN_CONFIG or /etc/vtpmd/guardian.json if it exists, as in
// `vtpmd socket`), no state key is derived, and the supervisor never holds
// one: it hands each worker the checked config (workerproto.Guardian)
// instead of a key, and the worker obtains its VM's key itself when the
// TPM starts (CMD_INIT, or the worker's start with startup_clear), as a
// host.KeySource: it attests with evidence bound to a transport key of its
// own (caching its health certificate, never sharing it), and asks for the
// key's release. Without a release the TPM's start fails: CMD_INIT answers
// an error, the worker's log names the reason (unknown host, baseline
// mismatch, wrong VM, or the guardian unreachable with the URLs tried),
// and so does the VM's status (guardian); the next CMD_INIT asks again,
// and a restarted worker (a crash, SIGKILL) obtains the key anew. Other
// VMs do not notice: a running TPM needs the guardian no more. A VM's key
// protector is kept in the state store beside its state record (the worker
// asks the supervisor for it, and sends a new VM's): created once, before
// the VM has state, never replaced, and deleted with the VM. A VM with
// state and no protector is refused. The worker reads the host TPM (or
// host key) and the guardian CA itself, so with worker_user that user must
// be able to.
//
// # vsock
//
// A VM created with vsock ports (--vsock-ctrl-port, --vsock-data-port)
// has its control and data channels served on those ports of the host's
// vsock too (beside its unix sockets), for a guest behind vhost-vsock
// (QEMU's -device vhost-vsock-pci,guest-cid=N). The supervisor opens the
// listening vsock sockets (VMADDR_CID_ANY; Linux only) when the VM starts
// and hands them to every worker of the VM like the unix ones; the worker
// serves them itself and lets in only the VM's guest CID (--vsock-cid),
// since every guest of the host can reach a host port. A port serves one
// VM: a create that names another VM's port, or a start on a port another
// process holds, is refused with 409 and changes nothing. Firecracker and
// Cloud Hypervisor use hybrid vsock instead (a guest's connection to host
// port P arrives on the unix socket <uds_path>_P): they need no vsock
// port, only a link from that path to the VM's data socket.
//
// # Metrics
//
// GET /metrics on the admin socket, and on --metrics-listen if set, gives
// the Prometheus metrics: per VM, the TPM commands by command name with
// their latency (vtpmd_tpm_command_duration_seconds), whether its worker
// is up (vtpmd_worker_up) and its restarts (vtpmd_worker_restarts_total),
// its worker's calls to the guardian by op and result
// (vtpmd_guardian_calls_total; reset when the worker restarts);
// the state commits' latency (vtpmd_state_commit_duration_seconds) and the
// store's WAL syncs (vtpmd_state_wal_syncs_total: commits per sync is the
// group commit's batch size); the idle spare workers
// (vtpmd_spare_workers); and the supervisor's process and Go metrics. The
// workers count their commands in memory (package metrics); the supervisor
// asks each for its counts (workerproto.StatsRequest) when scraped, so a
// TPM command costs no message.
//
// # Failures
//
// A worker that dies (a crash, SIGKILL) is restarted from the last stored
// state, after a delay that doubles from 100 ms to 10 s while it keeps
// dying (logged with the VM's name); its client's in-flight command fails,
// the client connects again to the same socket and finds a new TPM process
// that, like a freshly started swtpm, waits for CMD_INIT (or is started
// already, with startup_clear). Other VMs notice
// nothing: their workers and the store are untouched. A worker that ended
// after CMD_SHUTDOWN (QEMU is done with the TPM) is replaced at once, ready
// for the next QEMU.
//
// When the supervisor ends, its workers end too: on SIGTERM it stops them
// in order (each stores its state), and if it dies, PR_SET_PDEATHSIG kills
// them (every acknowledged state is stored already). Running workers are
// not adopted by the next supervisor: they are restarted cleanly. The
// registry records each VM's desired state, and a starting supervisor
// starts every VM that is to run. This keeps one owner for the store and
// the sockets, and a worker never outlives the process that commits its
// state; the cost is that VMs lose their TPM connection while the
// supervisor restarts, as they do when a worker restarts.
package serve
