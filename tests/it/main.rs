//! End-to-end tests of the `shoal` binary: real processes, each with its
//! own data dir, on loopback (and in network namespaces for discovery).
//! Every test is bounded in time and kills what it starts.

mod crash;
mod disk;
mod harness;
mod hostile;
mod load;
mod manifest;
mod netns;
mod store_cli;
mod swarm;
