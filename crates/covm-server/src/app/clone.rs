//! Templates and clones (DESIGN §19). A template is a VM marked read-only (`POST /vms/{vm}/template`):
//! it is never powered on or changed, and its disks never change while linked clones read them. A
//! clone (`POST /vms/{vm}/clone`) is a new VM with new disks — full copies, or qcow2 overlays on the
//! template's disks (linked) — and new MAC addresses; with `customize`, a new cloud-init identity too.
//! It runs as a saga (`saga/clone.rs`): a failure or a crash leaves neither a VM nor a disk behind.

use covm_store::ObjectRecord;
use covm_types::api::ObjectKind;
use covm_types::disk::{DiskFormat, Sharing};
use covm_types::vm::{CloudInit, DiskAttachment, VmClone, VmConfig, VmView};
use covm_types::{Error, ErrorCode, Name, Privilege};
use serde_json::json;
use uuid::Uuid;

use super::disks::{format_of, spec_str, wrapped_key};
use super::saga::clone::CloneSaga;
use super::saga::disk::{CreateSaga, DiskRecord, Source};
use super::vms::{DocChange, Preconditions, WriteOpts, mac_new, parse_config};
use super::{App, Ctx};

/// A host name made of a VM's name: what RFC 1123 does not allow becomes `-`.
pub(crate) fn hostname_of(name: &str) -> String {
    let h: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let h = h.trim_matches('-').chars().take(63).collect::<String>();
    if h.is_empty() { "vm".into() } else { h }
}

/// What a linked clone's overlay takes of a datastore at first: qcow2's header and tables.
const OVERLAY_BYTES: u64 = 1 << 20;

