//! VM snapshots: the config version at that moment plus an internal qcow2 snapshot (a tag,
//! `covm-<snapshot id>`) in every disk they cover. The rules are checked here with the VM and its disks
//! locked; the sagas that change files and records are in `saga/snapshot.rs`.
//!
//! A VM that is off is snapshotted with `qemu-img snapshot`; a running one through its QEMU, one QMP
//! `transaction` of `blockdev-snapshot-internal-sync` across its disks (all or none). A tag is removed
//! through whichever QEMU holds its disk then, or with `qemu-img`. A data revert needs the VM off.
//! Raw disks cannot hold snapshots: one that is not excluded makes the snapshot refuse; multi-writer
//! disks are never covered.
//!
//! A memory snapshot (a running VM) is one QMP `snapshot-save`: the guest's RAM and devices go into
//! the VM's hidden state image (`DATA/vms/<id>/vmstate.qcow2`, never a user's disk) and the same tag
//! into every covered disk. A memory revert (scope `both`) powers a running VM off, puts config and
//! disks back as any revert does (a safety snapshot first), then starts QEMU paused, loads the
//! snapshot (`snapshot-load`) and lets it run: the guest goes on where it was.

use covm_store::SnapshotRecord;
use covm_types::api::ObjectKind;
use covm_types::disk::{DiskFormat, Sharing};
use covm_types::snapshot::{
    DiskSnapshotCreate, DiskSnapshotView, RevertScope, SnapshotCreate, SnapshotDisk, SnapshotExcluded, SnapshotKind,
    SnapshotRevert, SnapshotUpdate, SnapshotView,
};
use covm_types::vm::{SafetyPolicy, TaskView, VmView};
use covm_types::{Error, ErrorCode, Privilege};
use serde_json::json;
use uuid::Uuid;

use super::power::task_view;

use super::saga::Saga;
use super::saga::snapshot::{
    ConfigRevert, SnapshotCreateSaga, SnapshotDeleteSaga, SnapshotRevertSaga, Tagged, snapshot_tag,
};
use super::vms::{DocChange, Preconditions, WriteOpts, parse_config, running};
use super::{App, Ctx, EventExt};

fn current_key(vm: Uuid) -> String {
    format!("snapshot-current/{vm}")
}

fn view_of(rec: &SnapshotRecord, vm_name: &str) -> Result<SnapshotView, Error> {
    let mut v: SnapshotView = serde_json::from_value(rec.doc.clone())
        .map_err(|e| Error::internal(format!("a snapshot's record cannot be read: {e}")))?;
    v.vm = vm_name.to_owned();
    Ok(v)
}

/// A snapshot's description: at most 1024 bytes.
fn description_check(d: Option<&str>) -> Result<(), Error> {
    match d {
        Some(d) if d.len() > 1024 => Err(Error::invalid("description", "a description has at most 1024 bytes")),
        _ => Ok(()),
    }
}

fn vm_running(vm: &str) -> Error {
    Error::conflict(
        ErrorCode::VmRunning,
        format!("{vm} is running; power it off first (or revert its memory too, with scope both)"),
    )
}

