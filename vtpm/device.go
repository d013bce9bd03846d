package vtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/google/go-tpm-tools/simulator"
)

// Errors of Device operations. Callers map them to their protocol's codes.
var (
	// ErrNotRunning: the operation needs a running (initialised) TPM.
	ErrNotRunning = errors.New("TPM is not running")
	// ErrRunning: the operation needs a stopped TPM.
	ErrRunning = errors.New("TPM is running")
	// ErrBadLocality: the locality is out of range or not allowed here.
	ErrBadLocality = errors.New("locality not allowed")
	// ErrEngineInUse: this process already holds the engine.
	ErrEngineInUse = errors.New("the TPM engine is already in use in this process")
)

// Store keeps a TPM's state image durably.
type Store interface {
	// Load returns the stored image, or an error wrapping fs.ErrNotExist
	// when the TPM has no state yet.
	Load() ([]byte, error)
	// Save stores the image; it is durable when Save returns nil. The
	// image is the caller's again once Save returns.
	Save(image []byte) error
}

// Config configures a Device.
type Config struct {
	// Store keeps the state. Required.
	Store Store
	// Logger receives the device's logs; it should carry the VM id.
	Logger *slog.Logger
	// DisableAutoShutdown turns off the TPM2_Shutdown(STATE) that is sent
	// before each power cycle when the guest did not send one.
	DisableAutoShutdown bool
	// RejectLocality4 refuses locality 4 in SetLocality.
	RejectLocality4 bool
}

// Buffer sizes. The engine's commands and responses are at most 4096 bytes;
// the minimum still holds the largest context blob (TPMS_CONTEXT with the
// engine's MAX_CONTEXT_SIZE of 1360, 1378 bytes) plus 128, the rule swtpm
// applies to libtpms.
const (
	MaxBufferSize = 4096
	MinBufferSize = 1378 + 128
)

// StartupType is the argument of TPM2_Startup and TPM2_Shutdown.
type StartupType uint16

// Startup types.
const (
	StartupClear StartupType = 0x0000
	StartupState StartupType = 0x0001
)

const (
	ccStartup  = 0x144
	ccShutdown = 0x145

	rcSuccess      = 0x000
	rcInitialize   = 0x100
	rcFailure      = 0x101
	rcInsufficient = 0x09a
	rcCommandSize  = 0x142

	headerSize = 10
)

var engineTaken atomic.Bool

// Device is one TPM with its platform. Its methods are safe for concurrent
// use; commands run one at a time.
type Device struct {
	cfg  Config
	log  *slog.Logger
	sim  *simulator.Simulator
	info EngineInfo

	mu          sync.Mutex
	running     bool
	locality    uint8
	established bool
	resume      bool
	bufferSize  uint32
	lastOrdinal uint32
	response    [MaxBufferSize]byte

	// Images set by SetState, applied by the next Init.
	pending [partCount]*Image

	// What the Store holds now, to skip writes that change nothing.
	saved            []byte
	savedEstablished bool
	savedResume      bool
	// Buffers persist reuses: the NV export that is not saved, and the
	// encoded image.
	spareNV []byte
	encoded []byte

	// A direct loop's wake-up while RunDirect holds the device, the callers
	// waiting for it, and the NV image last given to the loop.
	wake        atomic.Pointer[func()]
	waiting     atomic.Int32
	directSaved []byte
}

