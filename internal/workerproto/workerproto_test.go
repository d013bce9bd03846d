package workerproto

import (
	"bytes"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vtpmd/vtpmd/state"
)

// Messages are a few exemplars of every type, for tests here and seeds in
// fuzz/.
func Messages() []Message {
	rec := &state.Record{VMID: "0123", Generation: 7, Created: time.Unix(1700000000, 0).UTC(), Engine: "e", Sealed: []byte("sealed")}
	return []Message{
		Key{VMID: "0123", KeyID: "host:abcd", Secret: bytes.Repeat([]byte{7}, KeySize)},
		Ready{}, Get{VMID: "0123"}, Record{Record: rec}, NotFound{}, Put{Record: rec},
		Ack{Generation: 7}, Error{Message: "disk full"}, StatsRequest{},
		Stats{Commands: []CommandStats{{Code: 0x17b, Count: 3, Nanos: 90000, Buckets: []uint64{1, 2, 0}}, {Code: 0, Count: 1, Nanos: 5}}, Direct: 3},
		Stats{Guardian: []GuardianCalls{{Op: "release", Result: "ok", Count: 2}, {Op: "nonce", Result: "unreachable", Count: 1}}},
		Guardian{VMID: "0123", Config: []byte(`{"urls":["https://g1:8443"],"ca_file":"/etc/vtpmd/ca.pem"}`)},
		GetProtector{VMID: "0123"}, Protector{Data: []byte(`{"version":1}`)}, PutProtector{VMID: "0123", Data: []byte(`{"version":1}`)},
		KeyStatus{}, KeyStatus{Err: "guardian unreachable"},
	}
}

func TestRoundTrip(t *testing.T) {
	var stream bytes.Buffer
	for _, m := range Messages() {
		b, err := Marshal(m)
		require.NoError(t, err)
		got, err := DecodeMessage(b[4:])
		require.NoError(t, err, "%T", m)
		assert.Equal(t, m, got)
		require.NoError(t, WriteMessage(&stream, m))
	}
	for _, m := range Messages() {
		got, err := ReadMessage(&stream)
		require.NoError(t, err)
		assert.Equal(t, m, got)
	}
	_, err := ReadMessage(&stream)
	assert.ErrorIs(t, err, io.EOF)
}

func TestMalformed(t *testing.T) {
	key, err := Marshal(Messages()[0])
	require.NoError(t, err)
	for _, b := range [][]byte{{}, {0}, {99}, key[4 : len(key)-1], append(append([]byte(nil), key[4:]...), 0), {byte(TypeAck), 1}, {byte(TypePut), 'V'}, {byte(TypeReady), 0},
		{byte(TypeStats), 0, 1, 0, 0, 1, 0x7b, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 65}, {byte(TypeStats), 0, 2}, {byte(TypeStats), 0, 0}, {byte(TypeStats), 0, 0, 0, 1, 0, 2, 'o', 'k'}, {byte(TypeGuardian), 0, 1, 'v'}, {byte(TypePutProtector), 0}} {
		_, err := DecodeMessage(b)
		assert.ErrorIs(t, err, ErrMalformed, "%x", b)
	}
	_, err = ReadMessage(bytes.NewReader([]byte{0, 1, 0, 1}))
	assert.ErrorIs(t, err, ErrMalformed, "over the limit")
	_, err = ReadMessage(bytes.NewReader([]byte{0, 0, 0, 9, 2}))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, err = Marshal(Key{Secret: []byte("short")})
	assert.Error(t, err)
}

func TestKeyNeverPrinted(t *testing.T) {
	k := Key{VMID: "vm", KeyID: "id", Secret: bytes.Repeat([]byte("S"), KeySize)}
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k)} {
		assert.NotContains(t, s, "SSSS")
	}
}
