// Package fuzz holds the native Go fuzz targets (go test -fuzz) of vtpmd's
// parsers and of a live device behind its wire protocol.
package fuzz
