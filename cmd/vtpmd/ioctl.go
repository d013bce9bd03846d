package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/transport"
)

// exitCode ends the process with a status after the command has printed
// its own messages (as swtpm_ioctl does), without vtpmd's error line.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// ioctlCommand is the one command of a swtpm_ioctl command line.
type ioctlCommand struct {
	name string // the option, e.g. "-c" or "--save"
	arg  string // its argument
	file string // --save/--load: the file
}

// runIoctlTool is `vtpmd ioctl`: swtpm_ioctl's command line and output, for a
// TPM served on a unix or TCP control socket. Messages go to stdout and
// stderr exactly as swtpm_ioctl prints them.
func runIoctlTool(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fail := func(format string, a ...any) error {
		fmt.Fprintf(stderr, format, a...)
		return exitCode(1)
	}
	var unixPath, tcpAddr, device string
	var cmds []ioctlCommand
	add := func(name string) func(string) error {
		return func(v string) error { cmds = append(cmds, ioctlCommand{name: name, arg: v}); return nil }
	}
	var help, showVersion bool
	specs := []flagSpec{
		{long: "unix", takesValue: true, set: setString(&unixPath)},
		{long: "tcp", takesValue: true, set: setString(&tcpAddr)},
		{long: "tpm-device", takesValue: true, set: setString(&device)},
		{short: "c", set: add("-c")},
		{short: "i", set: add("-i")},
		{long: "stop", set: add("--stop")},
		{short: "s", set: add("-s")},
		{short: "e", set: add("-e")},
		{short: "r", takesValue: true, set: add("-r")},
		{short: "v", set: add("-v")},
		{short: "C", set: add("-C")},
		{short: "l", takesValue: true, set: add("-l")},
		{short: "h", takesValue: true, set: add("-h")},
		{short: "g", set: add("-g")},
		{short: "b", takesValue: true, set: add("-b")},
		{long: "info", takesValue: true, set: add("--info")},
		{long: "save", takesValue: true, set: add("--save")},
		{long: "load", takesValue: true, set: add("--load")},
		{long: "version", set: setBool(&showVersion)},
		{long: "help", set: setBool(&help)},
	}
	// --save and --load take two arguments, and like swtpm_ioctl the
	// device path may follow as a positional argument; parseArgs takes
	// neither, so they are set aside first.
	var rest, positional []string
	var files []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--save" || a == "--load":
			rest = append(rest, a)
			if i+1 < len(args) {
				rest = append(rest, args[i+1])
				i++
			}
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				files = append(files, args[i+1])
				i++
			} else {
				return fail("Missing filename argument for %s option\n", a)
			}
		case !strings.HasPrefix(a, "-") && (i == 0 || !ioctlTakesValue(args[i-1])):
			positional = append(positional, a)
		default:
			rest = append(rest, a)
		}
	}
	if err := parseArgs("swtpm_ioctl", rest, specs); err != nil {
		fmt.Fprintln(stderr, err)
		return fail("No valid command.\n")
	}
	for i, j := 0, 0; i < len(cmds); i++ {
		if cmds[i].name == "--save" || cmds[i].name == "--load" {
			cmds[i].file = files[j]
			j++
		}
	}
	switch {
	case help:
		_, err := fmt.Fprint(stdout, ioctlUsage)
		return err
	case showVersion:
		_, err := fmt.Fprintf(stdout, "TPM emulator control tool version %s (vtpmd)\n", version)
		return err
	case len(cmds) == 0:
		return fail("No valid command.\n")
	case len(cmds) > 1:
		return fail("Only one command may be given.\n")
	}
	cmd := cmds[0]
	// Arguments are checked before connecting, as swtpm_ioctl does.
	var number uint64
	switch cmd.name {
	case "-l", "-r":
		n, ok := scanUint(cmd.arg)
		if !ok {
			return fail("Could not get locality number from %s.\n", cmd.arg)
		}
		if n > 4 {
			return fail("Locality outside valid range of [0..4].\n")
		}
		number = n
	case "-b":
		n, ok := scanUint(cmd.arg)
		if !ok {
			return fail("Could not get buffersize from %s.\n", cmd.arg)
		}
		number = n
	case "--info":
		n, err := strconv.ParseUint(cmd.arg, 0, 64)
		if err != nil || strings.Contains(cmd.arg, "_") {
			return fail("Cannot parse info flags.\n")
		}
		number = n
	}
	var conn net.Conn
	var err error
	switch {
	case unixPath != "":
		conn, err = net.Dial("unix", unixPath)
		if err != nil {
			return fail("Connect failed: %s\n", syscallMessage(err))
		}
	case tcpAddr != "":
		host, port, _ := strings.Cut(tcpAddr, ":")
		if host == "" {
			host = "127.0.0.1"
		}
		if port == "" {
			port = "6546"
		}
		conn, err = net.Dial("tcp", net.JoinHostPort(host, port))
		if err != nil {
			return fail("Could not connect to host '%s' on port '%s' using TCP socket: %s\n", host, port, syscallMessage(err))
		}
	case device != "" || len(positional) > 0:
		return fail("vtpmd ioctl: only --unix and --tcp control sockets are supported, not TPM character devices\n")
	default:
		return fail("Error: Missing device name.\n")
	}
	defer conn.Close()
	c := &ctrlClient{conn: conn, r: bufio.NewReader(conn)}
	return c.run(cmd, number, stdin, stdout, stderr)
}

