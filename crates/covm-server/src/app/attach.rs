//! Attaching a disk to a VM and detaching it, cold or hot.
//!
//! Every rule is checked before anything changes: the one-writer rule (a disk has at most one
//! read-write attachment unless it is `multi_writer`; read-only attachments may be many, never beside a
//! read-write one), the controller (exists; its type fits the machine), the unit (in range, free; the
//! controller not full), and on a running VM that the bus can hot-plug (virtio-scsi yes; IDE and AHCI
//! no, unless `apply=next_boot`). Then, on a running VM, QEMU gets the disk (`blockdev-add` +
//! `device_add`), and the config version is written; if that write fails, the disk is unplugged again.
//! Detaching a disk from a running VM waits for the guest to release it (`DEVICE_DELETED`); if it does
//! not in time, the detach fails and the disk stays attached (and should the guest let go later, covm
//! plugs the device back: the config decides).
//!
//! Attach, detach and move are sagas ([`super::saga`]): the rules are checked with the VM(s) and the
//! disk locked in the store, then the steps run (QEMU's block node, its device, the config version; the
//! config version is the pivot). A failure or a crash at any step leaves the disk where it was.
//!
//! Each attachment has a generation: the log's position when it was made (the log only grows, and the
//! disk's lock keeps its attachments in order, so a disk's generations only grow). A detach that names
//! a generation removes only that attachment, so a late detach never removes a newer one.

use covm_types::ErrorCode;
use std::time::Duration;

use covm_types::api::ObjectKind;
use covm_types::disk::{DiskAttach, DiskAttachmentView, DiskMove, Sharing};
use covm_types::vm::{ControllerType, DiskAttachment, VmConfig, VmView};
use covm_types::{Error, ErrorKind, Privilege};
use serde_json::json;

use uuid::Uuid;

use super::agent::VmOp;
use super::node::hv_error;
use super::saga::Saga;
use super::saga::plug::{AttachSaga, DetachSaga, HotDisk, MoveSaga, Plug, PlugMode, plug_mode};
use super::vms::{parse_config, running};
use super::{App, Ctx};

pub(crate) const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// The block node (and device id) name of a disk in a VM.
pub fn disk_node(disk: Uuid) -> String {
    format!("d{}", &disk.simple().to_string()[20..])
}

pub(crate) fn conflict(code: ErrorCode, msg: String) -> Error {
    Error::new(ErrorKind::Conflict, code, msg)
}

/// Where a new attachment goes: the controller and unit, checked.
pub fn slot_choose(
    c: &VmConfig,
    controller: Option<&str>,
    unit: Option<u32>,
) -> Result<(String, ControllerType, u32), Error> {
    let ctl = match controller {
        Some(id) => c.controllers.iter().find(|x| x.id == id).ok_or_else(|| {
            conflict(ErrorCode::UnknownController, format!("{} has no controller {id}", c.name))
                .with_field("controller")
        })?,
        None => {
            c.controllers.iter().find(|x| x.kind == ControllerType::VirtioScsi).or(c.controllers.first()).ok_or_else(
                || {
                    conflict(ErrorCode::UnknownController, format!("{} has no disk controller", c.name))
                        .with_field("controller")
                },
            )?
        }
    };
    if ctl.kind == ControllerType::Ide && c.machine != covm_types::vm::Machine::Pc {
        return Err(conflict(ErrorCode::ControllerUnsupported, format!("IDE controller {} needs machine pc", ctl.id))
            .with_field("controller"));
    }
    let taken: Vec<u32> = c.disks.iter().filter(|d| d.controller == ctl.id).map(|d| d.unit).collect();
    let max = ctl.kind.max_unit();
    let unit = match unit {
        Some(u) if u > max => {
            return Err(conflict(ErrorCode::UnitOutOfRange, format!("unit {u} is beyond {} (0 to {max})", ctl.id))
                .with_field("unit"));
        }
        Some(u) if taken.contains(&u) => {
            return Err(
                conflict(ErrorCode::UnitTaken, format!("unit {u} of {} holds another disk", ctl.id)).with_field("unit")
            );
        }
        Some(u) => u,
        None => (0..=max).find(|u| !taken.contains(u)).ok_or_else(|| {
            conflict(ErrorCode::ControllerFull, format!("controller {} has no free unit (0 to {max})", ctl.id))
        })?,
    };
    Ok((ctl.id.clone(), ctl.kind, unit))
}

