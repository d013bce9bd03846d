package main

// End-to-end test of QEMU live migration between two daemons on separate
// state directories (libvirt's migration without shared storage): the guest
// of guest_test.go defines an NV index, extends PCRs 10 and 16 and makes a
// persistent key ("setup" on its console), QEMU migrates it to a second QEMU
// whose TPM is a second daemon, and the guest reports its TPM state ("state")
// before and after. The TPM state travels in the migration stream through
// CMD_GET_STATEBLOB on the source and CMD_SET_STATEBLOB + CMD_INIT on the
// destination.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// What the guest puts into its TPM.
const (
	migrateNVIndex    = 0x01500020
	migratePersistent = 0x81000042
	migrateNVValue    = "vtpmd-migration!" // NV index size: 16 bytes
	// migrateTimeout bounds the migration itself (256 MB guest, mostly zero
	// pages, over a UNIX socket).
	migrateTimeout = time.Minute
)

// migrateExtend is the digest the guest extends into PCRs 10 and 16.
var migrateExtend = sha256.Sum256([]byte("vtpmd migration test"))

// TPM 2.0 constants of the commands below.
const (
	tpmSTNoSessions = 0x8001
	tpmSTSessions   = 0x8002
	tpmRHOwner      = 0x40000001
	tpmRSPW         = 0x40000009
	tpmAlgSHA256    = 0x000b
	tpmAlgECC       = 0x0023
	tpmAlgAES       = 0x0006
	tpmAlgCFB       = 0x0043
	tpmAlgNull      = 0x0010
	tpmECCNistP256  = 0x0003
	// The first transient handle in a fresh /dev/tpmrm0 space: the kernel's
	// resource manager hands out virtual handles from 0x80ffffff down.
	tpmrmFirstHandle = 0x80ffffff
)