// Open takes the process's engine. The TPM is not running until Init.
func Open(cfg Config) (*Device, error) {
	if cfg.Store == nil {
		return nil, errors.New("open TPM: no state store configured")
	}
	if !engineTaken.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("open TPM: %w", ErrEngineInUse)
	}
	sim, err := simulator.Get()
	if err != nil {
		engineTaken.Store(false)
		return nil, fmt.Errorf("open TPM: start engine: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Device{cfg: cfg, log: log, sim: sim, bufferSize: MaxBufferSize}
	// Get() returns a started TPM, so its properties can be read now.
	if d.info, err = readEngineInfo(d); err != nil {
		_ = sim.Close()
		engineTaken.Store(false)
		return nil, fmt.Errorf("open TPM: %w", err)
	}
	return d, nil
}

// Close stops the TPM as Stop does and releases the engine.
func (d *Device) Close() error {
	err := d.Stop()
	d.lock()
	defer d.mu.Unlock()
	if d.sim != nil {
		// Close sends its own TPM2_Shutdown, which may fail when the TPM is
		// not started; the state was stored by Stop already.
		_ = d.sim.Close()
		d.sim = nil
		engineTaken.Store(false)
	}
	return err
}

// Running reports whether the TPM has been initialised and not stopped.
func (d *Device) Running() bool {
	d.lock()
	defer d.mu.Unlock()
	return d.running
}

// Init powers the TPM on from its stored state, after an orderly shutdown if
// it was running: what CMD_INIT and every VM reset do. A TPM without state is
// manufactured and stored first. An image taken by StoreVolatile resumes
// (TPM2_Startup(STATE)) unless deleteVolatile is set.
func (d *Device) Init(deleteVolatile bool) error {
	d.lock()
	defer d.mu.Unlock()
	if d.running {
		if err := d.stopLocked(); err != nil {
			return fmt.Errorf("init TPM: %w", err)
		}
	}
	img, fromBlob := d.pendingImage()
	if img == nil {
		var err error
		if img, err = d.load(); err != nil {
			return fmt.Errorf("init TPM: %w", err)
		}
		d.saved, d.savedEstablished, d.savedResume = img.NV, img.Established, img.Resume
	} else {
		d.saved = nil // store what was set, whatever the store held
	}
	nvImport(img.NV)
	powerCycle()
	d.established, d.resume = img.Established, false
	d.lastOrdinal = 0
	d.running = true
	if img.Resume && (fromBlob || !deleteVolatile) {
		if rc := d.runRC(shutdownOrStartup(ccStartup, StartupState)); rc != rcSuccess {
			d.log.Warn("stored state could not resume; the guest starts the TPM itself", "rc", fmt.Sprintf("%#x", rc))
		}
	}
	if err := d.persist(); err != nil {
		d.running = false
		return fmt.Errorf("init TPM: %w", err)
	}
	return nil
}

// pendingImage takes the image set by SetState, the volatile one first, as
// it holds the whole state.
func (d *Device) pendingImage() (*Image, bool) {
	defer func() { d.pending = [partCount]*Image{} }()
	for _, part := range []StatePart{PartVolatile, PartPermanent} {
		if img := d.pending[part]; img != nil {
			return img, true
		}
	}
	return nil, false
}

// load reads the stored image, manufacturing and storing a new TPM if there
// is none.
func (d *Device) load() (*Image, error) {
	b, err := d.cfg.Store.Load()
	if errors.Is(err, fs.ErrNotExist) {
		return d.manufactureLocked()
	}
	if err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	return ParseImage(b)
}

// manufactureLocked makes a brand-new TPM and stores it. It is left shut
// down in order (Startup(CLEAR), Shutdown(STATE)) so that the guest's first
// TPM2_Startup does not count as following a disorderly shutdown.
func (d *Device) manufactureLocked() (*Image, error) {
	manufacture()
	for _, cmd := range [][]byte{shutdownOrStartup(ccStartup, StartupClear), shutdownOrStartup(ccShutdown, StartupState)} {
		if rc := d.runRC(cmd); rc != rcSuccess {
			return nil, fmt.Errorf("manufacture TPM: command %#x failed with rc %#x", binary.BigEndian.Uint32(cmd[6:]), rc)
		}
	}
	img := &Image{Engine: EngineVersion, NV: nvExportInto(nil)}
	b, err := img.MarshalBinary()
	if err != nil {
		return nil, err
	}
	if err := d.cfg.Store.Save(b); err != nil {
		return nil, fmt.Errorf("store new TPM: %w", err)
	}
	d.log.Info("manufactured a new TPM")
	return img, nil
}

// Stop shuts the TPM down in order, stores its state and marks it not
// running: CMD_STOP. Stopping a stopped TPM does nothing.
func (d *Device) Stop() error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return nil
	}
	return d.stopLocked()
}

