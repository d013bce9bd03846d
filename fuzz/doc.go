// Package fuzz holds vtpmd's native Go fuzz targets (go test -fuzz), one per
// entry point that takes bytes from outside, plus one stateful target.
//
// The parser targets call the codecs as the server and its clients do and
// check properties rather than fixed answers: nothing panics; what decodes
// re-encodes to the bytes it came from, or to bytes that decode to the same
// value where the wire has bytes swtpm ignores (FuzzDecodeRequest,
// FuzzDecodeReply); the data-channel reader consumes exactly the framing
// and the command its size fields announce and never returns more than the
// engine takes (FuzzReadDataCommand); state blobs and images survive a
// round trip, FuzzStateBlob also against blobs encrypted by an encoder
// written from the spec (FuzzStateBlob, FuzzParseImage, which tries each
// input with its digest recomputed so that mutations reach the fields
// behind it, FuzzParseRecord, FuzzSealedEnvelope); option strings and
// configuration files read back as given (FuzzOptions, FuzzSwtpmKey, whose
// files and descriptors are replaced by ones the target made, and
// FuzzSetupConfig). FuzzServer runs a
// live vtpm.Device behind a transport.Server on in-process socketpairs and
// plays a sequence of control requests and TPM commands decoded from the
// input against it, checking every reply and response, and that an NV
// index written before the sequence still reads back after it. The engine
// is one per process, so the device is opened once and reset to the same
// stored state before each input.
//
// Seeds come from the traffic recorded against swtpm in testdata/capture
// (added with f.Add), from hand-written edge cases in testdata/fuzz (see
// handSeeds in corpus_test.go), and from inputs too large to commit that
// the targets generate. A parser added to the module without a target
// fails TestEveryParserHasATarget. `make fuzz` runs every target in turn;
// plain `go test ./...` runs the seed corpora as regression tests.
package fuzz
