package fuzz

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/transport"
)

// captureDir holds traffic recorded against swtpm by cmd/vtpmd's tests
// (VTPMD_CAPTURE=1): one line per read, "<channel><dir> <hex>", where
// channel is ctrl or data and dir is > (client to server) or < (server to
// client).
const captureDir = "testdata/capture"

// message is one recorded read.
type message struct {
	ctrl     bool // control channel, else data channel
	toServer bool
	data     []byte
}

// capture is one capture file, in order.
type capture struct {
	name     string
	messages []message
}

// loadCaptures reads every capture file, sorted by name.
func loadCaptures(tb testing.TB) []capture {
	tb.Helper()
	paths, err := filepath.Glob(filepath.Join(captureDir, "*.txt"))
	if err != nil {
		tb.Fatal(err)
	}
	if len(paths) == 0 {
		tb.Fatalf("no capture files in %s", captureDir)
	}
	sort.Strings(paths)
	var caps []capture
	for _, p := range paths {
		c, err := parseCapture(p)
		if err != nil {
			tb.Fatal(err)
		}
		caps = append(caps, c)
	}
	return caps
}

func parseCapture(path string) (capture, error) {
	f, err := os.Open(path)
	if err != nil {
		return capture{}, err
	}
	defer f.Close()
	c := capture{name: filepath.Base(path)}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		head, hexData, ok := strings.Cut(text, " ")
		if !ok || len(head) != 5 {
			return c, fmt.Errorf("%s:%d: not \"<channel><dir> <hex>\"", path, line)
		}
		var m message
		switch head[:4] {
		case "ctrl":
			m.ctrl = true
		case "data":
		default:
			return c, fmt.Errorf("%s:%d: unknown channel %q", path, line, head[:4])
		}
		switch head[4] {
		case '>':
			m.toServer = true
		case '<':
		default:
			return c, fmt.Errorf("%s:%d: unknown direction %q", path, line, head[4:])
		}
		if m.data, err = hex.DecodeString(hexData); err != nil {
			return c, fmt.Errorf("%s:%d: %v", path, line, err)
		}
		c.messages = append(c.messages, m)
	}
	return c, sc.Err()
}

// ctrlExchange is a control request and the reply recorded after it.
type ctrlExchange struct {
	request []byte
	command transport.Command
	reply   []byte // nil if none was recorded
}

// ctrlExchanges pairs each recorded control request with the replies that
// followed it (consecutive reads are joined).
func ctrlExchanges(caps []capture) []ctrlExchange {
	var out []ctrlExchange
	for _, c := range caps {
		cur := -1
		for _, m := range c.messages {
			switch {
			case !m.ctrl:
			case m.toServer:
				x := ctrlExchange{request: m.data}
				if len(m.data) >= 4 {
					x.command = transport.Command(binary.BigEndian.Uint32(m.data))
				}
				out = append(out, x)
				cur = len(out) - 1
			case cur >= 0:
				out[cur].reply = append(out[cur].reply, m.data...)
			}
		}
	}
	return out
}

// dataCommands returns every recorded data-channel write to the server.
func dataCommands(caps []capture) [][]byte {
	var out [][]byte
	for _, c := range caps {
		for _, m := range c.messages {
			if !m.ctrl && m.toServer {
				out = append(out, m.data)
			}
		}
	}
	return out
}

// TestCaptures checks that the capture files parse and hold both channels,
// so that the seeds taken from them do not silently vanish.
func TestCaptures(t *testing.T) {
	caps := loadCaptures(t)
	if n := len(ctrlExchanges(caps)); n < 100 {
		t.Errorf("%d control exchanges in the captures, want at least 100", n)
	}
	if n := len(dataCommands(caps)); n < 100 {
		t.Errorf("%d data commands in the captures, want at least 100", n)
	}
	for _, x := range ctrlExchanges(caps) {
		if x.reply == nil && x.command != transport.CmdShutdown {
			t.Logf("no reply recorded to %x", x.request[:min(len(x.request), 16)])
		}
	}
}
