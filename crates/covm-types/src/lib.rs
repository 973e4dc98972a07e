//! Types shared by every covm crate: typed names, the public [`Error`], privileges and built-in roles,
//! event kinds, and the request and response shapes of the HTTP API.
//!
//! Nothing here does I/O. The server maps [`Error`] to HTTP statuses in exactly one place
//! (`covm-server`'s `http::error`), the client maps statuses back to [`Error`].

pub mod api;
pub mod conditions;
pub mod disk;
pub mod error;
pub mod name;
pub mod privilege;
pub mod snapshot;
pub mod vm;

pub use error::{Error, ErrorBody, ErrorCode, ErrorKind};
pub use name::Name;
pub use privilege::{BuiltinRole, Privilege};

/// The id of the root folder `/`. Fixed so that every store and every replica agree on it.
pub const ROOT_ID: uuid::Uuid = uuid::Uuid::nil();
