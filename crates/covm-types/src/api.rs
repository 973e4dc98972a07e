//! Request and response shapes of the HTTP API (`/api/v1`). Requests refuse unknown fields.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{Name, Privilege};

/// A page of a list: `next` is the cursor to pass back for the following page, absent on the last.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Paging of a list: pass a page's `next` back as `after`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The cursor from the previous page's `next`.
    pub after: Option<String>,
    /// At most this many items (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

// ---------------------------------------------------------------------------------------------------
// Sessions, tokens, principals

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    #[schema(max_length = 256)]
    pub user: String,
    #[schema(max_length = 1024)]
    pub password: String,
    /// The current six-digit code of the user's authenticator app, when two-factor sign-in is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16)]
    pub totp: Option<String>,
    /// Instead of `totp`: one of the user's recovery codes (each works once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 64)]
    pub recovery_code: Option<String>,
    /// For browsers: the session goes in an HttpOnly cookie (`covm_session`, SameSite=Strict, Secure
    /// under TLS) instead of the body. Requests signed in by the cookie that change something must
    /// carry the header `X-Covm-Csrf: 1`.
    #[serde(default)]
    pub cookie: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionToken {
    /// Send as `Authorization: Bearer <token>`. Absent when the session is in a cookie.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    pub user: String,
    pub expires_at: DateTime<Utc>,
    /// A policy requires two-factor sign-in of this user, who has none yet: this session may only
    /// enroll (`POST /users/{user}/mfa` and `…/mfa/confirm`), read `GET /session` and sign out.
    #[serde(default)]
    pub enroll_only: bool,
}

/// A new TOTP secret (RFC 6238: SHA-1, 6 digits, 30 s) and recovery codes. Shown once; two-factor
/// sign-in is on after `POST /users/{user}/mfa/confirm` with a code from it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MfaEnrollment {
    /// Base32, for an authenticator app.
    pub secret: String,
    /// `otpauth://totp/…`, for a QR code.
    pub otpauth_url: String,
    /// Ten single-use codes that sign in instead of a TOTP code.
    pub recovery_codes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaCode {
    /// A current TOTP code.
    #[schema(max_length = 16)]
    pub code: String,
}

/// Turning two-factor sign-in off: the user's current code, unless the caller holds
/// `Authorization.ModifyPermissions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaDisable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16)]
    pub code: Option<String>,
}

/// A device sign-in begun (`POST /sso/device`): the user opens `verification_uri`, enters
/// `user_code`, and the CLI polls `POST /sso/device/poll {"id"}` every `interval_s` seconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SsoDeviceStart {
    pub id: Uuid,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    pub interval_s: u64,
    pub expires_in_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SsoDevicePollRequest {
    pub id: Uuid,
}

/// A device sign-in's state: still `pending`, or done with its session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SsoDevicePoll {
    pub pending: bool,
    pub interval_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionToken>,
}

/// How a browser sign-in through the identity provider begins.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SsoLoginQuery {
    /// For the web UI: a path of this server's UI (`/vms/web-1`) to land on. The session then goes
    /// into the browser's cookie (as `POST /session` with `"cookie": true`) and the callback
    /// redirects there instead of answering JSON.
    #[param(max_length = 2048)]
    pub next: Option<String>,
}

/// Whether single sign-on is on (for the sign-in page, before anyone is signed in).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SsoInfo {
    pub enabled: bool,
}

/// The identity provider's answer to the browser flow.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SsoCallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    /// The provider's error, when the user did not sign in.
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// What a master key rotation did: how many disk keys were wrapped again, and the new key's id (the
/// first 16 hex digits of its SHA-256; never the key).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeysRotated {
    pub disks: u64,
    pub master_key: String,
}

