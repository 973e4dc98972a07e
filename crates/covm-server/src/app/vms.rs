//! VMs as versioned documents: create, change (JSON Merge Patch), history, diff, revert, delete.
//!
//! A change is decided inside one store transaction (`Store::vm_write`): the patch is merged into the
//! newest version as it is *in* the transaction, so two concurrent changes without `If-Match` both land,
//! one after the other, and neither is lost. With `If-Match` a change whose base is not the newest
//! version is refused (412) with what changed since, so the client can rebase without asking again.
//!
//! Checks that need the database (does the network exist? may the caller assign this pool?) run before
//! the transaction, on the document merged with the newest version read then; inside the
//! transaction the same references are compared again, and a change whose references moved under it
//! is retried from the start.

use std::collections::BTreeSet;
use std::sync::Arc;

use covm_store::{ConfigWrite, NewObject, VersionRecord, VmFilter, VmRecord, VmWrite, WriteOutcome, Written};
use covm_types::api::{ObjectKind, Page};
use covm_types::error::StaleDetails;
use covm_types::vm::{
    ChangePlan, DiffView, LeaseView, RevertRequest, VersionQuery, VersionView, VmChangeQuery, VmConfig, VmListQuery,
    VmRuntime, VmView,
};
use covm_types::{Error, ErrorCode, ErrorKind, Privilege, ROOT_ID};
use serde_json::{Value, json};
use uuid::Uuid;

use super::change::{Asked, decide, references};
use super::leases::{LeaseCheck, lease_check};
use super::{App, Ctx, EventExt};

const RETRIES: usize = 20;

/// What a change request carries besides its body.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// `If-Match`: the version the client based its change on.
    pub if_match: Option<i64>,
    /// `Covm-Lease`: the fencing token of the caller's lease.
    pub lease_token: Option<i64>,
}

pub(crate) fn running(vm: &VmRecord) -> bool {
    vm.power_state.is_active()
}

/// One line per changed leaf: `memory_mib: 2048 → 4096`.
pub fn diff_summary(from: &Value, to: &Value) -> Vec<String> {
    fn show(v: Option<&Value>) -> String {
        match v {
            None | Some(Value::Null) => "(none)".into(),
            Some(v) => v.to_string(),
        }
    }
    fn walk(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k), y.get(k), out);
                }
            }
            (a, b) if a != b => out.push(format!("{path}: {} → {}", show(a), show(b))),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", Some(from), Some(to), &mut out);
    out
}

fn patch_of(from: &Value, to: &Value) -> Value {
    serde_json::to_value(json_patch::diff(from, to)).unwrap_or(Value::Array(vec![]))
}

pub(crate) fn parse_config(doc: &Value) -> Result<VmConfig, Error> {
    let v = serde_json::to_vec(doc).map_err(|_| Error::internal("could not render a config"))?;
    super::json::json_parse(&v)
}

