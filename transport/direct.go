package transport

// The direct data loop: read, execute and write in C on the connection's
// descriptor, for as long as commands need nothing from Go. Serving each
// command through Go's netpoller wakes a second thread and sysmon per
// command; this loop blocks in poll(2) like swtpm and costs one context
// switch per command. It returns to Go when a command changed the state
// (stored before its response goes), on anything unusual (Go's path handles
// it), and when woken because the control channel needs the TPM.

/*
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

// vtpm.DirectExec's function.
typedef int (*tr_exec_fn)(const uint8_t *cmd, uint32_t n, uint8_t *resp, uint32_t *resp_n, uint32_t buffer_size);

enum {
	TR_MAX = 4096,
	TR_FRAMED_HDR = 9,
	// Room for a whole framed command and what a client sent after it.
	TR_IN = 2 * (TR_MAX + TR_FRAMED_HDR),
	TR_OUT = TR_MAX + 8,
};

// Why tr_run returned.
enum {
	TR_WOKEN = 0,     // the wake descriptor was written
	TR_GO = 1,        // Go's path takes the next command (or the error)
	TR_HELD = 2,      // out holds a response that waits for Go
	TR_WRITE_ERR = 3, // writing a response failed (err)
};

// DirectStats' table: per command code, how many, their total duration and
// how many fell in each bucket (the first bound at or above the duration, as
// metrics.Commands.Observe; none beyond the last). Atomic additions: a
// loop and another connection's Go path (tr_record_held) may count at once,
// and Go reads at any time. The count goes first, so buckets read before the
// count never add up to more.
enum {
	TR_CODE_FIRST = 0x11f, // TPM_CC_FIRST
	TR_CODES = 256,        // from TPM_CC_FIRST; the slot after: every other code
	TR_BOUNDS = 24,
};

struct tr_count {
	uint64_t count, nanos, buckets[TR_BOUNDS];
};

struct tr_stats {
	uint64_t bounds[TR_BOUNDS]; // nanoseconds
	int nbounds;
	struct tr_count by[TR_CODES + 1];
};

static uint64_t tr_now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void tr_add(uint64_t *p, uint64_t n) { __atomic_fetch_add(p, n, __ATOMIC_RELEASE); }

// tr_record counts a command of the code that started at start (tr_now).
static void tr_record(struct tr_stats *s, uint32_t code, uint64_t start) {
	uint64_t d = tr_now() - start;
	uint32_t slot = code - TR_CODE_FIRST;
	if (slot >= TR_CODES)
		slot = TR_CODES;
	struct tr_count *c = &s->by[slot];
	tr_add(&c->count, 1);
	tr_add(&c->nanos, d);
	for (int i = 0; i < s->nbounds; i++) {
		if (d <= s->bounds[i]) {
			tr_add(&c->buckets[i], 1);
			break;
		}
	}
}

struct tr_loop {
	int fd, wakefd;
	struct tr_stats *stats; // or NULL: nothing counted
	uint64_t held_start;    // when the held command started, for stats
	uint8_t in[TR_IN];
	uint32_t have;
	uint8_t out[TR_OUT];
	uint32_t out_n;
	int commands, outcome, framed, err, closing;
	uint32_t last_ordinal;
	uint8_t locality;
};

static uint32_t tr_be32(const uint8_t *b) { return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3]; }
static void tr_put32(uint8_t *b, uint32_t v) { b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v; }

// tr_write writes all n bytes of p; -1 sets err.
static int tr_write(struct tr_loop *l, const uint8_t *p, uint32_t len) {
	uint32_t off = 0;
	while (off < len) {
		ssize_t n = send(l->fd, p + off, len - off, MSG_NOSIGNAL);
		if (n < 0 && errno == ENOTSOCK)
			n = write(l->fd, p + off, len - off);
		if (n >= 0) {
			off += n;
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN) {
			l->err = errno;
			return -1;
		}
		struct pollfd writable = {l->fd, POLLOUT, 0};
		poll(&writable, 1, -1);
	}
	return 0;
}

static int tr_run(struct tr_loop *l, void *exec_ptr, uint32_t buffer_size) {
	tr_exec_fn exec = (tr_exec_fn)exec_ptr;
	l->commands = l->outcome = l->framed = l->err = 0;
	l->out_n = 0;
	for (;;) {
		if (l->have >= 10) {
			const uint8_t *h = l->in;
			uint32_t tag = (uint32_t)h[0] << 8 | h[1], hdr = 0, size = tr_be32(h + 2);
			int framed = tag != 0x8001 && tag != 0x8002 && tr_be32(h) == 8;
			if (framed) {
				hdr = TR_FRAMED_HDR;
				size = tr_be32(h + 5);
			}
			if (size < 10 || size > buffer_size || size > TR_MAX)
				return TR_GO;
			if (l->have >= hdr + size) {
				const uint8_t *cmd = h + hdr;
				uint8_t *resp = l->out + (framed ? 4 : 0);
				uint32_t rn = TR_MAX;
				uint64_t start = l->stats ? tr_now() : 0;
				int outcome = exec(cmd, size, resp, &rn, buffer_size);
				l->commands++;
				l->last_ordinal = tr_be32(cmd + 6);
				l->framed = framed;
				if (framed) {
					l->locality = h[4];
					tr_put32(l->out, rn);
					tr_put32(l->out + 4 + rn, 0);
					l->out_n = rn + 8;
				} else {
					l->out_n = rn;
				}
				l->have -= hdr + size;
				memmove(l->in, l->in + hdr + size, l->have);
				if (outcome != 0) {
					// Counted once Go has stored the state (tr_record_held).
					l->outcome = outcome;
					l->held_start = start;
					return TR_HELD;
				}
				// Counted before the response goes: a client that has it
				// finds it in the counts.
				if (l->stats)
					tr_record(l->stats, l->last_ordinal, start);
				if (tr_write(l, l->out, l->out_n) < 0)
					return TR_WRITE_ERR;
				continue;
			}
		}
		struct pollfd p[2] = {{l->fd, POLLIN, 0}, {l->wakefd, POLLIN, 0}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return TR_GO;
		}
		if (p[1].revents) {
			uint64_t v;
			if (read(l->wakefd, &v, sizeof v) < 0) {
			}
			return TR_WOKEN;
		}
		ssize_t n = read(l->fd, l->in + l->have, TR_IN - l->have);
		if (n > 0) {
			l->have += n;
			continue;
		}
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		// End of stream or an error: Go's path reads it again and reports it.
		return TR_GO;
	}
}

static void tr_record_held(struct tr_loop *l) {
	if (l->stats)
		tr_record(l->stats, l->last_ordinal, l->held_start);
}

// tr_read reads up to n bytes into p for Go's path, waiting at most
// timeout_ms (-1: no limit). It returns the count, 0 at the end of the
// stream, -1 on an error (err), -2 at the timeout, -3 when closing.
static ssize_t tr_read(struct tr_loop *l, uint8_t *p, size_t n, int timeout_ms) {
	for (;;) {
		if (__atomic_load_n(&l->closing, __ATOMIC_SEQ_CST))
			return -3;
		ssize_t got = read(l->fd, p, n);
		if (got >= 0)
			return got;
		if (errno != EAGAIN && errno != EINTR) {
			l->err = errno;
			return -1;
		}
		struct pollfd w[2] = {{l->fd, POLLIN, 0}, {l->wakefd, POLLIN, 0}};
		int r = poll(w, 2, timeout_ms);
		if (r == 0)
			return -2;
		if (r > 0 && w[1].revents) {
			// A wake-up for a direct loop that is not running: dropped.
			uint64_t v;
			if (read(l->wakefd, &v, sizeof v) < 0) {
			}
		}
	}
}

static struct tr_loop *tr_new(int fd, struct tr_stats *stats) {
	struct tr_loop *l = calloc(1, sizeof *l);
	if (l == NULL)
		return NULL;
	l->fd = fd;
	l->stats = stats;
	l->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->wakefd < 0) {
		free(l);
		return NULL;
	}
	return l;
}

static void tr_wake(struct tr_loop *l) {
	uint64_t one = 1;
	if (write(l->wakefd, &one, sizeof one) < 0) {
		// Already pending (the counter is full) or closing: nothing to do.
	}
}

static void tr_close(struct tr_loop *l) {
	__atomic_store_n(&l->closing, 1, __ATOMIC_SEQ_CST);
	tr_wake(l);
}

static void tr_free(struct tr_loop *l) {
	close(l->fd);
	close(l->wakefd);
	free(l);
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/vtpmd/vtpmd/internal/unixsock"
	"github.com/vtpmd/vtpmd/vtpm"
)

// directTPM is a TPM whose commands a direct loop can run: *vtpm.Device.
type directTPM interface {
	RunDirect(ctx context.Context, wake func(), loop func(vtpm.DirectExec) vtpm.DirectRun) (bool, error)
}

// DirectStats counts the commands that a Server's direct loops run, which
// never reach its TPM's Execute: by command code, with their duration (the
// engine's, and the state's storing when a command changed it) in a
// histogram. The loop counts in C, before it sends the response, with no
// system call (the clock is read through the vDSO); Each reads the counts
// at any time.
type DirectStats struct {
	s *C.struct_tr_stats
}

// NewDirectStats makes the counts of a histogram of bounds, in increasing
// order: a command goes in the first bucket whose bound it does not exceed.
func NewDirectStats(bounds []time.Duration) (*DirectStats, error) {
	if len(bounds) > C.TR_BOUNDS {
		return nil, fmt.Errorf("direct loop counts: %d latency buckets, at most %d", len(bounds), C.TR_BOUNDS)
	}
	s := (*C.struct_tr_stats)(C.calloc(1, C.sizeof_struct_tr_stats))
	if s == nil {
		return nil, errors.New("direct loop counts: out of memory")
	}
	for i, b := range bounds {
		s.bounds[i] = C.uint64_t(b)
	}
	s.nbounds = C.int(len(bounds))
	d := &DirectStats{s: s}
	runtime.AddCleanup(d, func(s *C.struct_tr_stats) { C.free(unsafe.Pointer(s)) }, s)
	return d, nil
}

// Each calls f with the counts of each command code that ran: code 0
// stands for every code outside TPM 2.0's range. buckets are f's to keep.
func (d *DirectStats) Each(f func(code uint32, count, nanos uint64, buckets []uint64)) {
	for slot := range d.s.by {
		c := &d.s.by[slot]
		buckets := make([]uint64, d.s.nbounds)
		for i := range buckets {
			buckets[i] = atomic.LoadUint64((*uint64)(unsafe.Pointer(&c.buckets[i])))
		}
		// The count after the buckets: never less than they add up to.
		count := atomic.LoadUint64((*uint64)(unsafe.Pointer(&c.count)))
		if count == 0 {
			continue
		}
		code := uint32(0)
		if slot < C.TR_CODES {
			code = uint32(C.TR_CODE_FIRST + slot)
		}
		f(code, count, atomic.LoadUint64((*uint64)(unsafe.Pointer(&c.nanos))), buckets)
	}
	runtime.KeepAlive(d)
}

// directConn is a data connection served by the direct loop. It owns a
// duplicate of the connection's descriptor, outside Go's netpoller: while
// it is registered there, every request would wake the netpoller's thread.
// Go's path reads and writes it through C as well.
type directConn struct {
	tpm      directTPM
	stats    *DirectStats // kept while l counts in it
	mu       sync.Mutex   // guards l against a wake-up after free
	l        *C.struct_tr_loop
	left     []byte // bytes the loop read but did not run, for Go's path
	deadline time.Time
}

// newDirectConn takes c over for the direct loop, closing it, or returns
// nil, leaving c as it was, when the TPM or the connection cannot have one.
func (s *Server) newDirectConn(c net.Conn) *directConn {
	tpm, ok := s.TPM.(directTPM)
	if !ok || s.Disconnect {
		return nil
	}
	fd, err := unixsock.Dup(c)
	if err != nil {
		return nil
	}
	var stats *C.struct_tr_stats
	if s.DirectStats != nil {
		stats = s.DirectStats.s
	}
	l := C.tr_new(C.int(fd), stats)
	if l == nil {
		syscall.Close(fd)
		return nil
	}
	c.Close()
	return &directConn{tpm: tpm, stats: s.DirectStats, l: l}
}

// wake makes the loop return to Go; safe at any time, also after free.
func (d *directConn) wake() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.l != nil {
		C.tr_wake(d.l)
	}
}

// Close ends what is waiting on the connection; free releases it after.
func (d *directConn) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.l != nil {
		C.tr_close(d.l)
	}
	return nil
}

func (d *directConn) free() {
	d.mu.Lock()
	defer d.mu.Unlock()
	C.tr_free(d.l)
	d.l = nil
}

// Read gives Go's path what the loop read but did not run, then the
// connection's bytes.
func (d *directConn) Read(p []byte) (int, error) {
	if len(d.left) > 0 {
		n := copy(p, d.left)
		d.left = d.left[n:]
		return n, nil
	}
	if len(p) == 0 {
		return 0, nil
	}
	timeout := -1
	if !d.deadline.IsZero() {
		timeout = int(max(0, time.Until(d.deadline).Milliseconds()))
	}
	n := C.tr_read(d.l, (*C.uint8_t)(unsafe.Pointer(&p[0])), C.size_t(len(p)), C.int(timeout))
	switch {
	case n > 0:
		return int(n), nil
	case n == 0:
		return 0, io.EOF
	case n == -2:
		return 0, os.ErrDeadlineExceeded
	case n == -3:
		return 0, net.ErrClosed
	}
	return 0, syscall.Errno(d.l.err)
}

// Write writes all of p.
func (d *directConn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if C.tr_write(d.l, (*C.uint8_t)(unsafe.Pointer(&p[0])), C.uint32_t(len(p))) < 0 {
		return 0, syscall.Errno(d.l.err)
	}
	return len(p), nil
}

// SetReadDeadline bounds the reads of Go's path.
func (d *directConn) SetReadDeadline(t time.Time) error {
	d.deadline = t
	return nil
}

// errDirectWrite: the direct loop could not send a response.
var errDirectWrite = errors.New("write TPM response")

// serveDirect runs commands in the direct loop until Go's path must take
// the next one. Bytes read but not run are left in d.left.
func (s *Server) serveDirect(ctx context.Context, d *directConn) error {
	for {
		var why C.int
		ran, err := d.tpm.RunDirect(ctx, d.wake, func(x vtpm.DirectExec) vtpm.DirectRun {
			why = C.tr_run(d.l, x.Func, C.uint32_t(x.BufferSize))
			return vtpm.DirectRun{Commands: int(d.l.commands), LastOrdinal: uint32(d.l.last_ordinal), Outcome: int(d.l.outcome)}
		})
		if !ran {
			return nil
		}
		if d.l.framed != 0 {
			_ = s.TPM.SetLocality(uint8(d.l.locality))
		}
		switch why {
		case C.TR_WRITE_ERR:
			return fmt.Errorf("%w: %w", errDirectWrite, syscall.Errno(d.l.err))
		case C.TR_HELD:
			// The state is stored now, or the command failed.
			resp := unsafe.Slice((*byte)(unsafe.Pointer(&d.l.out[0])), int(d.l.out_n))
			if err != nil {
				resp = DataCommand{Framed: d.l.framed != 0}.Marshal(vtpm.ErrorResponse(rcFailure))
			}
			C.tr_record_held(d.l)
			if _, err := d.Write(resp); err != nil {
				return fmt.Errorf("%w: %w", errDirectWrite, err)
			}
			continue
		}
		if d.l.have > 0 {
			d.left = append(d.left, C.GoBytes(unsafe.Pointer(&d.l.in[0]), C.int(d.l.have))...)
			d.l.have = 0
		}
		return nil
	}
}
