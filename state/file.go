package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/safefile"
)

// The layout of a state file (swtpm's --tpmstate backend-uri=file://): two
// copies of a header, at 0 and 512, and two slots from 4096 on, each a frame
//
//	magic [8] | sequence u64 | payload length u32 | SHA-256 [32] | payload
//
// whose checksum covers everything before it and the payload. The header's
// payload is the format version and the slot capacity; a slot's payload is
// one Record. A write goes to the copy not holding the newest valid frame,
// and the newest valid copy wins on reading, so a torn write costs only the
// copy being written. Nothing is renamed or truncated: the file may be a
// block device.
const (
	fileHeaderMagic = "VTPMFILE"
	fileSlotMagic   = "VTPMSLOT"
	fileVersion     = 1
	frameOverhead   = 8 + 8 + 4 + sha256.Size
	headerCopySize  = 512
	slotsStart      = 4096
	fileAlign       = 4096
	maxSlotCapacity = 1 << 40
	// swtpmLinearMagic starts swtpm's own file format ("swtpmlin", little
	// endian), which vtpmd cannot read.
	swtpmLinearMagic = "nilmptws"
)

// MinBlockDeviceSize is the smallest block device OpenFile takes: the
// header and two slots of 64 KiB, each room for a TPM's sealed state (about
// 17 KiB) with headroom. A regular file grows as needed.
const MinBlockDeviceSize = slotsStart + 2*64<<10

// FileStore holds one VM's record in a single file or block device, locked
// (an open file description lock, which also excludes swtpm's fcntl lock)
// while open. Every Put is on disk (fdatasync) before it returns.
type FileStore struct {
	mu     sync.Mutex
	path   string
	f      *os.File
	device int64 // the block device's size, 0 for a regular file
	layout *fileLayout
	// corrupt says why the file does not read; such a file is never
	// written.
	corrupt error
}

// FileOptions configures OpenFile.
type FileOptions struct {
	// ReadOnly opens an existing file for reading, without the lock.
	ReadOnly bool
}

// OpenFile opens the state file at path, creating a regular file (mode
// 0600) if there is none, and takes its lock; a file another process holds
// gives an error wrapping ErrLocked. A symbolic link is refused, as swtpm
// refuses it. A file that does not read opens, but Get reports why, wrapping
// ErrCorrupt, and Put refuses to overwrite it.
func OpenFile(path string, o FileOptions) (*FileStore, error) {
	f, created, err := openStateFile(path, o.ReadOnly)
	if err != nil {
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
	s := &FileStore{path: path, f: f}
	if err := s.init(o.ReadOnly, created); err != nil {
		f.Close()
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
	return s, nil
}

func openStateFile(path string, readOnly bool) (*os.File, bool, error) {
	if readOnly {
		f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
		return f, false, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if !errors.Is(err, fs.ErrNotExist) {
		return f, false, err
	}
	f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	return f, err == nil, err
}

func (s *FileStore) init(readOnly, created bool) error {
	if !readOnly {
		lock := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
		if err := unix.FcntlFlock(s.f.Fd(), unix.F_OFD_SETLK, &lock); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
				return ErrLocked
			}
			return fmt.Errorf("lock: %w", err)
		}
	}
	fi, err := s.f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	switch {
	case fi.Mode().IsRegular():
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		if size, err = s.f.Seek(0, io.SeekEnd); err != nil {
			return fmt.Errorf("size of the block device: %w", err)
		}
		if size < MinBlockDeviceSize {
			return fmt.Errorf("the block device has %d bytes, too few: it needs at least %d (two copies of the TPM's state)", size, MinBlockDeviceSize)
		}
		s.device = size
	default:
		return fmt.Errorf("it is neither a regular file nor a block device (%s)", fi.Mode().Type())
	}
	if created {
		// The new file's name must outlive a crash, like its contents.
		if err := safefile.SyncDir(filepath.Dir(s.path)); err != nil {
			return err
		}
	}
	s.layout, s.corrupt = readLayout(s.f, size)
	return nil
}

// Path is the file's path.
func (s *FileStore) Path() string { return s.path }

// Close closes the file, releasing its lock.
func (s *FileStore) Close() error {
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("close state file %s: %w", s.path, err)
	}
	return nil
}

