//! The integration tests again, on PostgreSQL: the same modules, each server on a database of its own
//! on a real PostgreSQL server that the tests start (`covm_store::testing`; Debian's `postgresql`).
//! The QEMU tests run once, in the SQLite target.

#[path = "api/main.rs"]
mod api;

// The modules refer to each other as `crate::common`, `crate::qemu`, … as in the SQLite target.
#[allow(unused_imports)]
use api::*;