impl App {
    /// Makes a VM a template: powered off, it becomes read-only (a new config version says so).
    pub async fn vm_template(&self, ctx: &Ctx, vm: &str, pre: Preconditions) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmProvisioningMarkAsTemplate).await?;
        if parse_config(&rec.config)?.template {
            return self.vm_view(Some(ctx), &rec);
        }
        let opts = WriteOpts { message: Some("made a template".into()), template_op: true, ..Default::default() };
        Ok(self.vm_write_doc(ctx, rec, DocChange::Merge(json!({ "template": true })), pre, opts).await?.0)
    }

    /// The disks that are overlays on any of `disks` (linked clones), each with the VMs that hold it:
    /// `(disk name, VM names)`.
    pub(crate) async fn linked_clones_of(&self, disks: &[Uuid]) -> Result<Vec<(String, Vec<String>)>, Error> {
        if disks.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<String> = disks.iter().map(Uuid::to_string).collect();
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.store().objects_list(ObjectKind::Disk, None, after.as_deref(), 1000).await?;
            for o in &page {
                if o.spec["backing_disk"].as_str().is_some_and(|b| ids.iter().any(|i| i == b)) {
                    let vms = self.disk_attachments(o).await?.into_iter().map(|a| a.vm).collect();
                    out.push((o.name.clone(), vms));
                }
            }
            if page.len() < 1000 {
                break;
            }
            after = page.last().map(|o| o.path.clone());
        }
        Ok(out)
    }

    /// 409 `template_in_use` when linked clones read `disks`: the error names the clones.
    pub(crate) async fn linked_clones_refuse(&self, what: &str, disks: &[Uuid]) -> Result<(), Error> {
        let clones = self.linked_clones_of(disks).await?;
        if clones.is_empty() {
            return Ok(());
        }
        let mut vms: Vec<&str> = clones.iter().flat_map(|(_, v)| v.iter().map(String::as_str)).collect();
        vms.sort_unstable();
        vms.dedup();
        let disk_names: Vec<&str> = clones.iter().map(|(d, _)| d.as_str()).collect();
        let named = if vms.is_empty() { disk_names.join(", ") } else { vms.join(", ") };
        Err(Error::conflict(
            ErrorCode::TemplateInUse,
            format!("linked clones use {what}: {named}; delete them (or make full clones) first"),
        )
        .with_details(json!({ "clones": vms, "disks": disk_names })))
    }

    /// A new VM from a VM or a template.
    pub async fn vm_clone(&self, ctx: &Ctx, vm: &str, req: VmClone) -> Result<VmView, Error> {
        let src = self.vm_resolve(ctx, vm).await?;
        let src_cfg = parse_config(&src.config)?;
        let privilege =
            if src_cfg.template { Privilege::VmProvisioningDeployTemplate } else { Privilege::VmProvisioningClone };
        self.require(ctx, &src.object, privilege).await?;
        if req.customize.is_some() {
            self.require(ctx, &src.object, Privilege::VmProvisioningCustomize).await?;
        }
        let linked = req.linked.unwrap_or(src_cfg.template);
        if linked && !src_cfg.template {
            return Err(Error::conflict(
                ErrorCode::NotATemplate,
                format!(
                    "{} is not a template: a linked clone reads a template's disks; make it a template first, or \
                     make a full clone (linked: false)",
                    src.object.name
                ),
            )
            .with_field("linked"));
        }
        if self.object_lookup(req.name.as_str(), Some(ObjectKind::Vm)).await?.is_some() {
            return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a VM named {} already exists", req.name))
                .with_field("name"));
        }
        let folder_ref = req.folder.clone().unwrap_or_else(|| src_cfg.folder.clone());
        let folder = self.object_resolve(ctx, &folder_ref, Some(ObjectKind::Folder), "folder").await?;
        self.require(ctx, &folder, Privilege::VmInventoryCreate).await?;

        let mut c: VmConfig = src_cfg.clone();
        c.name = req.name.clone();
        c.folder = folder.path.clone();
        if let Some(p) = &req.pool {
            c.pool = p.clone();
        }
        if let Some(d) = &req.description {
            c.description = d.clone();
        }
        c.template = false;
        for n in &mut c.nics {
            n.mac = Some(mac_new());
            // A host port is the source's: two VMs cannot both forward it.
            n.port_forwards.clear();
        }
        if let Some(cz) = &req.customize {
            let ci = c.cloud_init.get_or_insert_with(CloudInit::default);
            if ci.user_data.is_some() && cz.users.is_some() {
                return Err(Error::invalid(
                    "customize.users",
                    format!(
                        "{} has raw user_data, which covm does not rewrite: its users cannot be replaced",
                        src.object.name
                    ),
                ));
            }
            ci.hostname = Some(cz.hostname.clone().unwrap_or_else(|| hostname_of(req.name.as_str())));
            if let Some(u) = &cz.users {
                ci.users = u.clone();
            }
            if let Some(n) = &cz.network {
                ci.network = Some(n.clone());
            }
        }
        c.check(self.host_memory_mib())?;
        // Every reference but the new disks (the folder, the pool, the networks, files) authorized now,
        // before anything is copied; the disks' attach with them.
        let mut refs = c.clone();
        refs.disks.clear();
        self.config_refs_authorize(ctx, None, None, folder.id, &mut refs, true).await?;
        if !src_cfg.disks.is_empty() {
            self.require(ctx, &folder, Privilege::DiskAttach).await?;
        }

        // The disks: each private one is copied or overlaid; a shared one is attached as it is.
        let mut disks = Vec::new();
        let mut locks = vec![Uuid::now_v7(), src.object.id];
        let vm_id = locks[0];
        let mut sources: Vec<ObjectRecord> = Vec::new();
        let mut attachments = Vec::new();
        if !src_cfg.disks.is_empty() {
            self.require(ctx, &folder, Privilege::DiskCreate).await?;
        }
        for (i, a) in src_cfg.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            let d = self.object_lookup(&a.disk, Some(ObjectKind::Disk)).await?.ok_or_else(|| {
                Error::conflict(
                    ErrorCode::DiskMissing,
                    format!("{} names disk {}, which no longer exists", src.object.name, a.disk),
                )
                .with_field(field.clone())
            })?;
            let sharing: Sharing = serde_json::from_value(d.spec["sharing"].clone()).unwrap_or(Sharing::None);
            if sharing != Sharing::None {
                attachments.push(a.clone());
                continue;
            }
            let name = Name::parse(&format!("{}-{}", req.name, i + 1)).map_err(|_| {
                Error::invalid(
                    "name",
                    format!("{}-{} is not a valid disk name: shorten the VM's name", req.name, i + 1),
                )
            })?;
            if self.object_lookup(name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
                return Err(Error::conflict(
                    ErrorCode::AlreadyExists,
                    format!("a disk named {name} already exists (a clone's disks are named NAME-1, NAME-2…)"),
                )
                .with_field("name"));
            }
            let (ds, root) = self.datastore_for_disk(ctx, spec_str(&d, "datastore")).await?;
            let capacity = d.spec["capacity_bytes"].as_u64().unwrap_or(0);
            let from_key = wrapped_key(&d.spec);
            if linked && d.spec["backing_disk"].is_string() {
                return Err(Error::conflict(
                    ErrorCode::NotATemplate,
                    format!(
                        "{} is itself a linked clone's disk: a linked clone of it would need the whole chain; make a full \
                         clone (linked: false)",
                        d.name
                    ),
                )
                .with_field("linked"));
            }
            if linked && from_key.is_some() {
                return Err(Error::invalid(
                    "linked",
                    format!(
                        "{} is encrypted: a linked clone of an encrypted disk is not supported; make a full clone",
                        d.name
                    ),
                ));
            }
            Self::space_check(&root, if linked { OVERLAY_BYTES } else { capacity })?;
            let pool = self.disk_pool_admit(&c.pool, if linked { 0 } else { capacity }, None).await?;
            let format = if linked { DiskFormat::Qcow2 } else { format_of(&d) };
            let id = Uuid::now_v7();
            let rel = format!("disks/{id}.{}", format.as_str());
            let mut spec = d.spec.clone();
            spec["file"] = json!(rel);
            spec["pool"] = json!(pool);
            spec["sharing"] = json!(Sharing::None);
            spec["format"] = json!(format);
            let from = self.disk_file(&d).await?;
            let source = if linked {
                spec["backing_disk"] = json!(d.id.to_string());
                Source::Overlay { backing: from, backing_format: format_of(&d).as_str().to_owned() }
            } else {
                if let Some(o) = spec.as_object_mut() {
                    o.remove("backing_disk");
                }
                if from_key.is_some() {
                    spec["encryption"] = json!(self.keys()?.wrap(id, &covm_hv::secret::DiskKey::random()));
                }
                Source::Copy { from, format: format.as_str().to_owned(), from_disk: from_key.map(|k| (d.id, k)) }
            };
            let data =
                json!({ "datastore": ds.name, "cloned_from": d.name, "linked": linked, "capacity_bytes": capacity });
            disks.push(CreateSaga {
                record: DiskRecord { id, name: name.to_string(), folder: folder.id, spec },
                file: root.join(&rel),
                source,
                data,
            });
            attachments.push(DiskAttachment { disk: name.to_string(), generation: 0, ..a.clone() });
            locks.extend([id, d.id]);
            sources.push(d);
        }
        c.disks = attachments;
        let saga = CloneSaga {
            vm_id,
            config: c,
            disks,
            data: json!({ "source": src.object.name, "linked": linked, "template": src_cfg.template }),
        };
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx2, <CloneSaga as super::saga::Saga>::KIND, &locks).await?;
            // Under the locks: a full clone copies nothing a running VM writes to.
            if !linked {
                for d in &sources {
                    if let Err(e) = app.clone_check(d).await {
                        return Err(guard.refuse(e).await);
                    }
                }
            }
            let saga = guard.run(&ctx2, saga).await?;
            let rec = app
                .store()
                .vm_get(saga.vm_id)
                .await?
                .ok_or_else(|| Error::not_found("vm", saga.config.name.as_str()))?;
            app.vm_view(Some(&ctx2), &rec)
        })
        .await
    }
}