/// A MAC in QEMU's locally administered range.
pub(crate) fn mac_new() -> String {
    let b: [u8; 3] = rand::random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn version_view(v: &VersionRecord, with_config: bool) -> VersionView {
    VersionView {
        version: v.version,
        author: v.author.clone(),
        time: v.time,
        message: v.message.clone(),
        request_id: v.request_id.clone(),
        patch: v.patch.clone(),
        event_seq: v.event_seq,
        config: if with_config { serde_json::from_value(v.config.clone()).ok() } else { None },
    }
}

impl App {
    pub(crate) fn vm_view(&self, ctx: Option<&Ctx>, r: &VmRecord) -> Result<VmView, Error> {
        let config: VmConfig = serde_json::from_value(r.config.clone())
            .map_err(|e| Error::internal(format!("the stored config of {} does not read: {e}", r.object.name)))?;
        let runtime: VmRuntime = super::node::runtime_of(r);
        let now = chrono::Utc::now();
        let lease = r.lease.as_ref().filter(|l| l.expires_at > now).map(|l| LeaseView {
            holder: l.holder.clone(),
            acquired_at: l.acquired_at,
            expires_at: l.expires_at,
            token: ctx.filter(|c| c.user_id == l.holder_id).map(|_| l.token),
        });
        Ok(VmView {
            id: r.object.id,
            name: r.object.name.clone(),
            path: r.object.path.clone(),
            version: r.version,
            config,
            runtime,
            lease,
        })
    }

    /// A VM the caller may view.
    pub(crate) async fn vm_resolve(&self, ctx: &Ctx, vm: &str) -> Result<VmRecord, Error> {
        // A bare name (the usual case) is one read of the object and its VM row.
        if covm_types::Name::parse(vm).is_ok() && Uuid::parse_str(vm).is_err() {
            let mut rec =
                self.store().vm_by_name(vm).await?.ok_or_else(|| Error::not_found("vm", vm).with_field("vm"))?;
            rec.object = self.viewable(ctx, rec.object, "vm", vm, "vm").await?;
            return Ok(rec);
        }
        let obj = self.object_resolve(ctx, vm, Some(ObjectKind::Vm), "vm").await?;
        self.store().vm_get(obj.id).await?.ok_or_else(|| Error::not_found("vm", vm))
    }

    /// Changing an annotation whose key a grant's condition names needs `Permissions.Modify` on the VM.
    async fn annotation_change_check(
        &self,
        ctx: &Ctx,
        vm: &covm_store::ObjectRecord,
        old: &std::collections::BTreeMap<String, String>,
        new: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), Error> {
        if old == new || ctx.system {
            return Ok(());
        }
        let guarded = self.store().condition_annotation_keys().await?;
        let touched = old.keys().chain(new.keys()).any(|k| old.get(k) != new.get(k) && guarded.contains(k));
        if touched {
            self.require(ctx, vm, Privilege::PermissionsModify).await?;
        }
        Ok(())
    }

    /// The privileges a change from `old` to `new` needs on the VM (DESIGN §7, per field).
    pub async fn vm_create(&self, ctx: &Ctx, mut c: VmConfig) -> Result<VmView, Error> {
        for n in &mut c.nics {
            if n.mac.is_none() {
                n.mac = Some(mac_new());
            }
        }
        c.check(self.host_memory_mib())?;
        if c.disks.is_empty() {
            return self.vm_create_locked(ctx, Uuid::now_v7(), c, "created", json!({})).await;
        }
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.disk_refs_lock(&ctx, None, &c).await?;
            let r = app.vm_create_locked(&ctx, Uuid::now_v7(), c, "created", json!({})).await;
            if let Some(g) = guard {
                g.release().await;
            }
            r
        })
        .await
    }

    /// Writes a new VM (version 1) with the id `id`, its references authorized; `data` goes into its
    /// `vm.created` entry beside folder, pool, CPUs and memory.
    pub(crate) async fn vm_create_locked(
        &self,
        ctx: &Ctx,
        id: Uuid,
        mut c: VmConfig,
        message: &str,
        data: Value,
    ) -> Result<VmView, Error> {
        let folder = self.object_resolve(ctx, &c.folder, Some(ObjectKind::Folder), "folder").await?;
        if !c.disks.is_empty() {
            // The new VM inherits the folder's grants: attaching disks is asked of the folder.
            self.require(ctx, &folder, Privilege::VmConfigAddExistingDisk).await?;
        }
        let folder = self.config_refs_authorize(ctx, None, None, folder.id, &mut c, false).await?;
        let doc = serde_json::to_value(&c).map_err(|_| Error::internal("could not render a config"))?;
        let patch = patch_of(&json!({}), &doc);
        let mut d = json!({ "folder": c.folder, "pool": c.pool, "cpus": c.cpus, "memory_mib": c.memory_mib });
        if let (Some(d), Some(extra)) = (d.as_object_mut(), data.as_object()) {
            d.extend(extra.clone());
        }
        let ev = ctx.event("vm.created", "vm", Some(id), c.name.as_str()).data(d);
        let ev = covm_store::NewEvent { version_after: Some(1), patch: Some(patch.clone()), ..ev };
        let write = ConfigWrite {
            config: doc,
            name: c.name.to_string(),
            parent_id: folder,
            author: ctx.user.clone(),
            message: Some(message.into()),
            request_id: Some(ctx.req.id.clone()),
            patch,
        };
        let object =
            NewObject { id, kind: ObjectKind::Vm, name: c.name.to_string(), parent_id: folder, spec: json!({}) };
        let (vm, _) = self.store().vm_create(object, write, ev).await?;
        self.committed();
        self.vm_view(Some(ctx), &vm)
    }

    pub async fn vm_get(&self, ctx: &Ctx, vm: &str) -> Result<VmView, Error> {
        let r = self.vm_resolve(ctx, vm).await?;
        self.vm_view(Some(ctx), &r)
    }

    pub async fn vms_list(&self, ctx: &Ctx, q: VmListQuery) -> Result<Page<VmView>, Error> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let folder = match &q.folder {
            Some(f) => Some(self.object_resolve(ctx, f, Some(ObjectKind::Folder), "folder").await?.id),
            None => None,
        };
        let filter = VmFilter { folder, name_prefix: q.name, power_state: q.power_state, after: q.after, limit };
        let items = self.store().vms_list(Some(&self.viewer(ctx).await?), filter).await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|v| v.object.name.clone())).flatten();
        let items = items.iter().map(|r| self.vm_view(Some(ctx), r)).collect::<Result<_, _>>()?;
        Ok(Page { items, next })
    }

    /// Applies a JSON Merge Patch (RFC 7386) to the newest version. Returns the VM after the change, or
    /// with `dry_run` the plan and no change.
    pub async fn vm_change(
        &self,
        ctx: &Ctx,
        vm: &str,
        merge: Value,
        pre: Preconditions,
        q: VmChangeQuery,
    ) -> Result<(VmView, ChangePlan), Error> {
        if !merge.is_object() {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::InvalidPatch,
                "a change is a JSON object (RFC 7386)",
            ));
        }
        let rec = self.vm_resolve(ctx, vm).await?;
        // A NIC sent without a MAC gets one now, as at create (a NAT network pins its address to it,
        // and QEMU names the NIC after it).
        let mut merge = merge;
        if let Some(nics) = merge.get_mut("nics").and_then(Value::as_array_mut) {
            for n in nics.iter_mut().filter_map(Value::as_object_mut) {
                if n.get("mac").is_none_or(Value::is_null) {
                    n.insert("mac".into(), json!(mac_new()));
                }
            }
        }
        let next_boot = q.apply == Some(covm_types::vm::ApplyMode::NextBoot);
        let opts = WriteOpts { message: q.message, dry_run: q.dry_run, next_boot, ..Default::default() };
        let change = DocChange::Merge(merge);
        if q.dry_run {
            return self.vm_write_doc(ctx, rec, change, pre, opts).await;
        }
        self.vm_write_guarded(ctx, rec, change, pre, opts, q.snapshot).await
    }

    /// A change or a revert, with the safety snapshot the VM's policy (or `forced`) asks for before it:
    /// a stale base is refused before anything is taken, and the change's own checks (privileges,
    /// references, refusals) run first, so nobody takes a snapshot with a change they may not make.
    async fn vm_write_guarded(
        &self,
        ctx: &Ctx,
        rec: VmRecord,
        change: DocChange,
        pre: Preconditions,
        opts: WriteOpts,
        forced: bool,
    ) -> Result<(VmView, ChangePlan), Error> {
        if let Some(v) = pre.if_match.filter(|v| *v != rec.version) {
            return Err(self.stale_error(&rec, v).await);
        }
        let new = parse_config(&change.apply(&rec.config)).ok();
        let id = rec.object.id;
        if self.safety_due(&rec, new.as_ref(), forced)? {
            let check = WriteOpts { dry_run: true, events: vec![], message: None, ..opts };
            self.vm_write_doc(ctx, rec.clone(), change.clone(), pre.clone(), check).await?;
        }
        let safety = self.safety_before(ctx, &rec, new.as_ref(), forced).await?;
        let r = self.vm_write_doc(ctx, rec, change, pre, opts).await;
        self.safety_after(ctx, id, safety, r.as_ref().ok().map(|(v, _)| v.version)).await;
        r
    }

    /// Writes a new version whose content is version `K`'s.
    pub async fn vm_revert(&self, ctx: &Ctx, vm: &str, r: RevertRequest, pre: Preconditions) -> Result<VmView, Error> {
        // To before a version: the safety snapshot that protects it, config and data by the scope.
        if let Some(n) = r.before_version {
            if r.version.is_some() {
                return Err(Error::invalid("before_version", "send version or before_version, not both"));
            }
            let safety = self.safety_for(ctx, vm, n).await?;
            let scope = r.scope.unwrap_or(covm_types::snapshot::RevertScope::Both);
            let p = covm_types::snapshot::SnapshotRevert { scope, memory: false, skip_moved: false };
            return self.snapshot_revert(ctx, vm, &safety.id.to_string(), p, pre).await;
        }
        let version = r.version.ok_or_else(|| {
            Error::new(ErrorKind::InvalidRequest, ErrorCode::MissingField, "the field version is required")
                .with_field("version")
        })?;
        let rec = self.vm_resolve(ctx, vm).await?;
        let old = self
            .store()
            .vm_version(rec.object.id, version)
            .await?
            .ok_or_else(|| Error::invalid("version", format!("{} has no version {}", rec.object.name, version)))?;
        let message = r.message.unwrap_or_else(|| format!("revert to version {version}"));
        let opts = WriteOpts { message: Some(message), dry_run: false, next_boot: r.next_boot, ..Default::default() };
        let change = DocChange::Replace(old.config, version);
        Ok(self.vm_write_guarded(ctx, rec, change, pre, opts, false).await?.0)
    }

    pub(crate) async fn vm_write_doc(
        &self,
        ctx: &Ctx,
        rec: VmRecord,
        change: DocChange,
        pre: Preconditions,
        opts: WriteOpts,
    ) -> Result<(VmView, ChangePlan), Error> {
        if let Some(m) = &opts.message
            && m.len() > 1024
        {
            return Err(Error::invalid("message", "a message has at most 1024 bytes"));
        }
        // A stale base is answered from what was read, without waiting for the writer (the write
        // transaction checks again, for the races in between).
        if let Some(v) = pre.if_match.filter(|v| *v != rec.version) {
            return Err(self.stale_error(&rec, v).await);
        }
        if opts.disks_checked || !change.touches_disks() {
            return self.vm_write_doc_locked(ctx, rec, change, pre, opts).await;
        }
        // A change that sets the disks holds the VM's and the disks' locks (those it had and those it
        // names) until it is written, as an attach does; it runs to its end even if the client goes,
        // so the locks are always released. It starts from the VM as it is once the locks are held.
        let (app, ctx) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let new = parse_config(&change.apply(&rec.config))?;
            let guard = app.disk_refs_lock(&ctx, Some(&rec), &new).await?;
            let r = match app.store().vm_get(rec.object.id).await {
                Ok(Some(rec)) => app.vm_write_doc_locked(&ctx, rec, change, pre, opts).await,
                Ok(None) => Err(Error::not_found("vm", &rec.object.name)),
                Err(e) => Err(e),
            };
            if let Some(g) = guard {
                g.release().await;
            }
            r
        })
        .await
    }

    async fn vm_write_doc_locked(
        &self,
        ctx: &Ctx,
        mut rec: VmRecord,
        change: DocChange,
        pre: Preconditions,
        opts: WriteOpts,
    ) -> Result<(VmView, ChangePlan), Error> {
        let WriteOpts {
            message,
            dry_run,
            next_boot: apply_next_boot,
            disks_checked,
            disks_live,
            events: extra,
            template_op,
            nics_live,
        } = opts;
        let host_mem = self.host_memory_mib();
        for _ in 0..RETRIES {
            // Outside the transaction: the whole document, decided and checked against the inventory
            // and privileges. (With a stale If-Match the transaction refuses the write; these checks
            // are then moot.)
            let asked = Asked { next_boot: apply_next_boot, disks_live, nics_live };
            let name = rec.object.name.clone();
            let old_cfg: VmConfig = parse_config(&rec.config)?;
            let asked_cfg = parse_config(&change.apply(&rec.config))?;
            template_check(&name, &old_cfg, &asked_cfg, template_op, running(&rec))?;
            let raw = decide(&name, &old_cfg, running(&rec), asked_cfg, host_mem, asked)?;
            for p in &raw.privileges {
                self.require(ctx, &rec.object, *p).await?;
            }
            // Annotations that a grant's conditions name decide privileges: changing them is changing
            // permissions (else an editor could meet a condition and give itself a grant's role).
            self.annotation_change_check(ctx, &rec.object, &old_cfg.annotations, &raw.config.annotations).await?;
            let checked = raw.privileges.clone();
            let parent = rec.object.parent_id.unwrap_or(ROOT_ID);
            let (refs, raw_disks) = (raw.references.clone(), raw.config.disks.clone());
            let (base_refs, base_disks) = (references(&old_cfg), old_cfg.disks.clone());
            let mut new_cfg = raw.config;
            let folder = self
                .config_refs_authorize(
                    ctx,
                    Some(&rec.object),
                    Some(&old_cfg),
                    parent,
                    &mut new_cfg,
                    disks_checked || !change.touches_disks(),
                )
                .await?;
            let settled_disks = new_cfg.disks.clone();
            // The decision on the config as it would be written (disk names and generations settled).
            let decision = decide(&name, &old_cfg, running(&rec), new_cfg, host_mem, asked)?;
            let (live, next_boot, fields) = (decision.live.clone(), decision.next_boot.clone(), decision.fields());
            if dry_run {
                let new_doc = serde_json::to_value(&decision.config).unwrap_or_default();
                let plan = ChangePlan {
                    from_version: rec.version,
                    patch: patch_of(&rec.config, &new_doc),
                    summary: diff_summary(&rec.config, &new_doc),
                    fields,
                    live,
                    next_boot,
                    refused: decision.refusal.map(|e| e.message.clone()),
                };
                return Ok((self.vm_view(Some(ctx), &rec)?, plan));
            }

            // Inside the transaction: the same decision on the newest version; what was checked must
            // still hold, else everything is checked again.
            let (c2, pre2, msg, user, user_id, req_id) =
                (change.clone(), pre.clone(), message.clone(), ctx.user.clone(), ctx.user_id, ctx.req.id.clone());
            let ctx2 = ctx.clone();
            let system = ctx.system;
            let extra = extra.clone();
            let write = Box::new(move |vm: &VmRecord, at: chrono::DateTime<chrono::Utc>| {
                if let Some(v) = pre2.if_match
                    && v != vm.version
                {
                    return Ok(WriteOutcome::Stale { current_version: vm.version, your_version: v });
                }
                match lease_check(vm, user_id, pre2.lease_token, at) {
                    LeaseCheck::Refused(e) if !system => return Err(e),
                    _ => {}
                }
                let base_now = parse_config(&vm.config)?;
                let asked_now = parse_config(&c2.apply(&vm.config))?;
                template_check(&name, &base_now, &asked_now, template_op, running(vm))?;
                let raw = decide(&name, &base_now, running(vm), asked_now, host_mem, asked)?;
                if !raw.privileges.is_subset(&checked) {
                    return Ok(WriteOutcome::Retry("the change needs other privileges now".into()));
                }
                // Checks were skipped for references the base already held: they hold only if the base
                // still holds the same ones.
                if raw.references != refs || raw.config.disks != raw_disks || references(&base_now) != base_refs {
                    return Ok(WriteOutcome::Retry("references changed".into()));
                }
                if base_now.disks != base_disks {
                    return Ok(WriteOutcome::Retry("the disks changed".into()));
                }
                // The disk attachments as checked (names and generations settled).
                let mut cfg = raw.config;
                cfg.disks = settled_disks.clone();
                let decision = decide(&name, &base_now, running(vm), cfg, host_mem, asked)?;
                let cfg = decision.config;
                let new_doc = serde_json::to_value(&cfg).map_err(|_| Error::internal("could not render a config"))?;
                if new_doc == vm.config {
                    // Already so: nothing to write.
                    return Ok(WriteOutcome::Unchanged);
                }
                // A running VM takes live fields at once; next-boot ones wait (if asked) or are refused.
                if let Some(e) = decision.refusal {
                    return Err(e);
                }
                let mut runtime = None;
                let waiting =
                    decision.next_boot.iter().any(|f| !(disks_live && f == "disks" || nics_live && f == "nics"));
                if running(vm) {
                    let mut rt = super::node::runtime_of(vm);
                    if !waiting && rt.running_version == Some(vm.version) {
                        rt.running_version = Some(vm.version + 1);
                        let mut v = serde_json::to_value(&rt).unwrap_or_default();
                        v.as_object_mut().map(|o| o.remove("generation"));
                        runtime = Some(covm_store::RuntimeWrite {
                            power_state: vm.power_state,
                            runtime: v,
                            bump_generation: false,
                        });
                    }
                }
                let patch = patch_of(&vm.config, &new_doc);
                let summary = diff_summary(&vm.config, &new_doc);
                let moved = vm.config["folder"] != new_doc["folder"];
                let mut data = json!({ "message": msg, "summary": summary, "moved": moved });
                // Grants may be conditioned on annotations: a change of them can change privileges.
                if vm.config["annotations"] != new_doc["annotations"] {
                    data["annotations_changed"] = json!(true);
                }
                if let DocChange::Replace(_, k) = &c2 {
                    data["reverted_to"] = json!(k);
                }
                let ev = ctx2.event("vm.config.changed", "vm", Some(vm.object.id), cfg.name.as_str()).data(data);
                let ev = covm_store::NewEvent {
                    version_before: Some(vm.version),
                    version_after: Some(vm.version + 1),
                    patch: Some(patch.clone()),
                    ..ev
                };
                Ok(WriteOutcome::from(VmWrite {
                    runtime,
                    config: Some(ConfigWrite {
                        config: new_doc,
                        name: cfg.name.to_string(),
                        parent_id: folder,
                        author: user,
                        message: msg,
                        request_id: Some(req_id),
                        patch,
                    }),
                    events: std::iter::once(ev).chain(extra.iter().cloned()).collect(),
                    ..Default::default()
                }))
            });
            let written = match self.store().vm_write(rec.object.id, write).await? {
                Written::Done { vm, events } => Ok((vm, events)),
                Written::Unchanged(vm) => Ok((Some(vm), vec![])),
                Written::Retry(why) => Err(why),
                Written::Stale { vm, your_version } => return Err(self.stale_error(&vm, your_version).await),
            };
            match written {
                Ok((after, events)) => {
                    if !events.is_empty() {
                        self.committed();
                    }
                    let after = after.ok_or_else(|| Error::internal("the VM vanished during a change"))?;
                    if events
                        .iter()
                        .any(|e| e.data["moved"] == json!(true) || e.data["annotations_changed"] == json!(true))
                    {
                        self.caches().authz_changed();
                    }
                    if !events.is_empty() && running(&after) {
                        self.nic_links_apply(&rec, &after).await;
                    }
                    let plan = ChangePlan {
                        live: live.clone(),
                        next_boot: next_boot.clone(),
                        refused: None,
                        from_version: after.version - i64::from(!events.is_empty()),
                        patch: events.first().and_then(|e| e.patch.clone()).unwrap_or(json!([])),
                        summary: events
                            .first()
                            .and_then(|e| serde_json::from_value(e.data["summary"].clone()).ok())
                            .unwrap_or_default(),
                        fields,
                    };
                    return Ok((self.vm_view(Some(ctx), &after)?, plan));
                }
                Err(why) => {
                    tracing::debug!(vm = %rec.object.name, why, "a change is checked again");
                    rec = self
                        .store()
                        .vm_get(rec.object.id)
                        .await?
                        .ok_or_else(|| Error::not_found("vm", &rec.object.name))?;
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            ErrorCode::Busy,
            "the VM changed too often while this change was checked; try again",
        ))
    }

    /// A 412 that tells the client what changed since its version, so it can rebase.
    pub(crate) async fn stale_error(&self, current: &VmRecord, mine: i64) -> Error {
        let id = current.object.id;
        let latest = self.vm_version_cached(id, current.version).await;
        let theirs = self.vm_version_cached(id, mine).await;
        let details = StaleDetails {
            current_version: current.version,
            your_version: mine,
            author: latest.as_ref().map(|l| l.author.clone()),
            time: latest.as_ref().map(|l| l.time),
            message: latest.as_ref().and_then(|l| l.message.clone()),
            patch: theirs.as_ref().map(|t| patch_of(&t.config, &current.config)),
            summary: theirs.as_ref().map(|t| diff_summary(&t.config, &current.config)),
        };
        let who = latest.map(|l| format!(" by {}", l.author)).unwrap_or_default();
        Error::new(
            ErrorKind::PreconditionFailed,
            ErrorCode::VersionMismatch,
            format!(
                "{} changed since your version {mine}: it is at version {}{who}; rebase your change on it",
                current.object.name, current.version
            ),
        )
        .with_details(serde_json::to_value(details).unwrap_or_default())
    }

    /// A config version (immutable, so cached once read).
    async fn vm_version_cached(&self, id: Uuid, version: i64) -> Option<Arc<VersionRecord>> {
        if let Some(v) = self.caches().version_get(id, version) {
            return Some(v);
        }
        let v = Arc::new(self.store().vm_version(id, version).await.ok().flatten()?);
        self.caches().version_put(id, version, v.clone());
        Some(v)
    }

    pub async fn vm_delete(&self, ctx: &Ctx, vm: &str, pre: Preconditions) -> Result<(), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmInventoryDelete).await?;
        let cfg = parse_config(&rec.config)?;
        if cfg.template {
            let mut ids = Vec::new();
            for a in &cfg.disks {
                if let Some(d) = self.object_lookup(&a.disk, Some(ObjectKind::Disk)).await? {
                    ids.push(d.id);
                }
            }
            self.linked_clones_refuse(&format!("template {}", rec.object.name), &ids).await?;
        }
        self.vm_snapshots_release(ctx, &rec).await?;
        let ctx2 = ctx.clone();
        let write = Box::new(move |vm: &VmRecord, at: chrono::DateTime<chrono::Utc>| {
            if let Some(v) = pre.if_match
                && v != vm.version
            {
                return Err(Error::new(
                    ErrorKind::PreconditionFailed,
                    ErrorCode::VersionMismatch,
                    format!("{} is at version {}, not {v}", vm.object.name, vm.version),
                ));
            }
            if let LeaseCheck::Refused(e) = lease_check(vm, ctx2.user_id, pre.lease_token, at) {
                return Err(e);
            }
            if vm.power_state.is_active() {
                return Err(Error::conflict(
                    ErrorCode::VmRunning,
                    format!("{} is {}; power it off first", vm.object.name, vm.power_state.as_str()),
                ));
            }
            let ev = ctx2
                .event("vm.deleted", "vm", Some(vm.object.id), &vm.object.name)
                .scope(vm.object.parent_id.unwrap_or(ROOT_ID))
                .data(json!({ "path": vm.object.path, "version": vm.version }));
            Ok(WriteOutcome::from(VmWrite { delete: true, events: vec![ev], ..Default::default() }))
        });
        self.store().vm_write(rec.object.id, write).await?;
        self.committed();
        let dir = self.agent().run_dir(rec.object.id);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a deleted VM's run directory");
        }
        Ok(())
    }

    pub async fn vm_versions(&self, ctx: &Ctx, vm: &str, q: VersionQuery) -> Result<Page<VersionView>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let limit = q.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let items = self.store().vm_versions(rec.object.id, q.before, limit).await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|v| v.version.to_string())).flatten();
        Ok(Page { items: items.iter().map(|v| version_view(v, false)).collect(), next })
    }

    pub async fn vm_version(&self, ctx: &Ctx, vm: &str, n: i64) -> Result<VersionView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let v = self
            .store()
            .vm_version(rec.object.id, n)
            .await?
            .ok_or_else(|| Error::not_found("version", &format!("{} of {}", n, rec.object.name)))?;
        Ok(version_view(&v, true))
    }

    pub async fn vm_diff(&self, ctx: &Ctx, vm: &str, from: i64, to: i64) -> Result<DiffView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let get = async |n: i64, field: &str| {
            self.store()
                .vm_version(rec.object.id, n)
                .await?
                .ok_or_else(|| Error::invalid(field, format!("{} has no version {n}", rec.object.name)))
        };
        let a = get(from, "from").await?;
        let b = get(to, "to").await?;
        Ok(DiffView { from, to, patch: patch_of(&a.config, &b.config), summary: diff_summary(&a.config, &b.config) })
    }

    /// Sets NIC links that a live change turned up or down.
    async fn nic_links_apply(&self, before: &VmRecord, after: &VmRecord) {
        let (Ok(a), Ok(b)) = (parse_config(&before.config), parse_config(&after.config)) else { return };
        if a.nics.len() != b.nics.len() {
            return;
        }
        for (i, (x, y)) in a.nics.iter().zip(&b.nics).enumerate() {
            if x.connected != y.connected {
                let up = y.connected;
                let mac = y.mac.clone().unwrap_or_default();
                if let Err(e) = self.agent().ask(after.object.id, super::agent::VmOp::SetLink(mac, up)).await {
                    tracing::warn!(vm = %after.object.name, nic = i, error = %e, "could not set the link");
                }
            }
        }
    }

    pub(crate) fn host_memory_mib(&self) -> u64 {
        static MEMORY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        *MEMORY.get_or_init(|| super::host::host_facts().memory_mib)
    }
}

