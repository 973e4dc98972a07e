//! What a VM change means, decided in one place: [`decide`] is a pure function of the VM as it is and
//! the change asked for, and both `?dry_run=true` and the write transaction call it (the transaction
//! again, on the VM as it is there, so that what was checked still holds when it is written).
//!
//! The rules per field are in [`field_changes`], which names every field of [`VmConfig`] by
//! destructuring it: a field added to the config does not compile until it has a privilege and a class
//! (live or next boot) here.

use std::collections::BTreeSet;

use covm_types::vm::{Nic, VmConfig};
use covm_types::{Error, ErrorCode, Privilege};
use serde_json::{Value, json};

/// How a changed field reaches a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// At once: the running VM takes it (or it is not the guest's business).
    Live,
    /// At the next power-on: QEMU would have to start again.
    NextBoot,
}

/// One changed field of a config, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    pub field: &'static str,
    /// The privileges on the VM it needs (references need more on their targets: see
    /// `refs.rs`).
    pub privileges: Vec<Privilege>,
    pub class: Class,
}

/// The changed fields from `old` to `new`, each with its privileges and class, in the order of the
/// config. Every field of `VmConfig` is named here (no `..`), so a new field must be given its rule.
pub fn field_changes(old: &VmConfig, new: &VmConfig) -> Vec<FieldChange> {
    use Class::{Live, NextBoot};
    use Privilege::*;
    let VmConfig {
        name,
        description,
        folder,
        pool,
        cpus,
        memory_mib,
        machine,
        firmware,
        accel,
        controllers,
        disks,
        nics,
        cdrom,
        boot,
        console,
        autostart,
        annotations,
        kernel,
        initrd,
        cmdline,
        safety_snapshots,
        template,
        cloud_init,
    } = new;
    // Disks: adding one and removing one are separate privileges.
    let disk_privileges = {
        let mut p = Vec::new();
        if disks.iter().any(|d| !old.disks.contains(d)) {
            p.push(VmConfigAddExistingDisk);
        }
        if old.disks.iter().any(|d| !disks.contains(d)) {
            p.push(VmConfigRemoveDisk);
        }
        p
    };
    // NICs: only the link state of the NICs there are changes live.
    let nics_class = {
        let link_only = |n: &Nic| Nic { connected: true, ..n.clone() };
        let same_but_links =
            old.nics.len() == nics.len() && old.nics.iter().zip(nics).all(|(x, y)| link_only(x) == link_only(y));
        if same_but_links { Live } else { NextBoot }
    };
    let rules: [(&'static str, bool, Vec<Privilege>, Class); 23] = [
        ("name", *name != old.name, vec![VmConfigEdit], Live),
        ("description", *description != old.description, vec![VmConfigEdit], Live),
        // Folder and pool also need their own privileges on the target (a reference).
        ("folder", *folder != old.folder, vec![VmConfigEdit], Live),
        ("pool", *pool != old.pool, vec![VmConfigEdit], Live),
        ("cpus", *cpus != old.cpus, vec![VmConfigCpuCount], NextBoot),
        ("memory_mib", *memory_mib != old.memory_mib, vec![VmConfigMemory], NextBoot),
        ("machine", *machine != old.machine, vec![VmConfigEdit], NextBoot),
        ("firmware", *firmware != old.firmware, vec![VmConfigEdit], NextBoot),
        ("accel", *accel != old.accel, vec![VmConfigEdit], NextBoot),
        ("controllers", *controllers != old.controllers, vec![VmConfigAddRemoveDevice], NextBoot),
        // Hot-plugging a disk goes through the attach endpoint's plug plan, which says so itself.
        ("disks", *disks != old.disks, disk_privileges, NextBoot),
        ("nics", *nics != old.nics, vec![VmConfigAddRemoveDevice], nics_class),
        ("cdrom", *cdrom != old.cdrom, vec![VmConfigAddRemoveDevice], NextBoot),
        ("boot", *boot != old.boot, vec![VmConfigEdit], NextBoot),
        ("console", *console != old.console, vec![VmConfigEdit], NextBoot),
        ("autostart", *autostart != old.autostart, vec![VmConfigEdit], Live),
        ("annotations", *annotations != old.annotations, vec![VmConfigEdit], Live),
        ("kernel", *kernel != old.kernel, vec![VmConfigEdit], NextBoot),
        ("initrd", *initrd != old.initrd, vec![VmConfigEdit], NextBoot),
        ("cmdline", *cmdline != old.cmdline, vec![VmConfigEdit], NextBoot),
        ("safety_snapshots", *safety_snapshots != old.safety_snapshots, vec![VmConfigEdit], Live),
        // Only `POST /vms/{vm}/template` sets it (a change that names it is refused before this).
        ("template", *template != old.template, vec![VmProvisioningMarkAsTemplate], Live),
        // The seed is built at power-on.
        ("cloud_init", *cloud_init != old.cloud_init, vec![VmConfigEdit], NextBoot),
    ];
    rules
        .into_iter()
        .filter(|(_, changed, _, _)| *changed)
        .map(|(field, _, privileges, class)| FieldChange { field, privileges, class })
        .collect()
}

/// Whether a change can lose data or break boot (a safety snapshot comes first under the `risky`
/// policy): a disk removed, or the machine type, firmware or boot order changed.
pub fn risky(changes: &[FieldChange]) -> bool {
    changes.iter().any(|c| {
        matches!(c.field, "machine" | "firmware" | "boot") || c.privileges.contains(&Privilege::VmConfigRemoveDisk)
    })
}

/// Everything a config refers to in the inventory (folder, pool, networks, disks, files), sorted: the
/// transaction compares it with what was authorized.
pub fn references(c: &VmConfig) -> Vec<String> {
    let mut r = vec![format!("folder:{}", c.folder), format!("pool:{}", c.pool)];
    r.extend(c.nics.iter().map(|n| format!("network:{}", n.network)));
    r.extend(c.disks.iter().map(|d| format!("disk:{}", d.disk)));
    r.extend(c.cdrom.iter().chain(&c.kernel).chain(&c.initrd).map(|p| format!("file:{p}")));
    r.sort();
    r
}

/// What the caller asked besides the document.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    /// `apply=next_boot`: next-boot fields of a running VM wait for its next power-on.
    pub next_boot: bool,
    /// The disks are plugged live by the caller (the attach endpoint's plug plan).
    pub disks_live: bool,
    /// The NICs are plugged or unplugged live by the caller (the NIC endpoints).
    pub nics_live: bool,
}

