package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/require"
)

// Crash safety: vtpmd releases a TPM response only after the state change
// it made is durably stored, so a SIGKILL at any moment loses nothing that
// was acknowledged, counters never go backwards and the state always loads.
//
// TestCrashSafety drives NV_Increment, NV_Write and EvictControl over one
// data connection, SIGKILLs the daemon at a random moment, restarts it on
// the same state (`vtpmd socket` on a state dir, then on a state file;
// `vtpmd serve`'s supervisor, with its worker) and compares what the TPM
// holds with what the client was told. The client tracks, for every
// operation, what its acknowledged responses imply, plus the one command
// that was in flight at the kill (it may or may not have taken effect). Set
// VTPMD_CRASH_SEED to replay the random choices of a run (the seed is
// logged).
//
// A killed process's writes stay in the page cache, so this checks the
// order of storing and answering and the atomicity of what is stored, not
// that the store reaches the disk (which only a power cut would show).

const (
	// crashKills is the number of SIGKILLs during client load, with the
	// state in a dir; crashFileKills with the state in a file, whose slot
	// logic the unit tests of state/ cover, so a few kills check the wiring.
	crashKills     = 80
	crashFileKills = 20
	// crashServeKills kill `vtpmd serve`'s supervisor (and so its worker),
	// whose store commits the worker's records.
	crashServeKills = 30
	// Every crashEarlyEvery-th round the daemon is also killed during its
	// start, 0..crashEarlyMax after exec, before or while it stores the
	// state of its TPM2_Startup(CLEAR). These kills come on top of
	// crashKills.
	crashEarlyEvery = 5
	crashEarlyMax   = 40 * time.Millisecond
	// The kill comes crashMinDelay..crashMaxDelay after the load started.
	crashMinDelay = 5 * time.Millisecond
	crashMaxDelay = 60 * time.Millisecond

	crashCounterIndex tpm2.TPMHandle = 0x01500170 // NT counter
	crashDataIndex    tpm2.TPMHandle = 0x01500171 // ordinary, 8 bytes
)

// crashHandles is the rotating set of persistent handles. At most two of
// them hold a key at a time, so EvictControl runs both ways.
var crashHandles = []tpm2.TPMHandle{0x81000170, 0x81000171, 0x81000172}

// crashModel is what the client's acknowledged responses say the TPM holds,
// with the in-flight command, whose response never came, allowed either way.
type crashModel struct {
	// The counter: lo counts acknowledged increments, hi attempted ones,
	// both from the value read after the last restart (seen).
	counterLo, counterHi, counterSeen uint64
	// The data index: the last acknowledged NV_Write, and the one sent
	// without a response.
	data, dataInFlight uint64
	dataPending        bool
	// The acknowledged persistent objects by handle, with their names.
	persisted map[tpm2.TPMHandle]tpm2.TPM2BName
	// An EvictControl without response: on evictHandle, making a key with
	// name evictName persistent, or removing the key when evictName is nil.
	evictPending bool
	evictHandle  tpm2.TPMHandle
	evictName    *tpm2.TPM2BName
	// inFlight names the command without a response ("" for none).
	inFlight string
}

// crashObserved is what the TPM holds after a restart.
type crashObserved struct {
	counter, data uint64
	persisted     map[tpm2.TPMHandle]tpm2.TPM2BName
}

func (m *crashModel) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "counter acknowledged %d, attempted %d, seen at restart %d; data %d", m.counterLo, m.counterHi, m.counterSeen, m.data)
	if m.dataPending {
		fmt.Fprintf(&b, " (in flight %d)", m.dataInFlight)
	}
	fmt.Fprintf(&b, "; persistent %s", handleList(m.persisted))
	if m.evictPending {
		what := "evict"
		if m.evictName != nil {
			what = "persist"
		}
		fmt.Fprintf(&b, " (in flight: %s %#x)", what, uint32(m.evictHandle))
	}
	fmt.Fprintf(&b, "; in flight: %q", m.inFlight)
	return b.String()
}

func (o crashObserved) String() string {
	return fmt.Sprintf("counter %d; data %d; persistent %s", o.counter, o.data, handleList(o.persisted))
}

func handleList(m map[tpm2.TPMHandle]tpm2.TPM2BName) string {
	var s []string
	for h, name := range m {
		s = append(s, fmt.Sprintf("%#x(name %x)", uint32(h), name.Buffer))
	}
	slices.Sort(s)
	return "[" + strings.Join(s, " ") + "]"
}