// scanUint reads a number as C's sscanf("%u") does: optional blanks and
// sign, then decimal digits, ignoring what follows; a negative number wraps
// around to 32 bits.
func scanUint(s string) (uint64, bool) {
	s = strings.TrimLeft(s, " \t\n")
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	end := 0
	for end < len(s) && s[end] >= '0' && s[end] <= '9' {
		end++
	}
	if end == 0 {
		return 0, false
	}
	n, err := strconv.ParseUint(s[:end], 10, 32)
	if err != nil {
		n = 1<<32 - 1
	}
	if neg {
		n = uint64(uint32(-int64(n)))
	}
	return n, true
}

// ioctlTakesValue reports whether the option consumes the next argument.
func ioctlTakesValue(opt string) bool {
	switch opt {
	case "--unix", "--tcp", "--tpm-device", "-r", "-l", "-h", "-b", "--info":
		return true
	}
	return false
}

// syscallMessage is the strerror text of an error's errno, as C programs
// print it, or the error itself.
func syscallMessage(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		msg := errno.Error()
		return strings.ToUpper(msg[:1]) + msg[1:]
	}
	return err.Error()
}

// blobType is swtpm's state blob type for a --save/--load name, 0 if none.
func blobType(name string) uint32 {
	switch name {
	case "permanent":
		return 1
	case "volatile":
		return 2
	case "savestate":
		return 3
	}
	return 0
}

// ctrlClient speaks the control channel through transport's typed
// requests and replies.
type ctrlClient struct {
	conn net.Conn
	r    *bufio.Reader
}

// ctrlTimeout bounds each reply.
const ctrlTimeout = 30 * time.Second

