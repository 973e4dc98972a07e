//! Integration tests of the covm server over real HTTP on loopback, on a real SQLite file.

mod authz_matrix;
mod common;
mod disks;
mod feed;
mod foundation;
mod openapi;
mod power;
mod qemu;
mod sagas;
mod vms;
