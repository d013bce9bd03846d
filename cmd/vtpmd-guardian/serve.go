package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/sealing"
	"github.com/vtpmd/vtpmd/sealing/guardian"
	"github.com/vtpmd/vtpmd/sealing/guardian/etcdstore"
	"github.com/vtpmd/vtpmd/sealing/guardian/server"
)

const serveUsage = `Usage: vtpmd-guardian serve [options]

Serves the guardian over HTTPS, with a TLS certificate from the guardian
CA made at each start. Without etcd options the state (hosts, baselines,
grants, audit log, nonces) is a local store in the data directory; with
them, every replica on the same etcd serves the same state.
Options:
--listen <host:port>      where to serve (default :8443)
--data-dir <dir>          the data directory of init (default ` + defaultDataDir + `)
--kek-file <file>         the key-encryption key (default ` + defaultKEKFile + `)
--name <name>             this replica's name in the audit log (default the
                          host name)
--tls-names <names>       more DNS names or IP addresses for the TLS
                          certificate (comma-separated; the listen address,
                          the host name, localhost and the loopback
                          addresses are always in it)
--cert-lifetime <d>       how long health certificates last (default 8h)
--nonce-ttl <d>           how long a nonce can be used (default 2m)
--log-level <level>       debug, info, warn or error (default info)
External etcd:
--etcd-endpoints <urls>   the cluster's client URLs (comma-separated)
--etcd-prefix <prefix>    the guardian's keys (default ` + etcdstore.DefaultPrefix + `)
Embedded etcd (a member in this process):
--etcd-embed              run an etcd member here, in <data dir>/etcd
--etcd-name <name>        the member's name (default --name)
--etcd-peer-urls <urls>   where it talks to the other members
--etcd-client-urls <urls> where it serves clients (this replica among them)
--etcd-initial-cluster <name=peer-url,...>
                          every member of the cluster
--etcd-join               join a running cluster (a replaced member)
`

func runServe(args []string, stdout io.Writer) error {
	flags := newFlags("serve")
	listen := flags.String("listen", ":8443", "")
	dataDir := flags.String("data-dir", defaultDataDir, "")
	kekFile := flags.String("kek-file", defaultKEKFile, "")
	hostname, _ := os.Hostname()
	name := flags.String("name", hostname, "")
	tlsNames := flags.String("tls-names", "", "")
	certLifetime := flags.Duration("cert-lifetime", guardian.DefaultCertificateLifetime, "")
	nonceTTL := flags.Duration("nonce-ttl", server.DefaultNonceTTL, "")
	logLevel := flags.String("log-level", "info", "")
	endpoints := flags.String("etcd-endpoints", "", "")
	prefix := flags.String("etcd-prefix", etcdstore.DefaultPrefix, "")
	embed := flags.Bool("etcd-embed", false, "")
	member := etcdstore.Member{}
	flags.StringVar(&member.Name, "etcd-name", "", "")
	peerURLs := flags.String("etcd-peer-urls", "", "")
	clientURLs := flags.String("etcd-client-urls", "", "")
	flags.StringVar(&member.InitialCluster, "etcd-initial-cluster", "", "")
	flags.BoolVar(&member.Existing, "etcd-join", false, "")
	words, err := parse(flags, args, serveUsage, stdout)
	if err != nil {
		return err
	}
	if len(words) > 0 {
		return fmt.Errorf("serve: unexpected argument %q", words[0])
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("serve: --log-level %q: use debug, info, warn or error", *logLevel)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *embed && *endpoints != "" {
		return errors.New("serve: give --etcd-embed or --etcd-endpoints, not both")
	}
	kek, err := server.LoadKEK(*kekFile, false)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var store server.Store
	switch {
	case *embed:
		member.Dir = dataPath(*dataDir, etcdDir)
		member.PeerURLs, member.ClientURLs = splitList(*peerURLs), splitList(*clientURLs)
		if member.Name == "" {
			member.Name = *name
		}
		if member.InitialCluster == "" {
			member.InitialCluster = member.Name + "=" + *peerURLs
		}
		log.Info("starting the embedded etcd member; it serves once a quorum of the cluster is up", "member", member.Name, "cluster", member.InitialCluster)
		if err := os.MkdirAll(*dataDir, 0o700); err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		e, err := etcdstore.StartMember(member)
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		defer e.Close()
		*endpoints = *clientURLs
		fallthrough
	case *endpoints != "":
		st, err := etcdstore.Dial(splitList(*endpoints), *prefix)
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		store = st
	default:
		st, err := server.OpenLocalStore(dataPath(*dataDir, storeDir), log)
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		store = st
	}
	defer store.Close()

	keys, err := loadKeys(ctx, store, *dataDir, kek, *endpoints != "", log)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if err := writeNew(dataPath(*dataDir, caFile), keys.CAPEM(), 0o644); err != nil && !errors.Is(err, fs.ErrExist) {
		log.Warn("could not write the CA certificate", "err", err)
	}
	srv, err := server.New(server.Config{Name: *name, Keys: keys, Store: store, CertLifetime: *certLifetime, NonceTTL: *nonceTTL, Log: log})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	names := append([]string{"localhost", "127.0.0.1", "::1", hostname}, splitList(*tlsNames)...)
	if host, _, err := net.SplitHostPort(*listen); err == nil && host != "" {
		names = append(names, host)
	}
	cert, err := keys.ServerCertificate(names, 365*24*time.Hour)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	hs := &http.Server{
		Handler:           srv,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = hs.Shutdown(shutdown) // the process ends next
	}()
	log.Info("guardian serving", "listen", ln.Addr().String(), "replica", *name, "fabric", keys.Fabric, "tls_names", names)
	if err := hs.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// loadKeys opens the sealed key bundle from the store; a store without one
// gets the data directory's (from init), and a replica on etcd with neither
// waits for the replica where init ran.
func loadKeys(ctx context.Context, st server.Store, dataDir string, kek *sealing.Key, shared bool, log *slog.Logger) (*server.Keys, error) {
	for {
		sealed, err := st.Get(ctx, server.KeysKey)
		if errors.Is(err, server.ErrNotFound) {
			sealed, err = os.ReadFile(dataPath(dataDir, sealedKeysFile))
			if err == nil {
				err = st.Create(ctx, server.KeysKey, sealed, 0)
				if errors.Is(err, server.ErrExists) {
					continue // another replica stored its own meanwhile: use that
				}
			} else if errors.Is(err, fs.ErrNotExist) && shared {
				log.Warn("no guardian keys in etcd yet: waiting for the replica where 'vtpmd-guardian init' ran")
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-time.After(2 * time.Second):
					continue
				}
			} else if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("no guardian keys in %s: run 'vtpmd-guardian init' first", dataDir)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("read the guardian keys: %w", err)
		}
		return server.OpenKeys(sealed, kek)
	}
}
