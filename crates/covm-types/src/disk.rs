//! First-class disks (like vSphere's First Class Disks): objects of their own, in a datastore, with an
//! image file that covm names and `qemu-img` makes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::Name;

/// The smallest and largest disk covm makes.
pub const CAPACITY_MIN: u64 = 1 << 20;
pub const CAPACITY_MAX: u64 = 64 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// One read-write attachment at a time.
    #[default]
    None,
    /// Several read-write attachments (raw only, no snapshots).
    MultiWriter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    Creating,
    #[default]
    Detached,
    Attaching,
    Attached,
    Detaching,
    Resizing,
    Faulted,
    Deleted,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    pub name: Name,
    /// The datastore's name.
    pub datastore: String,
    /// Bytes, a multiple of 512, from 1 MiB to 64 TiB.
    #[schema(minimum = 1048576, maximum = 70368744177664.0, multiple_of = 512)]
    pub capacity_bytes: u64,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub sharing: Sharing,
    /// The folder it is placed in (default `/`).
    #[serde(default)]
    pub folder: Option<String>,
    /// The resource pool whose disk quota it counts against (default `default`).
    #[serde(default)]
    pub pool: Option<String>,
    /// `luks`: the image is encrypted (LUKS in qcow2, AES-256-XTS) with a key of its own, which covm
    /// keeps wrapped by its master key. qcow2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<DiskEncryption>,
}

/// How a disk's image is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskEncryption {
    /// LUKS in qcow2: AES-256-XTS, the key derived from a random passphrase per disk.
    Luks,
}

impl DiskCreate {
    /// A qcow2 disk, not shared, in `/` and the default pool.
    pub fn new(name: Name, datastore: &str, capacity_bytes: u64) -> DiskCreate {
        DiskCreate {
            name,
            datastore: datastore.to_owned(),
            capacity_bytes,
            format: DiskFormat::default(),
            sharing: Sharing::default(),
            folder: None,
            pool: None,
            encryption: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskResize {
    /// The new size; larger than the current one (disks only grow).
    #[schema(minimum = 1048576, maximum = 70368744177664.0, multiple_of = 512)]
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskClone {
    /// The new disk's name.
    pub name: Name,
    /// `luks`: the copy is encrypted (qcow2 only). The copy of an encrypted disk is always encrypted,
    /// with a key of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<DiskEncryption>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskImport {
    pub datastore: String,
    /// A file inside the datastore, relative to its root; `..` and links that lead out are refused.
    pub path: String,
    #[serde(default)]
    pub folder: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
}

/// A file in a datastore (an ISO, an image to import, a kernel): not one of covm's disk images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileView {
    pub datastore: String,
    /// Relative to the datastore's root; `DATASTORE:path` names it in a VM's config.
    pub path: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
    /// The VMs whose config names it (kernel, initrd, cdrom); it cannot be deleted while any does.
    pub used_by: Vec<String>,
}

/// Where an upload stands (answered 202 until its last part arrives, then 201 with the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadView {
    pub datastore: String,
    pub path: String,
    /// Bytes received so far: the next part starts here (`Content-Range: bytes RECEIVED-…/TOTAL`).
    pub received: u64,
    pub total: u64,
    pub complete: bool,
    /// The file, once complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileView>,
}

/// A file's bytes (the body of an upload): `type: string, format: binary` in the OpenAPI document.
pub struct FileBytes;

impl utoipa::PartialSchema for FileBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .description(Some("the file's bytes"))
            .into()
    }
}

impl ToSchema for FileBytes {}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileUploadQuery {
    /// The SHA-256 of the whole file (hex): checked when the last part arrives; a file that does not
    /// match is deleted.
    #[param(pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
}

/// What `qemu-img info` says of the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskAttachmentView {
    pub vm: String,
    pub controller: String,
    pub unit: u32,
    pub read_only: bool,
    /// The attachment's generation (a detach may name it, to remove only this attachment).
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub id: Uuid,
    pub name: String,
    pub path: String,
    pub datastore: String,
    /// The image file, relative to the datastore (covm names it).
    pub file: String,
    pub format: DiskFormat,
    pub capacity_bytes: u64,
    pub sharing: Sharing,
    pub state: DiskState,
    pub pool: String,
    /// How the image is encrypted, if it is (never its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<DiskEncryption>,
    /// VMs whose config holds the disk.
    pub attachments: Vec<DiskAttachmentView>,
    /// In `GET /disks/{disk}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageView>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiskListQuery {
    pub datastore: Option<String>,
    pub state: Option<DiskState>,
    /// Only disks attached to this VM (its name).
    pub vm: Option<String>,
    pub after: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskAttach {
    /// The disk's name or id.
    pub disk: String,
    /// Default: the first virtio-scsi controller (else the first controller).
    #[serde(default)]
    pub controller: Option<String>,
    /// Default: the lowest free unit.
    #[serde(default)]
    pub unit: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
    /// On a running VM, with a bus that cannot hot-plug: keep it pending until the next power-on.
    #[serde(default)]
    pub next_boot: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskMove {
    /// The VM the disk goes to.
    pub to_vm: String,
    #[serde(default)]
    pub controller: Option<String>,
    #[serde(default)]
    pub unit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DetachQuery {
    /// On a running VM with a bus that cannot hot-unplug: keep the detach pending.
    #[serde(default)]
    pub next_boot: bool,
    /// Remove only this attachment (its generation, as `disk_in_use` and the config name it); a newer
    /// attachment is refused with `stale_generation`.
    #[serde(default)]
    pub generation: Option<u64>,
}
