package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/vtpmd/vtpmd/sealing/guardian/etcdstore"
	"github.com/vtpmd/vtpmd/sealing/guardian/server"
)

const initUsage = `Usage: vtpmd-guardian init [options]

Makes a fabric's guardian keys: the encryption key protectors are wrapped
to, the signing key of health certificates, a CA for the replicas' TLS
certificates, and an admin token. The keys are sealed (AES-256-GCM) under
the key-encryption key in --kek-file, created (mode 0600) if absent; every
replica needs a copy of that file, and nothing else of this command's.
Options:
--data-dir <dir>        where the sealed keys (keys.sealed), the CA
                        certificate (ca.crt, for hosts and admin tools) and
                        the admin token (admin.token, mode 0600) go
                        (default ` + defaultDataDir + `)
--kek-file <file>       the key-encryption key (default ` + defaultKEKFile + `)
--fabric <name>         the fabric's name, as protectors name it (default
                        the host name)
--etcd-endpoints <urls> also store the sealed keys in this etcd cluster
                        (comma-separated), where other replicas find them
--etcd-prefix <prefix>  the guardian's keys in etcd (default ` + etcdstore.DefaultPrefix + `)
`

func runInit(args []string, stdout io.Writer) error {
	flags := newFlags("init")
	dataDir := flags.String("data-dir", defaultDataDir, "")
	kekFile := flags.String("kek-file", defaultKEKFile, "")
	hostname, _ := os.Hostname()
	fabric := flags.String("fabric", hostname, "")
	endpoints := flags.String("etcd-endpoints", "", "")
	prefix := flags.String("etcd-prefix", etcdstore.DefaultPrefix, "")
	words, err := parse(flags, args, initUsage, stdout)
	if err != nil {
		return err
	}
	if len(words) > 0 {
		return fmt.Errorf("init: unexpected argument %q", words[0])
	}
	sealedPath := dataPath(*dataDir, sealedKeysFile)
	if _, err := os.Stat(sealedPath); err == nil {
		return fmt.Errorf("init: %s exists: this guardian is initialized already", sealedPath)
	}
	if err := os.MkdirAll(*dataDir, 0o700); err != nil {
		return fmt.Errorf("init: %w", err)
	}
	keys, token, err := server.NewKeys(*fabric)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	kek, err := server.LoadKEK(*kekFile, true)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	sealed, err := server.SealKeys(keys, kek)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	if *endpoints != "" {
		st, err := etcdstore.Dial(splitList(*endpoints), *prefix)
		if err != nil {
			return fmt.Errorf("init: %w", err)
		}
		defer st.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := st.Create(ctx, server.KeysKey, sealed, 0); errors.Is(err, server.ErrExists) {
			return fmt.Errorf("init: etcd %s holds a guardian's keys already (at %s%s): serve with them, or use another --etcd-prefix", *endpoints, *prefix, server.KeysKey)
		} else if err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}
	for _, f := range []struct {
		path string
		data []byte
		mode fs.FileMode
	}{
		{dataPath(*dataDir, tokenFile), []byte(token + "\n"), 0o600},
		{dataPath(*dataDir, caFile), keys.CAPEM(), 0o644},
		{sealedPath, sealed, 0o600}, // last: its presence says init is done
	} {
		if err := writeNew(f.path, f.data, f.mode); err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}
	fmt.Fprintf(stdout, "fabric %q initialized: keys sealed in %s under %s\n", keys.Fabric, sealedPath, *kekFile)
	fmt.Fprintf(stdout, "CA certificate for hosts and admin tools: %s\n", dataPath(*dataDir, caFile))
	fmt.Fprintf(stdout, "admin token: %s\n", dataPath(*dataDir, tokenFile))
	return nil
}

// writeNew writes a file that must not exist yet, synced, with mode.
func writeNew(path string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err = errors.Join(err, f.Sync(), f.Close()); err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
