//! The guest agent (DESIGN §19): a guest that runs `qemu-guest-agent` on the virtio-serial channel covm
//! gives every VM tells its OS, host name and addresses (kept in the VM's runtime, refreshed every few
//! seconds by [`App::guests_poll`]), shuts down cleanly on request, freezes its file systems for a
//! consistent snapshot, and sets a user's password or SSH keys. A guest without one works as before:
//! the runtime says `agent: false`, shutdown uses ACPI, and the operations that need it answer 409
//! `agent_unavailable`.

use std::time::Duration;

use base64::Engine;
use covm_hv::HvError;
use covm_store::{VmRecord, VmWrite, WriteOutcome};
use covm_types::vm::{GuestInfo, GuestInterface, GuestPassword, GuestSshKeys, PowerState};
use covm_types::{Error, ErrorCode, Privilege};
use serde_json::{Value, json};
use uuid::Uuid;

use super::node::{hv_error, runtime_of};
use super::system_event;
use super::{App, Ctx, EventExt};

/// How often the agents of this node's running VMs are asked.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
const ASK: Duration = Duration::from_secs(5);

/// A guest agent failure as the API says it.
pub(crate) fn agent_error(vm: &str, e: HvError) -> Error {
    match e {
        HvError::Unavailable(m) => Error::conflict(ErrorCode::AgentUnavailable, format!("{vm}: {m}")),
        HvError::Gone => Error::conflict(ErrorCode::VmNotRunning, format!("{vm} is not running")),
        HvError::Command { desc, .. } => {
            Error::conflict(ErrorCode::Conflict, format!("the guest agent of {vm} refused: {desc}"))
        }
        other => hv_error(other),
    }
}

/// The interfaces from `guest-network-get-interfaces`, loopback left out.
fn interfaces(v: &Value) -> Vec<GuestInterface> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["name"] != "lo")
        .take(32)
        .map(|i| GuestInterface {
            name: capped(i["name"].as_str().unwrap_or_default()),
            mac: i["hardware-address"].as_str().map(capped),
            addresses: i["ip-addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .take(32)
                .filter_map(|a| Some(capped(&format!("{}/{}", a["ip-address"].as_str()?, a["prefix"].as_u64()?))))
                .collect(),
        })
        .collect()
}

/// What a guest says is kept at most this long (it is the guest's, not covm's).
fn capped(s: &str) -> String {
    s.chars().take(255).collect()
}

impl App {
    /// Asks a running VM's agent what it knows of the guest (on this node).
    pub(crate) async fn guest_ask(&self, id: Uuid) -> Result<GuestInfo, HvError> {
        let agent = self.agent();
        match agent.guest(id, "guest-ping", Value::Null, ASK).await {
            Ok(_) => {}
            Err(HvError::Unavailable(m)) => {
                return Ok(GuestInfo { agent: false, message: Some(m), ..Default::default() });
            }
            Err(e) => return Err(e),
        }
        let os = agent.guest(id, "guest-get-osinfo", Value::Null, ASK).await.ok();
        let host = agent.guest(id, "guest-get-host-name", Value::Null, ASK).await.ok();
        let ifs = agent.guest(id, "guest-network-get-interfaces", Value::Null, ASK).await.ok();
        Ok(GuestInfo {
            agent: true,
            message: None,
            hostname: host.and_then(|h| h["host-name"].as_str().map(capped)),
            os: os.and_then(|o| o["pretty-name"].as_str().or(o["name"].as_str()).map(capped)),
            interfaces: ifs.as_ref().map(interfaces).unwrap_or_default(),
        })
    }

