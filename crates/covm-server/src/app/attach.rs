//! Attaching a disk to a VM and detaching it, cold or hot.
//!
//! Every rule is checked before anything changes: the one-writer rule (a disk has at most one
//! read-write attachment unless it is `multi_writer`; read-only attachments may be many, never beside a
//! read-write one), the controller (exists; its type fits the machine), the unit (in range, free; the
//! controller not full), and on a running VM that the bus can hot-plug (virtio-scsi yes; IDE and AHCI
//! no, unless `apply=next_boot`). Then, on a running VM, QEMU gets the disk (`blockdev-add` +
//! `device_add`), and the config version is written; if that write fails, the disk is unplugged again.
//! Detaching a disk from a running VM waits for the guest to release it (`DEVICE_DELETED`); if it does
//! not in time, the detach fails and the disk stays attached.
//!
//! TODO-correctness: attach decisions are serialized by a lock in this process; several replicas need
//! the store's (the PostgreSQL issue), and the saga log that finishes or undoes a half-done attach after
//! a crash is the disk issue's next step.

use std::time::Duration;

use covm_types::api::ObjectKind;
use covm_types::disk::{DiskAttachmentView, Sharing};
use covm_types::vm::{ControllerType, DiskAttachment, VmConfig, VmView};
use covm_types::{Error, ErrorKind, Privilege};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::node::{Cmd, hv_error};
use super::vms::{DocChange, Preconditions, WriteOpts, parse_config, running};
use super::{App, Ctx};

const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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

fn conflict(code: &str, msg: String) -> Error {
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
            conflict("unknown_controller", format!("{} has no controller {id}", c.name)).with_field("controller")
        })?,
        None => {
            c.controllers.iter().find(|x| x.kind == ControllerType::VirtioScsi).or(c.controllers.first()).ok_or_else(
                || {
                    conflict("unknown_controller", format!("{} has no disk controller", c.name))
                        .with_field("controller")
                },
            )?
        }
    };
    if ctl.kind == ControllerType::Ide && c.machine != covm_types::vm::Machine::Pc {
        return Err(conflict("controller_unsupported", format!("IDE controller {} needs machine pc", ctl.id))
            .with_field("controller"));
    }
    let taken: Vec<u32> = c.disks.iter().filter(|d| d.controller == ctl.id).map(|d| d.unit).collect();
    let max = ctl.kind.max_unit();
    let unit = match unit {
        Some(u) if u > max => {
            return Err(
                conflict("unit_out_of_range", format!("unit {u} is beyond {} (0 to {max})", ctl.id)).with_field("unit")
            );
        }
        Some(u) if taken.contains(&u) => {
            return Err(conflict("unit_taken", format!("unit {u} of {} holds another disk", ctl.id)).with_field("unit"));
        }
        Some(u) => u,
        None => (0..=max).find(|u| !taken.contains(u)).ok_or_else(|| {
            conflict("controller_full", format!("controller {} has no free unit (0 to {max})", ctl.id))
        })?,
    };
    Ok((ctl.id.clone(), ctl.kind, unit))
}

/// The one-writer rule.
pub fn writers_check(
    disk: &str,
    sharing: Sharing,
    read_only: bool,
    holders: &[(DiskAttachmentView, String)],
) -> Result<(), Error> {
    if sharing == Sharing::MultiWriter {
        return Ok(());
    }
    let clash = holders.iter().find(|(h, _)| !read_only || !h.read_only);
    if let Some((h, power)) = clash {
        return Err(conflict(
            "disk_in_use",
            format!(
                "{disk} is attached {} to {} ({power}); {}",
                if h.read_only { "read-only" } else { "read-write" },
                h.vm,
                if read_only {
                    "a read-only attachment cannot be beside a read-write one"
                } else {
                    "a disk has one writer"
                }
            ),
        )
        .with_details(json!({ "vm": h.vm, "power_state": power, "read_only": h.read_only })));
    }
    Ok(())
}

impl App {
    pub async fn vm_disk_attach(&self, ctx: &Ctx, vm: &str, p: DiskAttach) -> Result<VmView, Error> {
        let _one_at_a_time = self.attach_lock().lock().await;
        self.disk_attach_locked(ctx, vm, p).await
    }

