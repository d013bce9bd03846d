package measuredboot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
)

// EventType is a TCG PC Client event type.
type EventType uint32

// Event types of the TCG PC Client Platform Firmware Profile.
const (
	EvPostCode                   EventType = 0x00000001
	EvNoAction                   EventType = 0x00000003
	EvSeparator                  EventType = 0x00000004
	EvAction                     EventType = 0x00000005
	EvSCRTMVersion               EventType = 0x00000008
	EvPlatformConfigFlags        EventType = 0x0000000a
	EvEFIVariableDriverConfig    EventType = 0x80000001
	EvEFIVariableBoot            EventType = 0x80000002
	EvEFIBootServicesApplication EventType = 0x80000003
	EvEFIAction                  EventType = 0x80000007
	EvEFIPlatformFirmwareBlob    EventType = 0x80000008
	EvEFIHandoffTables           EventType = 0x80000009
	EvEFIVariableAuthority       EventType = 0x800000e0
	algSHA256                    uint16    = 0x000b
	specIDSignature                        = "Spec ID Event03\x00"
)

// Event is one measurement: Digest (the SHA-256 of Data when nil) is
// extended into PCR, and Data is what the log shows for it.
type Event struct {
	PCR    int
	Type   EventType
	Data   []byte
	Digest []byte
}

func (e Event) digest() []byte {
	if e.Digest != nil {
		return e.Digest
	}
	sum := sha256.Sum256(e.Data)
	return sum[:]
}

func (e Event) check() error {
	if e.PCR < 0 || e.PCR > 23 {
		return fmt.Errorf("event %#x: PCR %d out of 0..23", uint32(e.Type), e.PCR)
	}
	if e.Digest != nil && len(e.Digest) != sha256.Size {
		return fmt.Errorf("event %#x on PCR %d: digest of %d bytes, want %d", uint32(e.Type), e.PCR, len(e.Digest), sha256.Size)
	}
	return nil
}

// Encode writes the event log of events: the Spec ID header (a
// TCG_PCR_EVENT in the SHA-1 format, as the spec requires of the first
// event), then one TCG_PCR_EVENT2 per event with its SHA-256 digest. Every
// field is little-endian.
func Encode(events []Event) ([]byte, error) {
	var b bytes.Buffer
	le := func(v any) { _ = binary.Write(&b, binary.LittleEndian, v) } // writes to a Buffer do not fail

	// TCG_EfiSpecIDEventStruct: one algorithm, SHA-256, and no vendor info.
	var spec bytes.Buffer
	spec.WriteString(specIDSignature)
	_ = binary.Write(&spec, binary.LittleEndian, struct {
		PlatformClass           uint32
		Minor, Major, Errata    uint8
		UintnSize               uint8 // 2: UINTN is 64 bits
		NumberOfAlgorithms      uint32
		AlgorithmID, DigestSize uint16
		VendorInfoSize          uint8
	}{Major: 2, Errata: 2, UintnSize: 2, NumberOfAlgorithms: 1, AlgorithmID: algSHA256, DigestSize: sha256.Size})

	// TCG_PCR_EVENT: PCR 0, EV_NO_ACTION, a zero SHA-1 digest.
	le(uint32(0))
	le(uint32(EvNoAction))
	b.Write(make([]byte, 20))
	le(uint32(spec.Len()))
	b.Write(spec.Bytes())

	for _, e := range events {
		if err := e.check(); err != nil {
			return nil, fmt.Errorf("encode event log: %w", err)
		}
		le(uint32(e.PCR))
		le(uint32(e.Type))
		le(uint32(1)) // TPML_DIGEST_VALUES.count
		le(algSHA256)
		b.Write(e.digest())
		le(uint32(len(e.Data)))
		b.Write(e.Data)
	}
	return b.Bytes(), nil
}

// PCRs computes the SHA-256 PCR values that replaying events from reset
// gives (PCRs start at zero; EV_NO_ACTION events extend nothing), for every
// PCR in pcrs.
func PCRs(events []Event, pcrs []int) map[int][]byte {
	out := make(map[int][]byte, len(pcrs))
	for _, i := range pcrs {
		out[i] = make([]byte, sha256.Size)
	}
	for _, e := range events {
		v, ok := out[e.PCR]
		if !ok || e.Type == EvNoAction {
			continue
		}
		h := sha256.New()
		h.Write(v)
		h.Write(e.digest())
		out[e.PCR] = h.Sum(nil)
	}
	return out
}