// checkRecovered reports every way in which the restarted TPM's state o
// contradicts what the client was acknowledged (m): a lost acknowledged
// write, a counter that went backwards or beyond the increments sent, a
// persistent object acknowledged as made that is missing or different, or
// one acknowledged as evicted that is back.
func checkRecovered(m *crashModel, o crashObserved) error {
	var errs []error
	if o.counter < m.counterSeen {
		errs = append(errs, fmt.Errorf("NV counter went backwards: %d after restart, %d seen at the previous restart", o.counter, m.counterSeen))
	}
	if o.counter < m.counterLo {
		errs = append(errs, fmt.Errorf("acknowledged NV_Increment lost: counter is %d, %d increments acknowledged lead to %d", o.counter, m.counterLo-m.counterSeen, m.counterLo))
	}
	if o.counter > m.counterHi {
		errs = append(errs, fmt.Errorf("NV counter is %d, beyond the %d increments sent (at most %d)", o.counter, m.counterHi-m.counterSeen, m.counterHi))
	}
	if o.data != m.data && !(m.dataPending && o.data == m.dataInFlight) {
		want := strconv.FormatUint(m.data, 10)
		if m.dataPending {
			want += " or the in-flight " + strconv.FormatUint(m.dataInFlight, 10)
		}
		errs = append(errs, fmt.Errorf("acknowledged NV_Write lost: NV index holds %d, want %s", o.data, want))
	}
	for h, name := range o.persisted {
		if !slices.Contains(crashHandles, h) {
			errs = append(errs, fmt.Errorf("persistent handle %#x (name %x) was never made", uint32(h), name.Buffer))
		}
	}
	for _, h := range crashHandles {
		got, present := o.persisted[h]
		want, wantPresent := m.persisted[h]
		if persistedAs(got, present, want, wantPresent) {
			continue
		}
		if m.evictPending && m.evictHandle == h && persistedAs(got, present, derefName(m.evictName), m.evictName != nil) {
			continue // the in-flight EvictControl took effect
		}
		switch {
		case !present:
			errs = append(errs, fmt.Errorf("acknowledged EvictControl lost: persistent handle %#x is missing, want name %x", uint32(h), want.Buffer))
		case !wantPresent && !(m.evictPending && m.evictHandle == h && m.evictName != nil):
			errs = append(errs, fmt.Errorf("persistent handle %#x holds name %x, but it was acknowledged as evicted or never made", uint32(h), got.Buffer))
		default:
			allowed := "absent"
			if wantPresent {
				allowed = fmt.Sprintf("%x", want.Buffer)
			}
			if m.evictPending && m.evictHandle == h {
				if m.evictName != nil {
					allowed += fmt.Sprintf(" or the in-flight persist of %x", m.evictName.Buffer)
				} else {
					allowed += " or absent (in-flight evict)"
				}
			}
			errs = append(errs, fmt.Errorf("persistent handle %#x holds name %x, want %s", uint32(h), got.Buffer, allowed))
		}
	}
	return errors.Join(errs...)
}

func persistedAs(got tpm2.TPM2BName, present bool, want tpm2.TPM2BName, wantPresent bool) bool {
	return present == wantPresent && (!present || bytes.Equal(got.Buffer, want.Buffer))
}

func derefName(n *tpm2.TPM2BName) tpm2.TPM2BName {
	if n == nil {
		return tpm2.TPM2BName{}
	}
	return *n
}

// resolved reports what became of the in-flight command, now that o is
// known: "applied", "not applied" or "" when it cannot be told.
func (m *crashModel) resolved(o crashObserved) string {
	took := func(b bool) string {
		if b {
			return "applied"
		}
		return "not applied"
	}
	switch {
	case m.counterHi != m.counterLo:
		return took(o.counter == m.counterHi)
	case m.dataPending && m.dataInFlight != m.data:
		return took(o.data == m.dataInFlight)
	case m.evictPending:
		got, present := o.persisted[m.evictHandle]
		return took(persistedAs(got, present, derefName(m.evictName), m.evictName != nil))
	}
	return ""
}

// resync makes the model what the restarted TPM holds, once checked.
func (m *crashModel) resync(o crashObserved) {
	m.counterLo, m.counterHi, m.counterSeen = o.counter, o.counter, o.counter
	m.data, m.dataPending = o.data, false
	m.persisted = o.persisted
	m.evictPending, m.evictName = false, nil
	m.inFlight = ""
}