/// How a document write behaves.
#[derive(Default)]
pub(crate) struct WriteOpts {
    pub message: Option<String>,
    pub dry_run: bool,
    /// `apply=next_boot`.
    pub next_boot: bool,
    /// The disks change comes from an attach or detach saga, whose rules were checked under its locks.
    pub disks_checked: bool,
    /// The disks change was already applied to the running QEMU (hot-plug): it is live.
    pub disks_live: bool,
    /// More log entries to write with the version (a disk's `disk.attached`, …).
    pub events: Vec<covm_store::NewEvent>,
    /// The write is `POST /vms/{vm}/template`: the only one that may set `template` (and the only one
    /// a template takes).
    pub template_op: bool,
    /// The NICs change was already applied to the running QEMU (hot-plug): it is live.
    pub nics_live: bool,
}

/// A template is read-only, and only the template operation makes one.
fn template_check(name: &str, old: &VmConfig, new: &VmConfig, template_op: bool, running: bool) -> Result<(), Error> {
    if template_op {
        if running {
            return Err(Error::conflict(
                ErrorCode::VmRunning,
                format!("{name} is running; power it off before making it a template"),
            ));
        }
        return Ok(());
    }
    if old.template {
        return Err(Error::conflict(
            ErrorCode::VmIsTemplate,
            format!("{name} is a template: it is read-only; clone it to make a VM to change"),
        ));
    }
    if new.template {
        return Err(Error::invalid("template", "a VM becomes a template with POST /vms/{vm}/template, not a change"));
    }
    Ok(())
}