func (d *Device) stopLocked() error {
	d.autoShutdown()
	d.running = false
	if err := d.persist(); err != nil {
		return fmt.Errorf("stop TPM: %w", err)
	}
	return nil
}

// autoShutdown sends TPM2_Shutdown(STATE), or CLEAR if STATE fails, unless
// the guest's last command was a shutdown: a power cycle without one would
// count against the dictionary-attack protection.
func (d *Device) autoShutdown() {
	if d.cfg.DisableAutoShutdown || d.lastOrdinal == ccShutdown {
		return
	}
	rc := d.runRC(shutdownOrStartup(ccShutdown, StartupState))
	if rc != rcSuccess && rc != rcInitialize {
		d.runRC(shutdownOrStartup(ccShutdown, StartupClear))
	}
	d.lastOrdinal = ccShutdown
}

// Startup sends TPM2_Startup itself, for a TPM that starts without a guest
// firmware (swtpm's --flags startup-clear|startup-state).
func (d *Device) Startup(su StartupType) error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return fmt.Errorf("startup: %w", ErrNotRunning)
	}
	if rc := d.runRC(shutdownOrStartup(ccStartup, su)); rc != rcSuccess {
		return fmt.Errorf("startup(%d): TPM returned rc %#x", su, rc)
	}
	return d.persist()
}

// Execute runs one TPM command and returns its response. The state the
// command changed is stored before Execute returns. A stopped TPM, an engine
// failure or a storage failure give the TPM_RC_FAILURE response.
func (d *Device) Execute(ctx context.Context, cmd []byte) []byte {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return ErrorResponse(rcFailure)
	}
	if len(cmd) < headerSize {
		return ErrorResponse(rcInsufficient)
	}
	if len(cmd) > int(d.bufferSize) {
		return ErrorResponse(rcCommandSize)
	}
	d.lastOrdinal = binary.BigEndian.Uint32(cmd[6:10])
	resp, err := d.run(cmd)
	if err != nil {
		d.log.ErrorContext(ctx, "TPM engine failed", "command", fmt.Sprintf("%#x", d.lastOrdinal), "err", err)
		return ErrorResponse(rcFailure)
	}
	if len(resp) > int(d.bufferSize) {
		d.log.WarnContext(ctx, "response larger than the buffer size", "size", len(resp), "buffersize", d.bufferSize)
		resp = ErrorResponse(rcFailure)
	}
	d.resume = false
	if err := d.persist(); err != nil {
		// The change is not durable, so it must not be acknowledged. The
		// TPM stops; the next INIT reloads the last stored state.
		d.log.ErrorContext(ctx, "TPM state not stored; TPM stopped", "err", err)
		d.running = false
		return ErrorResponse(rcFailure)
	}
	// A copy: the engine's buffer is reused by the next command, which may
	// come from the control channel while the caller still sends this one.
	return append([]byte(nil), resp...)
}

// run executes cmd on the engine. The returned slice is valid until the next
// command.
func (d *Device) run(cmd []byte) ([]byte, error) {
	if _, err := d.sim.Write(cmd); err != nil {
		return nil, err
	}
	n, err := d.sim.Read(d.response[:])
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	return d.response[:n], nil
}

// runRC runs a command vtpmd makes itself and returns its response code.
func (d *Device) runRC(cmd []byte) uint32 {
	resp, err := d.run(cmd)
	if err != nil || len(resp) < headerSize {
		return rcFailure
	}
	return binary.BigEndian.Uint32(resp[6:10])
}