/// The one-writer rule.
pub fn writers_check(
    disk: &str,
    sharing: Sharing,
    read_only: bool,
    holders: &[(DiskAttachmentView, covm_types::vm::PowerState)],
) -> Result<(), Error> {
    if sharing == Sharing::MultiWriter {
        return Ok(());
    }
    let clash = holders.iter().find(|(h, _)| !read_only || !h.read_only);
    if let Some((h, power)) = clash {
        return Err(conflict(
            ErrorCode::DiskInUse,
            format!(
                "{disk} is attached {} to {} ({power}, attachment generation {}); {}",
                if h.read_only { "read-only" } else { "read-write" },
                h.vm,
                h.generation,
                if read_only {
                    "a read-only attachment cannot be beside a read-write one"
                } else {
                    "a disk has one writer"
                }
            ),
        )
        .with_details(
            json!({ "vm": h.vm, "power_state": power, "read_only": h.read_only, "generation": h.generation }),
        ));
    }
    Ok(())
}

impl App {
    pub async fn vm_disk_attach(&self, ctx: &Ctx, vm: &str, p: DiskAttach) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmConfigAddExistingDisk).await?;
        let disk = self.disk_use_authorize(ctx, &p.disk, "disk").await?;
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx2, AttachSaga::KIND, &[disk.id, rec.object.id]).await?;
            let plug = match app.attach_plan(&disk, rec.object.id, &p).await {
                Ok(plug) => plug,
                Err(e) => return Err(guard.refuse(e).await),
            };
            let vm = plug.vm;
            guard.run(&ctx2, AttachSaga { plug }).await?;
            let rec = app.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", "?"))?;
            app.vm_view(Some(&ctx2), &rec)
        })
        .await
    }

    /// Every rule of an attach, checked with the disk and the VM locked; the plan if they hold.
    async fn attach_plan(&self, disk: &covm_store::ObjectRecord, vm: Uuid, p: &DiskAttach) -> Result<Plug, Error> {
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", &p.disk))?;
        let cfg: VmConfig = parse_config(&rec.config)?;
        if cfg.disks.iter().any(|d| d.disk == disk.name || d.disk == disk.id.to_string()) {
            return Err(conflict(
                ErrorCode::AlreadyAttached,
                format!("{} is already attached to {}", disk.name, rec.object.name),
            ));
        }
        self.disk_writers_check(disk, Some(vm), p.read_only).await?;
        let (controller, bus, unit) = slot_choose(&cfg, p.controller.as_deref(), p.unit)?;
        self.agent_for(&rec)?;
        let mode = plug_mode(&rec.object.name, running(&rec), &controller, bus, true, p.next_boot)?;
        let hot = match mode {
            PlugMode::Hot => Some(self.hot_disk(disk, bus).await?),
            PlugMode::Cold | PlugMode::NextBoot => None,
        };
        let generation = u64::try_from(self.store().events_head().await?).unwrap_or(0) + 1;
        Ok(Plug {
            vm,
            vm_name: rec.object.name.clone(),
            disk: disk.id,
            disk_name: disk.name.clone(),
            attachment: DiskAttachment {
                disk: disk.name.clone(),
                controller,
                unit,
                read_only: p.read_only,
                generation,
            },
            hot,
            next_boot: mode == PlugMode::NextBoot,
            moved_from: None,
        })
    }

    /// A disk as QEMU is to open it live.
    async fn hot_disk(&self, disk: &covm_store::ObjectRecord, bus: ControllerType) -> Result<HotDisk, Error> {
        Ok(HotDisk {
            node: disk_node(disk.id),
            path: self.disk_file(disk).await?,
            format: disk.spec["format"].as_str().unwrap_or("qcow2").to_owned(),
            bus,
            key: super::disks::wrapped_key(&disk.spec),
            backing: self.disk_backing(disk).await?,
        })
    }

    /// Detaches a disk; one that is not attached is already detached. With `generation`, only that
    /// attachment is removed (a newer one is refused with `stale_generation`).
    pub async fn vm_disk_detach(
        &self,
        ctx: &Ctx,
        vm: &str,
        disk: &str,
        next_boot: bool,
        generation: Option<u64>,
    ) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmConfigRemoveDisk).await?;
        let obj = self.object_lookup(disk, Some(ObjectKind::Disk)).await?;
        let (app, ctx2, disk) = (self.clone(), ctx.clone(), disk.to_owned());
        self.to_the_end(async move {
            // A disk leaving a VM is risky: the VM's disks are kept first (its policy permitting).
            let held = parse_config(&rec.config)?.disks.iter().any(|d| {
                d.disk == disk || obj.as_ref().is_some_and(|o| d.disk == o.name || d.disk == o.id.to_string())
            });
            let safety = match held {
                true => app.safety_before(&ctx2, &rec, None, false).await?,
                false => None,
            };
            let r = app.vm_disk_detach_run(&ctx2, rec.clone(), &disk, obj, next_boot, generation).await;
            app.safety_after(&ctx2, rec.object.id, safety, r.as_ref().ok().map(|v| v.version)).await;
            r
        })
        .await
    }

    async fn vm_disk_detach_run(
        &self,
        ctx2: &Ctx,
        rec: covm_store::VmRecord,
        disk: &str,
        obj: Option<covm_store::ObjectRecord>,
        next_boot: bool,
        generation: Option<u64>,
    ) -> Result<VmView, Error> {
        let mut locks = vec![rec.object.id];
        locks.extend(obj.as_ref().map(|o| o.id));
        let guard = self.saga_begin(ctx2, DetachSaga::KIND, &locks).await?;
        let plan = match self.detach_plan(rec.object.id, disk, obj.as_ref(), next_boot, generation).await {
            Ok(p) => p,
            Err(e) => return Err(guard.refuse(e).await),
        };
        match plan {
            None => {
                guard.refuse(Error::internal("not attached")).await;
            }
            Some(plug) => {
                guard.run(ctx2, DetachSaga { plug }).await?;
            }
        }
        let rec = self.store().vm_get(rec.object.id).await?.ok_or_else(|| Error::not_found("vm", "?"))?;
        self.vm_view(Some(ctx2), &rec)
    }

    /// The rules of a detach, checked with the VM and disk locked; `None`: not attached.
    async fn detach_plan(
        &self,
        vm: Uuid,
        disk: &str,
        obj: Option<&covm_store::ObjectRecord>,
        next_boot: bool,
        generation: Option<u64>,
    ) -> Result<Option<Plug>, Error> {
        let rec = self.store().vm_get(vm).await?.ok_or_else(|| Error::not_found("vm", disk))?;
        let cfg: VmConfig = parse_config(&rec.config)?;
        let matches =
            |d: &DiskAttachment| d.disk == disk || obj.is_some_and(|o| d.disk == o.name || d.disk == o.id.to_string());
        let Some(entry) = cfg.disks.iter().find(|d| matches(d)).cloned() else {
            if let Some(g) = generation {
                return Err(conflict(
                    ErrorCode::StaleGeneration,
                    format!("{disk} is not attached to {}; attachment generation {g} is gone", rec.object.name),
                )
                .with_field("generation"));
            }
            return Ok(None);
        };
        if let Some(g) = generation.filter(|g| *g != entry.generation) {
            return Err(conflict(
                ErrorCode::StaleGeneration,
                format!(
                    "{disk} is attached to {} as generation {}, not {g}: it was detached and attached again since",
                    rec.object.name, entry.generation
                ),
            )
            .with_field("generation")
            .with_details(json!({ "generation": entry.generation })));
        }
        let bus = cfg
            .controllers
            .iter()
            .find(|c| c.id == entry.controller)
            .map(|c| c.kind)
            .unwrap_or(ControllerType::VirtioScsi);
        self.agent_for(&rec)?;
        let mode = plug_mode(&rec.object.name, running(&rec), &entry.controller, bus, false, next_boot)?;
        let hot = match obj {
            Some(o) if mode == PlugMode::Hot => Some(self.hot_disk(o, bus).await?),
            _ => None,
        };
        Ok(Some(Plug {
            vm,
            vm_name: rec.object.name.clone(),
            disk: obj.map_or(Uuid::nil(), |o| o.id),
            disk_name: entry.disk.clone(),
            attachment: entry,
            hot,
            next_boot: mode == PlugMode::NextBoot,
            moved_from: None,
        }))
    }

    /// A device went from a VM with no detach waiting for it (the guest let go after a detach gave
    /// up): the config decides. Still attached: plugged back. Not attached: its block nodes go.
    pub(crate) async fn disk_device_reconcile(&self, vm: Uuid, dev: &str) {
        let Ok(Some(rec)) = self.store().vm_get(vm).await else { return };
        let Ok(cfg) = parse_config(&rec.config) else { return };
        for d in &cfg.disks {
            let Ok(Some(o)) = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await else { continue };
            if disk_node(o.id) != dev {
                continue;
            }
            let bus =
                cfg.controllers.iter().find(|c| c.id == d.controller).map_or(ControllerType::VirtioScsi, |c| c.kind);
            let Ok(path) = self.disk_file(&o).await else { return };
            let spec = covm_hv::DiskSpec {
                node: dev.to_owned(),
                path,
                format: o.spec["format"].as_str().unwrap_or("qcow2").to_owned(),
                controller: d.controller.clone(),
                bus,
                unit: d.unit,
                read_only: d.read_only,
                key: self.disk_key(o.id, &o.spec).ok().flatten(),
                backing: self.disk_backing(&o).await.ok().flatten(),
            };
            tracing::warn!(vm = %rec.object.name, disk = %o.name, "the guest let go of a disk after its detach gave up; the config holds it, so it is plugged back");
            if let Err(e) = self.agent().ask(vm, VmOp::DeviceAdd(Box::new(spec))).await {
                tracing::error!(vm = %rec.object.name, disk = %o.name, error = %e, "a disk could not be plugged back");
            }
            return;
        }
        let node = dev.to_owned();
        let _ = self.agent().ask(vm, VmOp::BlockdevDel(node)).await;
    }

    /// What QEMU holds of block nodes and devices for a running VM (to compare with its config).
    pub async fn vm_block_state(&self, ctx: &Ctx, vm: &str) -> Result<covm_hv::BlockState, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.agent_for(&rec)?.block_state(rec.object.id).await.map_err(hv_error)
    }

    /// What a running VM's process uses of its host now (anyone who may view the VM may see it).
    pub async fn vm_stats(&self, ctx: &Ctx, vm: &str) -> Result<covm_types::vm::VmStats, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let agent = self.agent_for(&rec)?;
        let u = agent.stats(rec.object.id).await.map_err(hv_error)?;
        let memory_mib = parse_config(&rec.config).map(|c| c.memory_mib).unwrap_or(0);
        Ok(covm_types::vm::VmStats {
            node: self.config().node_id.clone(),
            pid: u.pid,
            cpu_seconds: u.cpu_seconds,
            memory_rss_bytes: u.rss_bytes,
            memory_configured_bytes: memory_mib << 20,
            sampled_at: chrono::Utc::now(),
        })
    }
}