/// Which groups' members must use two-factor sign-in (they may sign in only to enroll until then).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaPolicy {
    pub required_for: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// A path (`/team-a`), an id, or `KIND:NAME`; the response then lists my privileges there.
    pub object: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub user: UserView,
    pub groups: Vec<String>,
    /// The object asked about with `?object=` (the root `/` when none was given).
    pub object: ObjectRef,
    /// My effective privileges on `object`.
    pub privileges: Vec<Privilege>,
    /// This session may only enroll in two-factor sign-in (see `SessionToken.enroll_only`).
    #[serde(default)]
    pub enroll_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: Name,
    /// Lifetime in seconds (default 30 days, at most one year).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31536000)]
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Present only in the response that creates the token; covm keeps only its hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: Name,
    #[schema(min_length = 8)]
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordSet {
    #[schema(min_length = 8)]
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct UserView {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Two-factor sign-in is on.
    #[serde(default)]
    pub mfa: bool,
    /// Made by single sign-on (no password in covm).
    #[serde(default)]
    pub sso: bool,
    /// Disabled by its identity provider: no sign-in, no session, no token.
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupCreate {
    pub name: Name,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberAdd {
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    pub id: Uuid,
    pub name: String,
    pub members: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleCreate {
    /// Letters, digits, `.`, `_` and `-`, 1 to 63 characters, starting with a letter or digit.
    pub name: String,
    pub privileges: Vec<Privilege>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoleView {
    pub id: Uuid,
    pub name: String,
    pub builtin: bool,
    pub privileges: Vec<Privilege>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionCreate {
    /// A user name, or `group:NAME`.
    pub principal: String,
    /// A role name.
    pub role: String,
    /// A folder path (`/team-a`), an object id, or `KIND:NAME` (`datastore:local`).
    pub object: String,
    /// Whether the grant reaches everything below the object (default true).
    #[serde(default = "default_true")]
    pub propagate: bool,
    /// The grant applies only where and when these hold (annotations of the object, the request's
    /// address, hours, expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<crate::conditions::GrantConditions>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PermissionView {
    pub id: Uuid,
    /// A user name, or `group:NAME`.
    pub principal: String,
    pub role: String,
    pub object: ObjectRef,
    pub propagate: bool,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<crate::conditions::GrantConditions>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PermissionQuery {
    /// Only grants on this object.
    pub object: Option<String>,
    /// Only grants to this principal (user name or `group:NAME`).
    pub principal: Option<String>,
}

// ---------------------------------------------------------------------------------------------------
// Inventory

/// Kinds of object in the inventory tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Folder,
    Datastore,
    Network,
    Pool,
    Host,
    Vm,
    Disk,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Folder,
        ObjectKind::Datastore,
        ObjectKind::Network,
        ObjectKind::Pool,
        ObjectKind::Host,
        ObjectKind::Vm,
        ObjectKind::Disk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Folder => "folder",
            ObjectKind::Datastore => "datastore",
            ObjectKind::Network => "network",
            ObjectKind::Pool => "pool",
            ObjectKind::Host => "host",
            ObjectKind::Vm => "vm",
            ObjectKind::Disk => "disk",
        }
    }

    pub fn parse(s: &str) -> Option<ObjectKind> {
        ObjectKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A reference to an inventory object as shown in responses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ObjectRef {
    pub id: Uuid,
    pub kind: ObjectKind,
    pub name: String,
    /// The folder path of the object (`/team-a` for a folder; `/team-a/web-1` for a VM in it).
    pub path: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InventoryQuery {
    /// The folder to list (default `/`).
    pub path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FolderCreate {
    pub name: Name,
    /// The parent folder's path or id (default `/`).
    #[serde(default)]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FolderView {
    pub id: Uuid,
    pub name: String,
    pub path: String,
    pub parent: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatastoreCreate {
    pub name: Name,
    /// An absolute path to an existing directory on the host.
    pub path: String,
    /// The folder it is placed in (default `/`).
    #[serde(default)]
    pub folder: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DatastoreView {
    pub id: Uuid,
    pub name: String,
    pub path: String,
    pub folder: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    /// QEMU user-mode NAT; needs no privileges on the host.
    User,
    /// A Linux bridge on the host (that exists), optionally a VLAN on it.
    Bridge,
    /// A network covm makes: a bridge with the subnet's first address, dnsmasq for DHCP (each NIC's
    /// MAC pinned to its address) and DNS, masquerade out and port forwards in (nftables).
    Nat,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: Name,
    pub kind: NetworkKind,
    /// The host bridge, for `kind = bridge`.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The VLAN tag (1 to 4094) of the NICs' ports on the bridge, for `kind = bridge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan: Option<u16>,
    /// The IPv4 subnet, for `kind = nat`: `10.77.0.0/24` (a prefix from 16 to 29); the gateway is its
    /// first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default)]
    pub folder: Option<String>,
}

/// A port of the host that reaches a VM's port on a NAT network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkForward {
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    /// The VM (name) whose NIC on this network gets the traffic.
    pub vm: String,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    #[serde(default)]
    pub proto: crate::vm::Proto,
    /// Only this address of the host (default: every address of the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub host_addr: Option<std::net::Ipv4Addr>,
}

/// `PUT /networks/{net}/forwards`: the NAT network's port forwards, replaced whole.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkForwards {
    pub forwards: Vec<NetworkForward>,
}

/// An address a NAT network gave a NIC, pinned to its MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkLease {
    pub mac: String,
    pub ip: String,
    pub vm: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    pub id: Uuid,
    pub name: String,
    pub kind: NetworkKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<NetworkForward>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<NetworkLease>,
    pub folder: String,
    pub created_at: DateTime<Utc>,
}

/// Limits of a pool; an absent limit is unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    pub name: Name,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default)]
    pub folder: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    pub id: Uuid,
    pub name: String,
    pub quota: Quota,
    pub folder: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostView {
    pub id: Uuid,
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Whether `/dev/kvm` can be opened.
    pub kvm: bool,
    /// `kvm`, `kvm_pvm` (a slow nested software KVM) or `none`.
    pub kvm_kind: String,
    pub folder: String,
    /// When this host last registered (the local host: at every start).
    pub seen_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------------
// Events and audit

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EventView {
    pub seq: i64,
    pub time: DateTime<Utc>,
    /// The user name that caused it (`-` for covm itself, or an unknown name on a failed sign-in).
    pub actor: String,
    pub request_id: Option<String>,
    /// `folder.created`, `permission.granted`, `authz.denied`, `session.failed`, …
    pub kind: String,
    pub object_kind: String,
    pub object_id: Option<Uuid>,
    pub object_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<serde_json::Value>,
    pub data: serde_json::Value,
    /// `sha256(prev_hash ‖ canonical entry)`, hex.
    pub hash: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this sequence number.
    pub after: Option<i64>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only events on this object (id).
    pub object: Option<Uuid>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub actor: Option<String>,
    /// An object id.
    pub object: Option<Uuid>,
    /// An event kind, or a prefix ending in `.` (`authz.`).
    pub kind: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub after: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AuditVerify {
    pub ok: bool,
    pub entries: u64,
    /// The first sequence number whose hash does not match, when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_seq: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}