// persist stores the state if it differs from what the Store holds.
func (d *Device) persist() error {
	if d.saved != nil && !nvDiffers(d.saved) && d.established == d.savedEstablished && d.resume == d.savedResume {
		return nil
	}
	// Two NV buffers and one encoding buffer, reused: a durable write
	// allocates nothing here.
	img := &Image{Engine: EngineVersion, Established: d.established, Resume: d.resume, NV: nvExportInto(d.spareNV)}
	b, err := img.AppendBinary(d.encoded[:0])
	if err != nil {
		return err
	}
	d.encoded = b
	if err := d.cfg.Store.Save(b); err != nil {
		return fmt.Errorf("store TPM state: %w", err)
	}
	d.spareNV = d.saved
	d.saved, d.savedEstablished, d.savedResume = img.NV, img.Established, img.Resume
	return nil
}

// StoreVolatile makes the stored state resumable: it sends
// TPM2_Shutdown(STATE) unless the guest just did, and stores the state so
// that the next Init without deleteVolatile resumes with TPM2_Startup(STATE),
// keeping PCRs 0-15. The TPM goes on running. The engine cannot capture
// loaded objects and sessions, so those are not kept.
func (d *Device) StoreVolatile() error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return fmt.Errorf("store volatile state: %w", ErrNotRunning)
	}
	d.resume = d.lastOrdinal == ccShutdown || d.runRC(shutdownOrStartup(ccShutdown, StartupState)) == rcSuccess
	if err := d.persist(); err != nil {
		return fmt.Errorf("store volatile state: %w", err)
	}
	return nil
}

// SetLocality sets the locality of the following commands. The engine runs
// every command at locality 0; the value is kept for the protocol.
func (d *Device) SetLocality(l uint8) error {
	if l > 4 || (l == 4 && d.cfg.RejectLocality4) {
		return fmt.Errorf("set locality %d: %w", l, ErrBadLocality)
	}
	d.lock()
	defer d.mu.Unlock()
	d.locality = l
	return nil
}

// Established reports the TPM-established flag.
func (d *Device) Established() (bool, error) {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return false, fmt.Errorf("get established flag: %w", ErrNotRunning)
	}
	return d.established, nil
}

// ResetEstablished clears the TPM-established flag, which only localities 3
// and 4 may do.
func (d *Device) ResetEstablished(l uint8) error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return fmt.Errorf("reset established flag: %w", ErrNotRunning)
	}
	if l != 3 && l != 4 {
		return fmt.Errorf("reset established flag from locality %d: %w", l, ErrBadLocality)
	}
	d.established = false
	return d.persist()
}

// HashStart begins a locality-4 hash sequence (_TPM_Hash_Start) and sets the
// TPM-established flag.
func (d *Device) HashStart() error {
	return d.hashEvent("hash start", func() {
		hashStart()
		d.established = true
	})
}

// HashData feeds data into the hash sequence (_TPM_Hash_Data).
func (d *Device) HashData(data []byte) error {
	return d.hashEvent("hash data", func() { hashData(data) })
}

// HashEnd completes the hash sequence (_TPM_Hash_End): a D-RTM measurement
// into PCR 17 after TPM2_Startup, an H-CRTM one into PCR 0 before it.
func (d *Device) HashEnd() error {
	return d.hashEvent("hash end", hashEnd)
}

func (d *Device) hashEvent(what string, event func()) error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return fmt.Errorf("%s: %w", what, ErrNotRunning)
	}
	event()
	if err := d.persist(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Cancel asks the TPM to cancel the running command. The engine cannot
// cancel, and commands run one at a time, so it only checks the state.
func (d *Device) Cancel() error {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return fmt.Errorf("cancel: %w", ErrNotRunning)
	}
	return nil
}