// roundTrip sends req and decodes the reply, reading exactly its fixed
// part (and, for GET_INFO and GET_STATEBLOB, the data it announces).
func (c *ctrlClient) roundTrip(req transport.Request) (transport.Reply, error) {
	if err := c.conn.SetDeadline(time.Now().Add(ctrlTimeout)); err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(req.Marshal()); err != nil {
		return nil, err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return nil, err
	}
	failed := binary.BigEndian.Uint32(b) != 0
	if failed && req.Command() != transport.CmdGetStateBlob {
		return transport.DecodeReply(req.Command(), b)
	}
	if failed && !c.moreArrives() {
		// GET_STATEBLOB refused before its handler: the bare result.
		return transport.DecodeReply(req.Command(), b)
	}
	if n := transport.ReplyHeaderSize(req.Command()); n > 4 {
		rest := make([]byte, n-4)
		if _, err := io.ReadFull(c.r, rest); err != nil {
			return nil, err
		}
		b = append(b, rest...)
	}
	var dataLen uint32
	switch req.Command() {
	case transport.CmdGetInfo:
		dataLen = binary.BigEndian.Uint32(b[8:])
	case transport.CmdGetStateBlob:
		dataLen = binary.BigEndian.Uint32(b[12:])
	}
	if dataLen > transport.MaxStateBlob {
		return nil, fmt.Errorf("reply announces %d bytes", dataLen)
	}
	if dataLen > 0 {
		data := make([]byte, dataLen)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return nil, err
		}
		b = append(b, data...)
	}
	return transport.DecodeReply(req.Command(), b)
}

// moreArrives reports whether more reply bytes are buffered or arrive
// shortly: the server writes each reply at once.
func (c *ctrlClient) moreArrives() bool {
	if c.r.Buffered() > 0 {
		return true
	}
	if err := c.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		return false
	}
	_, err := c.r.Peek(1)
	_ = c.conn.SetReadDeadline(time.Now().Add(ctrlTimeout))
	return err == nil
}

// result is the result code of a reply that has one.
func result(r transport.Reply) transport.Result {
	switch r := r.(type) {
	case transport.ResultReply:
		return r.Result
	case transport.GetStateBlobReply:
		return r.Result
	}
	return transport.ResultSuccess
}

// nonFatal marks a result that is not an error (TPM_NON_FATAL): a TPM 2
// has no savestate blob, and GET_STATEBLOB answers so with TPM_RETRY, which
// swtpm_ioctl saves as an empty file.
const nonFatal = 0x800

// ptmNames are swtpm_ioctl's names of the commands, for its messages.
var ptmNames = map[transport.Command]string{
	transport.CmdGetCapability:       "PTM_GET_CAPABILITY",
	transport.CmdInit:                "PTM_INIT",
	transport.CmdShutdown:            "PTM_SHUTDOWN",
	transport.CmdGetTPMEstablished:   "PTM_GET_TPMESTABLISHED",
	transport.CmdSetLocality:         "PTM_SET_LOCALITY",
	transport.CmdHashStart:           "PTM_HASH_START",
	transport.CmdHashData:            "PTM_HASH_DATA",
	transport.CmdHashEnd:             "PTM_HASH_END",
	transport.CmdCancelTPMCmd:        "PTM_CANCEL_TPM_CMD",
	transport.CmdStoreVolatile:       "PTM_STORE_VOLATILE",
	transport.CmdResetTPMEstablished: "PTM_RESET_TPMESTABLISHED",
	transport.CmdGetStateBlob:        "PTM_GET_STATEBLOB",
	transport.CmdSetStateBlob:        "PTM_SET_STATEBLOB",
	transport.CmdStop:                "PTM_STOP",
	transport.CmdGetConfig:           "PTM_GET_CONFIG",
	transport.CmdSetBufferSize:       "PTM_SET_BUFFERSIZE",
	transport.CmdGetInfo:             "PTM_GET_INFO",
}

// hashChunk is how much data one HASH_DATA carries, as with swtpm_ioctl.
const hashChunk = 4096