// linkError is a failure to talk to the daemon (it was killed), as opposed
// to a TPM error response.
type linkError struct{ err error }

func (e *linkError) Error() string { return "data connection: " + e.err.Error() }
func (e *linkError) Unwrap() error { return e.err }

// connTPM is a go-tpm transport over one persistent data connection.
type connTPM struct{ c net.Conn }

func (t connTPM) Send(cmd []byte) ([]byte, error) {
	if _, err := t.c.Write(cmd); err != nil {
		return nil, &linkError{err}
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(t.c, hdr); err != nil {
		return nil, &linkError{err}
	}
	size := binary.BigEndian.Uint32(hdr[2:])
	if size < 10 || size > 1<<16 {
		return nil, fmt.Errorf("response size field %d in % x", size, hdr)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(t.c, rsp[10:]); err != nil {
		return nil, &linkError{err}
	}
	return rsp, nil
}

func isLinkError(err error) bool {
	var le *linkError
	return errors.As(err, &le)
}

// nvNamed is an NV index handle for commands with password authorization,
// which do not use the Name (it changes with TPMA_NV_WRITTEN anyway).
func nvNamed(h tpm2.TPMHandle) tpm2.NamedHandle {
	return tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: binary.BigEndian.AppendUint32(nil, uint32(h))}}
}

func defineCrashIndices(tpm transport.TPM) error {
	for _, ix := range []struct {
		h  tpm2.TPMHandle
		nt tpm2.TPMNT
	}{{crashCounterIndex, tpm2.TPMNTCounter}, {crashDataIndex, tpm2.TPMNTOrdinary}} {
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex:    ix.h,
				NameAlg:    tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: ix.nt},
				DataSize:   8,
			}),
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("define NV index %#x: %w", uint32(ix.h), err)
		}
	}
	return nil
}

func readNV64(tpm transport.TPM, h tpm2.TPMHandle) (uint64, error) {
	rsp, err := tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(h), Size: 8}.Execute(tpm)
	if err != nil {
		return 0, fmt.Errorf("NV_Read %#x: %w", uint32(h), err)
	}
	if len(rsp.Data.Buffer) != 8 {
		return 0, fmt.Errorf("NV_Read %#x: %d bytes", uint32(h), len(rsp.Data.Buffer))
	}
	return binary.BigEndian.Uint64(rsp.Data.Buffer), nil
}

// observeCrashState reads the counter, the data index and the persistent
// handles (with the names of their objects).
func observeCrashState(tpm transport.TPM) (crashObserved, error) {
	var o crashObserved
	var err error
	if o.counter, err = readNV64(tpm, crashCounterIndex); err != nil {
		return o, err
	}
	if o.data, err = readNV64(tpm, crashDataIndex); err != nil {
		return o, err
	}
	caps, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x81000000, PropertyCount: 64}.Execute(tpm)
	if err != nil {
		return o, fmt.Errorf("GetCapability(handles): %w", err)
	}
	hl, err := caps.CapabilityData.Data.Handles()
	if err != nil {
		return o, err
	}
	o.persisted = map[tpm2.TPMHandle]tpm2.TPM2BName{}
	for _, h := range hl.Handle {
		if h>>24 != 0x81 {
			continue
		}
		rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
		if err != nil {
			return o, fmt.Errorf("ReadPublic %#x: %w", uint32(h), err)
		}
		o.persisted[h] = rp.Name
	}
	return o, nil
}

// crashClient drives the load on one connection and keeps the model.
type crashClient struct {
	tpm      transport.TPM
	m        *crashModel
	rng      *rand.Rand
	next     *uint64 // the next value NV_Write writes, unique over the run
	rotation *int    // the next EvictControl rotation step
	acked    map[string]int
}

// run sends commands until the connection breaks, which is the kill. It
// returns a TPM error or a wrong read-back as an error.
func (c *crashClient) run() error {
	for {
		var err error
		switch r := c.rng.IntN(10); {
		case r < 4:
			err = c.increment()
		case r < 8:
			err = c.write()
		default:
			err = c.rotate()
		}
		if err != nil {
			if isLinkError(err) {
				return nil
			}
			return err
		}
	}
}