// BufferSize sets the buffer size when size is not 0, clamped to
// [MinBufferSize, MaxBufferSize], and returns the size in force. Setting
// needs a stopped TPM.
func (d *Device) BufferSize(size uint32) (uint32, error) {
	d.lock()
	defer d.mu.Unlock()
	if size == 0 {
		return d.bufferSize, nil
	}
	if d.running {
		return 0, fmt.Errorf("set buffer size: %w", ErrRunning)
	}
	d.bufferSize = min(max(size, MinBufferSize), MaxBufferSize)
	return d.bufferSize, nil
}

// ErrorResponse is a TPM 2.0 response that carries only the response code rc.
func ErrorResponse(rc uint32) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, headerSize, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[6:], rc)
	return b
}

// shutdownOrStartup builds TPM2_Startup or TPM2_Shutdown with su.
func shutdownOrStartup(cc uint32, su StartupType) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[6:], cc)
	binary.BigEndian.PutUint16(b[10:], uint16(su))
	return b
}

// StatePart selects a state image for State and SetState.
type StatePart int

// State parts, as swtpm's blob types.
const (
	// PartPermanent is the state as stored.
	PartPermanent StatePart = 1
	// PartVolatile is the whole state after an orderly
	// TPM2_Shutdown(STATE), marked to resume where it was.
	PartVolatile StatePart = 2
)

// partCount sizes arrays indexed by StatePart.
const partCount = 3

// State returns a state image for migration or backup. For PartVolatile it
// sends TPM2_Shutdown(STATE) unless the guest just did; the TPM goes on
// running, and commands after it are not in the image. The engine cannot
// capture loaded objects, sessions and PCRs 16-23, so those are lost.
func (d *Device) State(part StatePart) ([]byte, error) {
	d.lock()
	defer d.mu.Unlock()
	if !d.running {
		return nil, fmt.Errorf("get state: %w", ErrNotRunning)
	}
	img := &Image{Engine: EngineVersion, Established: d.established}
	switch part {
	case PartPermanent:
		img.NV = d.saved
	case PartVolatile:
		img.Resume = d.lastOrdinal == ccShutdown || d.runRC(shutdownOrStartup(ccShutdown, StartupState)) == rcSuccess
		if err := d.persist(); err != nil {
			return nil, fmt.Errorf("get volatile state: %w", err)
		}
		img.NV = d.saved
	default:
		return nil, fmt.Errorf("get state: %w: part %d", ErrNoSuchState, part)
	}
	return img.MarshalBinary()
}

// ErrNoSuchState: the engine has no state of that kind.
var ErrNoSuchState = errors.New("no such state")

// SetState checks an image and keeps it for the next Init, which loads it
// in place of the stored state and stores it. An empty image clears what
// was set. The TPM must be stopped.
func (d *Device) SetState(part StatePart, image []byte) error {
	d.lock()
	defer d.mu.Unlock()
	if d.running {
		return fmt.Errorf("set state: %w", ErrRunning)
	}
	if part != PartPermanent && part != PartVolatile {
		return fmt.Errorf("set state: %w: part %d", ErrNoSuchState, part)
	}
	if len(image) == 0 {
		d.pending[part] = nil
		return nil
	}
	img, err := ParseImage(image)
	if err != nil {
		return fmt.Errorf("set state: %w", err)
	}
	d.pending[part] = img
	return nil
}

// MemoryStore keeps the state image in memory only, for tests and
// measurements where nothing is to outlive the process.
type MemoryStore struct {
	mu    sync.Mutex
	image []byte
}

// Load returns the image saved last, or an error wrapping fs.ErrNotExist.
func (m *MemoryStore) Load() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.image == nil {
		return nil, fmt.Errorf("memory store: %w", fs.ErrNotExist)
	}
	return append([]byte(nil), m.image...), nil
}

// Save keeps a copy of the image.
func (m *MemoryStore) Save(image []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.image = append([]byte(nil), image...)
	return nil
}