func (c *ctrlClient) run(cmd ioctlCommand, number uint64, stdin io.Reader, stdout, stderr io.Writer) error {
	// do sends one request and prints swtpm_ioctl's message for a
	// transport failure or a non-zero result.
	do := func(req transport.Request) (transport.Reply, error) {
		reply, err := c.roundTrip(req)
		if err != nil {
			name := ptmNames[req.Command()]
			switch req.Command() {
			case transport.CmdGetTPMEstablished:
				name = "PTM_GET_ESTABLISHED"
			case transport.CmdResetTPMEstablished:
				name = "PTM_RESET_ESTABLISHED"
			}
			fmt.Fprintf(stderr, "Could not execute %s: %s\n", name, syscallMessage(err))
			return nil, exitCode(1)
		}
		if rc := result(reply); rc != transport.ResultSuccess && !(req.Command() == transport.CmdGetStateBlob && rc&nonFatal != 0) {
			fmt.Fprintf(stderr, "TPM result from %s: 0x%x\n", ptmNames[req.Command()], uint32(rc))
			return nil, exitCode(1)
		}
		return reply, nil
	}
	var err error
	switch cmd.name {
	case "-c":
		var r transport.Reply
		if r, err = do(transport.GetCapabilityRequest{}); err == nil {
			fmt.Fprintf(stdout, "ptm capability is 0x%x\n", r.(transport.GetCapabilityReply).Caps)
		}
	case "-i":
		_, err = do(transport.InitRequest{Flags: transport.InitFlagDeleteVolatile})
	case "--stop":
		_, err = do(transport.StopRequest{})
	case "-s":
		_, err = do(transport.ShutdownRequest{})
	case "-e":
		var r transport.Reply
		if r, err = do(transport.GetTPMEstablishedRequest{}); err == nil {
			established := 0
			if r.(transport.GetTPMEstablishedReply).Established {
				established = 1
			}
			fmt.Fprintf(stdout, "tpmEstablished is %d\n", established)
		}
	case "-r":
		_, err = do(transport.ResetTPMEstablishedRequest{Locality: uint8(number)})
	case "-v":
		_, err = do(transport.StoreVolatileRequest{})
	case "-C":
		_, err = do(transport.CancelTPMCmdRequest{})
	case "-l":
		_, err = do(transport.SetLocalityRequest{Locality: uint8(number)})
	case "-g":
		var r transport.Reply
		if r, err = do(transport.GetConfigRequest{}); err == nil {
			fmt.Fprintf(stdout, "ptm configuration flags: 0x%x\n", r.(transport.GetConfigReply).Flags)
		}
	case "-b":
		var r transport.Reply
		if r, err = do(transport.SetBufferSizeRequest{Size: uint32(number)}); err == nil {
			b := r.(transport.SetBufferSizeReply)
			fmt.Fprintf(stdout, "TPM buffersize: %d\nminimum size  : %d\nmaximum size  : %d\n", b.Size, b.Min, b.Max)
		}
	case "--info":
		err = c.info(number, stdout, do)
	case "-h":
		err = c.hash(cmd.arg, stdin, stderr, do)
	case "--save", "--load":
		typ := blobType(cmd.arg)
		switch {
		case typ == 0:
			// swtpm_ioctl prints this one without a newline.
			fmt.Fprintf(stderr, "Unknown TPM state type '%s'", cmd.arg)
			err = exitCode(1)
		case cmd.name == "--save":
			err = c.save(typ, cmd.file, stderr, do)
		default:
			err = c.load(typ, cmd.file, stderr, do)
		}
	}
	return err
}

type doFunc func(transport.Request) (transport.Reply, error)

// info prints the GET_INFO JSON, reading it in as many parts as it comes.
func (c *ctrlClient) info(flags uint64, stdout io.Writer, do doFunc) error {
	var data []byte
	for {
		r, err := do(transport.GetInfoRequest{Flags: flags, Offset: uint32(len(data))})
		if err != nil {
			return err
		}
		info := r.(transport.GetInfoReply)
		data = append(data, info.Data...)
		if len(info.Data) == 0 || uint32(len(data)) >= info.Total {
			break
		}
	}
	// The string is sent with its NUL.
	if i := strings.IndexByte(string(data), 0); i >= 0 {
		data = data[:i]
	}
	_, err := fmt.Fprintf(stdout, "%s\n", data)
	return err
}