/// A VM change, decided.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The new config, checked on its own (limits, names, slots).
    pub config: VmConfig,
    pub changes: Vec<FieldChange>,
    /// Every privilege the changed fields need on the VM.
    pub privileges: BTreeSet<Privilege>,
    /// The new config's references (to authorize; see `refs.rs`).
    pub references: Vec<String>,
    pub live: Vec<String>,
    pub next_boot: Vec<String>,
    /// Why it cannot be written now (next-boot fields on a running VM, not asked to wait).
    pub refusal: Option<Error>,
}

impl Decision {
    pub fn fields(&self) -> Vec<String> {
        self.changes.iter().map(|c| c.field.to_owned()).collect()
    }
}

/// Decides a change from `old` (the VM's config, `running` or not) to `new`: what it needs, when it
/// applies, and whether it is refused. Pure: the same inputs, the same decision.
pub fn decide(
    name: &str,
    old: &VmConfig,
    running: bool,
    new: VmConfig,
    host_memory_mib: u64,
    asked: Asked,
) -> Result<Decision, Error> {
    new.check(host_memory_mib)?;
    let changes = field_changes(old, &new);
    let privileges = changes.iter().flat_map(|c| c.privileges.iter().copied()).collect();
    let (mut live, mut next_boot) = (Vec::new(), Vec::new());
    for c in &changes {
        match c.class {
            Class::Live => live.push(c.field.to_owned()),
            Class::NextBoot => next_boot.push(c.field.to_owned()),
        }
    }
    let waiting: Vec<String> = next_boot
        .iter()
        .filter(|f| !(asked.disks_live && f.as_str() == "disks" || asked.nics_live && f.as_str() == "nics"))
        .cloned()
        .collect();
    let refusal = (running && !waiting.is_empty() && !asked.next_boot).then(|| requires_power_cycle(name, &waiting));
    Ok(Decision { references: references(&new), config: new, changes, privileges, live, next_boot, refusal })
}

