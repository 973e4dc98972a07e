//! `covm vm clone|template|nic|ip|guest`: from a template to a VM people can reach.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use covm_client::{ChangeOptions, Client};
use covm_types::vm::{CloneCustomize, CloudInitUser, GuestPassword, GuestSshKeys, VmClone, VmView};
use serde_json::{Value, json};

use crate::output::Out;

#[derive(Subcommand)]
pub enum VmNicCmd {
    /// Add a NIC (a running VM takes it at its next power-on: --next-boot).
    Add {
        vm: String,
        network: String,
        #[arg(long, value_parser = ["virtio-net", "e1000"])]
        model: Option<String>,
        #[arg(long)]
        mac: Option<String>,
        /// A port forward on a user network: HOST_PORT:GUEST_PORT[/udp] (repeatable).
        #[arg(long = "forward")]
        forwards: Vec<String>,
        #[arg(long)]
        next_boot: bool,
    },
    /// Remove NIC number N (as `vm nic ls` numbers them).
    Rm {
        vm: String,
        index: usize,
        #[arg(long)]
        next_boot: bool,
    },
    /// Move NIC N to another network, plug or unplug its cable (live), or set its forwards.
    Change {
        vm: String,
        index: usize,
        #[arg(long)]
        network: Option<String>,
        /// Link up (true) or down (false): live on a running VM.
        #[arg(long)]
        connected: Option<bool>,
        /// Replace its port forwards: HOST_PORT:GUEST_PORT[/udp] (repeatable).
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// Remove its port forwards.
        #[arg(long, conflicts_with = "forwards")]
        no_forwards: bool,
        #[arg(long)]
        next_boot: bool,
    },
    Ls {
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum VmGuestCmd {
    /// What the guest agent tells: OS, host name, addresses.
    Info { vm: String },
    /// Set a guest user's password (read from standard input) through the guest agent.
    Password { vm: String, user: String },
    /// Add SSH public keys (or @FILE) to a guest user's authorized_keys through the guest agent.
    SshKey {
        vm: String,
        user: String,
        keys: Vec<String>,
        #[arg(long)]
        replace: bool,
    },
}

/// A key given as itself or as `@FILE`.
pub fn key_arg(k: &str) -> anyhow::Result<String> {
    match k.strip_prefix('@') {
        Some(f) => Ok(std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?.trim().to_owned()),
        None => Ok(k.to_owned()),
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn clone(
    c: &Client,
    out: &Out,
    source: String,
    name: String,
    full: bool,
    folder: Option<String>,
    pool: Option<String>,
    hostname: Option<String>,
    user: Option<String>,
    ssh_keys: Vec<String>,
    sudo: bool,
) -> anyhow::Result<VmView> {
    let customize = if hostname.is_some() || user.is_some() || !ssh_keys.is_empty() {
        let users = match user {
            Some(u) => Some(vec![CloudInitUser {
                name: u,
                ssh_authorized_keys: ssh_keys.iter().map(|k| key_arg(k)).collect::<anyhow::Result<_>>()?,
                sudo,
            }]),
            None if !ssh_keys.is_empty() => bail!("--ssh-key goes with --user"),
            None => None,
        };
        Some(CloneCustomize { hostname, users, network: None })
    } else {
        None
    };
    let p = VmClone {
        name: covm_types::Name::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?,
        linked: full.then_some(false),
        folder,
        pool,
        customize,
        description: None,
    };
    let t = Instant::now();
    let v = c.vm_clone(&source, &p).await?;
    out.message(&format!("cloned {source} to {name} in {:.0} ms", t.elapsed().as_secs_f64() * 1000.0));
    Ok(v)
}

/// The VM's NICs as a JSON list, to change and send back whole (a merge patch replaces lists).
async fn nics_of(c: &Client, vm: &str) -> anyhow::Result<(Vec<Value>, i64)> {
    let v = c.vm(vm).await?;
    Ok((serde_json::from_value(serde_json::to_value(&v.config.nics)?)?, v.version))
}

async fn nics_write(
    c: &Client,
    vm: &str,
    nics: Vec<Value>,
    version: i64,
    next_boot: bool,
    msg: &str,
) -> anyhow::Result<VmView> {
    let opts = ChangeOptions { if_match: Some(version), next_boot, message: Some(msg.into()), ..Default::default() };
    Ok(c.vm_change(vm, &json!({ "nics": nics }), &opts).await?)
}

pub async fn nic(c: &Client, out: &Out, cmd: VmNicCmd) -> anyhow::Result<()> {
    match cmd {
        VmNicCmd::Add { vm, network, model, mac, forwards, next_boot } => {
            let mut n = json!({ "network": network });
            if let Some(m) = model {
                n["model"] = json!(m);
            }
            if let Some(m) = mac {
                n["mac"] = json!(m);
            }
            if !forwards.is_empty() {
                n["port_forwards"] = json!(
                    forwards
                        .iter()
                        .map(|f| crate::network::nic_forward_parse(f))
                        .collect::<anyhow::Result<Vec<_>>>()?
                );
            }
            let v = c.vm_nic_add(&vm, &n, next_boot).await?;
            out.message(&format!("{vm} has {} NICs (version {})", v.config.nics.len(), v.version));
            Ok(())
        }
        VmNicCmd::Rm { vm, index, next_boot } => {
            let (nics, _) = nics_of(c, &vm).await?;
            let Some(mac) = nics.get(index).and_then(|n| n["mac"].as_str()) else {
                bail!("{vm} has no NIC {index} (it has {})", nics.len());
            };
            let v = c.vm_nic_remove(&vm, mac, next_boot).await?;
            out.message(&format!("{vm} has {} NICs (version {})", v.config.nics.len(), v.version));
            Ok(())
        }
        VmNicCmd::Change { vm, index, network, connected, forwards, no_forwards, next_boot } => {
            let (mut nics, version) = nics_of(c, &vm).await?;
            let Some(n) = nics.get_mut(index) else { bail!("{vm} has no NIC {index}") };
            let running = c.vm(&vm).await?.runtime.power_state == covm_types::vm::PowerState::Running;
            if let Some(net) = network.as_ref().filter(|_| running && !next_boot) {
                // Moved on a running VM: unplugged, then plugged on the other network (same MAC).
                let mut moved = n.clone();
                moved["network"] = json!(net);
                let mac = n["mac"].as_str().unwrap_or_default().to_owned();
                c.vm_nic_remove(&vm, &mac, false).await?;
                let v = c.vm_nic_add(&vm, &moved, false).await?;
                out.message(&format!("moved NIC {mac} of {vm} to {net} (version {})", v.version));
                return Ok(());
            }
            if let Some(net) = network {
                n["network"] = json!(net);
            }
            if let Some(up) = connected {
                n["connected"] = json!(up);
            }
            if no_forwards {
                n.as_object_mut().map(|o| o.remove("port_forwards"));
            } else if !forwards.is_empty() {
                n["port_forwards"] = json!(
                    forwards
                        .iter()
                        .map(|f| crate::network::nic_forward_parse(f))
                        .collect::<anyhow::Result<Vec<_>>>()?
                );
            }
            let v = nics_write(c, &vm, nics, version, next_boot, &format!("changed NIC {index}")).await?;
            out.message(&format!("{vm} is at version {}", v.version));
            Ok(())
        }
        VmNicCmd::Ls { vm } => {
            let v = c.vm(&vm).await?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&v.config.nics)?);
                return Ok(());
            }
            let addrs = v.runtime.guest.map(|g| g.interfaces).unwrap_or_default();
            for (i, n) in v.config.nics.iter().enumerate() {
                let mac = n.mac.clone().unwrap_or_default();
                let ips: Vec<String> = addrs
                    .iter()
                    .filter(|a| a.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&mac)))
                    .flat_map(|a| a.addresses.clone())
                    .collect();
                let fw: Vec<String> = n
                    .port_forwards
                    .iter()
                    .map(|f| format!("{}->{}/{}", f.host_port, f.guest_port, f.proto.as_str()))
                    .collect();
                println!(
                    "{i}  {:<12} {mac}  {}{}{}",
                    n.network,
                    if n.connected { "up" } else { "down" },
                    if ips.is_empty() { String::new() } else { format!("  {}", ips.join(" ")) },
                    if fw.is_empty() { String::new() } else { format!("  forwards {}", fw.join(" ")) },
                );
            }
            Ok(())
        }
    }
}

