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
    pub code: ErrorCode,
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
    pub fn new(kind: ErrorKind, code: ErrorCode, message: impl Into<String>) -> Error {
        Error(Box::new(ErrorInner {
            kind,
            code,
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
        Error::new(ErrorKind::InvalidRequest, ErrorCode::InvalidValue, message).with_field(field)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unauthenticated, ErrorCode::Unauthenticated, message)
    }

    /// 403 naming the missing privilege and the object it was needed on.
    pub fn forbidden(privilege: &str, object: &str) -> Error {
        Error::new(ErrorKind::Forbidden, ErrorCode::Forbidden, format!("privilege {privilege} is required on {object}"))
            .with_details(serde_json::json!({ "privilege": privilege, "object": object }))
    }

    pub fn not_found(kind: &str, what: &str) -> Error {
        Error::new(ErrorKind::NotFound, ErrorCode::NotFound, format!("{kind} {what} not found"))
            .with_details(serde_json::json!({ "kind": kind, "object": what }))
    }

    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, code, message)
    }

    pub fn rate_limited(retry_after_s: u64, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::RateLimited, ErrorCode::RateLimited, message);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// 409 `vm_on_other_node`: another node runs the VM; it carries the node, typed, for forwarding.
    pub fn on_other_node(node: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Conflict, ErrorCode::VmOnOtherNode, message)
            .with_details(serde_json::json!({ "node": node }));
        e.other_node = Some(node.to_owned());
        e
    }

    /// 503 with `Retry-After`: the store cannot be reached.
    pub fn store_unavailable(message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorKind::Unavailable, ErrorCode::StoreUnavailable, message);
        e.retry_after_s = Some(5);
        e
    }

    /// 507: no room left where covm writes.
    pub fn storage_full(what: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::StorageFull, ErrorCode::StorageFull, message)
            .with_details(serde_json::json!({ "full": what }))
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, ErrorCode::Internal, message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
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
    pub code: ErrorCode,
    /// A sentence for a person.
    pub message: String,
    /// The request field at fault, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Every error code covm answers with: stable and machine-readable, serialized as snake_case strings.