/// 409 `requires_power_cycle`: the fields a running VM takes only at its next power-on.
pub fn requires_power_cycle(name: &str, fields: &[String]) -> Error {
    Error::conflict(
        ErrorCode::RequiresPowerCycle,
        format!(
            "{name} is running and {} only take effect at the next power-on; send apply=next_boot to keep the change pending",
            fields.join(", ")
        ),
    )
    .with_details(json!({ "fields": fields }))
}

/// The top-level fields that differ between two documents.
pub fn changed_fields(from: &Value, to: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (from.as_object(), to.as_object()) else { return vec![] };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> VmConfig {
        serde_json::from_value(v).unwrap()
    }

    /// The typed rules name exactly the fields whose JSON differs, for a change of every field.
    #[test]
    fn every_changed_field_has_one_rule() {
        let old = cfg(json!({ "name": "a", "folder": "/", "cpus": 1, "memory_mib": 64 }));
        let new = cfg(json!({
            "name": "b", "description": "d", "folder": "/f", "pool": "p", "cpus": 2, "memory_mib": 128,
            "machine": "pc", "firmware": "uefi", "accel": "tcg",
            "controllers": [{ "id": "sata0", "type": "ahci" }],
            "disks": [{ "disk": "d1", "controller": "sata0", "unit": 0 }],
            "nics": [{ "network": "n", "mac": "52:54:00:00:00:01" }], "cdrom": "x.iso",
            "boot": ["cdrom"], "console": { "vnc": false }, "autostart": { "enabled": true },
            "annotations": { "k": "v" }, "kernel": "k", "initrd": "i", "cmdline": "c", "safety_snapshots": "off",
            "template": true, "cloud_init": { "hostname": "h" }
        }));
        let typed: Vec<String> = field_changes(&old, &new).iter().map(|c| c.field.to_owned()).collect();
        let mut json_fields =
            changed_fields(&serde_json::to_value(&old).unwrap(), &serde_json::to_value(&new).unwrap());
        let mut sorted = typed.clone();
        sorted.sort();
        json_fields.sort();
        assert_eq!(sorted, json_fields);
        assert_eq!(typed.len(), 23, "a field of VmConfig is not changed by this test: {typed:?}");
    }

    #[test]
    fn a_running_vm_refuses_next_boot_fields_unless_asked_to_wait() {
        let old = cfg(json!({ "name": "a", "folder": "/", "cpus": 1, "memory_mib": 64 }));
        let new = cfg(json!({ "name": "a", "folder": "/", "cpus": 2, "memory_mib": 64, "description": "x" }));
        let d = decide("a", &old, true, new.clone(), 1 << 20, Asked::default()).unwrap();
        assert_eq!(
            (d.live.as_slice(), d.next_boot.as_slice()),
            (&["description".to_owned()][..], &["cpus".to_owned()][..])
        );
        assert_eq!(d.refusal.map(|e| e.code), Some(ErrorCode::RequiresPowerCycle));
        assert_eq!(d.privileges, BTreeSet::from([Privilege::VmConfigEdit, Privilege::VmConfigCpuCount]));
        let asked = Asked { next_boot: true, ..Default::default() };
        assert!(decide("a", &old, true, new.clone(), 1 << 20, asked).unwrap().refusal.is_none());
        assert!(decide("a", &old, false, new, 1 << 20, Asked::default()).unwrap().refusal.is_none());
    }

    #[test]
    fn only_a_link_state_change_of_nics_is_live() {
        let old = cfg(json!({ "name": "a", "folder": "/", "cpus": 1, "memory_mib": 64,
            "nics": [{ "network": "n", "mac": "52:54:00:00:00:01" }] }));
        let mut link = old.clone();
        link.nics[0].connected = false;
        assert_eq!(field_changes(&old, &link)[0].class, Class::Live);
        let mut other = old.clone();
        other.nics[0].network = "m".into();
        assert_eq!(field_changes(&old, &other)[0].class, Class::NextBoot);
    }
}