/// How a write makes the new document from the newest one.
#[derive(Debug, Clone)]
pub(crate) enum DocChange {
    /// RFC 7386.
    Merge(Value),
    /// Revert: version K's document.
    Replace(Value, i64),
}

impl DocChange {
    /// Whether the change may set the disk attachments (a merge that names them, or a revert).
    fn touches_disks(&self) -> bool {
        match self {
            DocChange::Merge(m) => m.get("disks").is_some(),
            DocChange::Replace(..) => true,
        }
    }

    fn apply(&self, base: &Value) -> Value {
        match self {
            DocChange::Merge(m) => {
                let mut doc = base.clone();
                json_patch::merge(&mut doc, m);
                doc
            }
            DocChange::Replace(doc, _) => doc.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_like_a_person_would_write_them() {
        let a = json!({ "memory_mib": 2048, "annotations": { "owner": "ann" }, "cpus": 1 });
        let b = json!({ "memory_mib": 4096, "annotations": { "owner": "bob", "team": "x" }, "cpus": 1 });
        assert_eq!(
            diff_summary(&a, &b),
            ["annotations.owner: \"ann\" → \"bob\"", "annotations.team: (none) → \"x\"", "memory_mib: 2048 → 4096"]
        );
        assert!(diff_summary(&a, &a).is_empty());
    }

    #[test]
    fn merge_and_patch_replay() {
        let base = json!({ "name": "a", "cpus": 1, "annotations": { "k": "v" } });
        let new = DocChange::Merge(json!({ "cpus": 2, "annotations": { "k": null, "j": "w" } })).apply(&base);
        assert_eq!(new, json!({ "name": "a", "cpus": 2, "annotations": { "j": "w" } }));
        let p: json_patch::Patch = serde_json::from_value(patch_of(&base, &new)).unwrap();
        let mut replay = base.clone();
        json_patch::patch(&mut replay, &p).unwrap();
        assert_eq!(replay, new);
        assert_eq!(crate::app::change::changed_fields(&base, &new), ["annotations", "cpus"]);
    }
}