impl App {
    /// Takes a snapshot of a VM (live through its QEMU when it runs; with its memory, `snapshot-save`),
    /// as a task: the rules are checked at once (a refusal is the answer), then again under the locks
    /// by the task, which ends with the snapshot taken or undone.
    pub async fn snapshot_create(&self, ctx: &Ctx, vm: &str, p: SnapshotCreate) -> Result<TaskView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmStateCreateSnapshot).await?;
        if parse_config(&rec.config)?.template {
            return Err(Error::conflict(
                ErrorCode::VmIsTemplate,
                format!("{} is a template: its disks do not change, so it takes no snapshot", rec.object.name),
            ));
        }
        description_check(p.description.as_deref())?;
        let take = Take {
            name: p.name.to_string(),
            description: p.description,
            exclude: p.exclude,
            kind: SnapshotKind::Manual,
            memory: p.memory,
            consistency: p.consistency,
        };
        let vm_id = rec.object.id;
        let (seen, disks) = self.snapshot_disks(vm_id, &take).await?;
        self.snapshot_plan(ctx, vm_id, &take, &disks, seen).await?;
        let task = self.task_new(ctx, "vm.snapshot.create", &rec).await?;
        let view = task_view(&task);
        let (app, ctx) = (self.clone(), ctx.clone());
        tokio::spawn(async move {
            let r = app.snapshot_take(&ctx, vm_id, take).await.map(|s| {
                let memory = if s.memory { " with its memory" } else { "" };
                format!("took snapshot {} ({}) of {}{memory}", s.name, s.id, s.vm)
            });
            app.task_end(task, r).await;
        });
        Ok(view)
    }

    /// The VM's version and its disks (the objects), with `exclude` checked against them.
    async fn snapshot_disks(&self, vm: Uuid, t: &Take) -> Result<(i64, Vec<covm_store::ObjectRecord>), Error> {
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &vm.to_string()))?;
        let cfg = parse_config(&rec.config)?;
        let mut disks = Vec::new();
        for d in &cfg.disks {
            if let Some(o) = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await? {
                disks.push(o);
            }
        }
        for (i, x) in t.exclude.iter().enumerate() {
            if !disks.iter().any(|o| o.name == *x) {
                return Err(Error::invalid(
                    &format!("exclude[{i}]"),
                    format!("{x} is not a disk of {}", rec.object.name),
                ));
            }
        }
        Ok((rec.version, disks))
    }

    /// Locks the VM and its disks, checks the rules and runs the create saga.
    async fn snapshot_take(&self, ctx: &Ctx, vm: Uuid, t: Take) -> Result<SnapshotView, Error> {
        let (seen, disks) = self.snapshot_disks(vm, &t).await?;
        let mut locks = vec![vm];
        locks.extend(disks.iter().map(|o| o.id));
        let guard = self.saga_begin(ctx, SnapshotCreateSaga::KIND, &locks).await?;
        let plan = self.snapshot_plan(ctx, vm, &t, &disks, seen).await;
        let tagged = match plan {
            Ok(t) => t,
            Err(e) => return Err(guard.refuse(e).await),
        };
        let saga = guard.run(ctx, SnapshotCreateSaga(tagged)).await?;
        let view = saga.0.view;
        self.store().meta_set(&current_key(vm), &view.id.to_string()).await?;
        Ok(view)
    }

    /// A snapshot's plan, with the VM and its disks locked: what it covers and leaves out, and how.
    async fn snapshot_plan(
        &self,
        ctx: &Ctx,
        vm: Uuid,
        t: &Take,
        disks: &[covm_store::ObjectRecord],
        seen: i64,
    ) -> Result<Tagged, Error> {
        // With the locks held: the VM as it is now.
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &vm.to_string()))?;
        if rec.version != seen {
            // Its disks may have changed before the locks were taken: they were read from then.
            return Err(Error::conflict(ErrorCode::ConfigChanged, "the VM changed meanwhile; take the snapshot again"));
        }
        let live = running(&rec);
        if live {
            // Its QEMU takes the tags: this host's agent must run it.
            self.agent_for(&rec)?;
        }
        let existing = self.store().snapshots_of(vm).await?;
        if existing.iter().any(|s| s.name == t.name) {
            return Err(Error::conflict(
                ErrorCode::AlreadyExists,
                format!("{} has a snapshot named {}", rec.object.name, t.name),
            )
            .with_field("name"));
        }
        let id = Uuid::now_v7();
        let (mut covered, mut files, mut excluded) = (Vec::new(), Vec::new(), Vec::new());
        let attached = parse_config(&rec.config)?.disks;
        for o in disks {
            let sharing: Sharing = serde_json::from_value(o.spec["sharing"].clone()).unwrap_or_default();
            let format: DiskFormat = serde_json::from_value(o.spec["format"].clone()).unwrap_or_default();
            let read_only = attached.iter().any(|a| a.disk == o.name && a.read_only);
            if sharing == Sharing::MultiWriter {
                excluded.push(SnapshotExcluded { disk: o.name.clone(), reason: "multi_writer".into() });
            } else if read_only {
                // The VM cannot change it (and its QEMU holds it read-only, where no tag can be taken).
                excluded.push(SnapshotExcluded { disk: o.name.clone(), reason: "read_only".into() });
            } else if t.exclude.contains(&o.name) {
                excluded.push(SnapshotExcluded { disk: o.name.clone(), reason: "excluded".into() });
            } else if format != DiskFormat::Qcow2 {
                if t.kind == SnapshotKind::Safety {
                    excluded.push(SnapshotExcluded { disk: o.name.clone(), reason: "raw".into() });
                    continue;
                }
                return Err(Error::conflict(
                    ErrorCode::SnapshotUnsupported,
                    format!("{} is a raw disk, which cannot hold snapshots; exclude it", o.name),
                )
                .with_field("exclude"));
            } else {
                covered.push(SnapshotDisk { disk: o.name.clone(), disk_id: o.id, tag: snapshot_tag(id) });
                files.push(Some(self.disk_file(o).await?));
            }
        }
        let state = match t.memory {
            true => Some(self.memory_plan(&rec, &attached, &excluded, live)?),
            false => None,
        };
        if t.consistency == covm_types::snapshot::Consistency::Quiesced {
            if state.is_some() {
                return Err(Error::invalid(
                    "consistency",
                    "a memory snapshot is consistent as it is; quiesced is for a snapshot of the disks alone",
                ));
            }
            if !live {
                return Err(Error::conflict(
                    ErrorCode::VmNotRunning,
                    format!(
                        "{} is not running: its disks are consistent as they are (leave consistency out)",
                        rec.object.name
                    ),
                )
                .with_field("consistency"));
            }
        }
        let parent = self.store().meta_get(&current_key(vm)).await?.and_then(|s| Uuid::parse_str(&s).ok());
        let parent = parent.filter(|p| existing.iter().any(|s| s.id == *p));
        let now = covm_store::now();
        let view = SnapshotView {
            id,
            vm: rec.object.name.clone(),
            name: t.name.clone(),
            description: t.description.clone(),
            kind: t.kind,
            config_version: rec.version,
            protects_version: None,
            memory: state.is_some(),
            consistency: t.consistency,
            frozen_filesystems: None,
            disks: covered,
            excluded,
            parent,
            created_by: ctx.user.clone(),
            created_at: now,
            expires_at: (t.kind == SnapshotKind::Safety).then(|| now + self.config().safety_snapshot_ttl),
            pinned: false,
            partial: false,
        };
        Ok(Tagged { vm_id: vm, view, files, live, via: None, disk: false, state, qemu_ms: None })
    }

    /// A memory snapshot's rules: the VM runs, and no disk it writes to is left out (the guest's cache
    /// would disagree with that disk after a revert). Answers the state image.
    fn memory_plan(
        &self,
        rec: &covm_store::VmRecord,
        attached: &[covm_types::vm::DiskAttachment],
        excluded: &[SnapshotExcluded],
        live: bool,
    ) -> Result<std::path::PathBuf, Error> {
        if !live {
            return Err(Error::conflict(
                ErrorCode::VmNotRunning,
                format!("{} is not running: it has no memory to keep (leave memory out)", rec.object.name),
            )
            .with_field("memory"));
        }
        for x in excluded {
            if attached.iter().any(|d| d.disk == x.disk && !d.read_only) {
                return Err(Error::conflict(
                    ErrorCode::SnapshotUnsupported,
                    format!(
                        "{} writes to {}, which the snapshot leaves out ({}); with memory, the guest's cache would disagree with that disk after a revert",
                        rec.object.name, x.disk, x.reason
                    ),
                )
                .with_field("memory"));
            }
        }
        Ok(self.state_file(rec.object.id))
    }

    /// The hidden image where a VM's memory snapshots keep its RAM and devices (in its run directory).
    pub(crate) fn state_file(&self, vm: Uuid) -> std::path::PathBuf {
        self.agent().run_dir(vm).join("vmstate.qcow2")
    }

    /// A VM's snapshots, oldest first (`parent` makes the tree).
    pub async fn snapshots_list(&self, ctx: &Ctx, vm: &str) -> Result<Vec<SnapshotView>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let mut out = Vec::new();
        for s in self.store().snapshots_of(rec.object.id).await? {
            out.push(self.snapshot_settle(view_of(&s, &rec.object.name)?, rec.object.id).await?);
        }
        Ok(out)
    }

    /// Marks a snapshot `partial` when a disk it covers is now attached to another VM.
    async fn snapshot_settle(&self, mut v: SnapshotView, vm: Uuid) -> Result<SnapshotView, Error> {
        for d in &v.disks {
            let gone = self.store().object_get(d.disk_id).await?.is_none();
            if gone || self.store().disk_attachments(&d.disk, d.disk_id).await?.iter().any(|a| a.vm_id != vm) {
                v.partial = true;
            }
        }
        Ok(v)
    }

    /// Pins or unpins a snapshot, or changes its description. Unpinned, a safety snapshot expires the
    /// configured time after it was taken (at once at the reaper's next round if that time is past).
    pub async fn snapshot_update(
        &self,
        ctx: &Ctx,
        vm: &str,
        snap: &str,
        p: SnapshotUpdate,
    ) -> Result<SnapshotView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmStateRenameSnapshot).await?;
        description_check(p.description.as_deref())?;
        let s = self.snapshot_find(rec.object.id, &rec.object.name, snap).await?;
        let mut v = view_of(&s, &rec.object.name)?;
        if let Some(pinned) = p.pinned {
            v.pinned = pinned;
            v.expires_at = match (v.kind, pinned) {
                (SnapshotKind::Safety, false) => Some(v.created_at + self.config().safety_snapshot_ttl),
                _ => None,
            };
        }
        if let Some(d) = p.description {
            v.description = Some(d).filter(|d| !d.is_empty());
        }
        let data = json!({ "snapshot": v.id, "name": v.name, "pinned": v.pinned, "expires_at": v.expires_at });
        let ev = ctx.event("vm.snapshot.updated", "vm", Some(rec.object.id), &rec.object.name).data(data);
        let doc = serde_json::to_value(&v).map_err(|e| Error::internal(e.to_string()))?;
        if !self.store().snapshot_update(v.id, doc, ev).await? {
            return Err(Error::not_found("snapshot", &format!("{}/{snap}", rec.object.name)));
        }
        self.committed();
        self.snapshot_settle(v, rec.object.id).await
    }

    /// One snapshot, by name or id.
    pub async fn snapshot_get(&self, ctx: &Ctx, vm: &str, snap: &str) -> Result<SnapshotView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let s = self.snapshot_find(rec.object.id, &rec.object.name, snap).await?;
        self.snapshot_settle(view_of(&s, &rec.object.name)?, rec.object.id).await
    }

    async fn snapshot_find(&self, vm: Uuid, vm_name: &str, snap: &str) -> Result<SnapshotRecord, Error> {
        let all = self.store().snapshots_of(vm).await?;
        all.into_iter()
            .find(|s| s.name == snap || s.id.to_string() == snap)
            .ok_or_else(|| Error::not_found("snapshot", &format!("{vm_name}/{snap}")))
    }

    /// The files of a snapshot's disks as they are now, and its disks' locks.
    async fn snapshot_files(&self, view: &SnapshotView) -> Result<(Vec<Option<std::path::PathBuf>>, Vec<Uuid>), Error> {
        let (mut files, mut locks) = (Vec::new(), Vec::new());
        for d in &view.disks {
            match self.store().object_get(d.disk_id).await? {
                Some(o) => {
                    files.push(Some(self.disk_file(&o).await?));
                    locks.push(o.id);
                }
                None => files.push(None),
            }
        }
        Ok((files, locks))
    }

    /// Deletes a snapshot: its record, then its tags (none of its disks may run in a VM).
    pub async fn snapshot_delete(&self, ctx: &Ctx, vm: &str, snap: &str) -> Result<(), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmStateRemoveSnapshot).await?;
        let s = self.snapshot_find(rec.object.id, &rec.object.name, snap).await?;
        let view = view_of(&s, &rec.object.name)?;
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move { app.snapshot_remove(&ctx, rec.object.id, view, false).await }).await
    }

    async fn snapshot_remove(&self, ctx: &Ctx, vm: Uuid, view: SnapshotView, disk: bool) -> Result<(), Error> {
        let (files, mut locks) = self.snapshot_files(&view).await?;
        if !locks.contains(&vm) {
            locks.push(vm);
        }
        let guard = self.saga_begin(ctx, SnapshotDeleteSaga::KIND, &locks).await?;
        let state = (view.memory && !disk).then(|| self.state_file(vm));
        let tagged = Tagged { vm_id: vm, view, files, live: false, via: None, disk, state, qemu_ms: None };
        guard.run(ctx, SnapshotDeleteSaga(tagged)).await?;
        Ok(())
    }

    /// Reverts a VM to a snapshot: its config (a new version equal to the snapshot's), its data (the
    /// covered disks it still holds; the VM must be off), or both, as one saga. A revert of the data
    /// first takes a safety snapshot of the present, so it can itself be undone (a revert that fails
    /// removes it again); the config's own history keeps the present config.
    pub async fn snapshot_revert(
        &self,
        ctx: &Ctx,
        vm: &str,
        snap: &str,
        p: SnapshotRevert,
        pre: Preconditions,
    ) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmStateRevertToSnapshot).await?;
        if parse_config(&rec.config)?.template {
            return Err(Error::conflict(
                ErrorCode::VmIsTemplate,
                format!("{} is a template: it is read-only (its linked clones read its disks)", rec.object.name),
            ));
        }
        if p.memory && p.scope != RevertScope::Both {
            return Err(Error::invalid(
                "memory",
                "a revert with memory puts the config and the data back too: send scope both",
            ));
        }
        let s = self.snapshot_find(rec.object.id, &rec.object.name, snap).await?;
        let to = view_of(&s, &rec.object.name)?;
        if p.memory && !to.memory {
            return Err(Error::conflict(
                ErrorCode::SnapshotUnsupported,
                format!("snapshot {} holds no memory (it was taken without it)", to.name),
            )
            .with_field("memory"));
        }
        let data = matches!(p.scope, RevertScope::Data | RevertScope::Both);
        // A memory revert powers a running VM off first: what it runs now is replaced.
        if data && running(&rec) && !p.memory {
            return Err(vm_running(&rec.object.name));
        }
        if let Some(v) = pre.if_match.filter(|v| *v != rec.version) {
            return Err(self.stale_error(&rec, v).await);
        }
        // Someone else's edit lease refuses a revert as any change (423); the holder sends its token.
        if let super::leases::LeaseCheck::Refused(e) =
            super::leases::lease_check(&rec, ctx.user_id, pre.lease_token, chrono::Utc::now())
        {
            return Err(e);
        }
        let (app, ctx2) = (self.clone(), ctx.clone());
        let vm_id = rec.object.id;
        self.to_the_end(async move {
            let safety = Take::safety("before-revert", format!("taken before reverting to {}", to.name));
            // A config-only revert needs none: the config's history keeps the present version. The
            // safety snapshot is the saga's first step, under its locks (undone with it).
            let safety = data.then_some(safety);
            let token = pre.lease_token;
            let stopped = p.memory && running(&rec);
            if stopped {
                // The revert's rules first (a refusal leaves the VM running), then the VM goes off.
                let dry = app.snapshot_revert_run(&ctx2, vm_id, &to, safety.as_ref(), &p, token, true).await;
                dry.map_err(|f| f.error)?;
                app.vm_stop_and_wait(vm_id).await?;
            }
            if let Err(RevertFailed { error: mut e, stuck }) =
                app.snapshot_revert_run(&ctx2, vm_id, &to, safety.as_ref(), &p, token, false).await
            {
                if let (Some(safety), true) = (&safety, stuck) {
                    e.message = format!(
                        "{}; the revert could not be undone: snapshot {} holds the data of before it",
                        e.message, safety.name
                    );
                }
                if stopped {
                    e.message = format!("{}; {} was powered off for the revert and is off now", e.message, to.vm);
                }
                return Err(e);
            }
            app.store().meta_set(&current_key(vm_id), &to.id.to_string()).await?;
            if p.memory {
                // Config and disks are the snapshot's: the guest resumes where it was.
                let nodes = to.disks.iter().map(|d| super::attach::disk_node(d.disk_id)).collect();
                let m = covm_hv::MemoryState { tag: snapshot_tag(to.id), state: app.state_file(vm_id), nodes };
                if let Err(mut e) = app.power_on_restoring(&ctx2, vm_id, m).await {
                    e.message = format!(
                        "the config and the disks are back at snapshot {}, but the guest could not resume from its memory: {}",
                        to.name, e.message
                    );
                    return Err(e);
                }
            }
            let rec = app.store().vm_get(vm_id).await?.ok_or_else(|| Error::not_found("vm", "?"))?;
            app.vm_view(Some(&ctx2), &rec)
        })
        .await
    }

    /// The revert saga: locks the VM, the disks it holds, those the snapshot's config names and those the
    /// snapshot covers; checks the rules with them held; runs. `dry`: only the rules that do not need
    /// the locks, and nothing runs.
    #[allow(clippy::too_many_arguments)]
    async fn snapshot_revert_run(
        &self,
        ctx: &Ctx,
        vm: Uuid,
        to: &SnapshotView,
        safety: Option<&Take>,
        p: &SnapshotRevert,
        lease_token: Option<i64>,
        dry: bool,
    ) -> Result<(), RevertFailed> {
        let scope = p.scope;
        let data = matches!(scope, RevertScope::Data | RevertScope::Both);
        let config = matches!(scope, RevertScope::Config | RevertScope::Both);
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &vm.to_string()))?;
        let cfg = parse_config(&rec.config)?;
        let version = self.store().vm_version(vm, to.config_version).await?.ok_or_else(|| {
            Error::conflict(
                ErrorCode::Conflict,
                format!("{} no longer has version {}", rec.object.name, to.config_version),
            )
        })?;
        let target = parse_config(&version.config)?;
        let mut locks = vec![vm];
        let mut held = Vec::new();
        let mut held_objects = Vec::new();
        for d in &cfg.disks {
            if let Some(o) = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await? {
                held.push(o.id);
                locks.push(o.id);
                held_objects.push(o);
            }
        }
        // Disks the snapshot's config holds that the VM does not now: attached again by the revert.
        let mut comes_back = Vec::new();
        if config {
            for (i, d) in target.disks.iter().enumerate() {
                // A disk of the snapshot's config that is gone (or that the caller may not see) is a
                // conflict with the present, not a missing snapshot.
                let o = match self.disk_use_authorize(ctx, &d.disk, &format!("disks[{i}].disk")).await {
                    Err(e) if e.kind == covm_types::ErrorKind::NotFound => {
                        return Err(Error::conflict(
                            ErrorCode::DiskMissing,
                            format!(
                                "{} held disk {} at version {}; it no longer exists",
                                rec.object.name, d.disk, to.config_version
                            ),
                        )
                        .with_field(format!("disks[{i}].disk"))
                        .into());
                    }
                    r => r?,
                };
                if !locks.contains(&o.id) {
                    locks.push(o.id);
                    comes_back.push((o, d.read_only));
                }
            }
        }
        // A covered disk another VM holds now is not touched: the revert refuses, naming the VM, unless
        // told to leave it.
        if data && !p.skip_moved {
            for d in to.disks.iter().filter(|d| !held.contains(&d.disk_id)) {
                let holders = self.store().disk_attachments(&d.disk, d.disk_id).await?;
                if let Some(h) = holders.iter().find(|h| h.vm_id != vm) {
                    return Err(Error::conflict(
                        ErrorCode::DiskInUse,
                        format!(
                            "{} is now attached to {}; its data cannot go back with {}'s (send skip_moved to revert the rest)",
                            d.disk, h.vm_name, rec.object.name
                        ),
                    )
                    .with_details(serde_json::json!({ "vm": h.vm_name }))
                    .into());
                }
            }
        }
        let mut view = to.clone();
        // The covered disks the VM holds now, and those the config revert attaches again.
        view.disks.retain(|d| held.contains(&d.disk_id) || comes_back.iter().any(|(o, _)| o.id == d.disk_id));
        if !data {
            view.disks.clear();
        }
        if p.memory && view.disks.len() != to.disks.len() {
            let missing: Vec<&str> =
                to.disks.iter().filter(|d| !view.disks.contains(d)).map(|d| d.disk.as_str()).collect();
            return Err(Error::conflict(
                ErrorCode::DiskInUse,
                format!(
                    "a memory revert needs every disk the snapshot covers; {} {} not with {} any more",
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" },
                    rec.object.name
                ),
            )
            .into());
        }
        let (files, _) = self.snapshot_files(&view).await?;
        if dry {
            return Ok(());
        }
        let guard = self.saga_begin(ctx, SnapshotRevertSaga::KIND, &locks).await?;
        let checks = async {
            let now = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &vm.to_string()))?;
            if now.version != rec.version {
                return Err(Error::conflict(ErrorCode::ConfigChanged, "the VM changed meanwhile; revert again"));
            }
            if data && running(&now) {
                return Err(vm_running(&now.object.name));
            }
            for (o, read_only) in &comes_back {
                self.disk_writers_check(o, Some(vm), *read_only).await?;
            }
            Ok(())
        };
        if let Err(e) = checks.await {
            return Err(guard.refuse(e).await.into());
        }
        // The present, kept first, under the same locks: the safety snapshot's plan (its raw disks are
        // left out of it, not refused).
        let safety = match safety {
            Some(t) => match self.snapshot_plan(ctx, vm, t, &held_objects, rec.version).await {
                Ok(s) => Some(s),
                Err(e) => return Err(guard.refuse(e).await.into()),
            },
            None => None,
        };
        let safety_tags = view
            .disks
            .iter()
            .map(|d| safety.as_ref()?.view.disks.iter().find(|s| s.disk_id == d.disk_id).map(|s| s.tag.clone()))
            .collect();
        let doc = match config {
            true => match self.revert_doc_settle(&cfg, &target).await {
                Ok(d) => d,
                Err(e) => return Err(guard.refuse(e).await.into()),
            },
            false => serde_json::Value::Null,
        };
        let config = config.then(|| ConfigRevert {
            version: to.config_version,
            doc,
            message: format!("revert to snapshot {}", to.name),
            before_version: rec.version,
            before_doc: rec.config.clone(),
            lease_token,
        });
        let saga = SnapshotRevertSaga {
            to: Tagged { vm_id: vm, view, files, live: false, via: None, disk: false, state: None, qemu_ms: None },
            safety_tags,
            data,
            config,
            safety,
        };
        match guard.run_ending(ctx, saga).await {
            Ok(_) => Ok(()),
            Err((error, state)) => Err(RevertFailed { error, stuck: state == covm_store::SagaState::Stuck }),
        }
    }

    /// The config a revert writes: the snapshot's, with each disk attachment's generation settled
    /// against the present: one the VM holds now keeps its present generation, one that comes back is
    /// a new attachment with a generation of its own (as an attach gives it).
    async fn revert_doc_settle(
        &self,
        now: &covm_types::vm::VmConfig,
        target: &covm_types::vm::VmConfig,
    ) -> Result<serde_json::Value, Error> {
        let mut cfg = target.clone();
        let mut fresh = None;
        for d in &mut cfg.disks {
            match now.disks.iter().find(|p| p.disk == d.disk) {
                Some(p) => d.generation = p.generation,
                None => {
                    let g = match fresh {
                        Some(g) => g,
                        None => u64::try_from(self.store().events_head().await?).unwrap_or(0) + 1,
                    };
                    fresh = Some(g);
                    d.generation = g;
                }
            }
        }
        serde_json::to_value(&cfg).map_err(|e| Error::internal(e.to_string()))
    }

    /// Writes a config version equal to an earlier one, inside a revert saga whose locks cover the disks
    /// (their rules were checked under them).
    pub(crate) async fn vm_config_restore(&self, ctx: &Ctx, vm: Uuid, c: &ConfigRevert) -> Result<(), Error> {
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &vm.to_string()))?;
        let opts = WriteOpts {
            message: Some(c.message.clone()),
            dry_run: false,
            next_boot: false,
            disks_checked: true,
            ..Default::default()
        };
        let pre = Preconditions { if_match: None, lease_token: c.lease_token };
        self.vm_write_doc(ctx, rec, DocChange::Replace(c.doc.clone(), c.version), pre, opts).await.map(drop)
    }
}