// Get returns the VM's record. A file holding another VM's record is an
// error, never a missing record, so that no new TPM is made over it.
func (s *FileStore) Get(vmID string) (*Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.corrupt != nil:
		return nil, fmt.Errorf("state of VM %q in %s: %w", vmID, s.path, s.corrupt)
	case s.layout.blank():
		return nil, fmt.Errorf("VM %q: %w", vmID, ErrNotFound)
	}
	r, err := ParseRecord(s.layout.record)
	switch {
	case err != nil:
		return nil, fmt.Errorf("state of VM %q in %s: %w", vmID, s.path, err)
	case r.VMID != vmID:
		return nil, fmt.Errorf("state file %s holds the state of VM %q, not of VM %q: refusing to make a new TPM over it", s.path, r.VMID, vmID)
	}
	return r, nil
}

// List lists the file's record, if it has one, as Store.List does.
func (s *FileStore) List() ([]Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.corrupt != nil:
		return []Entry{{Err: s.corrupt}}, nil
	case s.layout.blank():
		return nil, nil
	}
	e := Entry{Size: len(s.layout.record)}
	r, err := ParseRecord(s.layout.record)
	if err == nil {
		e.VMID = r.VMID
	}
	e.Err = err
	return []Entry{e}, nil
}

// Put stores the record durably in the slot not holding the newest one.
func (s *FileStore) Put(r *Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.corrupt != nil {
		return fmt.Errorf("store state of VM %q: not overwriting %s: %w", r.VMID, s.path, s.corrupt)
	}
	if r.Delta || len(r.Deltas) > 0 {
		return fmt.Errorf("store state of VM %q in %s: a state file keeps whole images, not deltas", r.VMID, s.path)
	}
	payload, err := r.MarshalBinary()
	if err != nil {
		return err
	}
	if err := s.put(payload); err != nil {
		return fmt.Errorf("store state of VM %q in %s: %w", r.VMID, s.path, err)
	}
	return nil
}

func (s *FileStore) put(payload []byte) error {
	l := *s.layout
	need := int64(frameOverhead + len(payload))
	switch {
	case s.device > 0 && l.blank():
		l.slotCap = min((s.device-slotsStart)/2/fileAlign*fileAlign, maxSlotCapacity)
	case l.blank():
		l.slotCap = roundUp(2 * need)
	}
	if need > l.slotCap && s.device > 0 {
		return fmt.Errorf("the record has %d bytes, more than a slot of the block device holds (%d)", len(payload), l.slotCap-frameOverhead)
	}
	target := 0
	if l.slot == 0 {
		target = 1
	}
	if need > l.slotCap {
		// Grow: the new slot 1 begins past both old slots, so the newest
		// record stays intact until the new header names the new layout.
		l.slotCap = max(2*l.slotCap, roundUp(2*need))
		target = 1
	}
	if err := s.writeFrame(fileSlotMagic, l.slotSeq+1, payload, slotsStart+int64(target)*l.slotCap); err != nil {
		return err
	}
	l.slot, l.slotSeq, l.record = target, l.slotSeq+1, payload
	if l.slotCap != s.layout.slotCap {
		// A new or grown file: its header is written after its record, so
		// a crash before leaves the old header and record.
		hdr := binary.BigEndian.AppendUint64([]byte{fileVersion}, uint64(l.slotCap))
		next := 1 - l.hdrCopy
		if s.layout.blank() {
			next = 0
		}
		if err := s.writeFrame(fileHeaderMagic, l.hdrSeq+1, hdr, int64(next)*headerCopySize); err != nil {
			return err
		}
		l.hdrCopy, l.hdrSeq = next, l.hdrSeq+1
	}
	s.layout = &l
	return nil
}

func roundUp(n int64) int64 { return (n + fileAlign - 1) / fileAlign * fileAlign }

// writeFrame writes a frame at off and waits until it is on disk.
func (s *FileStore) writeFrame(magic string, seq uint64, payload []byte, off int64) error {
	if _, err := s.f.WriteAt(appendFrame(nil, magic, seq, payload), off); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync: %w", err)
	}
	return nil
}

func appendFrame(b []byte, magic string, seq uint64, payload []byte) []byte {
	start := len(b)
	b = append(b, magic...)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	sum := frameSum(b[start:], payload)
	b = append(b, sum[:]...)
	return append(b, payload...)
}

