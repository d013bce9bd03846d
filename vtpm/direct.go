package vtpm

// A data loop written in C (transport's) can run commands without coming
// back to Go for each: Go's scheduler wakes a second thread and sysmon for
// every request it reads, which costs more than a small command itself.
// The loop calls vtpm_direct_exec through a function pointer, and comes back
// to Go whenever a command changed the NV image, so that the state is stored
// before the response goes out.

/*
#include <stdint.h>
#include <string.h>

extern unsigned char s_NV[];
extern int g_inFailureMode;
extern void _plat__RunCommand(uint32_t requestSize, unsigned char *request, uint32_t *responseSize, unsigned char **response);

enum { VTPM_NV_SIZE = 16384 };

// The NV image the Store holds, copied in by Go before a loop starts.
static unsigned char vtpm_saved_nv[VTPM_NV_SIZE];

static void vtpm_direct_set_saved(const unsigned char *nv) { memcpy(vtpm_saved_nv, nv, VTPM_NV_SIZE); }

// vtpm_direct_exec runs one command of n bytes, at most buffer_size, and
// puts its response, of at most *resp_n bytes, in resp. It returns 0 when
// the response may be sent now, 1 when the NV image changed and must be
// stored first, 2 when the engine failed or the response is larger than
// buffer_size (the response must be TPM_RC_FAILURE).
static int vtpm_direct_exec(const uint8_t *cmd, uint32_t n, uint8_t *resp, uint32_t *resp_n, uint32_t buffer_size) {
	uint32_t size = *resp_n;
	unsigned char *out = resp;
	_plat__RunCommand(n, (unsigned char *)cmd, &size, &out);
	if (g_inFailureMode)
		return 2;
	if (size > *resp_n || size > buffer_size)
		return 2;
	if (out != resp)
		memmove(resp, out, size);
	*resp_n = size;
	return memcmp(vtpm_saved_nv, s_NV, VTPM_NV_SIZE) != 0;
}

static void *vtpm_direct_exec_ptr(void) { return (void *)vtpm_direct_exec; }
*/
import "C"

import (
	"context"
	"fmt"
	"unsafe"
)

// Outcomes of the last command a direct loop ran, as vtpm_direct_exec
// returns them.
const (
	// DirectSent: the loop sent every response itself.
	DirectSent = 0
	// DirectStore: the last command changed the NV image; its response is
	// held until RunDirect has stored the state.
	DirectStore = 1
	// DirectFailed: the engine failed on the last command, or its response
	// was too large; TPM_RC_FAILURE goes in its place.
	DirectFailed = 2
)

// DirectExec is what RunDirect gives a loop: the C function that runs one
// command, int (*)(const uint8_t *cmd, uint32_t n, uint8_t *resp,
// uint32_t *resp_n, uint32_t buffer_size), returning a Direct* outcome.
type DirectExec struct {
	Func       unsafe.Pointer
	BufferSize uint32
}

// DirectRun is what a direct loop reports back.
type DirectRun struct {
	// Commands is the number of commands the engine ran.
	Commands int
	// LastOrdinal is the command code of the last one.
	LastOrdinal uint32
	// Outcome is that of the last command: DirectSent if the loop stopped
	// for another reason.
	Outcome int
}

// RunDirect holds the TPM while loop runs commands through the engine
// outside Go. It returns false without calling loop when a command must go
// through Execute instead: the TPM is not running, it is to resume, or a
// caller waits for the device. wake must make loop return soon; it is called
// when another caller wants the device. When the last command changed the
// state, RunDirect stores it before returning; a non-nil error then says
// that the held response must not go: TPM_RC_FAILURE goes in its place.
func (d *Device) RunDirect(ctx context.Context, wake func(), loop func(DirectExec) DirectRun) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.wake.Store(&wake)
	defer d.wake.Store(nil)
	// Read after wake is published: a caller that came before sees it.
	if d.waiting.Load() > 0 || !d.running || d.resume || d.saved == nil {
		return false, nil
	}
	if len(d.directSaved) == 0 || &d.directSaved[0] != &d.saved[0] {
		C.vtpm_direct_set_saved((*C.uchar)(unsafe.Pointer(&d.saved[0])))
		d.directSaved = d.saved
	}
	run := loop(DirectExec{Func: C.vtpm_direct_exec_ptr(), BufferSize: d.bufferSize})
	if run.Commands == 0 {
		return true, nil
	}
	d.lastOrdinal = run.LastOrdinal
	switch run.Outcome {
	case DirectFailed:
		d.log.ErrorContext(ctx, "TPM engine failed", "command", fmt.Sprintf("%#x", d.lastOrdinal))
		return true, fmt.Errorf("command %#x: engine failure", d.lastOrdinal)
	case DirectStore:
		if err := d.persist(); err != nil {
			d.log.ErrorContext(ctx, "TPM state not stored; TPM stopped", "err", err)
			d.running = false
			return true, err
		}
	}
	return true, nil
}

// lock takes the device, first making a direct loop that holds it return.
func (d *Device) lock() {
	d.waiting.Add(1)
	if w := d.wake.Load(); w != nil {
		(*w)()
	}
	d.mu.Lock()
	d.waiting.Add(-1)
}
