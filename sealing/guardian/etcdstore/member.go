package etcdstore

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Member configures an etcd member embedded in a guardian replica.
type Member struct {
	// Name names the member in InitialCluster.
	Name string
	// Dir holds its data (mode 0700).
	Dir string
	// PeerURLs and ClientURLs are where it listens and what it advertises.
	PeerURLs, ClientURLs []string
	// InitialCluster lists every member as name=peerURL, comma-separated.
	InitialCluster string
	// Existing joins a running cluster rather than forming a new one.
	Existing bool
	// StartTimeout bounds the wait for the cluster's quorum.
	StartTimeout time.Duration
}

// StartMember starts the embedded member and waits until it serves (which
// needs a quorum of the initial cluster to be up).
func StartMember(m Member) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = m.Dir
	cfg.LogLevel = "warn"
	cfg.InitialClusterToken = "vtpmd-guardian"
	cfg.InitialCluster = m.InitialCluster
	cfg.ClusterState = embed.ClusterStateFlagNew
	if m.Existing {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	var err error
	if cfg.ListenPeerUrls, err = parseURLs(m.PeerURLs); err != nil {
		return nil, fmt.Errorf("etcd member %s: peer URLs: %w", m.Name, err)
	}
	if cfg.ListenClientUrls, err = parseURLs(m.ClientURLs); err != nil {
		return nil, fmt.Errorf("etcd member %s: client URLs: %w", m.Name, err)
	}
	cfg.AdvertisePeerUrls, cfg.AdvertiseClientUrls = cfg.ListenPeerUrls, cfg.ListenClientUrls
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
	}
	timeout := m.StartTimeout
	if timeout <= 0 {
		timeout = time.Minute
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-time.After(timeout):
		e.Close()
		return nil, fmt.Errorf("etcd member %s: no quorum of %s within %s", m.Name, m.InitialCluster, timeout)
	}
}

func parseURLs(ss []string) ([]url.URL, error) {
	if len(ss) == 0 {
		return nil, errors.New("none given")
	}
	var out []url.URL
	for _, s := range ss {
		for _, part := range strings.Split(s, ",") {
			u, err := url.Parse(strings.TrimSpace(part))
			if err != nil {
				return nil, err
			}
			out = append(out, *u)
		}
	}
	return out, nil
}