impl App {
    /// Moves a disk from the VM that holds it to another, as one saga: detach (hot if that VM runs),
    /// attach (hot if the target runs); on any failure the disk is back where it was.
    pub async fn disk_move(&self, ctx: &Ctx, disk: &str, p: DiskMove) -> Result<VmView, Error> {
        let d = self.disk_use_authorize(ctx, disk, "disk").await?;
        let target = self.vm_resolve(ctx, &p.to_vm).await?;
        self.require(ctx, &target.object, Privilege::VmConfigAddExistingDisk).await?;
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            for _ in 0..5 {
                let seen = app.disk_attachments(&d).await?;
                let mut locks = vec![d.id, target.object.id];
                let mut source = None;
                if let Some(h) = seen.first() {
                    let o = app.store().object_by_name(ObjectKind::Vm, &h.vm).await?;
                    source = o.map(|o| o.id);
                    locks.extend(source.filter(|s| *s != target.object.id));
                }
                let guard = app.saga_begin(&ctx2, MoveSaga::KIND, &locks).await?;
                if app.disk_attachments(&d).await? != seen {
                    // It moved while the locks were taken: look again.
                    guard.refuse(Error::internal("the disk's holders changed; retrying")).await;
                    continue;
                }
                let plan = app.move_plan(&ctx2, &d, &seen, source, &target, &p).await;
                let saga = match plan {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        guard.refuse(Error::internal("already there")).await;
                        return app.vm_view(Some(&ctx2), &target);
                    }
                    Err(e) => return Err(guard.refuse(e).await),
                };
                guard.run(&ctx2, saga).await?;
                let rec = app.store().vm_get(target.object.id).await?.ok_or_else(|| Error::not_found("vm", "?"))?;
                return app.vm_view(Some(&ctx2), &rec);
            }
            Err(conflict(ErrorCode::OperationInProgress, format!("{} keeps moving; try again", d.name)))
        })
        .await
    }

    async fn move_plan(
        &self,
        ctx: &Ctx,
        d: &covm_store::ObjectRecord,
        holders: &[DiskAttachmentView],
        source: Option<Uuid>,
        target: &covm_store::VmRecord,
        p: &DiskMove,
    ) -> Result<Option<MoveSaga>, Error> {
        if holders.len() > 1 {
            return Err(conflict(
                ErrorCode::DiskShared,
                format!("{} is attached to {} VMs; detach it from all but one", d.name, holders.len()),
            ));
        }
        let from = match (holders.first(), source) {
            (Some(h), _) if h.vm == target.object.name => return Ok(None),
            (Some(h), Some(src)) => {
                let src_rec = self.store().vm_get(src).await?.ok_or_else(|| Error::not_found("vm", &h.vm))?;
                let src_obj = src_rec.object.clone();
                self.require(ctx, &src_obj, Privilege::VmConfigRemoveDisk).await?;
                self.detach_plan(src, &d.name, Some(d), false, Some(h.generation)).await?
            }
            _ => None,
        };
        // The target's rules, as if the disk were already free.
        let rec = self.store().vm_get(target.object.id).await?.ok_or_else(|| Error::not_found("vm", &p.to_vm))?;
        let cfg: VmConfig = parse_config(&rec.config)?;
        let (controller, bus, unit) = slot_choose(&cfg, p.controller.as_deref(), p.unit)?;
        self.agent_for(&rec)?;
        // A move is never left pending: both sides take it now.
        let hot = match plug_mode(&rec.object.name, running(&rec), &controller, bus, true, false)? {
            PlugMode::Hot => Some(self.hot_disk(d, bus).await?),
            PlugMode::Cold | PlugMode::NextBoot => None,
        };
        let generation = u64::try_from(self.store().events_head().await?).unwrap_or(0) + 1;
        let to = Plug {
            vm: rec.object.id,
            vm_name: rec.object.name.clone(),
            disk: d.id,
            disk_name: d.name.clone(),
            attachment: DiskAttachment { disk: d.name.clone(), controller, unit, read_only: false, generation },
            hot,
            next_boot: false,
            moved_from: from.as_ref().map(|f| f.vm_name.clone()),
        };
        Ok(Some(MoveSaga { from, to }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(j: serde_json::Value) -> VmConfig {
        serde_json::from_value(j).unwrap()
    }

    #[test]
    fn slots_are_chosen_and_checked() {
        let c = cfg(json!({ "name": "a", "disks": [{ "disk": "x", "controller": "scsi0", "unit": 0 }] }));
        assert_eq!(slot_choose(&c, None, None).unwrap(), ("scsi0".into(), ControllerType::VirtioScsi, 1));
        let code = |r: Result<(String, ControllerType, u32), Error>| r.unwrap_err().code;
        assert_eq!(code(slot_choose(&c, Some("nope"), None)), "unknown_controller");
        assert_eq!(code(slot_choose(&c, None, Some(0))), "unit_taken");
        assert_eq!(code(slot_choose(&c, None, Some(256))), "unit_out_of_range");
        let ahci = cfg(json!({ "name": "a", "controllers": [{ "id": "sata0", "type": "ahci" }],
            "disks": (0..6).map(|u| json!({ "disk": format!("d{u}"), "controller": "sata0", "unit": u })).collect::<Vec<_>>() }));
        assert_eq!(code(slot_choose(&ahci, None, None)), "controller_full");
    }

    #[test]
    fn one_plug_decision_for_attach_detach_and_move() {
        use ControllerType::{Ahci, VirtioScsi};
        assert_eq!(plug_mode("v", false, "sata0", Ahci, true, false).unwrap(), PlugMode::Cold);
        assert_eq!(plug_mode("v", true, "scsi0", VirtioScsi, false, false).unwrap(), PlugMode::Hot);
        assert_eq!(plug_mode("v", true, "sata0", Ahci, true, true).unwrap(), PlugMode::NextBoot);
        let e = plug_mode("v", true, "sata0", Ahci, false, false).unwrap_err();
        assert_eq!((e.code, e.message.contains("hot-unplug")), (ErrorCode::HotplugUnsupported, true));
    }

    #[test]
    fn one_writer_unless_shared() {
        let rw = (
            DiskAttachmentView { vm: "b".into(), controller: "scsi0".into(), unit: 0, read_only: false, generation: 7 },
            covm_types::vm::PowerState::Running,
        );
        let ro = (DiskAttachmentView { read_only: true, ..rw.0.clone() }, covm_types::vm::PowerState::Off);
        let e = writers_check("d", Sharing::None, false, std::slice::from_ref(&rw)).unwrap_err();
        assert_eq!(e.code, "disk_in_use");
        assert!(e.message.contains("b (running, attachment generation 7)"), "{}", e.message);
        assert_eq!(e.details.as_ref().unwrap()["generation"], 7);
        assert!(writers_check("d", Sharing::None, true, std::slice::from_ref(&rw)).is_err());
        assert!(writers_check("d", Sharing::None, true, std::slice::from_ref(&ro)).is_ok());
        assert!(writers_check("d", Sharing::None, false, std::slice::from_ref(&ro)).is_err());
        assert!(writers_check("d", Sharing::MultiWriter, false, &[rw]).is_ok());
    }
}