/// A revert that failed; `stuck`: its undo failed too (what it did may still be there).
struct RevertFailed {
    error: Error,
    stuck: bool,
}

impl From<Error> for RevertFailed {
    fn from(error: Error) -> RevertFailed {
        RevertFailed { error, stuck: false }
    }
}

/// A snapshot to take.
struct Take {
    name: String,
    description: Option<String>,
    exclude: Vec<String>,
    kind: SnapshotKind,
    /// The guest's memory too (a running VM).
    memory: bool,
    consistency: covm_types::snapshot::Consistency,
}

impl Take {
    /// A safety snapshot named `PREFIX-<time>` (its raw disks left out, not refused).
    fn safety(prefix: &str, description: String) -> Take {
        let stamp = covm_store::now().format("%Y%m%dT%H%M%S%6fZ");
        Take {
            name: format!("{prefix}-{stamp}"),
            description: Some(description),
            exclude: vec![],
            kind: SnapshotKind::Safety,
            memory: false,
            consistency: Default::default(),
        }
    }
}

impl App {
    /// Before a change of `rec`: a safety snapshot of its disks if the VM's policy (or `forced`, from
    /// `?snapshot=true`) asks for one for this change. Taken under its own locks; None when none is due.
    pub(crate) async fn safety_before(
        &self,
        ctx: &Ctx,
        rec: &covm_store::VmRecord,
        new: Option<&covm_types::vm::VmConfig>,
        forced: bool,
    ) -> Result<Option<SnapshotView>, Error> {
        if !self.safety_due(rec, new, forced)? {
            return Ok(None);
        }
        let take = Take::safety("safety", format!("taken before a change of version {}", rec.version));
        self.snapshot_take(ctx, rec.object.id, take).await.map(Some)
    }

