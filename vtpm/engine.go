package vtpm

// The simulator package exports no state API; its C globals are reached here
// through extern declarations, resolved when the final binary is linked.

/*
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

extern unsigned char s_NV[];
extern void _plat__Reset(bool forceManufacture);
extern void _TPM_Hash_Start(void);
extern void _TPM_Hash_Data(uint32_t dataSize, unsigned char *data);
extern void _TPM_Hash_End(void);
extern int g_inFailureMode;

static void vtpm_nv_export(unsigned char *out, size_t n) { memcpy(out, s_NV, n); }
static void vtpm_nv_import(const unsigned char *in, size_t n) { memcpy(s_NV, in, n); }
static int vtpm_nv_differs(const unsigned char *prev, size_t n) { return memcmp(prev, s_NV, n) != 0; }
static void vtpm_power_cycle(void) { _plat__Reset(false); }
static void vtpm_manufacture(void) { _plat__Reset(true); }
static int vtpm_failed(void) { return g_inFailureMode; }
*/
import "C"

import (
	"unsafe"

	// The blank import links the engine's C code that the externs above name.
	_ "github.com/google/go-tpm-tools/simulator"
)

// NVSize is the size of the engine's NV image (NV_MEMORY_SIZE in the engine's
// TpmProfile.h). It is not exported as a symbol, so it is fixed here and
// checked by a golden test.
const NVSize = 16384

// nvExportInto exports NV into buf if it has room, else into a new slice.
func nvExportInto(buf []byte) []byte {
	if cap(buf) < NVSize {
		buf = make([]byte, NVSize)
	}
	out := buf[:NVSize]
	C.vtpm_nv_export((*C.uchar)(unsafe.Pointer(&out[0])), NVSize)
	return out
}

func nvImport(img []byte) {
	C.vtpm_nv_import((*C.uchar)(unsafe.Pointer(&img[0])), NVSize)
}

func nvDiffers(prev []byte) bool {
	return C.vtpm_nv_differs((*C.uchar)(unsafe.Pointer(&prev[0])), NVSize) != 0
}

// powerCycle is _TPM_Init after a power loss: NV is kept, RAM state is
// reloaded from it and the TPM waits for TPM2_Startup.
func powerCycle() { C.vtpm_power_cycle() }

// manufacture wipes the TPM and manufactures it anew with fresh seeds. The
// TPM then waits for TPM2_Startup.
func manufacture() { C.vtpm_manufacture() }

func engineFailed() bool { return C.vtpm_failed() != 0 }

func hashStart() { C._TPM_Hash_Start() }

func hashData(b []byte) {
	if len(b) == 0 {
		return
	}
	C._TPM_Hash_Data(C.uint32_t(len(b)), (*C.uchar)(unsafe.Pointer(&b[0])))
}

func hashEnd() { C._TPM_Hash_End() }
