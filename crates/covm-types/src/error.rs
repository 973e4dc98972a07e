//! The public error: what went wrong from the client's point of view.
//!
//! Every variant carries a stable machine-readable `code` and a sentence a person understands; the HTTP
//! status is chosen from [`ErrorKind`] in one place in the server. Bodies look like
//! `{"error":{"code","message","field"?,"details"?}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The class of an error; it alone decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed or a value is out of range.
    InvalidRequest,
    /// 401: no credentials, or bad ones.
    Unauthenticated,
    /// 403: the caller lacks a privilege on an object it may see.
    Forbidden,
    /// 404: no such object, or one the caller may not view.
    NotFound,
    /// 409: the request conflicts with the state of an object.
    Conflict,
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 412: `If-Match` named a version that is no longer current.
    PreconditionFailed,
    /// 413: the body is larger than the server accepts.
    PayloadTooLarge,
    /// 415: the body is not JSON (or says it is not).
    UnsupportedMediaType,
    /// 423: the object is leased by someone else.
    Locked,
    /// 429: too many requests (or failed sign-ins); retry later.
    RateLimited,
    /// 503: a dependency is not available right now.
    Unavailable,
    /// 507: a file system covm writes to is full.
    StorageFull,
    /// 500: a fault in covm; the message carries a request id to find in the log.
    Internal,
}

/// A covm error as clients see it. Boxed, so that `Result<T, Error>` stays small on the happy path;
/// its fields read through `Deref` (`e.code`, `e.message`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .0.message)]
pub struct Error(Box<ErrorInner>);

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInner {
    pub kind: ErrorKind,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    pub details: Option<serde_json::Value>,
    /// Seconds a client should wait before retrying (429).
    pub retry_after_s: Option<u64>,
    /// The node that runs the VM the request is about, when it is not this one: the request is for
    /// that node's replica (the HTTP layer forwards it there).
    pub other_node: Option<String>,
}

impl std::ops::Deref for Error {
    type Target = ErrorInner;
    fn deref(&self) -> &ErrorInner {
        &self.0
    }
}

impl std::ops::DerefMut for Error {
    fn deref_mut(&mut self) -> &mut ErrorInner {
        &mut self.0
    }
}

impl Error {
    pub fn new(kind: ErrorKind, code: &str, message: impl Into<String>) -> Error {
        Error(Box::new(ErrorInner {
            kind,
            code: code.to_owned(),
            message: message.into(),
            field: None,
            details: None,
            retry_after_s: None,
            other_node: None,
        }))
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Error {
        self.field = Some(field.into());
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Error {
        self.details = Some(details);
        self
    }

    /// 400 with the offending field named.
    pub fn invalid(field: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidRequest, "invalid_value", message).with_field(field)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unauthenticated, "unauthenticated", message)
    }

    /// 403 naming the missing privilege and the object it was needed on.
    pub fn forbidden(privilege: &str, object: &str) -> Error {
        Error::new(ErrorKind::Forbidden, "forbidden", format!("privilege {privilege} is required on {object}"))
            .with_details(serde_json::json!({ "privilege": privilege, "object": object }))
    }

    pub fn not_found(kind: &str, what: &str) -> Error {
        Error::new(ErrorKind::NotFound, "not_found", format!("{kind} {what} not found"))
            .with_details(serde_json::json!({ "kind": kind, "object": what }))
    }

    pub fn conflict(code: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, code, message)
    }

    pub fn rate_limited(retry_after_s: u64, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::RateLimited, "rate_limited", message);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// 409 `vm_on_other_node`: another node runs the VM; it carries the node, typed, for forwarding.
    pub fn on_other_node(node: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Conflict, "vm_on_other_node", message)
            .with_details(serde_json::json!({ "node": node }));
        e.other_node = Some(node.to_owned());
        e
    }

    /// 503 with `Retry-After`: the store cannot be reached.
    pub fn store_unavailable(message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Unavailable, "store_unavailable", message);
        e.retry_after_s = Some(5);
        e
    }

    /// 507: no room left where covm writes.
    pub fn storage_full(what: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::StorageFull, "storage_full", message).with_details(serde_json::json!({ "full": what }))
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, "internal", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
                field: self.field.clone(),
                details: self.details.clone(),
            },
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_value`, `unknown_field`, `forbidden`, `not_found`, …
    pub code: String,
    /// A sentence for a person.
    pub message: String,
    /// The request field at fault, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}
