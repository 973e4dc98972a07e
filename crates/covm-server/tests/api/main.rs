//! Integration tests of the covm server over real HTTP on loopback, on a real SQLite file.

pub mod abuse;
pub mod authz_matrix;
pub mod common;
pub mod conditions;
pub mod disks;
pub mod encryption;
pub mod faults;
pub mod feed;
pub mod foundation;
pub mod guest_snapshots;
pub mod hygiene;
pub mod mfa;
pub mod openapi;
pub mod power;
pub mod qemu;
pub mod ratelimits;
pub mod references;
pub mod replicas;
pub mod sagas;
pub mod snapshots;
pub mod stats;
pub mod streams;
pub mod tls;
pub mod upgrade;
pub mod vms;