/// A code this build does not know (from a newer server) reads as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The file is already a managed disk.
    AlreadyADisk,
    /// The disk is already attached to this VM.
    AlreadyAttached,
    /// An object of that kind and name exists.
    AlreadyExists,
    /// The object changed too often while the request was checked; try again.
    Busy,
    /// The config changed while the request was handled; send it again.
    ConfigChanged,
    /// The request conflicts with the object's state.
    Conflict,
    /// The VM has no console to connect to now.
    ConsoleUnavailable,
    /// A part of an upload does not start where the upload stands (`details.received` says where).
    UploadOffset,
    /// The guest runs no guest agent (qemu-guest-agent), or it does not answer.
    AgentUnavailable,
    /// Linked clones use this template's disks (`details.clones` names them).
    TemplateInUse,
    /// A linked clone is made from a template; this VM is not one.
    NotATemplate,
    /// The VM is a template: read-only and never powered on; clone it.
    VmIsTemplate,
    /// An uploaded file's SHA-256 is not the one the upload named.
    ChecksumMismatch,
    /// The controller has no free slot.
    ControllerFull,
    /// A request signed in by the session cookie that changes something lacks the `X-Covm-Csrf`
    /// header, or comes from another site.
    CsrfFailed,
    /// The controller type cannot take this device.
    ControllerUnsupported,
    /// The database cannot be reached.
    DatabaseUnavailable,
    /// The datastore named does not exist or is not usable.
    DatastoreMissing,
    /// The guest did not release the device in time.
    DetachTimeout,
    /// The disk is attached for writing elsewhere.
    DiskInUse,
    /// The disk's image file is gone.
    DiskMissing,
    /// The disk is shared and cannot be changed this way.
    DiskShared,
    /// A file the config names does not exist.
    FileMissing,
    /// The folder still holds objects.
    FolderNotEmpty,
    /// The caller lacks a privilege on an object it may see.
    Forbidden,
    /// The bus cannot add or remove this device on a running VM.
    HotplugUnsupported,
    /// The hypervisor refused or failed an operation.
    HypervisorError,
    /// The hypervisor cannot be reached.
    HypervisorUnavailable,
    /// The object is in use.
    InUse,
    /// The datastore has too little free space.
    InsufficientSpace,
    /// A fault in covm; the message carries a request id.
    Internal,
    /// A capacity is out of range.
    InvalidCapacity,
    /// The body is not valid JSON.
    InvalidJson,
    /// A name breaks the naming rules.
    InvalidName,
    /// The patch cannot be applied.
    InvalidPatch,
    /// A query parameter has a bad value.
    InvalidQuery,
    /// The request is malformed.
    InvalidRequest,
    /// A field has a bad value.
    InvalidValue,
    /// The caller's lease token is no longer current.
    LeaseExpired,
    /// Someone else holds the object's edit lease.
    Leased,
    /// The path is a managed disk's image.
    ManagedDiskFile,
    /// The request needs a JSON body.
    MissingBody,
    /// A required field is missing.
    MissingField,
    /// The user is disabled (its identity provider said so).
    UserDisabled,
    /// The identity provider of single sign-on cannot be reached or answered something covm cannot use.
    SsoUnavailable,
    /// An encrypted disk's key cannot be unwrapped with the master keys this server has.
    KeyUnavailable,
    /// Two-factor sign-in is on for the user: send `totp` or `recovery_code` too (401).
    MfaRequired,
    /// The one-time code or recovery code is wrong, used already, or out of its window.
    MfaInvalid,
    /// The session may only enroll in two-factor sign-in (a policy requires it) (403).
    MfaEnrollmentRequired,
    /// Two-factor sign-in is already on (turn it off first), or not begun (enroll first).
    MfaState,
    /// The path does not take this method.
    MethodNotAllowed,
    /// There is no such API path.
    NoRoute,
    /// No such object, or one the caller may not view.
    NotFound,
    /// Another operation holds the object.
    OperationInProgress,
    /// The path is not inside a datastore.
    PathOutsideDatastore,
    /// The body is larger than the server accepts.
    PayloadTooLarge,
    /// The resource pool's quota would be exceeded.
    QuotaExceeded,
    /// Too many requests; retry later.
    RateLimited,
    /// The request did not arrive in time.
    RequestTimeout,
    /// The change takes effect only at the next boot.
    RequiresPowerCycle,
    /// The root folder cannot be changed this way.
    RootFolder,
    /// A user cannot delete themself.
    SelfDelete,
    /// A disk cannot shrink.
    ShrinkRefused,
    /// The guest did not shut down in time.
    ShutdownTimeout,
    /// A disk cannot hold snapshots (raw) and was not excluded, or memory snapshots were asked for.
    SnapshotUnsupported,
    /// The server is shutting down.
    ShuttingDown,
    /// The attachment's generation is no longer current.
    StaleGeneration,
    /// A file system covm writes to is full.
    StorageFull,
    /// The store cannot be reached now.
    StoreUnavailable,
    /// The task ended in error.
    TaskFailed,
    /// No credentials, or bad ones.
    Unauthenticated,
    /// The unit number is out of the controller's range.
    UnitOutOfRange,
    /// The unit number is in use.
    UnitTaken,
    /// No such controller type.
    UnknownController,
    /// The body names a field that does not exist.
    UnknownField,
    /// The query names a parameter that does not exist.
    UnknownQueryParameter,
    /// The body is not JSON.
    UnsupportedMediaType,
    /// The path needs a WebSocket upgrade.
    UpgradeRequired,
    /// If-Match named a version that is no longer current.
    VersionMismatch,
    /// The VM is not running.
    VmNotRunning,
    /// Another node runs the VM.
    VmOnOtherNode,
    /// The VM is running; power it off first.
    VmRunning,
    /// The password is too weak.
    WeakPassword,
    /// A code this client does not know, or a response that was not covm's error body.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, in the order of the schema.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::AlreadyADisk,
        ErrorCode::AlreadyAttached,
        ErrorCode::AlreadyExists,
        ErrorCode::Busy,
        ErrorCode::ConfigChanged,
        ErrorCode::Conflict,
        ErrorCode::ConsoleUnavailable,
        ErrorCode::UploadOffset,
        ErrorCode::AgentUnavailable,
        ErrorCode::TemplateInUse,
        ErrorCode::NotATemplate,
        ErrorCode::VmIsTemplate,
        ErrorCode::ChecksumMismatch,
        ErrorCode::ControllerFull,
        ErrorCode::CsrfFailed,
        ErrorCode::ControllerUnsupported,
        ErrorCode::DatabaseUnavailable,
        ErrorCode::DatastoreMissing,
        ErrorCode::DetachTimeout,
        ErrorCode::DiskInUse,
        ErrorCode::DiskMissing,
        ErrorCode::DiskShared,
        ErrorCode::FileMissing,
        ErrorCode::FolderNotEmpty,
        ErrorCode::Forbidden,
        ErrorCode::HotplugUnsupported,
        ErrorCode::HypervisorError,
        ErrorCode::HypervisorUnavailable,
        ErrorCode::InUse,
        ErrorCode::InsufficientSpace,
        ErrorCode::Internal,
        ErrorCode::InvalidCapacity,
        ErrorCode::InvalidJson,
        ErrorCode::InvalidName,
        ErrorCode::InvalidPatch,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidValue,
        ErrorCode::LeaseExpired,
        ErrorCode::Leased,
        ErrorCode::ManagedDiskFile,
        ErrorCode::MissingBody,
        ErrorCode::MissingField,
        ErrorCode::UserDisabled,
        ErrorCode::SsoUnavailable,
        ErrorCode::KeyUnavailable,
        ErrorCode::MfaRequired,
        ErrorCode::MfaInvalid,
        ErrorCode::MfaEnrollmentRequired,
        ErrorCode::MfaState,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NoRoute,
        ErrorCode::NotFound,
        ErrorCode::OperationInProgress,
        ErrorCode::PathOutsideDatastore,
        ErrorCode::PayloadTooLarge,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::RequestTimeout,
        ErrorCode::RequiresPowerCycle,
        ErrorCode::RootFolder,
        ErrorCode::SelfDelete,
        ErrorCode::ShrinkRefused,
        ErrorCode::ShutdownTimeout,
        ErrorCode::SnapshotUnsupported,
        ErrorCode::ShuttingDown,
        ErrorCode::StaleGeneration,
        ErrorCode::StorageFull,
        ErrorCode::StoreUnavailable,
        ErrorCode::TaskFailed,
        ErrorCode::Unauthenticated,
        ErrorCode::UnitOutOfRange,
        ErrorCode::UnitTaken,
        ErrorCode::UnknownController,
        ErrorCode::UnknownField,
        ErrorCode::UnknownQueryParameter,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::UpgradeRequired,
        ErrorCode::VersionMismatch,
        ErrorCode::VmNotRunning,
        ErrorCode::VmOnOtherNode,
        ErrorCode::VmRunning,
        ErrorCode::WeakPassword,
        ErrorCode::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AlreadyADisk => "already_a_disk",
            ErrorCode::AlreadyAttached => "already_attached",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::ConfigChanged => "config_changed",
            ErrorCode::Busy => "busy",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ConsoleUnavailable => "console_unavailable",
            ErrorCode::UploadOffset => "upload_offset",
            ErrorCode::AgentUnavailable => "agent_unavailable",
            ErrorCode::TemplateInUse => "template_in_use",
            ErrorCode::NotATemplate => "not_a_template",
            ErrorCode::VmIsTemplate => "vm_is_template",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::ControllerFull => "controller_full",
            ErrorCode::CsrfFailed => "csrf_failed",
            ErrorCode::ControllerUnsupported => "controller_unsupported",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::DatastoreMissing => "datastore_missing",
            ErrorCode::DetachTimeout => "detach_timeout",
            ErrorCode::DiskInUse => "disk_in_use",
            ErrorCode::DiskMissing => "disk_missing",
            ErrorCode::DiskShared => "disk_shared",
            ErrorCode::FileMissing => "file_missing",
            ErrorCode::FolderNotEmpty => "folder_not_empty",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::HotplugUnsupported => "hotplug_unsupported",
            ErrorCode::HypervisorError => "hypervisor_error",
            ErrorCode::HypervisorUnavailable => "hypervisor_unavailable",
            ErrorCode::InUse => "in_use",
            ErrorCode::InsufficientSpace => "insufficient_space",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidCapacity => "invalid_capacity",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::InvalidPatch => "invalid_patch",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::Leased => "leased",
            ErrorCode::ManagedDiskFile => "managed_disk_file",
            ErrorCode::MissingBody => "missing_body",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::UserDisabled => "user_disabled",
            ErrorCode::SsoUnavailable => "sso_unavailable",
            ErrorCode::KeyUnavailable => "key_unavailable",
            ErrorCode::MfaRequired => "mfa_required",
            ErrorCode::MfaInvalid => "mfa_invalid",
            ErrorCode::MfaEnrollmentRequired => "mfa_enrollment_required",
            ErrorCode::MfaState => "mfa_state",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::NotFound => "not_found",
            ErrorCode::OperationInProgress => "operation_in_progress",
            ErrorCode::PathOutsideDatastore => "path_outside_datastore",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::RequiresPowerCycle => "requires_power_cycle",
            ErrorCode::RootFolder => "root_folder",
            ErrorCode::SelfDelete => "self_delete",
            ErrorCode::ShrinkRefused => "shrink_refused",
            ErrorCode::SnapshotUnsupported => "snapshot_unsupported",
            ErrorCode::ShutdownTimeout => "shutdown_timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::StaleGeneration => "stale_generation",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::TaskFailed => "task_failed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::UnitOutOfRange => "unit_out_of_range",
            ErrorCode::UnitTaken => "unit_taken",
            ErrorCode::UnknownController => "unknown_controller",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::UnknownQueryParameter => "unknown_query_parameter",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::VmNotRunning => "vm_not_running",
            ErrorCode::VmOnOtherNode => "vm_on_other_node",
            ErrorCode::VmRunning => "vm_running",
            ErrorCode::WeakPassword => "weak_password",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl ErrorDetail {
    /// The details read as `T` (for a 412 [`StaleDetails`], a 423 [`LeasedDetails`], a 409
    /// [`ConflictDetails`]); None when there are none or they do not have that shape.
    pub fn details_as<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        self.details.clone().and_then(|d| serde_json::from_value(d).ok())
    }
}

