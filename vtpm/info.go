package vtpm

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/google/go-tpm-tools/simulator"
)

// EngineInfo describes the engine as the TPM itself reports it.
type EngineInfo struct {
	Family       string // TPM_PT_FAMILY_INDICATOR, "2.0"
	Level        uint32 // TPM_PT_LEVEL
	Revision     uint32 // TPM_PT_REVISION, 154 for spec 1.54
	Manufacturer uint32 // TPM_PT_MANUFACTURER, "MSFT"
	Firmware     uint32 // TPM_PT_FIRMWARE_VERSION_1
	RSAKeySizes  []int  // the RSA key sizes TPM2_TestParms accepts
}

// Model is what CMD_GET_INFO reports as the TPM model, as swtpm reports
// "swtpm".
const Model = "vtpmd"

// GET_INFO flags (swtpm's SWTPM_INFO_*).
const (
	InfoSpecification = 1 << 0
	InfoAttributes    = 1 << 1
	InfoFeatures      = 1 << 2
)

// JSON renders the parts selected by flags as swtpm's CMD_GET_INFO does,
// in the same order and without spaces. Flags it does not know are ignored.
func (e *EngineInfo) JSON(flags uint64) string {
	var parts []string
	add := func(key string, v any) {
		b, _ := json.Marshal(v) // plain structs of strings and numbers
		parts = append(parts, fmt.Sprintf("%q:%s", key, b))
	}
	if flags&InfoSpecification != 0 {
		add("TPMSpecification", struct {
			Family   string `json:"family"`
			Level    uint32 `json:"level"`
			Revision uint32 `json:"revision"`
		}{e.Family, e.Level, e.Revision})
	}
	if flags&InfoAttributes != 0 {
		add("TPMAttributes", struct {
			Manufacturer string `json:"manufacturer"`
			Version      string `json:"version"`
			Model        string `json:"model"`
		}{fmt.Sprintf("id:%08X", e.Manufacturer), fmt.Sprintf("id:%08X", e.Firmware), Model})
	}
	if flags&InfoFeatures != 0 {
		add("TPMFeatures", struct {
			RSAKeySizes []int `json:"RSAKeySizes"`
		}{e.RSAKeySizes})
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// Info returns the engine's description.
func (d *Device) Info() *EngineInfo { return &d.info }

const (
	ccGetCapability  = 0x17a
	ccTestParms      = 0x18a
	capTPMProperties = 6

	ptFamilyIndicator = 0x100
	ptLevel           = 0x101
	ptRevision        = 0x102
	ptManufacturer    = 0x105
	ptFirmwareVersion = 0x10b
)

// readEngineInfo asks the started engine for its fixed properties.
func readEngineInfo(d *Device) (EngineInfo, error) {
	cmd := []byte{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, capTPMProperties, 0, 0, 0x01, 0x00, 0, 0, 0, 16}
	binary.BigEndian.PutUint32(cmd[6:], ccGetCapability)
	resp, err := d.run(cmd)
	if err != nil {
		return EngineInfo{}, fmt.Errorf("read TPM properties: %w", err)
	}
	// header(10) moreData(1) capability(4) count(4) then (property, value) pairs
	if len(resp) < 19 || binary.BigEndian.Uint32(resp[6:]) != rcSuccess {
		return EngineInfo{}, fmt.Errorf("read TPM properties: bad response % x", resp)
	}
	props := map[uint32]uint32{}
	count := int(binary.BigEndian.Uint32(resp[15:]))
	for i, off := 0, 19; i < count && off+8 <= len(resp); i, off = i+1, off+8 {
		props[binary.BigEndian.Uint32(resp[off:])] = binary.BigEndian.Uint32(resp[off+4:])
	}
	var family [4]byte
	binary.BigEndian.PutUint32(family[:], props[ptFamilyIndicator])
	info := EngineInfo{
		Family:       strings.TrimRight(string(family[:]), "\x00"),
		Level:        props[ptLevel],
		Revision:     props[ptRevision],
		Manufacturer: props[ptManufacturer],
		Firmware:     props[ptFirmwareVersion],
	}
	for _, bits := range []int{1024, 2048, 3072, 4096} {
		// TPMT_PUBLIC_PARMS: RSA, no symmetric, no scheme, keyBits, exponent 0
		cmd := []byte{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0, 0, 0x00, 0x01, 0x00, 0x10, 0x00, 0x10, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(cmd[6:], ccTestParms)
		binary.BigEndian.PutUint16(cmd[16:], uint16(bits))
		if d.runRC(cmd) == rcSuccess {
			info.RSAKeySizes = append(info.RSAKeySizes, bits)
		}
	}
	return info, nil
}

// InfoJSON is CMD_GET_INFO's JSON for flags.
func (d *Device) InfoJSON(flags uint64) string { return d.info.JSON(flags) }

// Describe starts the engine briefly to read its description, for callers
// that have no Device, such as --print-capabilities. It also leaves the
// engine warm: the first start in a process pays OpenSSL's set-up, later
// ones do not.
func Describe() (*EngineInfo, error) {
	if !engineTaken.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("describe TPM: %w", ErrEngineInUse)
	}
	defer engineTaken.Store(false)
	sim, err := simulator.Get()
	if err != nil {
		return nil, fmt.Errorf("describe TPM: start engine: %w", err)
	}
	defer sim.Close()
	info, err := readEngineInfo(&Device{sim: sim})
	if err != nil {
		return nil, fmt.Errorf("describe TPM: %w", err)
	}
	return &info, nil
}