    /// Attach with the attach lock held by the caller.
    async fn disk_attach_locked(&self, ctx: &Ctx, vm: &str, p: DiskAttach) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmConfigAddExistingDisk).await?;
        let disk = self.object_resolve(ctx, &p.disk, Some(ObjectKind::Disk), "disk").await?;
        let rec = self.store().vm_get(rec.object.id).await?.ok_or_else(|| Error::not_found("vm", vm))?;
        let cfg: VmConfig = parse_config(&rec.config)?;
        if cfg.disks.iter().any(|d| d.disk == disk.name || d.disk == disk.id.to_string()) {
            return Err(conflict(
                "already_attached",
                format!("{} is already attached to {}", disk.name, rec.object.name),
            ));
        }
        let mut holders = Vec::new();
        for h in self.disk_attachments(&disk).await? {
            let power = match self.store().object_by_name(ObjectKind::Vm, &h.vm).await? {
                Some(o) => self.store().vm_get(o.id).await?.map(|v| v.power_state).unwrap_or_default(),
                None => String::new(),
            };
            holders.push((h, power));
        }
        let sharing: Sharing = serde_json::from_value(disk.spec["sharing"].clone()).unwrap_or_default();
        writers_check(&disk.name, sharing, p.read_only, &holders)?;
        let (controller, bus, unit) = slot_choose(&cfg, p.controller.as_deref(), p.unit)?;
        let is_running = running(&rec);
        let hot = is_running && bus.hotplug();
        if is_running && !bus.hotplug() && !p.next_boot {
            return Err(conflict(
                "hotplug_unsupported",
                format!(
                    "{} is running and {controller} cannot hot-plug; power it off, or send next_boot",
                    rec.object.name
                ),
            ));
        }
        let node = format!("d{}", &disk.id.simple().to_string()[20..]);
        if hot {
            let spec = covm_hv::DiskSpec {
                node: node.clone(),
                path: self.disk_file(&disk).await?,
                format: disk.spec["format"].as_str().unwrap_or("qcow2").to_owned(),
                controller: controller.clone(),
                bus,
                unit,
                read_only: p.read_only,
            };
            self.node().ask(rec.object.id, |r| Cmd::DiskAdd(Box::new(spec), r)).await.map_err(hv_error)?;
        }
        let mut disks = cfg.disks.clone();
        disks.push(DiskAttachment { disk: disk.name.clone(), controller, unit, read_only: p.read_only });
        let opts = WriteOpts {
            message: Some(format!("attach {}", disk.name)),
            next_boot: p.next_boot,
            disks_live: hot,
            ..Default::default()
        };
        let change = DocChange::Merge(json!({ "disks": disks }));
        match self.vm_write_doc(ctx, rec.clone(), change, Preconditions::default(), opts).await {
            Ok((view, _)) => Ok(view),
            Err(e) => {
                if hot {
                    // Undo the hot-plug: the config does not hold the disk.
                    let _ = tokio::time::timeout(
                        UNPLUG_TIMEOUT,
                        self.node().ask(rec.object.id, |r| Cmd::DiskRemove(node, r)),
                    )
                    .await;
                }
                Err(e)
            }
        }
    }

    /// Detaches a disk; one that is not attached is already detached.
    pub async fn vm_disk_detach(&self, ctx: &Ctx, vm: &str, disk: &str, next_boot: bool) -> Result<VmView, Error> {
        let _one_at_a_time = self.attach_lock().lock().await;
        self.disk_detach_locked(ctx, vm, disk, next_boot).await
    }

    /// Detach with the attach lock held by the caller.
    async fn disk_detach_locked(&self, ctx: &Ctx, vm: &str, disk: &str, next_boot: bool) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmConfigRemoveDisk).await?;
        let rec = self.store().vm_get(rec.object.id).await?.ok_or_else(|| Error::not_found("vm", vm))?;
        let cfg: VmConfig = parse_config(&rec.config)?;
        let obj = self.object_lookup(disk, Some(ObjectKind::Disk)).await?;
        let matches = |d: &DiskAttachment| {
            d.disk == disk || obj.as_ref().is_some_and(|o| d.disk == o.name || d.disk == o.id.to_string())
        };
        let Some(entry) = cfg.disks.iter().find(|d| matches(d)).cloned() else {
            return self.vm_view(Some(ctx), &rec);
        };
        let bus = cfg
            .controllers
            .iter()
            .find(|c| c.id == entry.controller)
            .map(|c| c.kind)
            .unwrap_or(ControllerType::VirtioScsi);
        let is_running = running(&rec);
        if is_running && !bus.hotplug() && !next_boot {
            return Err(conflict(
                "hotplug_unsupported",
                format!(
                    "{} is running and {} cannot hot-unplug; power it off, or send next_boot",
                    rec.object.name, entry.controller
                ),
            ));
        }
        let hot = is_running && bus.hotplug();
        if hot && let Some(o) = &obj {
            let node = format!("d{}", &o.id.simple().to_string()[20..]);
            match tokio::time::timeout(UNPLUG_TIMEOUT, self.node().ask(rec.object.id, |r| Cmd::DiskRemove(node, r)))
                .await
            {
                Ok(r) => r.map_err(hv_error)?,
                Err(_) => {
                    return Err(conflict(
                        "detach_timeout",
                        format!(
                            "the guest of {} did not release {disk} within {} s; it stays attached",
                            rec.object.name,
                            UNPLUG_TIMEOUT.as_secs()
                        ),
                    ));
                }
            }
        }
        let disks: Vec<DiskAttachment> = cfg.disks.iter().filter(|d| !matches(d)).cloned().collect();
        let opts =
            WriteOpts { message: Some(format!("detach {disk}")), next_boot, disks_live: hot, ..Default::default() };
        let (view, _) = self
            .vm_write_doc(ctx, rec, DocChange::Merge(json!({ "disks": disks })), Preconditions::default(), opts)
            .await?;
        Ok(view)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskMove {
    /// The VM the disk goes to.
    pub to_vm: String,
    #[serde(default)]
    pub controller: Option<String>,
    #[serde(default)]
    pub unit: Option<u32>,
}

