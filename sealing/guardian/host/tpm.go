package host

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/vtpmd/vtpmd/sealing/guardian"
)

// DefaultPCRs are the SHA-256 PCRs quoted unless configured otherwise: the
// firmware, boot loader and Secure Boot measurements.
var DefaultPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// TPM proves a host's health with its TPM: a quote by an attestation key
// over the SHA-256 PCRs, with the measured-boot event log that explains
// them.
type TPM struct {
	// Open opens the TPM for one attestation; see OpenTPM.
	Open func() (io.ReadWriteCloser, error)
	// EventLog is the path of the TCG event log, such as
	// /sys/kernel/security/tpm0/binary_bios_measurements.
	EventLog string
	// PCRs are the quoted PCRs (DefaultPCRs when empty).
	PCRs []int
}

// OpenTPM returns how to open the TPM that spec names: a device path such as
// /dev/tpmrm0, or unix:PATH, the data socket of a vtpmd or swtpm instance.
func OpenTPM(spec string) func() (io.ReadWriteCloser, error) {
	if path, ok := strings.CutPrefix(spec, "unix:"); ok {
		return func() (io.ReadWriteCloser, error) {
			c, err := net.Dial("unix", path)
			if err != nil {
				return nil, fmt.Errorf("open host TPM %s: %w", spec, err)
			}
			return &streamTPM{Conn: c}, nil
		}
	}
	return func() (io.ReadWriteCloser, error) {
		f, err := os.OpenFile(spec, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open host TPM: %w", err)
		}
		return f, nil
	}
}

// streamTPM frames a TPM on a stream socket: go-tpm reads each response
// with one Read, which a socket may split.
type streamTPM struct{ net.Conn }

func (s *streamTPM) Read(p []byte) (int, error) {
	const header = 10
	if len(p) < header {
		return 0, io.ErrShortBuffer
	}
	if _, err := io.ReadFull(s.Conn, p[:header]); err != nil {
		return 0, fmt.Errorf("read TPM response: %w", err)
	}
	size := int(binary.BigEndian.Uint32(p[2:6]))
	if size < header || size > len(p) {
		return 0, fmt.Errorf("read TPM response: size %d out of %d..%d", size, header, len(p))
	}
	if _, err := io.ReadFull(s.Conn, p[header:size]); err != nil {
		return 0, fmt.Errorf("read TPM response: %w", err)
	}
	return size, nil
}

func (t *TPM) pcrs() []int {
	if len(t.PCRs) == 0 {
		return DefaultPCRs
	}
	return t.PCRs
}

// withTPM runs f on the opened TPM.
func (t *TPM) withTPM(what string, f func(rw io.ReadWriter) error) error {
	rw, err := t.Open()
	if err != nil {
		return err
	}
	err = f(rw)
	if cerr := rw.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close host TPM: %w", cerr)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// attestationKey is the host's AK: a primary key from go-tpm-tools' ECC AK
// template in the endorsement hierarchy, so the same key at every start
// without using the TPM's NV space.
func attestationKey(rw io.ReadWriter) (*client.Key, error) {
	k, err := client.NewKey(rw, tpm2.HandleEndorsement, client.AKTemplateECC())
	if err != nil {
		return nil, fmt.Errorf("create attestation key: %w", err)
	}
	return k, nil
}

// Identity reads the EK and AK public areas.
func (t *TPM) Identity() (*guardian.HostIdentity, error) {
	id := &guardian.HostIdentity{Mode: guardian.ModeTPM}
	err := t.withTPM("host TPM identity", func(rw io.ReadWriter) error {
		ek, err := client.NewKey(rw, tpm2.HandleEndorsement, client.DefaultEKTemplateECC())
		if err != nil {
			return fmt.Errorf("create endorsement key: %w", err)
		}
		id.EKPublic, err = ek.PublicArea().Encode()
		ek.Close()
		if err != nil {
			return fmt.Errorf("encode endorsement key: %w", err)
		}
		ak, err := attestationKey(rw)
		if err != nil {
			return err
		}
		defer ak.Close()
		if id.AKPublic, err = ak.PublicArea().Encode(); err != nil {
			return fmt.Errorf("encode attestation key: %w", err)
		}
		return nil
	})
	return id, err
}

// Evidence quotes the PCRs with AttestationDigest(nonce, transportKey) as
// the qualifying data, and reads the event log.
func (t *TPM) Evidence(nonce, transportKey []byte) (*guardian.AttestRequest, error) {
	eventLog, err := readEventLog(t.EventLog)
	if err != nil {
		return nil, err
	}
	ev := &guardian.TPMEvidence{EventLog: eventLog, PCRs: map[int][]byte{}}
	err = t.withTPM("quote the host TPM", func(rw io.ReadWriter) error {
		ak, err := attestationKey(rw)
		if err != nil {
			return err
		}
		defer ak.Close()
		sel := tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: t.pcrs()}
		q, err := ak.Quote(sel, guardian.AttestationDigest(nonce, transportKey))
		if err != nil {
			return err
		}
		ev.Quote, ev.Signature = q.GetQuote(), q.GetRawSig()
		for i, v := range q.GetPcrs().GetPcrs() {
			ev.PCRs[int(i)] = v
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &guardian.AttestRequest{Nonce: nonce, TransportKey: transportKey, TPM: ev}, nil
}

// readEventLog reads the event log, which must fit in a request.
func readEventLog(path string) ([]byte, error) {
	if path == "" {
		return nil, errors.New("read event log: no event log configured (event_log)")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read event log: %w", err)
	}
	defer f.Close()
	limit := int64(guardian.MaxRequestSize / 2)
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("read event log %s: %w", path, err)
	case int64(len(b)) > limit:
		return nil, fmt.Errorf("read event log %s: larger than %d bytes", path, limit)
	case len(b) == 0:
		return nil, fmt.Errorf("read event log %s: empty", path)
	}
	return b, nil
}