func frameSum(head, payload []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(head)
	h.Write(payload)
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// fileLayout is what a state file holds: its newest valid header and slot.
type fileLayout struct {
	hdrCopy int // the header copy holding hdrSeq; -1 for a blank file
	hdrSeq  uint64
	slotCap int64 // each slot's size, frame included
	slot    int   // the slot holding the newest record, -1 for none
	slotSeq uint64
	record  []byte
}

func (l *fileLayout) blank() bool { return l.hdrCopy < 0 }

// ReadFileRecord reads the newest record of a state file of size bytes. A
// blank file (empty, or zeros where the header goes, as a new block device)
// gives an error wrapping ErrNotFound; any other file whose headers or slots
// are all invalid gives one wrapping ErrCorrupt.
func ReadFileRecord(r io.ReaderAt, size int64) (*Record, error) {
	l, err := readLayout(r, size)
	switch {
	case err != nil:
		return nil, err
	case l.blank():
		return nil, fmt.Errorf("blank state file: %w", ErrNotFound)
	}
	return ParseRecord(l.record)
}

func readLayout(r io.ReaderAt, size int64) (*fileLayout, error) {
	l := &fileLayout{hdrCopy: -1, slot: -1}
	// A file with zeros where the header goes is blank; anything else there
	// (a file system's superblock, a swap signature) is not taken over.
	head := make([]byte, max(0, min(size, slotsStart)))
	if err := readAt(r, head, 0); err != nil {
		return nil, fmt.Errorf("read the header: %w", err)
	}
	if len(bytes.TrimLeft(head, "\x00")) == 0 {
		return l, nil
	}
	var why [2]error
	for i := range 2 {
		seq, p, err := readFrame(r, size, int64(i)*headerCopySize, headerCopySize, fileHeaderMagic)
		if err == nil {
			err = checkHeader(p)
		}
		if why[i] = err; err == nil && (l.hdrCopy < 0 || seq > l.hdrSeq) {
			l.hdrCopy, l.hdrSeq, l.slotCap = i, seq, int64(binary.BigEndian.Uint64(p[1:]))
		}
	}
	switch {
	case l.hdrCopy < 0 && bytes.HasPrefix(head, []byte(swtpmLinearMagic)):
		return nil, fmt.Errorf("%w: it holds swtpm's own state format, which vtpmd cannot read", ErrCorrupt)
	case l.hdrCopy < 0:
		return nil, fmt.Errorf("%w: not a vtpmd state file, or its header is damaged (copy 0: %v; copy 1: %v)", ErrCorrupt, why[0], why[1])
	}
	for i := range 2 {
		seq, p, err := readFrame(r, size, slotsStart+int64(i)*l.slotCap, l.slotCap, fileSlotMagic)
		if why[i] = err; err == nil && (l.slot < 0 || seq > l.slotSeq) {
			l.slot, l.slotSeq, l.record = i, seq, p
		}
	}
	if l.slot < 0 {
		return nil, fmt.Errorf("%w: neither copy of the record is valid (slot 0: %v; slot 1: %v)", ErrCorrupt, why[0], why[1])
	}
	return l, nil
}

func checkHeader(p []byte) error {
	switch {
	case len(p) != 9:
		return fmt.Errorf("header of %d bytes", len(p))
	case p[0] != fileVersion:
		return fmt.Errorf("version %d, this build reads %d", p[0], fileVersion)
	}
	c := binary.BigEndian.Uint64(p[1:])
	if c < fileAlign || c > maxSlotCapacity || c%fileAlign != 0 {
		return fmt.Errorf("slot size %d", c)
	}
	return nil
}

// readFrame reads the frame at off, of at most capacity bytes.
func readFrame(r io.ReaderAt, size, off, capacity int64, magic string) (uint64, []byte, error) {
	if off+frameOverhead > size {
		return 0, nil, errors.New("past the end of the file")
	}
	head := make([]byte, frameOverhead)
	if err := readAt(r, head, off); err != nil {
		return 0, nil, err
	}
	if string(head[:8]) != magic {
		return 0, nil, fmt.Errorf("no %q", magic)
	}
	seq := binary.BigEndian.Uint64(head[8:])
	n := int64(binary.BigEndian.Uint32(head[16:]))
	if n > capacity-frameOverhead || off+frameOverhead+n > size {
		return 0, nil, fmt.Errorf("length %d past its end", n)
	}
	payload := make([]byte, n)
	if err := readAt(r, payload, off+frameOverhead); err != nil {
		return 0, nil, err
	}
	if sum := frameSum(head[:20], payload); !bytes.Equal(sum[:], head[20:]) {
		return 0, nil, errors.New("checksum mismatch (a torn write?)")
	}
	return seq, payload, nil
}

// readAt fills b from off; io.EOF after a full read is success.
func readAt(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	switch {
	case n == len(b):
		return nil
	case err == nil:
		return io.ErrUnexpectedEOF
	}
	return err
}