func (c *ctrlClient) hash(arg string, stdin io.Reader, stderr io.Writer, do doFunc) error {
	if _, err := do(transport.HashStartRequest{}); err != nil {
		return err
	}
	send := func(chunk []byte) error {
		_, err := do(transport.HashDataRequest{Length: uint32(len(chunk)), Data: chunk})
		return err
	}
	if arg == "-" {
		buf := make([]byte, hashChunk)
		for {
			n, err := io.ReadFull(stdin, buf)
			if n > 0 {
				if err := send(buf[:n]); err != nil {
					return err
				}
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			if err != nil {
				fmt.Fprintf(stderr, "Error reading from stdin: %v\n", err)
				return exitCode(1)
			}
		}
	} else {
		for data := []byte(arg); len(data) > 0; {
			n := min(len(data), hashChunk)
			if err := send(data[:n]); err != nil {
				return err
			}
			data = data[n:]
		}
	}
	_, err := do(transport.HashEndRequest{})
	return err
}

// stateFlagDecrypted asks for the blob decrypted (swtpm's
// PTM_STATE_FLAG_DECRYPTED), as swtpm_ioctl does.
const stateFlagDecrypted = 1

func (c *ctrlClient) save(typ uint32, path string, stderr io.Writer, do doFunc) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		fmt.Fprintf(stderr, "Could not open file '%s' for writing: %s\n", path, syscallMessage(err))
		return exitCode(1)
	}
	defer f.Close()
	var offset uint32
	for {
		r, err := do(transport.GetStateBlobRequest{Flags: stateFlagDecrypted, Type: typ, Offset: offset})
		if err != nil {
			return err
		}
		blob := r.(transport.GetStateBlobReply)
		if _, err := f.Write(blob.Data); err != nil {
			fmt.Fprintf(stderr, "Could not write to file '%s': %s\n", path, syscallMessage(err))
			return exitCode(1)
		}
		offset += uint32(len(blob.Data))
		if len(blob.Data) == 0 || offset >= blob.Total {
			break
		}
	}
	if err := f.Close(); err != nil {
		fmt.Fprintf(stderr, "Could not write to file '%s': %s\n", path, syscallMessage(err))
		return exitCode(1)
	}
	return nil
}

func (c *ctrlClient) load(typ uint32, path string, stderr io.Writer, do doFunc) error {
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "Could not open file '%s' for reading: %s\n", path, syscallMessage(err))
		return exitCode(1)
	}
	if len(data) > transport.MaxStateBlob {
		fmt.Fprintf(stderr, "File '%s' is too large for a state blob\n", path)
		return exitCode(1)
	}
	_, err = do(transport.SetStateBlobRequest{Type: typ, Length: uint32(len(data)), Data: data})
	return err
}

const ioctlUsage = `Usage: vtpmd ioctl --unix <path> | --tcp [<host>]:[<port>] <command>

Sends one control command to a TPM served by vtpmd (or swtpm), with
swtpm_ioctl's options and output:
-c                    : get ptm capabilities
-i                    : do a hardware TPM_Init (volatile state resumes and is deleted)
--stop                : stop the TPM without exiting
-s                    : shutdown the TPM; stops and exits
-e                    : get the tpmEstablished bit
-r <loc>              : reset the tpmEstablished bit from the given locality
-v                    : store the TPM's volatile data
-C                    : cancel an ongoing TPM command
-l <loc>              : set the locality (0-4)
-h <data>             : hash the data ('-' reads stdin)
--save <type> <file>  : store the state blob of the type (volatile, permanent, savestate)
--load <type> <file>  : load the state blob of the type from the file
-g                    : get the configuration flags (which keys are in use)
-b <buffersize>       : set (0: get) the buffer size; also the minimum and maximum
--info <flags>        : get the TPM's JSON description
--version, --help

Installed as 'swtpm_ioctl', vtpmd takes this command line.
`
