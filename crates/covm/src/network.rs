//! `covm network`: user, bridge (with a VLAN) and NAT networks, and a NAT network's port forwards.

use anyhow::{Context, bail};
use clap::Subcommand;
use covm_client::Client;
use covm_types::api::{ListQuery, NetworkCreate, NetworkForward, NetworkForwards, NetworkKind, NetworkView};

use crate::output::Out;

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Add a network: `--kind user`, `--kind bridge --bridge br0 [--vlan 10]`, or `--kind nat --subnet
    /// 10.77.0.0/24` (covm makes the bridge, DHCP/DNS and NAT).
    Create {
        name: String,
        #[arg(long, value_parser = ["user", "bridge", "nat"], default_value = "nat")]
        kind: String,
        #[arg(long)]
        bridge: Option<String>,
        #[arg(long)]
        vlan: Option<u16>,
        #[arg(long)]
        subnet: Option<String>,
        #[arg(long)]
        folder: Option<String>,
    },
    Ls,
    /// A network, with a NAT network's pinned addresses and forwards.
    Info {
        name: String,
    },
    /// Delete a network no VM uses, with what covm made for it on the host.
    Rm {
        name: String,
    },
    /// Set a NAT network's port forwards, replacing them: `HOST_PORT=VM:GUEST_PORT[/udp]`, each
    /// repeated; none clears them.
    Forward {
        name: String,
        forwards: Vec<String>,
    },
}

/// `8080=web:80`, `5353=dns:53/udp`.
fn forward_parse(s: &str) -> anyhow::Result<NetworkForward> {
    let bad = || anyhow::anyhow!("{s:?} is not HOST_PORT=VM:GUEST_PORT[/udp]");
    let (host, rest) = s.split_once('=').ok_or_else(bad)?;
    let (rest, proto) = match rest.rsplit_once('/') {
        Some((r, "udp")) => (r, covm_types::vm::Proto::Udp),
        Some((r, "tcp")) => (r, covm_types::vm::Proto::Tcp),
        Some(_) => return Err(bad()),
        None => (rest, covm_types::vm::Proto::Tcp),
    };
    let (vm, guest) = rest.rsplit_once(':').ok_or_else(bad)?;
    Ok(NetworkForward {
        host_port: host.parse().map_err(|_| bad())?,
        vm: vm.to_owned(),
        guest_port: guest.parse().map_err(|_| bad())?,
        proto,
        host_addr: None,
    })
}

fn print(out: &Out, n: &NetworkView) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(n)?);
        return Ok(());
    }
    let kind = serde_json::to_value(n.kind)?;
    println!("name:     {}", n.name);
    println!("kind:     {}", kind.as_str().unwrap_or("-"));
    if let Some(b) = &n.bridge {
        println!("bridge:   {b}{}", n.vlan.map(|v| format!(" (VLAN {v})")).unwrap_or_default());
    }
    if let (Some(s), Some(g)) = (&n.subnet, &n.gateway) {
        println!("subnet:   {s} (gateway {g})");
    }
    for l in &n.leases {
        println!("address:  {} {} ({})", l.ip, l.mac, l.vm);
    }
    for f in &n.forwards {
        println!("forward:  {}/{} -> {}:{}", f.host_port, f.proto.as_str(), f.vm, f.guest_port);
    }
    Ok(())
}

pub async fn run(c: &Client, out: &Out, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create { name, kind, bridge, vlan, subnet, folder } => {
            let kind = match kind.as_str() {
                "user" => NetworkKind::User,
                "bridge" => NetworkKind::Bridge,
                _ => NetworkKind::Nat,
            };
            let name = covm_types::Name::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            print(out, &c.network_create(&NetworkCreate { name, kind, bridge, vlan, subnet, folder }).await?)
        }
        NetworkCmd::Ls => {
            let items = c.networks(&ListQuery { limit: Some(1000), ..Default::default() }).await?.items;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(());
            }
            for n in items {
                let kind = serde_json::to_value(n.kind)?;
                let detail = n.subnet.or(n.bridge).unwrap_or_default();
                println!("{:<20} {:<7} {detail}", n.name, kind.as_str().unwrap_or("-"));
            }
            Ok(())
        }
        NetworkCmd::Info { name } => print(out, &c.get(&format!("/networks/{name}")).await?),
        NetworkCmd::Rm { name } => {
            c.delete(&format!("/networks/{name}")).await?;
            out.message(&format!("deleted network {name}"));
            Ok(())
        }
        NetworkCmd::Forward { name, forwards } => {
            let forwards = forwards.iter().map(|f| forward_parse(f)).collect::<anyhow::Result<Vec<_>>>()?;
            let n: NetworkView = c
                .put(&format!("/networks/{name}/forwards"), &NetworkForwards { forwards })
                .await
                .with_context(|| format!("setting the forwards of {name}"))?;
            print(out, &n)
        }
    }
}

/// A NIC's user-network forward: `HOST_PORT:GUEST_PORT[/udp]`.
pub fn nic_forward_parse(s: &str) -> anyhow::Result<serde_json::Value> {
    let bad = || anyhow::anyhow!("{s:?} is not HOST_PORT:GUEST_PORT[/udp]");
    let (rest, proto) = match s.rsplit_once('/') {
        Some((r, p @ ("udp" | "tcp"))) => (r, p),
        Some(_) => bail!("{s:?} is not HOST_PORT:GUEST_PORT[/udp]"),
        None => (s, "tcp"),
    };
    let (h, g) = rest.split_once(':').ok_or_else(bad)?;
    let (h, g): (u16, u16) = (h.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
    Ok(serde_json::json!({ "host_port": h, "guest_port": g, "proto": proto }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        let f = forward_parse("8080=web:80").unwrap();
        assert_eq!((f.host_port, f.vm.as_str(), f.guest_port), (8080, "web", 80));
        assert_eq!(forward_parse("53=dns:53/udp").unwrap().proto, covm_types::vm::Proto::Udp);
        assert!(forward_parse("8080:web:80").is_err());
        assert_eq!(nic_forward_parse("2222:22").unwrap()["host_port"], 2222);
        assert!(nic_forward_parse("2222").is_err());
    }
}
