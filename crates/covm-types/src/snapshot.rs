//! VM snapshots: the config version at that moment and an internal qcow2 snapshot (a tag) in each disk
//! it covers. Tags live inside the disk files, so a disk that moves keeps its history.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::Name;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Asked for by a user.
    Manual,
    /// Taken by covm before a change that can lose data (and before every revert).
    Safety,
}

/// What a revert puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevertScope {
    /// A new config version equal to the snapshot's; the disks stay as they are.
    Config,
    /// The covered disks still attached to the VM go back; the config stays.
    Data,
    /// Both.
    Both,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub name: Name,
    #[serde(default)]
    pub description: Option<String>,
    /// The running guest's memory too (RAM and devices, `snapshot-save` into the VM's hidden state
    /// image; the guest pauses meanwhile). Refused for a VM that is off, and while a disk the VM
    /// writes to is left out.
    #[serde(default)]
    pub memory: bool,
    /// Disks (by name) left out; a raw disk must be left out to snapshot its VM.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `quiesced`: the running guest's file systems are frozen by its guest agent while the disks'
    /// tags are taken (refused, 409 `agent_unavailable`, when the guest has no agent).
    #[serde(default)]
    pub consistency: Consistency,
}

/// What a snapshot of a running VM's disks is consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As if the power had gone: what the guest had written (its file systems recover as after a crash).
    #[default]
    Crash,
    /// The guest's file systems were frozen (flushed and still) through its agent.
    Quiesced,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRevert {
    pub scope: RevertScope,
    /// Resume the guest from the snapshot's memory (with scope `both`): a running VM is powered off
    /// and started again from the snapshot, its processes as they were.
    #[serde(default)]
    pub memory: bool,
    /// Revert the data of the covered disks this VM still holds, leaving those another VM holds now
    /// (without it, such a disk makes the revert refuse, naming the VM).
    #[serde(default)]
    pub skip_moved: bool,
}

/// What a snapshot's owner may change of it (`PATCH`): its description, and whether it is pinned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotUpdate {
    /// Keep it until it is deleted by hand: a pinned safety snapshot never expires; unpinned, it
    /// expires the configured time after it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshotCreate {
    pub name: Name,
    #[serde(default)]
    pub description: Option<String>,
}

/// A snapshot of one disk on its own (a First Class Disk's snapshot): a tag inside its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskSnapshotView {
    pub id: Uuid,
    pub disk: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `safety`: taken by covm before a revert of the disk.
    pub kind: SnapshotKind,
    pub tag: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A disk a snapshot covers, and its tag inside the disk's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDisk {
    pub disk: String,
    pub disk_id: Uuid,
    pub tag: String,
}

/// A disk a snapshot does not cover, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotExcluded {
    pub disk: String,
    /// `excluded` (asked), `multi_writer` (never snapshotted), `read_only` (attached read-only: the VM
    /// cannot change it), `raw` (a safety snapshot leaves raw disks out).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotView {
    pub id: Uuid,
    pub vm: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub kind: SnapshotKind,
    /// The config version the snapshot holds.
    pub config_version: i64,
    /// For a safety snapshot: the version the change it protects against created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protects_version: Option<i64>,
    pub memory: bool,
    #[serde(default)]
    pub consistency: Consistency,
    /// Quiesced: how many file systems the guest agent froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_filesystems: Option<u64>,
    pub disks: Vec<SnapshotDisk>,
    pub excluded: Vec<SnapshotExcluded>,
    /// The snapshot the VM was at when this one was taken (the tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// When the reaper deletes it (a safety snapshot that is not pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Kept until deleted by hand (a safety snapshot then never expires).
    #[serde(default)]
    pub pinned: bool,
    /// A disk it covers is now attached to another VM, or deleted: its data cannot come back with this VM's.
    #[serde(default)]
    pub partial: bool,
}