// TypicalBoot is the measured boot of a UEFI machine booting a Linux
// kernel through a boot loader, the events firmware typically logs. The
// version string makes boots of different "firmware" differ.
func TypicalBoot(firmwareVersion string) []Event {
	separator := []byte{0, 0, 0, 0}
	var events []Event
	events = append(events,
		Event{PCR: 0, Type: EvSCRTMVersion, Data: utf16z(firmwareVersion)},
		Event{PCR: 0, Type: EvEFIPlatformFirmwareBlob, Data: []byte("\x00\x00\x82\xff\x00\x00\x00\x00\x00\x00\x0e\x00\x00\x00\x00\x00"), Digest: sum("firmware volume " + firmwareVersion)},
		Event{PCR: 0, Type: EvPostCode, Data: []byte("POST CODE")},
		Event{PCR: 1, Type: EvEFIHandoffTables, Data: []byte("\x01\x00\x00\x00\x00\x00\x00\x00"), Digest: sum("handoff tables")},
		Event{PCR: 1, Type: EvPlatformConfigFlags, Data: []byte("platform config")},
		Event{PCR: 1, Type: EvEFIVariableBoot, Data: efiVariable("BootOrder", []byte{1, 0})},
		Event{PCR: 1, Type: EvEFIVariableBoot, Data: efiVariable("Boot0001", []byte("vtpmd test boot entry"))},
		Event{PCR: 7, Type: EvEFIVariableDriverConfig, Data: efiVariable("SecureBoot", []byte{1})},
		Event{PCR: 7, Type: EvEFIVariableDriverConfig, Data: efiVariable("PK", []byte("test platform key"))},
		Event{PCR: 7, Type: EvEFIVariableDriverConfig, Data: efiVariable("KEK", []byte("test key exchange key"))},
		Event{PCR: 7, Type: EvEFIVariableDriverConfig, Data: efiVariable("db", []byte("test signature db"))},
		Event{PCR: 7, Type: EvEFIVariableDriverConfig, Data: efiVariable("dbx", []byte("test forbidden db"))},
	)
	for pcr := range 8 {
		events = append(events, Event{PCR: pcr, Type: EvSeparator, Data: separator})
	}
	events = append(events,
		Event{PCR: 4, Type: EvEFIAction, Data: []byte("Calling EFI Application from Boot Option")},
		Event{PCR: 7, Type: EvEFIVariableAuthority, Data: efiVariable("db", []byte("boot loader signer"))},
		Event{PCR: 4, Type: EvEFIBootServicesApplication, Data: []byte("shim image load event"), Digest: sum("shimx64.efi")},
		Event{PCR: 4, Type: EvEFIBootServicesApplication, Data: []byte("grub image load event"), Digest: sum("grubx64.efi")},
		Event{PCR: 4, Type: EvEFIBootServicesApplication, Data: []byte("kernel image load event"), Digest: sum("vmlinuz")},
		Event{PCR: 5, Type: EvEFIAction, Data: []byte("Exit Boot Services Invocation")},
	)
	return events
}

// Tampered is a copy of events in which the first EV_EFI_BOOT_SERVICES_APPLICATION
// (a boot loader) measures another image: a boot a baseline must refuse.
func Tampered(events []Event) []Event {
	out := slices.Clone(events)
	for i, e := range out {
		if e.Type == EvEFIBootServicesApplication {
			out[i].Digest = sum("tampered boot loader")
			return out
		}
	}
	out = append(out, Event{PCR: 4, Type: EvEFIBootServicesApplication, Data: []byte("tampered"), Digest: sum("tampered boot loader")})
	return out
}

func sum(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

// utf16z is s in UTF-16LE with a terminating zero, as firmware strings are.
func utf16z(s string) []byte {
	var b []byte
	for _, r := range s + "\x00" {
		b = binary.LittleEndian.AppendUint16(b, uint16(r))
	}
	return b
}

// efiVariable is a UEFI_VARIABLE_DATA (EFI global variable GUID, name in
// UTF-16 without its terminator, the value).
func efiVariable(name string, value []byte) []byte {
	guid := []byte{0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c}
	b := slices.Clone(guid)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(name)))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(value)))
	n := utf16z(name)
	b = append(b, n[:len(n)-2]...)
	return append(b, value...)
}