// do runs one state-changing command with name what in flight, counting it
// when acknowledged.
func (c *crashClient) do(what string, f func() error) error {
	c.m.inFlight = what
	if err := f(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	c.m.inFlight = ""
	c.acked[what]++
	return nil
}

func (c *crashClient) increment() error {
	c.m.counterHi++
	err := c.do("NV_Increment", func() error {
		_, err := tpm2.NVIncrement{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(crashCounterIndex)}.Execute(c.tpm)
		return err
	})
	if err != nil {
		return err
	}
	c.m.counterLo++
	if c.rng.IntN(3) == 0 {
		v, err := readNV64(c.tpm, crashCounterIndex)
		if err != nil {
			return err
		}
		c.acked["NV_Read"]++
		if v != c.m.counterLo {
			return fmt.Errorf("counter reads %d right after acknowledged increments to %d", v, c.m.counterLo)
		}
	}
	return nil
}

func (c *crashClient) write() error {
	v := *c.next
	*c.next++
	c.m.dataInFlight, c.m.dataPending = v, true
	err := c.do("NV_Write", func() error {
		_, err := tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHOwner,
			NVIndex:    nvNamed(crashDataIndex),
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)},
		}.Execute(c.tpm)
		return err
	})
	if err != nil {
		return err
	}
	c.m.data, c.m.dataPending = v, false
	if c.rng.IntN(3) == 0 {
		got, err := readNV64(c.tpm, crashDataIndex)
		if err != nil {
			return err
		}
		c.acked["NV_Read"]++
		if got != v {
			return fmt.Errorf("NV index reads %d right after the acknowledged write of %d", got, v)
		}
	}
	return nil
}

// rotate makes a new primary ECC key persistent at the next handle of the
// set, evicting the oldest key (and whatever the handle held) first. Only
// one transient object is loaded at a time, well within the engine's 3
// slots; it is flushed after use.
func (c *crashClient) rotate() error {
	k := *c.rotation
	*c.rotation++
	target := crashHandles[k%len(crashHandles)]
	for _, h := range []tpm2.TPMHandle{crashHandles[(k+1)%len(crashHandles)], target} {
		name, ok := c.m.persisted[h]
		if !ok {
			continue
		}
		if err := c.evict(h, tpm2.NamedHandle{Handle: h, Name: name}, nil); err != nil {
			return err
		}
	}
	tmpl := tpm2.ECCSRKTemplate
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: binary.BigEndian.AppendUint64(nil, uint64(k))},
	})
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tmpl)}.Execute(c.tpm)
	if err != nil {
		return fmt.Errorf("CreatePrimary: %w", err)
	}
	c.acked["CreatePrimary"]++
	name := cp.Name
	if err := c.evict(target, tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: name}, &name); err != nil {
		return err
	}
	if _, err := (tpm2.FlushContext{FlushHandle: cp.ObjectHandle}).Execute(c.tpm); err != nil {
		return fmt.Errorf("FlushContext: %w", err)
	}
	c.acked["FlushContext"]++
	return nil
}

// evict runs EvictControl on persistent handle h: it makes obj persistent
// there when name is set, or removes the persistent obj when it is nil.
func (c *crashClient) evict(h tpm2.TPMHandle, obj tpm2.NamedHandle, name *tpm2.TPM2BName) error {
	what := "EvictControl(evict)"
	if name != nil {
		what = "EvictControl(persist)"
	}
	c.m.evictPending, c.m.evictHandle, c.m.evictName = true, h, name
	err := c.do(what, func() error {
		_, err := tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: obj, PersistentHandle: h}.Execute(c.tpm)
		return err
	})
	if err != nil {
		return err
	}
	if name != nil {
		c.m.persisted[h] = *name
	} else {
		delete(c.m.persisted, h)
	}
	c.m.evictPending, c.m.evictName = false, nil
	return nil
}

