//! Networks (DESIGN §19): `user` (QEMU's user networking, with port forwards per NIC), `bridge` (an
//! existing Linux bridge, a VLAN tag optional) and `nat`, which covm makes on the host: a bridge, dnsmasq
//! (DHCP with each NIC's MAC pinned to an address of the subnet, and DNS) and an nftables table
//! (masquerade out, the network's port forwards in). The record says what is wanted; [`App::net_host_apply`]
//! makes the host so, idempotently — at creation, at each power-on of a VM on it, at covm's start (after
//! a reboot) and every minute — and [`App::network_delete`] removes all of it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use covm_hv::NicBridge;
use covm_hv::net::{HostNet, NatForward, bridge_name, subnet_hosts, subnet_parse, table_name};
use covm_store::ObjectRecord;
use covm_types::api::{
    NetworkCreate, NetworkForward, NetworkForwards, NetworkKind, NetworkLease, NetworkView, ObjectKind,
};
use covm_types::vm::VmConfig;
use covm_types::{Error, ErrorCode, Privilege};
use serde_json::{Value, json};

use super::inventory::parent_path;
use super::node::hv_error;
use super::{App, Ctx, EventExt};

pub(crate) fn network_view(o: &ObjectRecord) -> NetworkView {
    let s = &o.spec;
    let mut leases: Vec<NetworkLease> = s["leases"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(mac, l)| NetworkLease {
            mac: mac.clone(),
            ip: l["ip"].as_str().unwrap_or_default().to_owned(),
            vm: l["vm"].as_str().unwrap_or_default().to_owned(),
        })
        .collect();
    leases.sort_by_key(|a| a.ip.parse::<Ipv4Addr>().ok());
    NetworkView {
        id: o.id,
        name: o.name.clone(),
        kind: serde_json::from_value(s["kind"].clone()).unwrap_or(NetworkKind::User),
        bridge: s["bridge"].as_str().map(str::to_owned),
        vlan: s["vlan"].as_u64().map(|v| v as u16),
        subnet: s["subnet"].as_str().map(str::to_owned),
        gateway: s["gateway"].as_str().map(str::to_owned),
        forwards: serde_json::from_value(s["forwards"].clone()).unwrap_or_default(),
        leases,
        folder: parent_path(o),
        created_at: o.created_at,
    }
}

/// One change of a network's host parts at a time in this process (a power-on and the minute's
/// reconcile would otherwise both restart its dnsmasq, and the second find the port taken).
fn host_lock(id: uuid::Uuid) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<uuid::Uuid, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone()
}

fn kind_of(o: &ObjectRecord) -> NetworkKind {
    serde_json::from_value(o.spec["kind"].clone()).unwrap_or(NetworkKind::User)
}

impl App {
    pub(crate) fn host_net(&self) -> HostNet {
        HostNet::new(self.config().netns.clone())
    }

    /// Where a NAT network's dnsmasq keeps its files on this host.
    fn net_dir(&self, o: &ObjectRecord) -> PathBuf {
        self.config().data_dir.join("networks").join(o.id.to_string())
    }