/// The details of a 412 `version_mismatch`: what changed since the caller's version, so that a client
/// can rebase its change and show whose change it met.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StaleDetails {
    /// The version the object is at.
    pub current_version: i64,
    /// The version the request was based on (`If-Match`).
    pub your_version: i64,
    /// Who wrote the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// When the current version was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    /// The current version's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// From the caller's version to the current one, as a JSON Patch (RFC 6902).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub patch: Option<serde_json::Value>,
    /// The same change, a line a field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Vec<String>>,
}

/// The details of a 423 `leased`: who holds the edit lease and until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeasedDetails {
    pub holder: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// The details of a 409; which fields are present depends on the code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictDetails {
    /// `operation_in_progress`: the object, who runs the operation, what it is and its saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga: Option<uuid::Uuid>,
    /// `lease_expired`: the token sent and the lease's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_token: Option<i64>,
    /// `disk_in_use`: the VM holding the disk, its power state, how it holds it and the attachment's
    /// generation (also `stale_generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// `in_use` (a disk that cannot be deleted): the VMs it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    /// `insufficient_space`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needed_bytes: Option<u64>,
    /// `requires_power_cycle`: the fields that only take effect at the next power-on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// `vm_on_other_node`: the node that runs the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

macro_rules! error_body_with {
    ($(#[doc = $doc:literal])* $body:ident, $detail:ident, $details:ty) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $body {
            pub error: $detail,
        }

        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $detail {
            pub code: ErrorCode,
            pub message: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub field: Option<String>,
            pub details: $details,
        }
    };
}

error_body_with!(
    /// The body of a 412: the base version was stale.
    StaleError,
    StaleErrorDetail,
    StaleDetails
);
error_body_with!(
    /// The body of a 423: someone else holds the edit lease.
    LeasedError,
    LeasedErrorDetail,
    LeasedDetails
);
error_body_with!(
    /// The body of a 409: the request conflicts with the object's state.
    ConflictError,
    ConflictErrorDetail,
    Option<ConflictDetails>
);