    /// Whether a change of `rec` to `new` (None: a disk leaving it) takes a safety snapshot first.
    pub(crate) fn safety_due(
        &self,
        rec: &covm_store::VmRecord,
        new: Option<&covm_types::vm::VmConfig>,
        forced: bool,
    ) -> Result<bool, Error> {
        let old = parse_config(&rec.config)?;
        let due = match new {
            // A change of the config: by what it changes.
            Some(new) => {
                let changes = super::change::field_changes(&old, new);
                !changes.is_empty()
                    && (forced
                        || match old.safety_snapshots {
                            SafetyPolicy::Always => true,
                            SafetyPolicy::Risky => super::change::risky(&changes),
                            SafetyPolicy::Off => false,
                        })
            }
            // A disk leaving the VM: risky by nature.
            None => forced || old.safety_snapshots != SafetyPolicy::Off,
        };
        Ok(due)
    }

    /// After the change: the safety snapshot learns the version it protects; a change that wrote no
    /// new version leaves nothing to protect, and its safety snapshot goes.
    pub(crate) async fn safety_after(&self, ctx: &Ctx, vm: Uuid, safety: Option<SnapshotView>, version: Option<i64>) {
        let Some(mut s) = safety else { return };
        let r = match version.filter(|v| *v > s.config_version) {
            Some(v) => {
                s.protects_version = Some(v);
                let data = json!({ "snapshot": s.id, "name": s.name, "protects_version": v });
                let ev = ctx.event("vm.snapshot.updated", "vm", Some(vm), &s.vm).data(data);
                let doc = serde_json::to_value(&s).unwrap_or_default();
                self.store().snapshot_update(s.id, doc, ev).await.map(|_| self.committed())
            }
            None => self.snapshot_remove(ctx, vm, s, false).await,
        };
        if let Err(e) = r {
            tracing::warn!(%vm, error = %e, "a safety snapshot could not be settled");
        }
    }