    pub async fn network_create(&self, ctx: &Ctx, p: NetworkCreate) -> Result<NetworkView, Error> {
        let folder = self.placement(ctx, p.folder.as_deref(), "folder", Privilege::NetworkConfig).await?;
        let only = |field: &str, what: &str| Error::invalid(field, format!("{field} is for {what} networks"));
        if p.kind != NetworkKind::Bridge && p.vlan.is_some() {
            return Err(only("vlan", "bridge"));
        }
        if p.kind != NetworkKind::Nat && p.subnet.is_some() {
            return Err(only("subnet", "nat"));
        }
        if p.kind != NetworkKind::Bridge && p.bridge.is_some() {
            return Err(only("bridge", "bridge"));
        }
        let spec = match p.kind {
            NetworkKind::User => json!({ "kind": p.kind, "bridge": null }),
            NetworkKind::Bridge => {
                let b = p.bridge.ok_or_else(|| Error::invalid("bridge", "a bridge network names its host bridge"))?;
                if b.is_empty()
                    || b.len() > 15
                    || !b.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err(Error::invalid("bridge", "a bridge name has 1 to 15 letters, digits, '-', '_' or '.'"));
                }
                if p.vlan.is_some_and(|v| !(1..=4094).contains(&v)) {
                    return Err(Error::invalid("vlan", "a VLAN tag is from 1 to 4094"));
                }
                json!({ "kind": p.kind, "bridge": b, "vlan": p.vlan })
            }
            NetworkKind::Nat => {
                let subnet = p
                    .subnet
                    .ok_or_else(|| Error::invalid("subnet", "a nat network has a subnet, like 10.77.0.0/24"))?;
                let (net, gw, len) = subnet_parse(&subnet).ok_or_else(|| {
                    Error::invalid(
                        "subnet",
                        "a subnet is an IPv4 network address and a prefix from 16 to 29, like 10.77.0.0/24",
                    )
                })?;
                let subnet = format!("{net}/{len}");
                // No two NAT networks on one subnet.
                for o in self.store().objects_list(ObjectKind::Network, None, None, 1000).await? {
                    if o.spec["subnet"].as_str() == Some(subnet.as_str()) {
                        return Err(Error::conflict(
                            ErrorCode::InUse,
                            format!("network {} already has subnet {subnet}", o.name),
                        )
                        .with_field("subnet"));
                    }
                }
                json!({ "kind": p.kind, "subnet": subnet, "gateway": gw.to_string(), "prefix": len, "forwards": [], "leases": {} })
            }
        };
        let mut rec = self.object_new(ctx, ObjectKind::Network, &p.name, &folder, spec).await?;
        if p.kind == NetworkKind::Nat {
            // Its bridge's name comes from its id.
            let mut spec = rec.spec.clone();
            spec["bridge"] = json!(bridge_name(rec.id));
            self.store().object_spec_set(rec.id, spec.clone()).await?;
            rec.spec = spec;
            if let Err(e) = self.net_host_apply(&rec).await {
                // Nothing half made: the host's parts and the record go.
                self.net_host_remove(&rec).await;
                let ev = ctx.event("network.deleted", "network", Some(rec.id), &rec.name).data(json!({ "undo": true }));
                let _ = self.store().object_delete(rec.id, ev).await;
                self.committed();
                return Err(e);
            }
        }
        Ok(network_view(&rec))
    }

    pub async fn network_get(&self, ctx: &Ctx, net: &str) -> Result<NetworkView, Error> {
        Ok(network_view(&self.object_resolve(ctx, net, Some(ObjectKind::Network), "network").await?))
    }

    /// Deletes a network no VM's config names (409 `in_use` naming them), and what covm made for it.
    pub async fn network_delete(&self, ctx: &Ctx, net: &str) -> Result<(), Error> {
        let o = self.object_resolve(ctx, net, Some(ObjectKind::Network), "network").await?;
        self.require(ctx, &o, Privilege::NetworkConfig).await?;
        let mut users = Vec::new();
        for vm in self.vms_all().await? {
            if let Ok(c) = serde_json::from_value::<VmConfig>(vm.config.clone())
                && c.nics.iter().any(|n| n.network == o.name || n.network == o.id.to_string())
            {
                users.push(vm.object.name.clone());
            }
        }
        if !users.is_empty() {
            return Err(Error::conflict(
                ErrorCode::InUse,
                format!("VMs have NICs on {}: {}; move or remove them first", o.name, users.join(", ")),
            )
            .with_details(json!({ "vms": users })));
        }
        // The host's parts first: a crash in between leaves the record, whose parts the next reconcile
        // makes again (and a delete removes), never parts without a record.
        self.net_host_remove(&o).await;
        let ev = ctx.event("network.deleted", "network", Some(o.id), &o.name).data(json!({ "kind": o.spec["kind"] }));
        self.store().object_delete(o.id, ev).await?;
        self.committed();
        Ok(())
    }

    /// Replaces a NAT network's port forwards (each to a VM with a NIC on it) and applies them.
    pub async fn network_forwards_set(&self, ctx: &Ctx, net: &str, p: NetworkForwards) -> Result<NetworkView, Error> {
        let o = self.object_resolve(ctx, net, Some(ObjectKind::Network), "network").await?;
        self.require(ctx, &o, Privilege::NetworkConfig).await?;
        if kind_of(&o) != NetworkKind::Nat {
            return Err(Error::invalid(
                "forwards",
                format!("{} is not a nat network: it has no forwards of its own", o.name),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut p = p;
        let listen = self.config().listen_port;
        for (i, f) in p.forwards.iter_mut().enumerate() {
            let field = |x: &str| format!("forwards[{i}].{x}");
            if f.host_port == 0 || f.guest_port == 0 {
                return Err(Error::invalid(&field("host_port"), "a port is between 1 and 65535"));
            }
            if !seen.insert((f.proto, f.host_addr, f.host_port)) {
                return Err(Error::invalid(&field("host_port"), format!("port {} is forwarded twice", f.host_port)));
            }
            if Some(f.host_port) == listen {
                return Err(Error::invalid(&field("host_port"), format!("port {} is covm's own", f.host_port)));
            }
            // Without a namespace of covm's own, a port the host already serves is not taken over.
            if self.config().netns.is_none()
                && self.agent().driver_name() != "sim"
                && f.proto == covm_types::vm::Proto::Tcp
            {
                let on_host = covm_types::vm::PortForward {
                    host_port: f.host_port,
                    guest_port: f.guest_port,
                    proto: f.proto,
                    host_addr: f.host_addr.unwrap_or(Ipv4Addr::UNSPECIFIED).into(),
                };
                super::power::port_free(&on_host).map_err(|e| e.with_field(field("host_port")))?;
            }
            let vm = self.vm_resolve(ctx, &f.vm).await.map_err(|e| e.with_field(field("vm")))?;
            f.vm = vm.object.name.clone();
            let c: VmConfig = serde_json::from_value(vm.config.clone()).map_err(|e| Error::internal(e.to_string()))?;
            let Some(nic) = c.nics.iter().find(|n| n.network == o.name || n.network == o.id.to_string()) else {
                return Err(Error::invalid(&field("vm"), format!("{} has no NIC on {}", f.vm, o.name)));
            };
            // The VM's address, pinned now if it has none yet.
            let mac = nic.mac.clone().unwrap_or_default();
            self.lease_for(o.id, &mac, &vm.object.name).await?;
        }
        let o = self.store().object_get(o.id).await?.ok_or_else(|| Error::not_found("network", net))?;
        let mut spec = o.spec.clone();
        spec["forwards"] = json!(p.forwards);
        let ev = ctx
            .event("network.forwards.changed", "network", Some(o.id), &o.name)
            .data(json!({ "forwards": p.forwards }));
        self.store().object_spec_update(o.id, &o.spec, spec.clone(), ev).await?;
        self.committed();
        let o = ObjectRecord { spec, ..o };
        self.net_host_apply(&o).await?;
        Ok(network_view(&o))
    }

    /// The address pinned to `mac` on a NAT network (allocated, the lowest free one, if it has none);
    /// a compare-and-swap of the network's record, so two power-ons never take the same address.
    pub(crate) async fn lease_for(&self, net: uuid::Uuid, mac: &str, vm: &str) -> Result<Ipv4Addr, Error> {
        let mac = mac.to_ascii_lowercase();
        if mac.is_empty() {
            return Err(Error::invalid(
                "mac",
                format!("a NIC of {vm} has no MAC address: set one (or leave it to covm on create)"),
            ));
        }
        for _ in 0..20 {
            let o = self.store().object_get(net).await?.ok_or_else(|| Error::not_found("network", &net.to_string()))?;
            let leases = o.spec["leases"].as_object().cloned().unwrap_or_default();
            if let Some(l) = leases.get(&mac)
                && l["vm"] == json!(vm)
                && let Some(ip) = l["ip"].as_str().and_then(|s| s.parse().ok())
            {
                return Ok(ip);
            }
            let (net_addr, len) = o.spec["subnet"]
                .as_str()
                .and_then(subnet_parse)
                .map(|(n, _, l)| (n, l))
                .ok_or_else(|| Error::internal(format!("network {} has no subnet", o.name)))?;
            // Addresses of VMs gone are free again.
            let live: std::collections::HashSet<String> =
                self.vms_all().await?.into_iter().map(|v| v.object.name).collect();
            // A MAC another VM holds here is that VM's: its address and its forwards are not taken over.
            if let Some(other) =
                leases.get(&mac).and_then(|l| l["vm"].as_str()).filter(|o| *o != vm && live.contains(*o))
            {
                return Err(Error::conflict(
                    ErrorCode::InUse,
                    format!("MAC {mac} is {other}'s on network {}: give this NIC another MAC", o.name),
                ));
            }
            let mut kept: serde_json::Map<String, Value> = leases
                .into_iter()
                .filter(|(_, l)| l["vm"].as_str().is_some_and(|v| live.contains(v) || v == vm))
                .collect();
            let ip = match kept.get(&mac).and_then(|l| l["ip"].as_str()).and_then(|s| s.parse().ok()) {
                Some(ip) => ip,
                None => {
                    let taken: std::collections::HashSet<&str> =
                        kept.values().filter_map(|l| l["ip"].as_str()).collect();
                    subnet_hosts(net_addr, len).find(|a| !taken.contains(a.to_string().as_str())).ok_or_else(|| {
                        Error::conflict(ErrorCode::InUse, format!("network {} has no free address left", o.name))
                    })?
                }
            };
            kept.insert(mac.clone(), json!({ "ip": ip.to_string(), "vm": vm }));
            let mut spec = o.spec.clone();
            spec["leases"] = Value::Object(kept);
            let ev = super::system_event("network.lease.pinned", "network", Some(o.id), &o.name)
                .audit_only()
                .data(json!({ "mac": mac, "ip": ip.to_string(), "vm": vm }));
            match self.store().object_spec_update(o.id, &o.spec, spec, ev).await {
                Ok(_) => {
                    self.committed();
                    return Ok(ip);
                }
                Err(e) if e.code == ErrorCode::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::conflict(ErrorCode::Busy, "the network changed too often while an address was pinned; try again"))
    }

    /// Makes the host as a network's record says (a NAT network: bridge, dnsmasq, nftables).
    pub(crate) async fn net_host_apply(&self, o: &ObjectRecord) -> Result<(), Error> {
        // The simulated driver touches nothing on the host: its networks are records only.
        if kind_of(o) != NetworkKind::Nat || self.agent().driver_name() == "sim" {
            return Ok(());
        }
        let lock = host_lock(o.id);
        let _one = lock.lock().await;
        // As the record is now (a lease pinned while this waited is in it); a network deleted meanwhile is
        // made no more.
        let Some(o) = &self.store().object_get(o.id).await? else { return Ok(()) };
        let h = self.host_net();
        let (net, gw, len) = o.spec["subnet"]
            .as_str()
            .and_then(subnet_parse)
            .ok_or_else(|| Error::internal(format!("network {} has no subnet", o.name)))?;
        let bridge = o.spec["bridge"].as_str().map(str::to_owned).unwrap_or_else(|| bridge_name(o.id));
        h.bridge_ensure(&bridge, Some(&format!("{gw}/{len}")), false).await.map_err(hv_error)?;
        let mut hosts = Vec::new();
        for (mac, l) in o.spec["leases"].as_object().into_iter().flatten() {
            if let Some(ip) = l["ip"].as_str().and_then(|s| s.parse().ok()) {
                hosts.push((mac.clone(), ip));
            }
        }
        h.dnsmasq_ensure(&self.net_dir(o), &bridge, gw, net, &hosts).await.map_err(hv_error)?;
        let forwards: Vec<NetworkForward> = serde_json::from_value(o.spec["forwards"].clone()).unwrap_or_default();
        let mut rules = Vec::new();
        for f in &forwards {
            let ip = o.spec["leases"]
                .as_object()
                .into_iter()
                .flatten()
                .find(|(_, l)| l["vm"] == json!(f.vm))
                .and_then(|(_, l)| l["ip"].as_str()?.parse().ok());
            let Some(ip) = ip else {
                tracing::warn!(network = %o.name, vm = %f.vm, "a port forward names a VM with no address on the network; left out");
                continue;
            };
            rules.push(NatForward {
                proto: f.proto.as_str(),
                host_addr: f.host_addr,
                host_port: f.host_port,
                ip,
                guest_port: f.guest_port,
            });
        }
        h.nat_apply(&table_name(o.id), &format!("{net}/{len}"), &rules).await.map_err(hv_error)?;
        Ok(())
    }

    /// Removes what covm made on the host for a network (what is already gone is fine).
    pub(crate) async fn net_host_remove(&self, o: &ObjectRecord) {
        if kind_of(o) != NetworkKind::Nat || self.agent().driver_name() == "sim" {
            return;
        }
        let lock = host_lock(o.id);
        let _one = lock.lock().await;
        let h = self.host_net();
        h.dnsmasq_stop(&self.net_dir(o)).await;
        if let Err(e) = h.nat_remove(&table_name(o.id)).await {
            tracing::debug!(network = %o.name, error = %e, "no nftables table to remove");
        }
        let bridge = o.spec["bridge"].as_str().map(str::to_owned).unwrap_or_else(|| bridge_name(o.id));
        if let Err(e) = h.link_remove(&bridge).await {
            tracing::warn!(network = %o.name, error = %e, "could not remove a network's bridge");
        }
    }

    /// Applies every NAT network again (at start: after a reboot the host has none of it).
    pub async fn networks_reconcile(&self) {
        let nets = match self.store().objects_list(ObjectKind::Network, None, None, 1000).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the networks to make them on the host");
                return;
            }
        };
        for o in nets.iter().filter(|o| kind_of(o) == NetworkKind::Nat) {
            if let Err(e) = self.net_host_apply(o).await {
                tracing::warn!(network = %o.name, error = %e, "could not make a network on the host");
            }
        }
    }

    /// The host bridge of each NIC of a VM about to start (None: user networking); a NIC on a NAT
    /// network gets its pinned address, and the network is made on the host if it is not there.
    pub(crate) async fn nic_bridges_for(&self, vm: &str, c: &VmConfig) -> Result<Vec<Option<NicBridge>>, Error> {
        let mut out = Vec::new();
        for (i, n) in c.nics.iter().enumerate() {
            out.push(self.nic_bridge(vm, n, &format!("nics[{i}].network")).await?);
        }
        Ok(out)
    }

    /// The host bridge of one NIC about to run (None: user networking); see [`Self::nic_bridges_for`].
    pub(crate) async fn nic_bridge(
        &self,
        vm: &str,
        n: &covm_types::vm::Nic,
        field: &str,
    ) -> Result<Option<NicBridge>, Error> {
        let Some(o) = self.object_lookup(&n.network, Some(ObjectKind::Network)).await? else {
            return Err(
                Error::conflict(ErrorCode::InUse, format!("network {} no longer exists", n.network)).with_field(field)
            );
        };
        Ok(match kind_of(&o) {
            NetworkKind::User => None,
            NetworkKind::Bridge => Some(NicBridge {
                bridge: o.spec["bridge"].as_str().unwrap_or_default().to_owned(),
                vlan: o.spec["vlan"].as_u64().map(|v| v as u16),
            }),
            NetworkKind::Nat => {
                self.lease_for(o.id, n.mac.as_deref().unwrap_or_default(), vm).await?;
                let o = self.store().object_get(o.id).await?.unwrap_or(o);
                self.net_host_apply(&o).await?;
                Some(NicBridge { bridge: o.spec["bridge"].as_str().unwrap_or_default().to_owned(), vlan: None })
            }
        })
    }
}