impl App {
    /// Moves a disk from the VM that holds it to another, as one operation: detach (hot if that VM
    /// runs), attach (hot if the target runs); if the attach fails, the disk goes back where it was.
    /// The attach lock is held throughout, so no one can take the disk in between.
    pub async fn disk_move(&self, ctx: &Ctx, disk: &str, p: DiskMove) -> Result<VmView, Error> {
        let d = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        let target = self.vm_resolve(ctx, &p.to_vm).await?;
        self.require(ctx, &target.object, Privilege::VmConfigAddExistingDisk).await?;
        let _one_at_a_time = self.attach_lock().lock().await;
        let holders = self.disk_attachments(&d).await?;
        if holders.len() > 1 {
            return Err(conflict(
                "disk_shared",
                format!("{} is attached to {} VMs; detach it from all but one", d.name, holders.len()),
            ));
        }
        let source = holders.into_iter().next();
        if let Some(h) = &source {
            if h.vm == target.object.name {
                return self.vm_view(Some(ctx), &target);
            }
            self.disk_detach_locked(ctx, &h.vm, &d.name, false).await?;
        }
        let attach = DiskAttach {
            disk: d.name.clone(),
            controller: p.controller,
            unit: p.unit,
            read_only: false,
            next_boot: false,
        };
        match self.disk_attach_locked(ctx, &target.object.name, attach).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(h) = source {
                    let back = DiskAttach {
                        disk: d.name.clone(),
                        controller: Some(h.controller.clone()),
                        unit: Some(h.unit),
                        read_only: h.read_only,
                        next_boot: false,
                    };
                    if let Err(undo) = self.disk_attach_locked(ctx, &h.vm, back).await {
                        tracing::error!(disk = %d.name, vm = %h.vm, error = %undo, "a failed move could not put the disk back");
                    }
                }
                Err(e)
            }
        }
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
        let code = |r: Result<(String, ControllerType, u32), Error>| r.unwrap_err().code.clone();
        assert_eq!(code(slot_choose(&c, Some("nope"), None)), "unknown_controller");
        assert_eq!(code(slot_choose(&c, None, Some(0))), "unit_taken");
        assert_eq!(code(slot_choose(&c, None, Some(256))), "unit_out_of_range");
        let ahci = cfg(json!({ "name": "a", "controllers": [{ "id": "sata0", "type": "ahci" }],
            "disks": (0..6).map(|u| json!({ "disk": format!("d{u}"), "controller": "sata0", "unit": u })).collect::<Vec<_>>() }));
        assert_eq!(code(slot_choose(&ahci, None, None)), "controller_full");
    }

    #[test]
    fn one_writer_unless_shared() {
        let rw = (
            DiskAttachmentView { vm: "b".into(), controller: "scsi0".into(), unit: 0, read_only: false },
            "running".to_owned(),
        );
        let ro = (DiskAttachmentView { read_only: true, ..rw.0.clone() }, "off".to_owned());
        let e = writers_check("d", Sharing::None, false, std::slice::from_ref(&rw)).unwrap_err();
        assert_eq!(e.code, "disk_in_use");
        assert!(e.message.contains("b (running)"), "{}", e.message);
        assert!(writers_check("d", Sharing::None, true, std::slice::from_ref(&rw)).is_err());
        assert!(writers_check("d", Sharing::None, true, std::slice::from_ref(&ro)).is_ok());
        assert!(writers_check("d", Sharing::None, false, std::slice::from_ref(&ro)).is_err());
        assert!(writers_check("d", Sharing::MultiWriter, false, &[rw]).is_ok());
    }
}
