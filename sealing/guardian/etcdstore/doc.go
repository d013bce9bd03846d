// Package etcdstore keeps a guardian's shared state in etcd, so that every
// replica serves the same hosts, baselines, grants, audit log and nonces:
// an external cluster, or an etcd member embedded in each replica
// (StartMember). Keys live under a prefix; a nonce's single use is one etcd
// transaction, its expiry an etcd lease; audit entries have ordered keys.
// Only cmd/vtpmd-guardian imports this package, so vtpmd itself never links
// etcd.
package etcdstore