    /// `GET /vms/{vm}/guest`: asks the agent now (and keeps the answer in the runtime).
    pub async fn vm_guest(&self, ctx: &Ctx, vm: &str) -> Result<GuestInfo, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmGuestQuery).await?;
        self.agent_for(&rec)?;
        if runtime_of(&rec).power_state != PowerState::Running {
            return Err(Error::conflict(
                ErrorCode::VmNotRunning,
                format!("{} is {}; its guest tells nothing", rec.object.name, runtime_of(&rec).power_state),
            ));
        }
        let info = self.guest_ask(rec.object.id).await.map_err(|e| agent_error(&rec.object.name, e))?;
        self.guest_keep(&rec, &info).await?;
        Ok(info)
    }

    /// Keeps what the agent said in the VM's runtime (and tells the feed), when it changed.
    async fn guest_keep(&self, rec: &VmRecord, info: &GuestInfo) -> Result<(), Error> {
        if runtime_of(rec).guest.as_ref() == Some(info) {
            return Ok(());
        }
        let (generation, info) = (rec.generation, info.clone());
        let write = Box::new(move |vm: &VmRecord, _at: chrono::DateTime<chrono::Utc>| {
            let mut rt = runtime_of(vm);
            if vm.generation != generation || rt.guest.as_ref() == Some(&info) || !rt.power_state.is_active() {
                return Ok(WriteOutcome::Unchanged);
            }
            rt.guest = Some(info.clone());
            let mut runtime = serde_json::to_value(&rt).unwrap_or_default();
            runtime.as_object_mut().map(|o| o.remove("generation"));
            let ev = system_event("vm.guest.changed", "vm", Some(vm.object.id), &vm.object.name)
                .data(json!({ "agent": info.agent, "hostname": info.hostname, "ipv4": info.ipv4() }));
            Ok(WriteOutcome::from(VmWrite {
                runtime: Some(covm_store::RuntimeWrite {
                    power_state: rt.power_state,
                    runtime,
                    bump_generation: false,
                }),
                events: vec![ev],
                ..Default::default()
            }))
        });
        let (_, events) = self.store().vm_write(rec.object.id, write).await?.done()?;
        if !events.is_empty() {
            self.committed();
        }
        Ok(())
    }

    /// Asks the agents of the running QEMU VMs of this node, and keeps what changed.
    pub async fn guests_poll(&self) {
        if self.agent().driver_name() == "sim" {
            return;
        }
        let me = self.config().node_id.clone();
        let vms = match self.vms_all().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the VMs to ask their guest agents");
                return;
            }
        };
        let asks = vms.into_iter().filter(|v| {
            let rt = runtime_of(v);
            rt.power_state == PowerState::Running && rt.node.as_deref().is_none_or(|n| n == me)
        });
        let asks = asks.map(|rec| async move {
            if let Ok(info) = self.guest_ask(rec.object.id).await
                && let Err(e) = self.guest_keep(&rec, &info).await
            {
                tracing::debug!(vm = %rec.object.name, error = %e, "could not keep what the guest agent said");
            }
        });
        futures::future::join_all(asks).await;
    }

    /// Shuts a running VM's guest down through its agent; Ok(false) when it has none (use ACPI).
    pub(crate) async fn guest_shutdown(&self, rec: &VmRecord) -> bool {
        if runtime_of(rec).guest.is_some_and(|g| !g.agent) {
            return false;
        }
        match self.agent().guest(rec.object.id, "guest-shutdown", json!({ "mode": "powerdown" }), ASK).await {
            Ok(_) => true,
            Err(HvError::Unavailable(_)) => false,
            Err(e) => {
                tracing::info!(vm = %rec.object.name, error = %e, "the guest agent could not shut the guest down; using ACPI");
                false
            }
        }
    }

    async fn guest_modify(&self, ctx: &Ctx, vm: &str) -> Result<VmRecord, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmGuestModify).await?;
        self.agent_for(&rec)?;
        if runtime_of(&rec).power_state != PowerState::Running {
            return Err(Error::conflict(ErrorCode::VmNotRunning, format!("{} is not running", rec.object.name)));
        }
        Ok(rec)
    }

    /// Sets a guest user's password through the agent; the audit log says who did, never the password.
    pub async fn vm_guest_password(&self, ctx: &Ctx, vm: &str, p: GuestPassword) -> Result<(), Error> {
        user_check(&p.user)?;
        if p.password.is_empty() || p.password.len() > 1024 || p.password.contains(['\n', '\r', ':']) {
            return Err(Error::invalid("password", "a password has 1 to 1024 bytes and no line break or ':'"));
        }
        let rec = self.guest_modify(ctx, vm).await?;
        let pw = base64::engine::general_purpose::STANDARD.encode(p.password.as_bytes());
        let args = json!({ "username": p.user, "password": pw, "crypted": false });
        self.agent()
            .guest(rec.object.id, "guest-set-user-password", args, ASK)
            .await
            .map_err(|e| agent_error(&rec.object.name, e))?;
        let ev = ctx
            .event("vm.guest.password_set", "vm", Some(rec.object.id), &rec.object.name)
            .data(json!({ "user": p.user }));
        self.store().event_append(ev).await?;
        self.committed();
        Ok(())
    }

    /// Adds (or with `replace`, sets) a guest user's SSH keys through the agent.
    pub async fn vm_guest_ssh_keys(&self, ctx: &Ctx, vm: &str, p: GuestSshKeys) -> Result<(), Error> {
        user_check(&p.user)?;
        if p.keys.is_empty() || p.keys.len() > 64 {
            return Err(Error::invalid("keys", "send 1 to 64 keys"));
        }
        let ci = covm_types::vm::CloudInit {
            users: vec![covm_types::vm::CloudInitUser {
                name: "x".into(),
                ssh_authorized_keys: p.keys.clone(),
                sudo: false,
            }],
            ..Default::default()
        };
        ci.check().map_err(|e| Error::invalid("keys", e.message.clone()))?;
        let rec = self.guest_modify(ctx, vm).await?;
        let args = json!({ "username": p.user, "keys": p.keys, "reset": p.replace });
        self.agent()
            .guest(rec.object.id, "guest-ssh-add-authorized-keys", args, ASK)
            .await
            .map_err(|e| agent_error(&rec.object.name, e))?;
        let ev = ctx
            .event("vm.guest.ssh_keys_added", "vm", Some(rec.object.id), &rec.object.name)
            .data(json!({ "user": p.user, "keys": p.keys.len(), "replace": p.replace }));
        self.store().event_append(ev).await?;
        self.committed();
        Ok(())
    }

    /// Freezes a running guest's file systems (`guest-fsfreeze-freeze`): how many it froze. An error
    /// means the guest has no agent or cannot freeze; the caller decides.
    pub(crate) async fn guest_freeze(&self, id: Uuid) -> Result<u64, HvError> {
        let v = self.agent().guest(id, "guest-fsfreeze-freeze", Value::Null, Duration::from_secs(30)).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Thaws them again; always called after a freeze that may have frozen something.
    pub(crate) async fn guest_thaw(&self, id: Uuid) -> Result<u64, HvError> {
        let v = self.agent().guest(id, "guest-fsfreeze-thaw", Value::Null, Duration::from_secs(30)).await?;
        Ok(v.as_u64().unwrap_or(0))
    }
}

fn user_check(user: &str) -> Result<(), Error> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok { Ok(()) } else { Err(Error::invalid("user", "a user name has 1 to 32 letters, digits, '_', '-' or '.'")) }
}
