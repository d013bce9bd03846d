package server

import (
	"os"
	"path/filepath"
	"strings"
)

// seedDir is where VTPMD_CAPTURE=1 records the first request body of each
// path these tests send: the fuzz targets' seeds (fuzz/guardian_test.go).
const seedDir = "../../../fuzz/testdata/guardian"

func recordSeed(path string, body []byte) {
	if os.Getenv("VTPMD_CAPTURE") == "" {
		return
	}
	name := filepath.Join(seedDir, strings.ReplaceAll(strings.Trim(path, "/"), "/", "_")+".json")
	if _, err := os.Stat(name); err == nil {
		return
	}
	_ = os.MkdirAll(seedDir, 0o755)
	_ = os.WriteFile(name, body, 0o644) // a missing seed shows in the fuzz test
}