    /// The safety snapshot that protects version `n` of a VM: the present before the change that made it.
    pub(crate) async fn safety_for(&self, ctx: &Ctx, vm: &str, n: i64) -> Result<SnapshotView, Error> {
        let all = self.snapshots_list(ctx, vm).await?;
        all.into_iter().rev().find(|s| s.kind == SnapshotKind::Safety && s.protects_version == Some(n)).ok_or_else(
            || {
                Error::not_found("snapshot", &format!("{vm}: a safety snapshot that protects version {n}"))
                    .with_field("before_version")
            },
        )
    }

    /// Deletes the safety snapshots whose time is up (run now and then by the replica that runs
    /// background work).
    pub async fn snapshots_reap(&self) -> Result<usize, Error> {
        self.snapshots_reap_at(covm_store::now()).await
    }

    /// [`Self::snapshots_reap`] as if it were `now` (tests look ahead with it).
    pub async fn snapshots_reap_at(&self, now: chrono::DateTime<chrono::Utc>) -> Result<usize, Error> {
        let mut n = 0;
        for rec in self.store().snapshots_all().await? {
            let owner = self.store().object_get(rec.owner_id).await?;
            let disk = owner.as_ref().is_some_and(|o| o.kind == ObjectKind::Disk);
            let name = owner.map(|o| o.name).unwrap_or_default();
            let Ok(view) = view_of(&rec, &name) else { continue };
            if view.kind != SnapshotKind::Safety || view.pinned || view.expires_at.is_none_or(|e| e > now) {
                continue;
            }
            let ctx = Ctx::system("covm", None);
            match self.snapshot_remove(&ctx, rec.owner_id, view, disk).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(snapshot = %rec.id, error = %e, "an expired safety snapshot could not be deleted")
                }
            }
        }
        Ok(n)
    }
}

