//! A running VM's NICs plugged and unplugged (DESIGN §19): `POST /vms/{vm}/nics` and
//! `DELETE /vms/{vm}/nics/{mac}`. The change is checked first as a dry run (privileges, the network,
//! port forwards); then QEMU plugs the NIC (its backend, its device on a free PCIe port, its tap on
//! its bridge) and the new version is written as live; a write that fails unplugs it again. A VM that
//! is off, or `next_boot`, takes the change in its config alone. NICs are named after their MACs in
//! QEMU, so the others keep their names.

use std::time::Duration;

use covm_types::vm::{Nic, VmView};
use covm_types::{Error, ErrorCode};
use serde_json::json;

use super::agent::VmOp;
use super::node::hv_error;
use super::vms::{DocChange, Preconditions, WriteOpts, mac_new, parse_config, running};
use super::{App, Ctx};

/// How long the guest has to let go of a NIC.
const UNPLUG_WAIT: Duration = Duration::from_secs(30);

impl App {
    /// A NIC change for the config alone (the VM is off, or `next_boot`): None. Else its node's agent,
    /// once the change passed everything the write checks, as a dry run, before QEMU is touched.
    async fn nic_cold_or_check(
        &self,
        ctx: &Ctx,
        rec: &covm_store::VmRecord,
        change: &DocChange,
        next_boot: bool,
        pre: &Preconditions,
    ) -> Result<Option<&dyn super::agent::NodeAgent>, Error> {
        if !running(rec) || next_boot {
            return Ok(None);
        }
        let agent = self.agent_for(rec)?;
        let check = WriteOpts { dry_run: true, nics_live: true, ..Default::default() };
        self.vm_write_doc(ctx, rec.clone(), change.clone(), pre.clone(), check).await?;
        Ok(Some(agent))
    }

    /// Adds a NIC: plugged into the running VM at once (unless `next_boot`), else in the config.
    pub async fn vm_nic_add(
        &self,
        ctx: &Ctx,
        vm: &str,
        mut nic: Nic,
        next_boot: bool,
        pre: Preconditions,
    ) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let cfg = parse_config(&rec.config)?;
        let mac = nic.mac.get_or_insert_with(mac_new).to_ascii_lowercase();
        nic.mac = Some(mac.clone());
        let mut nics = cfg.nics.clone();
        nics.push(nic.clone());
        let change = DocChange::Merge(json!({ "nics": nics }));
        let message = Some(format!("added NIC {mac} on {}", nic.network));
        let Some(agent) = self.nic_cold_or_check(ctx, &rec, &change, next_boot, &pre).await? else {
            let opts = WriteOpts { message, next_boot, ..Default::default() };
            return Ok(self.vm_write_doc(ctx, rec, change, pre, opts).await?.0);
        };
        let i = nics.len() - 1;
        for (j, f) in nic.port_forwards.iter().enumerate() {
            super::power::port_free(f).map_err(|e| e.with_field(format!("nics[{i}].port_forwards[{j}].host_port")))?;
        }
        let bridge = self.nic_bridge(&rec.object.name, &nic, &format!("nics[{i}].network")).await?;
        agent.ask(rec.object.id, VmOp::NicAdd(Box::new(covm_hv::NicSpec { nic: nic.clone(), bridge }))).await.map_err(
            |e| match e {
                covm_hv::HvError::Unavailable(m) => Error::conflict(ErrorCode::HotplugUnsupported, m),
                other => hv_error(other),
            },
        )?;
        let opts = WriteOpts { message, nics_live: true, ..Default::default() };
        match self.vm_write_doc(ctx, rec.clone(), change, pre, opts).await {
            Ok((v, _)) => Ok(v),
            Err(e) => {
                // Not written: the NIC goes again.
                let _ = tokio::time::timeout(UNPLUG_WAIT, agent.ask(rec.object.id, VmOp::NicDel(mac.clone()))).await;
                let _ = agent.ask(rec.object.id, VmOp::NetdevDel(mac)).await;
                Err(e)
            }
        }
    }

    /// Removes the NIC with this MAC: unplugged from the running VM first (unless `next_boot`).
    pub async fn vm_nic_remove(
        &self,
        ctx: &Ctx,
        vm: &str,
        mac: &str,
        next_boot: bool,
        pre: Preconditions,
    ) -> Result<VmView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let cfg = parse_config(&rec.config)?;
        let mac = mac.to_ascii_lowercase();
        let Some(pos) = cfg.nics.iter().position(|n| n.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&mac)))
        else {
            return Err(Error::not_found("nic", &mac).with_field("mac"));
        };
        let mut nics = cfg.nics.clone();
        let gone = nics.remove(pos);
        let change = DocChange::Merge(json!({ "nics": nics }));
        let message = Some(format!("removed NIC {mac} from {}", gone.network));
        let Some(agent) = self.nic_cold_or_check(ctx, &rec, &change, next_boot, &pre).await? else {
            let opts = WriteOpts { message, next_boot, ..Default::default() };
            return Ok(self.vm_write_doc(ctx, rec, change, pre, opts).await?.0);
        };
        match tokio::time::timeout(UNPLUG_WAIT, agent.ask(rec.object.id, VmOp::NicDel(mac.clone()))).await {
            Ok(r) => r.map_err(hv_error)?,
            Err(_) => {
                return Err(Error::conflict(
                    ErrorCode::DetachTimeout,
                    format!(
                        "the guest of {} did not let go of NIC {mac} within {} s; it is still there (remove it with next_boot)",
                        rec.object.name,
                        UNPLUG_WAIT.as_secs()
                    ),
                ));
            }
        }
        agent.ask(rec.object.id, VmOp::NetdevDel(mac.clone())).await.map_err(hv_error)?;
        let opts = WriteOpts { message, nics_live: true, ..Default::default() };
        self.vm_write_doc(ctx, rec, change, pre, opts).await.map(|(v, _)| v).inspect_err(|e| {
            tracing::error!(vm = vm, mac = %mac, error = %e, "a NIC was unplugged but the config could not be written; it comes back at the next power-on");
        })
    }
}