// tpmCmd builds a TPM 2.0 command with the given handles and, if pw, one
// empty password authorisation.
func tpmCmd(cc uint32, handles []uint32, pw bool, params ...[]byte) []byte {
	tag := uint16(tpmSTNoSessions)
	if pw {
		tag = tpmSTSessions
	}
	b := binary.BigEndian.AppendUint16(nil, tag)
	b = append(b, 0, 0, 0, 0) // size, set below
	b = binary.BigEndian.AppendUint32(b, cc)
	for _, h := range handles {
		b = binary.BigEndian.AppendUint32(b, h)
	}
	if pw {
		// authorizationSize 9: TPM_RS_PW, empty nonce, attributes 0, empty hmac.
		b = binary.BigEndian.AppendUint32(b, 9)
		b = binary.BigEndian.AppendUint32(b, tpmRSPW)
		b = append(b, 0, 0, 0, 0, 0)
	}
	for _, p := range params {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// be concatenates big-endian values: uint16, uint32 and byte slices.
func be(vs ...any) []byte {
	var b []byte
	for _, v := range vs {
		switch v := v.(type) {
		case uint16:
			b = binary.BigEndian.AppendUint16(b, v)
		case uint32:
			b = binary.BigEndian.AppendUint32(b, v)
		case []byte:
			b = append(b, v...)
		default:
			panic(fmt.Sprintf("be: %T", v))
		}
	}
	return b
}

// tpm2b prefixes b with its uint16 size.
func tpm2b(b []byte) []byte { return be(uint16(len(b)), b) }

// guestStateCommands are the raw commands of the guest's "setup" and
// "state" console commands, stored as files in the initramfs.
var guestStateCommands = []struct {
	file string
	cmd  []byte
}{
	// TPM2_NV_DefineSpace(owner, auth "", {index, SHA-256,
	// OWNERWRITE|AUTHWRITE|OWNERREAD|AUTHREAD|NO_DA, no policy, 16 bytes}).
	{"nvdefine.bin", tpmCmd(0x12a, []uint32{tpmRHOwner}, true,
		tpm2b(nil), tpm2b(be(uint32(migrateNVIndex), uint16(tpmAlgSHA256), uint32(0x02060006), tpm2b(nil), uint16(len(migrateNVValue)))))},
	// TPM2_NV_Write(owner, index, value, offset 0)
	{"nvwrite.bin", tpmCmd(0x137, []uint32{tpmRHOwner, migrateNVIndex}, true, tpm2b([]byte(migrateNVValue)), be(uint16(0)))},
	// TPM2_NV_Read(owner, index, size, offset 0)
	{"nvread.bin", tpmCmd(0x14e, []uint32{tpmRHOwner, migrateNVIndex}, true, be(uint16(len(migrateNVValue)), uint16(0)))},
	// TPM2_PCR_Extend(PCR, {SHA-256: migrateExtend})
	{"extend10.bin", tpmCmd(0x182, []uint32{10}, true, be(uint32(1), uint16(tpmAlgSHA256), migrateExtend[:]))},
	{"extend16.bin", tpmCmd(0x182, []uint32{16}, true, be(uint32(1), uint16(tpmAlgSHA256), migrateExtend[:]))},
	// TPM2_CreatePrimary(owner): an ECC P-256 storage key (fast to make,
	// unlike RSA), AES-128-CFB, no creation PCRs.
	{"createprimary.bin", tpmCmd(0x131, []uint32{tpmRHOwner}, true,
		tpm2b(be(tpm2b(nil), tpm2b(nil))),
		tpm2b(be(uint16(tpmAlgECC), uint16(tpmAlgSHA256),
			uint32(0x00030472), // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt
			tpm2b(nil),
			uint16(tpmAlgAES), uint16(128), uint16(tpmAlgCFB), uint16(tpmAlgNull), uint16(tpmECCNistP256), uint16(tpmAlgNull),
			tpm2b(nil), tpm2b(nil))),
		tpm2b(nil), be(uint32(0)))},
	// TPM2_EvictControl(owner, the key just made, persistent handle)
	{"evictcontrol.bin", tpmCmd(0x120, []uint32{tpmRHOwner, tpmrmFirstHandle}, true, be(uint32(migratePersistent)))},
	// TPM2_ReadPublic(persistent handle)
	{"readpublic.bin", tpmCmd(0x173, []uint32{migratePersistent}, false)},
}

func TestQEMUMigration(t *testing.T) {
	testStart := time.Now()
	qemu, kernel, initrd := prepareGuest(t)
	t.Logf("daemon %s, kernel %s", daemonPath, filepath.Base(kernel.dir))

	base := t.TempDir()
	machine := func(name string) *guestMachine {
		g := &guestMachine{qemu: qemu, kernel: kernel.vmlinuz, initrd: initrd, iface: "tpm-crb", fw: guestFirmwares[0],
			dir: filepath.Join(base, name), capture: captureLog(t, "qemu-migrate-"+name+".txt")}
		require.NoError(t, os.MkdirAll(filepath.Join(g.dir, "state"), 0o700))
		return g
	}
	require.Equal(t, "seabios", guestFirmwares[0].name)
	src, dst := machine("source"), machine("destination")

	// Source: boot, put things into the TPM, report.
	dA := src.startDaemon(t)
	vmA := src.startQEMU(t)
	src.check(t, vmA, "source boot")
	setup := guestCommand(t, vmA, "setup")
	for _, k := range []string{"nvdefine", "nvwrite", "extend10", "extend16"} {
		requireTPMSuccess(t, setup, k)
	}
	persist := strings.Split(setup.get("persist"), ",")
	require.Len(t, persist, 2, "persist: want the CreatePrimary and EvictControl responses, got %q", setup.get("persist"))
	primary := mustHex(t, persist[0])
	require.NoError(t, checkTPMResponseAnyTag(primary), "TPM2_CreatePrimary: %x", primary)
	require.Equal(t, uint32(tpmrmFirstHandle), binary.BigEndian.Uint32(primary[10:]),
		"CreatePrimary returned another handle than EvictControl uses")
	evict := mustHex(t, persist[1])
	require.NoError(t, checkTPMResponseAnyTag(evict), "TPM2_EvictControl: %x", evict)
	before := readGuestState(t, guestCommand(t, vmA, "state"), "before migration")
	// PCR 16 was reset by the boot's TPM2_Startup(CLEAR) and extended once.
	want16 := sha256.Sum256(append(make([]byte, 32), migrateExtend[:]...))
	require.Equal(t, hex.EncodeToString(want16[:]), before.pcrs[16], "PCR 16 after one extend")

	// Destination: a second daemon on its own state directory and a QEMU
	// waiting for the migration.
	migrateSock := filepath.Join(base, "migrate.sock")
	dst.incoming = "unix:" + migrateSock
	dB := dst.startDaemon(t)
	vmB := dst.startQEMU(t)
	waitForPath(t, vmB, migrateSock)
	storedBefore, digestBefore := stateFiles(t, dst)
	t.Logf("destination state dir before migration: %v", storedBefore)

	start := time.Now()
	vmA.monitor(t, "migrate -d unix:"+migrateSock)
	waitMigration(t, vmA)
	t.Logf("migration took %v", time.Since(start).Round(time.Millisecond))
	vmA.monitor(t, "quit")
	vmA.waitExit(t, exitTimeout)
	dA.waitExit(t, exitTimeout)

	// The guest runs on, now on the destination.
	after := readGuestState(t, guestCommand(t, vmB, "state"), "after migration")
	for i := 0; i < 16; i++ {
		assert.Equal(t, before.pcrs[i], after.pcrs[i], "PCR %d changed by the migration", i)
	}
	switch after.pcrs[16] {
	case before.pcrs[16]:
		t.Logf("PCR 16 kept across the migration (%s…)", after.pcrs[16][:16])
	case strings.Repeat("0", 64):
		t.Logf("PCR 16 reset by the migration (expected with vtpmd: no image of PCRs 16-23)")
	default:
		t.Errorf("PCR 16 after migration is %s: neither the value before (%s) nor reset", after.pcrs[16], before.pcrs[16])
	}
	assert.Equal(t, before.readPublic, after.readPublic, "persistent key %#x differs after the migration", migratePersistent)
	t.Logf("clock before: resetCount %d restartCount %d; after: resetCount %d restartCount %d",
		before.clock.reset, before.clock.restart, after.clock.reset, after.clock.restart)
	assert.Equal(t, before.clock.reset, after.clock.reset, "resetCount changed by the migration: the TPM was reset")

	// The destination daemon stored the transferred state (the daemon may
	// have created its store at start, so the directory must have changed).
	stored, digest := stateFiles(t, dst)
	t.Logf("destination state dir after migration: %v", stored)
	assert.NotEmpty(t, stored, "no TPM state stored in the destination's state dir after the migration")
	assert.NotEqual(t, digestBefore, digest, "the destination's state dir did not change with the migration")

	vmB.console(t, "poweroff")
	vmB.waitExit(t, exitTimeout)
	dB.waitExit(t, exitTimeout)

	// A new daemon and QEMU on the destination's state directory.
	dst.incoming = ""
	d := dst.startDaemon(t)
	vm := dst.startQEMU(t)
	dst.check(t, vm, "boot on the destination's state")
	again := readGuestState(t, guestCommand(t, vm, "state"), "after a new boot on the destination's state")
	assert.Equal(t, before.readPublic, again.readPublic, "persistent key %#x differs after a new boot", migratePersistent)
	vm.console(t, "poweroff")
	vm.waitExit(t, exitTimeout)
	d.waitExit(t, exitTimeout)
	t.Logf("whole test took %v", time.Since(testStart).Round(time.Millisecond))
}

// guestCommand types a state command on the guest's console and returns its
// report.
func guestCommand(t *testing.T, vm *qemuVM, command string) guestReport {
	t.Helper()
	vm.console(t, command)
	r := vm.waitReport(t, bootTimeout, command)
	if e := r.get("error"); e != "" {
		t.Fatalf("%s: guest error %s\nconsole tail:\n%s", command, e, vm.tail())
	}
	return r
}

// guestTPMState is what a "state" report shows.
type guestTPMState struct {
	pcrs       [24]string
	readPublic string
	clock      tpmClock
}

// readGuestState checks a "state" report: every command succeeded, the NV
// index holds the value written, GetRandom returned random bytes.
func readGuestState(t *testing.T, r guestReport, what string) guestTPMState {
	t.Helper()
	var s guestTPMState
	for i := range s.pcrs {
		v := strings.ToLower(r.get(fmt.Sprintf("pcr-sha256-%d", i)))
		raw, err := hex.DecodeString(v)
		require.True(t, err == nil && len(raw) == 32, "%s: PCR %d = %q is not a SHA-256 value\n%s", what, i, v, r)
		s.pcrs[i] = v
	}
	nv := requireTPMSuccess(t, r, "nvread")
	// parameterSize, TPM2B_MAX_NV_BUFFER, then the response auth area.
	require.True(t, len(nv) >= 16+len(migrateNVValue), "%s: NV_Read response %x too short", what, nv)
	require.Equal(t, uint16(len(migrateNVValue)), binary.BigEndian.Uint16(nv[14:]), "%s: NV_Read size", what)
	assert.Equal(t, migrateNVValue, string(nv[16:16+len(migrateNVValue)]), "%s: NV index %#x", what, migrateNVIndex)
	s.readPublic = hex.EncodeToString(requireTPMSuccess(t, r, "readpublic"))
	rnd := requireTPMSuccess(t, r, "getrandom")
	require.Len(t, rnd, 12+getRandomBytes, "%s: GetRandom response %x", what, rnd)
	assert.NotEqual(t, make([]byte, getRandomBytes), rnd[12:], "%s: GetRandom returned zeros", what)
	clock := requireTPMSuccess(t, r, "readclock")
	require.Len(t, clock, 35, "%s: ReadClock response %x", what, clock)
	s.clock = tpmClock{reset: binary.BigEndian.Uint32(clock[26:]), restart: binary.BigEndian.Uint32(clock[30:])}
	return s
}

// checkTPMResponseAnyTag is checkTPMResponse that also takes responses to
// commands with sessions (tag TPM_ST_SESSIONS).
func checkTPMResponseAnyTag(rsp []byte) error {
	if len(rsp) >= 2 && binary.BigEndian.Uint16(rsp) == tpmSTSessions {
		rsp = append([]byte{0x80, 0x01}, rsp[2:]...)
	}
	return checkTPMResponse(rsp)
}

// requireTPMSuccess decodes the hex response under key and requires a
// successful response.
func requireTPMSuccess(t *testing.T, r guestReport, key string) []byte {
	t.Helper()
	rsp := mustHex(t, r.get(key))
	require.NoError(t, checkTPMResponseAnyTag(rsp), "%s: response %x\nreport:\n%s", key, rsp, r)
	return rsp
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err, "%q is not hex", s)
	return b
}

// waitForPath waits until QEMU created path (its incoming migration socket).
func waitForPath(t *testing.T, vm *qemuVM, path string) {
	t.Helper()
	deadline := time.Now().Add(exitTimeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case <-vm.done:
			t.Fatalf("QEMU exited before %s appeared (%v)\n%s", path, vm.err, vm.tail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %v\n%s", path, exitTimeout, vm.tail())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitMigration polls "info migrate" until the migration completed.
func waitMigration(t *testing.T, vm *qemuVM) {
	t.Helper()
	deadline := time.Now().Add(migrateTimeout)
	for {
		out := vm.monitor(t, "info migrate")
		status := ""
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Migration status:"); ok {
				status = strings.TrimSpace(v)
			}
		}
		switch {
		case status == "completed":
			return
		case status == "failed" || status == "cancelled":
			t.Fatalf("migration %s:\n%s\nsource console tail:\n%s", status, out, vm.tail())
		case time.Now().After(deadline):
			t.Fatalf("migration not completed within %v (status %q):\n%s", migrateTimeout, status, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stateFiles lists the non-empty regular files in a machine's state
// directory, as name:size, and returns a digest of their names and contents.
func stateFiles(t *testing.T, g *guestMachine) ([]string, string) {
	t.Helper()
	dir := filepath.Join(g.dir, "state")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var files []string
	h := sha256.New()
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || info.Size() == 0 || e.Name() == ".lock" {
			continue
		}
		files = append(files, fmt.Sprintf("%s:%d", e.Name(), info.Size()))
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		fmt.Fprintf(h, "%s\x00%d\x00", e.Name(), len(data))
		h.Write(data)
	}
	return files, hex.EncodeToString(h.Sum(nil))
}