fn disk_view(v: SnapshotView) -> DiskSnapshotView {
    let tag = v.disks.first().map(|d| d.tag.clone()).unwrap_or_default();
    DiskSnapshotView {
        id: v.id,
        disk: v.vm,
        name: v.name,
        description: v.description,
        kind: v.kind,
        tag,
        created_by: v.created_by,
        created_at: v.created_at,
        expires_at: v.expires_at,
    }
}

impl App {
    /// A disk on its own: a visible disk object the caller may snapshot.
    async fn disk_for_snapshot(&self, ctx: &Ctx, disk: &str) -> Result<covm_store::ObjectRecord, Error> {
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        self.require(ctx, &o, Privilege::DiskSnapshot).await?;
        Ok(o)
    }

    /// The running VM that holds a disk now, if one does.
    async fn disk_running_holder(
        &self,
        o: &covm_store::ObjectRecord,
    ) -> Result<Option<covm_store::AttachmentRecord>, Error> {
        Ok(self.store().disk_attachments(&o.name, o.id).await?.into_iter().find(|a| a.power_state.is_active()))
    }

    /// Takes a snapshot of one disk (qcow2, not shared): through the QEMU of the VM running it, or with
    /// `qemu-img`.
    pub async fn disk_snapshot_create(
        &self,
        ctx: &Ctx,
        disk: &str,
        p: DiskSnapshotCreate,
    ) -> Result<DiskSnapshotView, Error> {
        let o = self.disk_for_snapshot(ctx, disk).await?;
        // Linked clones read it as it is (a snapshot writes into the image).
        self.linked_clones_refuse(&o.name, &[o.id]).await?;
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx, SnapshotCreateSaga::KIND, &[o.id]).await?;
            let take = Take {
                name: p.name.to_string(),
                description: p.description,
                exclude: vec![],
                kind: SnapshotKind::Manual,
                memory: false,
                consistency: Default::default(),
            };
            let tagged = match app.disk_snapshot_plan(&ctx, &o, &take).await {
                Ok(t) => t,
                Err(e) => return Err(guard.refuse(e).await),
            };
            Ok(disk_view(guard.run(&ctx, SnapshotCreateSaga(tagged)).await?.0.view))
        })
        .await
    }

    /// A disk snapshot's plan, with the disk locked: the rules, and how its tag is taken.
    async fn disk_snapshot_plan(&self, ctx: &Ctx, o: &covm_store::ObjectRecord, t: &Take) -> Result<Tagged, Error> {
        let sharing: Sharing = serde_json::from_value(o.spec["sharing"].clone()).unwrap_or_default();
        let format: DiskFormat = serde_json::from_value(o.spec["format"].clone()).unwrap_or_default();
        if sharing == Sharing::MultiWriter || format != DiskFormat::Qcow2 {
            return Err(Error::conflict(
                ErrorCode::SnapshotUnsupported,
                format!("{} cannot hold snapshots (only qcow2 disks that are not shared can)", o.name),
            ));
        }
        if self.store().snapshots_of(o.id).await?.iter().any(|s| s.name == t.name) {
            return Err(Error::conflict(
                ErrorCode::AlreadyExists,
                format!("{} has a snapshot named {}", o.name, t.name),
            )
            .with_field("name"));
        }
        let holder = self.disk_running_holder(o).await?;
        if let Some(h) = &holder
            && let Some(vm) = self.store().vm_get(h.vm_id).await?
        {
            self.agent_for(&vm)?;
        }
        let id = Uuid::now_v7();
        let now = covm_store::now();
        let view = SnapshotView {
            id,
            vm: o.name.clone(),
            name: t.name.clone(),
            description: t.description.clone(),
            kind: t.kind,
            config_version: 0,
            protects_version: None,
            memory: false,
            consistency: Default::default(),
            frozen_filesystems: None,
            disks: vec![SnapshotDisk { disk: o.name.clone(), disk_id: o.id, tag: snapshot_tag(id) }],
            excluded: vec![],
            parent: None,
            created_by: ctx.user.clone(),
            created_at: now,
            expires_at: (t.kind == SnapshotKind::Safety).then(|| now + self.config().safety_snapshot_ttl),
            pinned: false,
            partial: false,
        };
        let files = vec![Some(self.disk_file(o).await?)];
        let (live, via) = (holder.is_some(), holder.map(|h| h.vm_id));
        Ok(Tagged { vm_id: o.id, view, files, live, via, disk: true, state: None, qemu_ms: None })
    }

    pub async fn disk_snapshots_list(&self, ctx: &Ctx, disk: &str) -> Result<Vec<DiskSnapshotView>, Error> {
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        let all = self.store().snapshots_of(o.id).await?;
        all.iter().map(|s| view_of(s, &o.name).map(disk_view)).collect()
    }

    pub async fn disk_snapshot_delete(&self, ctx: &Ctx, disk: &str, snap: &str) -> Result<(), Error> {
        let o = self.disk_for_snapshot(ctx, disk).await?;
        // Linked clones read it as it is.
        self.linked_clones_refuse(&o.name, &[o.id]).await?;
        let s = self.snapshot_find(o.id, &o.name, snap).await?;
        let view = view_of(&s, &o.name)?;
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move { app.snapshot_remove(&ctx, o.id, view, true).await }).await
    }

    /// Puts a disk back to its snapshot; refused while a running VM holds it.
    pub async fn disk_snapshot_revert(&self, ctx: &Ctx, disk: &str, snap: &str) -> Result<DiskSnapshotView, Error> {
        let o = self.disk_for_snapshot(ctx, disk).await?;
        let s = self.snapshot_find(o.id, &o.name, snap).await?;
        let view = view_of(&s, &o.name)?;
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx, SnapshotRevertSaga::KIND, &[o.id]).await?;
            if let Some(h) = app.disk_running_holder(&o).await? {
                return Err(guard.refuse(vm_running(&h.vm_name)).await);
            }
            // The present first, as a safety snapshot of the disk (the saga's first step).
            let take = Take::safety("before-revert", format!("taken before reverting {} to {}", o.name, view.name));
            let safety = match app.disk_snapshot_plan(&ctx, &o, &take).await {
                Ok(t) => t,
                Err(e) => return Err(guard.refuse(e).await),
            };
            let files = vec![Some(app.disk_file(&o).await?)];
            let to = Tagged {
                vm_id: o.id,
                view: view.clone(),
                files,
                live: false,
                via: None,
                disk: true,
                state: None,
                qemu_ms: None,
            };
            let safety_tags = vec![Some(safety.view.disks[0].tag.clone())];
            let saga = SnapshotRevertSaga { to, safety_tags, data: true, config: None, safety: Some(safety) };
            guard.run(&ctx, saga).await?;
            Ok(disk_view(view))
        })
        .await
    }
}

impl App {
    /// Before a VM is deleted: its own snapshots must go first (409 naming them; their tags live in
    /// disks that outlive the VM); its safety snapshots go with it.
    pub(crate) async fn vm_snapshots_release(&self, ctx: &Ctx, rec: &covm_store::VmRecord) -> Result<(), Error> {
        let mut safety = Vec::new();
        let mut manual = Vec::new();
        for s in self.store().snapshots_of(rec.object.id).await? {
            let v = view_of(&s, &rec.object.name)?;
            match v.kind {
                SnapshotKind::Manual => manual.push(v.name),
                SnapshotKind::Safety => safety.push(v),
            }
        }
        if !manual.is_empty() {
            return Err(Error::conflict(
                ErrorCode::InUse,
                format!("{} has snapshots ({}); delete them first", rec.object.name, manual.join(", ")),
            ));
        }
        if running(rec) {
            // The delete refuses a running VM anyway; its safety snapshots stay.
            return Ok(());
        }
        for v in safety {
            self.snapshot_remove(ctx, rec.object.id, v, false).await?;
        }
        Ok(())
    }
}