// dialCrashTPM connects to the data socket of a daemon just started on a
// state directory where a killed one left its socket files: it retries
// until the new daemon listens (it does so only once its state is loaded),
// and fails the test if the daemon exits instead.
func dialCrashTPM(t *testing.T, s *daemon, data string) net.Conn {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", data)
		if err == nil {
			require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
			return c
		}
		select {
		case <-s.done:
			t.Fatalf("vtpmd exited on restart, the state did not load: %v\n%s", s.err, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("vtpmd did not listen within 10 s: %v\n%s", err, s.stderr.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// killDaemon SIGKILLs the daemon and requires that it died of the signal,
// not of something before it.
func killDaemon(t *testing.T, d *daemon) {
	t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGKILL) // fails only if it already ended
	<-d.done
	var exitErr *exec.ExitError
	require.True(t, errors.As(d.err, &exitErr), "daemon ended before the SIGKILL: %v\n%s", d.err, d.stderr.String())
	ws, ok := exitErr.Sys().(syscall.WaitStatus)
	require.True(t, ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL, "daemon ended before the SIGKILL: %v\n%s", d.err, d.stderr.String())
}

func TestCrashSafety(t *testing.T) {
	if testingPeer() {
		t.Skip("swtpm 0.7.1 does not fsync its state, so it does not promise what this test checks")
	}
	t.Run("dir", func(t *testing.T) { testCrashSafety(t, socketCrashTarget(t, dirBackend), crashKills) })
	t.Run("file", func(t *testing.T) { testCrashSafety(t, socketCrashTarget(t, fileBackend), crashFileKills) })
	t.Run("serve", func(t *testing.T) { testCrashSafety(t, serveCrashTarget(t), crashServeKills) })
}

// crashTarget is how the crash test starts a daemon on the state that the
// earlier ones left, and kills it.
type crashTarget struct {
	// start starts a daemon and returns it with the data socket of its
	// TPM; the test dials until the TPM answers.
	start func(t *testing.T) (*daemon, string)
	// kill SIGKILLs the daemon and returns once nothing of it runs.
	kill func(t *testing.T, d *daemon)
}

// socketCrashTarget is `vtpmd socket` on one state (directory or file).
func socketCrashTarget(t *testing.T, b stateBackend) crashTarget {
	dir := sockDir(t)
	return crashTarget{
		start: func(t *testing.T) (*daemon, string) {
			s := startSocketTPMOn(t, b, dir, "not-need-init,startup-clear", "")
			return s.daemon, s.data
		},
		kill: killDaemon,
	}
}

// serveCrashTarget is `vtpmd serve` with one VM (created with its data
// socket and started with TPM2_Startup(CLEAR) by the worker); the kill is
// the supervisor's, which takes its worker with it, and a new supervisor
// starts the VM again.
func serveCrashTarget(t *testing.T) crashTarget {
	dir := sockDir(t)
	created := false
	return crashTarget{
		start: func(t *testing.T) (*daemon, string) {
			s := startServe(t, dir)
			if !created {
				s.ctlOK(t, "create", "--data", "--startup-clear", "crash")
				s.ctlOK(t, "start", "crash")
				created = true
			}
			return s.daemon, filepath.Join(s.run, "crash.data")
		},
		kill: func(t *testing.T, d *daemon) {
			supervisor := d.cmd.Process.Pid
			killDaemon(t, d)
			// The worker dies of the supervisor's death (PR_SET_PDEATHSIG);
			// until it has, it may still accept on the VM's old socket.
			require.Eventually(t, func() bool { return len(workersOf(t, supervisor)) == 0 }, 5*time.Second, time.Millisecond,
				"a worker outlived its supervisor %d", supervisor)
		},
	}
}

// workersOf lists the pids of the live `vtpmd worker` processes started by
// the supervisor of pid supervisor.
func workersOf(t *testing.T, supervisor int) []int {
	t.Helper()
	procs, err := os.ReadDir("/proc")
	require.NoError(t, err)
	want := []byte("\x00--supervisor\x00" + strconv.Itoa(supervisor) + "\x00")
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, want) && !zombie(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// zombie says that the process has exited and waits to be reaped.
func zombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// The state follows the command name in parentheses.
	i := bytes.LastIndexByte(stat, ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z'
}

func testCrashSafety(t *testing.T, target crashTarget, kills int) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("VTPMD_CRASH_SEED"); s != "" {
		var err error
		seed, err = strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, "VTPMD_CRASH_SEED")
	}
	t.Logf("VTPMD_CRASH_SEED=%d", seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	start := time.Now()

	// Set up on a new TPM: the indices, one increment (a new counter has
	// no value) and one write.
	s, data := target.start(t)
	conn := dialCrashTPM(t, s, data)
	tpm := connTPM{conn}
	require.NoError(t, defineCrashIndices(tpm))
	_, err := tpm2.NVIncrement{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(crashCounterIndex)}.Execute(tpm)
	require.NoError(t, err)
	_, err = tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nvNamed(crashDataIndex),
		Data: tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, 0)}}.Execute(tpm)
	require.NoError(t, err)
	o, err := observeCrashState(tpm)
	require.NoError(t, err)
	require.Equal(t, uint64(0), o.data)
	require.Empty(t, o.persisted)
	m := &crashModel{}
	m.resync(o)
	firstCounter := o.counter

	next, rotation := uint64(1), 0
	acked := map[string]int{}
	outcomes := map[string]map[string]int{} // in-flight command -> what became of it
	earlyKills, idleKills := 0, 0
	var loadTime time.Duration

	for kill := 0; kill < kills; kill++ {
		// Load the daemon that serves conn, kill it, check the restart.
		client := &crashClient{tpm: tpm, m: m, rng: rng, next: &next, rotation: &rotation, acked: acked}
		done := make(chan error, 1)
		loadStart := time.Now()
		go func() { done <- client.run() }()
		time.Sleep(crashMinDelay + time.Duration(rng.Int64N(int64(crashMaxDelay-crashMinDelay))))
		target.kill(t, s)
		loadErr := <-done
		loadTime += time.Since(loadStart)
		conn.Close()
		require.NoError(t, loadErr, "round %d: an operation failed before the kill (not a link error)\n%s", kill, s.stderr.String())
		killed := s

		if kill%crashEarlyEvery == crashEarlyEvery-1 {
			// Kill a restarting daemon before it serves.
			e, _ := target.start(t)
			time.Sleep(time.Duration(rng.Int64N(int64(crashEarlyMax))))
			target.kill(t, e)
			earlyKills++
		}

		s, data = target.start(t)
		conn = dialCrashTPM(t, s, data)
		tpm = connTPM{conn}
		o, err := observeCrashState(tpm)
		require.NoError(t, err, "round %d: reading the state after restart\n%s", kill, s.stderr.String())
		require.NoError(t, checkRecovered(m, o),
			"round %d (seed %d): state after SIGKILL and restart\nacknowledged: %v\nfound:        %v\nkilled daemon's log:\n%s\nrestarted daemon's log:\n%s",
			kill, seed, m, o, killed.stderr.String(), s.stderr.String())
		if m.inFlight == "" {
			idleKills++
		} else if r := m.resolved(o); r != "" {
			if outcomes[m.inFlight] == nil {
				outcomes[m.inFlight] = map[string]int{}
			}
			outcomes[m.inFlight][r]++
		}
		m.resync(o)
	}
	conn.Close()
	s.stop(t)

	var ops []string
	total := 0
	for op, n := range acked {
		ops = append(ops, fmt.Sprintf("%s %d", op, n))
		total += n
	}
	slices.Sort(ops)
	var inflight []string
	for op, r := range outcomes {
		inflight = append(inflight, fmt.Sprintf("%s (applied %d, not applied %d)", op, r["applied"], r["not applied"]))
	}
	slices.Sort(inflight)
	t.Logf("%d SIGKILLs under load (%v of load in all) + %d during start, in %v; every restart loaded and kept every acknowledged change",
		kills, loadTime.Round(time.Millisecond), earlyKills, time.Since(start).Round(time.Millisecond))
	t.Logf("acknowledged: %d commands: %s", total, strings.Join(ops, ", "))
	t.Logf("killed with a state-changing command in flight: %s; at other moments: %d", strings.Join(inflight, ", "), idleKills)
	t.Logf("counter %d -> %d, last NV_Write value %d, persistent %s", firstCounter, m.counterLo, m.data, handleList(m.persisted))
}