/// Waits until the VM's IPv4 address is known (through its guest agent, or the address a NAT network
/// pinned to its NIC once the guest answers); prints it.
pub async fn ip(c: &Client, out: &Out, vm: &str, timeout: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let last = match c.vm_guest(vm).await {
            Ok(g) => {
                if let Some(ip) = g.ipv4() {
                    if out.json {
                        println!("{}", json!({ "vm": vm, "ip": ip }));
                    } else {
                        println!("{ip}");
                    }
                    return Ok(());
                }
                g.message.unwrap_or_else(|| "the guest has no IPv4 address yet".into())
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(timeout) {
            bail!("no address for {vm} within {timeout} s: {last}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn guest(c: &Client, out: &Out, cmd: VmGuestCmd) -> anyhow::Result<()> {
    match cmd {
        VmGuestCmd::Info { vm } => {
            let g = c.vm_guest(&vm).await?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&g)?);
                return Ok(());
            }
            if !g.agent {
                println!("agent:     none ({})", g.message.unwrap_or_default());
                return Ok(());
            }
            println!("agent:     yes");
            println!("os:        {}", g.os.unwrap_or_default());
            println!("hostname:  {}", g.hostname.unwrap_or_default());
            for i in g.interfaces {
                println!("{:<10} {} {}", i.name, i.mac.unwrap_or_default(), i.addresses.join(" "));
            }
            Ok(())
        }
        VmGuestCmd::Password { vm, user } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            c.vm_guest_password(&vm, &GuestPassword { user: user.clone(), password }).await?;
            out.message(&format!("set the password of {user} on {vm}"));
            Ok(())
        }
        VmGuestCmd::SshKey { vm, user, keys, replace } => {
            let keys = keys.iter().map(|k| key_arg(k)).collect::<anyhow::Result<Vec<_>>>()?;
            c.vm_guest_ssh_keys(&vm, &GuestSshKeys { user: user.clone(), keys, replace }).await?;
            out.message(&format!("added SSH keys of {user} on {vm}"));
            Ok(())
        }
    }
}