// TestCrashSafetyCheck makes sure checkRecovered catches what
// TestCrashSafety looks for: fabricated lost writes, lost increments,
// counters that go backwards or too far, and persistent objects lost or
// resurrected, while it accepts the in-flight command either way.
func TestCrashSafetyCheck(t *testing.T) {
	nameA := tpm2.TPM2BName{Buffer: []byte{0, 0x0b, 0xaa}}
	nameB := tpm2.TPM2BName{Buffer: []byte{0, 0x0b, 0xbb}}
	h0, h1, h2 := crashHandles[0], crashHandles[1], crashHandles[2]
	base := func() *crashModel {
		return &crashModel{
			counterSeen: 10, counterLo: 14, counterHi: 14, data: 7,
			persisted: map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA},
		}
	}
	obs := func(counter, data uint64, p map[tpm2.TPMHandle]tpm2.TPM2BName) crashObserved {
		return crashObserved{counter: counter, data: data, persisted: p}
	}
	onlyA := map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA}

	t.Run("Consistent", func(t *testing.T) {
		require.NoError(t, checkRecovered(base(), obs(14, 7, onlyA)))
	})
	t.Run("LostWrite", func(t *testing.T) {
		err := checkRecovered(base(), obs(14, 6, onlyA))
		require.ErrorContains(t, err, "acknowledged NV_Write lost: NV index holds 6, want 7")
	})
	t.Run("InFlightWrite", func(t *testing.T) {
		m := base()
		m.dataPending, m.dataInFlight = true, 8
		require.NoError(t, checkRecovered(m, obs(14, 7, onlyA)))
		require.NoError(t, checkRecovered(m, obs(14, 8, onlyA)))
		require.ErrorContains(t, checkRecovered(m, obs(14, 6, onlyA)), "NV_Write lost")
		require.ErrorContains(t, checkRecovered(m, obs(14, 9, onlyA)), "NV_Write lost")
	})
	t.Run("LostIncrement", func(t *testing.T) {
		err := checkRecovered(base(), obs(13, 7, onlyA))
		require.ErrorContains(t, err, "acknowledged NV_Increment lost")
		require.NotContains(t, err.Error(), "backwards")
	})
	t.Run("CounterBackwards", func(t *testing.T) {
		err := checkRecovered(base(), obs(9, 7, onlyA))
		require.ErrorContains(t, err, "NV counter went backwards: 9 after restart, 10 seen")
		require.ErrorContains(t, err, "acknowledged NV_Increment lost")
	})
	t.Run("InFlightIncrement", func(t *testing.T) {
		m := base()
		m.counterHi++
		require.NoError(t, checkRecovered(m, obs(14, 7, onlyA)))
		require.NoError(t, checkRecovered(m, obs(15, 7, onlyA)))
		require.ErrorContains(t, checkRecovered(m, obs(16, 7, onlyA)), "beyond the 5 increments sent")
	})
	t.Run("LostPersist", func(t *testing.T) {
		err := checkRecovered(base(), obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{}))
		require.ErrorContains(t, err, "acknowledged EvictControl lost: persistent handle 0x81000170 is missing, want name 000baa")
	})
	t.Run("LostEvict", func(t *testing.T) {
		err := checkRecovered(base(), obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA, h1: nameB}))
		require.ErrorContains(t, err, "persistent handle 0x81000171 holds name 000bbb, but it was acknowledged as evicted or never made")
	})
	t.Run("OldObject", func(t *testing.T) {
		err := checkRecovered(base(), obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameB}))
		require.ErrorContains(t, err, "persistent handle 0x81000170 holds name 000bbb, want 000baa")
	})
	t.Run("ForeignHandle", func(t *testing.T) {
		err := checkRecovered(base(), obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA, 0x81000001: nameB}))
		require.ErrorContains(t, err, "persistent handle 0x81000001 (name 000bbb) was never made")
	})
	t.Run("InFlightPersist", func(t *testing.T) {
		m := base()
		m.evictPending, m.evictHandle, m.evictName = true, h2, &nameB
		require.NoError(t, checkRecovered(m, obs(14, 7, onlyA)))
		require.NoError(t, checkRecovered(m, obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA, h2: nameB})))
		require.ErrorContains(t, checkRecovered(m, obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h0: nameA, h2: nameA})), "0x81000172 holds name 000baa, want absent or the in-flight persist of 000bbb")
		// The in-flight command is on h2 only: h0 is still required.
		require.ErrorContains(t, checkRecovered(m, obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{h2: nameB})), "0x81000170 is missing, want name 000baa")
	})
	t.Run("InFlightEvict", func(t *testing.T) {
		m := base()
		m.evictPending, m.evictHandle = true, h0
		require.NoError(t, checkRecovered(m, obs(14, 7, onlyA)))
		require.NoError(t, checkRecovered(m, obs(14, 7, map[tpm2.TPMHandle]tpm2.TPM2BName{})))
	})
	t.Run("Resolved", func(t *testing.T) {
		m := base()
		m.dataPending, m.dataInFlight = true, 8
		require.Equal(t, "applied", m.resolved(obs(14, 8, onlyA)))
		require.Equal(t, "not applied", m.resolved(obs(14, 7, onlyA)))
	})
}
