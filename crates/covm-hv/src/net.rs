//! What covm makes on the host for networks: Linux bridges, the VMs' tap devices on them (with a VLAN
//! tag), dnsmasq for DHCP and DNS with MAC-pinned addresses, and an nftables table per NAT network
//! (masquerade out, DNAT for port forwards). Everything runs through `ip`, `bridge`, `nft`, `sysctl`
//! and `dnsmasq` from Debian (iproute2, nftables, dnsmasq-base), optionally inside a network namespace
//! (`ip netns exec NS …`: covm's `--netns`, which the tests use so that no packet leaves them).
//! Every operation is idempotent: covm applies the whole wanted state again after a restart or a reboot.

use std::net::Ipv4Addr;
use std::path::Path;

use uuid::Uuid;

use crate::HvError;

/// The tap device of a NIC (QEMU makes it, and it goes with QEMU): `cvt` + the MAC's 12 hex digits.
pub fn tap_name(mac: &str) -> String {
    format!("cvt{}", mac.replace(':', "").to_ascii_lowercase())
}

/// The bridge covm makes for a NAT network.
pub fn bridge_name(net: Uuid) -> String {
    let id = net.simple().to_string();
    format!("cvb{}", &id[id.len() - 9..])
}

/// The nftables table of a NAT network.
pub fn table_name(net: Uuid) -> String {
    let id = net.simple().to_string();
    format!("covm_{}", &id[id.len() - 9..])
}

/// A DNAT rule: `proto` port `host_port` on the host's own addresses (or `host_addr`) to `ip:guest_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatForward {
    pub proto: &'static str,
    pub host_addr: Option<Ipv4Addr>,
    pub host_port: u16,
    pub ip: Ipv4Addr,
    pub guest_port: u16,
}

/// The host's networking, in the root namespace or in `netns`.
#[derive(Debug, Clone, Default)]
pub struct HostNet {
    pub netns: Option<String>,
}

impl HostNet {
    pub fn new(netns: Option<String>) -> HostNet {
        HostNet { netns }
    }

    fn command(&self, prog: &str) -> tokio::process::Command {
        match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
            None => tokio::process::Command::new(prog),
        }
    }

    /// Runs a program to its end; its stdout, or an error with its stderr.
    pub async fn run(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, HvError> {
        use tokio::io::AsyncWriteExt;
        let mut c = self.command(prog);
        c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        c.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
        let mut child = c.spawn().map_err(|e| {
            HvError::Unavailable(format!("cannot run {prog}: {e} (install iproute2, nftables and dnsmasq-base)"))
        })?;
        if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(input.as_bytes()).await.map_err(|e| HvError::Io(format!("{prog}: {e}")))?;
        }
        let out = child.wait_with_output().await.map_err(|e| HvError::Io(format!("{prog}: {e}")))?;
        if !out.status.success() {
            return Err(HvError::Io(format!(
                "{prog} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn link_exists(&self, name: &str) -> bool {
        self.run("ip", &["link", "show", "dev", name], None).await.is_ok()
    }

    /// A bridge with this address (`10.77.0.1/24`, or none for a plain bridge), up; VLAN filtering on
    /// when asked (a bridge whose ports carry VLAN tags).
    pub async fn bridge_ensure(&self, name: &str, addr: Option<&str>, vlan_filtering: bool) -> Result<(), HvError> {
        if !self.link_exists(name).await {
            self.run("ip", &["link", "add", "name", name, "type", "bridge"], None).await?;
        }
        if vlan_filtering {
            self.run("ip", &["link", "set", "dev", name, "type", "bridge", "vlan_filtering", "1"], None).await?;
        }
        if let Some(a) = addr {
            self.run("ip", &["addr", "replace", a, "dev", name], None).await?;
        }
        self.run("ip", &["link", "set", "dev", name, "up"], None).await?;
        Ok(())
    }

    /// Removes a link (bridge or tap); one already gone is fine.
    pub async fn link_remove(&self, name: &str) -> Result<(), HvError> {
        if self.link_exists(name).await {
            self.run("ip", &["link", "del", "dev", name], None).await?;
        }
        Ok(())
    }

    /// Puts a VM's tap on a bridge and up, as an untagged port of `vlan` when given.
    pub async fn tap_attach(&self, tap: &str, bridge: &str, vlan: Option<u16>) -> Result<(), HvError> {
        if !self.link_exists(bridge).await {
            return Err(HvError::Unavailable(format!("there is no bridge {bridge} on this host")));
        }
        if let Some(v) = vlan {
            // covm does not change a bridge it did not make: turning VLAN filtering on would cut its
            // other ports off VLANs they carry. The administrator turns it on and carries the VLAN on
            // the uplink.
            let info = self.run("ip", &["-j", "-d", "link", "show", "dev", bridge], None).await?;
            let filtering = serde_json::from_str::<serde_json::Value>(&info)
                .ok()
                .and_then(|j| j.get(0).and_then(|l| l["linkinfo"]["info_data"]["vlan_filtering"].as_u64()));
            if filtering != Some(1) {
                return Err(HvError::Unavailable(format!(
                    "bridge {bridge} does not filter VLANs, so VLAN {v} cannot be kept apart on it: turn it on \
                     (ip link set dev {bridge} type bridge vlan_filtering 1; the kernel needs \
                     CONFIG_BRIDGE_VLAN_FILTERING) and carry VLAN {v} on the bridge's uplink"
                )));
            }
            self.run("ip", &["link", "set", "dev", tap, "master", bridge], None).await?;
            let _ = self.run("bridge", &["vlan", "del", "dev", tap, "vid", "1"], None).await;
            let vid = v.to_string();
            self.run("bridge", &["vlan", "add", "dev", tap, "vid", &vid, "pvid", "untagged"], None).await?;
        } else {
            self.run("ip", &["link", "set", "dev", tap, "master", bridge], None).await?;
        }
        self.run("ip", &["link", "set", "dev", tap, "up"], None).await?;
        Ok(())
    }

    /// A NAT network's nftables table, replaced whole in one transaction: masquerade for what leaves
    /// `subnet` for elsewhere, and the port forwards (from outside, and from the host itself).
    pub async fn nat_apply(&self, table: &str, subnet: &str, forwards: &[NatForward]) -> Result<(), HvError> {
        let mut dnat = String::new();
        for f in forwards {
            let daddr = match f.host_addr {
                Some(a) => format!("ip daddr {a}"),
                None => "fib daddr type local".into(),
            };
            dnat.push_str(&format!(
                "    {daddr} {} dport {} dnat to {}:{}\n",
                f.proto, f.host_port, f.ip, f.guest_port
            ));
        }
        let rules = format!(
            "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n\
             chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {subnet} ip daddr != {subnet} masquerade\n}}\n\
             chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{dnat}}}\n\
             chain out {{\n    type nat hook output priority -100; policy accept;\n{dnat}}}\n}}\n"
        );
        self.run("nft", &["-f", "-"], Some(&rules)).await?;
        // Forwarding between the bridge and the world (per namespace).
        self.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"], None).await?;
        Ok(())
    }

    pub async fn nat_remove(&self, table: &str) -> Result<(), HvError> {
        let rules = format!("table ip {table}\ndelete table ip {table}\n");
        self.run("nft", &["-f", "-"], Some(&rules)).await.map(drop)
    }

    /// dnsmasq for a NAT network: DHCP that gives each pinned MAC its address (and nothing to others)
    /// and DNS, on the bridge only. Its files are in `dir`. The pinned addresses are on its command
    /// line (dnsmasq drops to `nobody` and could not read a hosts file in covm's data directory): one
    /// running with other arguments is started again (its lease file keeps the leases).
    pub async fn dnsmasq_ensure(
        &self,
        dir: &Path,
        bridge: &str,
        gateway: Ipv4Addr,
        network: Ipv4Addr,
        hosts: &[(String, Ipv4Addr)],
    ) -> Result<(), HvError> {
        let io = |e: std::io::Error| HvError::Io(format!("dnsmasq's files in {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let p = |f: &str| dir.join(f).display().to_string();
        let mut args = vec![
            "--conf-file=/dev/null".to_owned(),
            format!("--pid-file={}", p("dnsmasq.pid")),
            format!("--interface={bridge}"),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            format!("--listen-address={gateway}"),
            format!("--dhcp-range={network},static,12h"),
            format!("--dhcp-leasefile={}", p("leases")),
            "--dhcp-authoritative".into(),
            format!("--log-facility={}", p("dnsmasq.log")),
        ];
        args.extend(hosts.iter().map(|(mac, ip)| format!("--dhcp-host={mac},{ip}")));
        if let Some(pid) = dnsmasq_pid(dir) {
            let running = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let running: Vec<String> =
                running.split(|b| *b == 0).skip(1).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if running.iter().filter(|a| !a.is_empty()).eq(args.iter()) {
                return Ok(());
            }
            self.dnsmasq_kill(dir, pid).await;
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The one it replaced may hold the port for a moment after it has gone.
        let mut tries = 0;
        while let Err(e) = self.run("dnsmasq", &args, None).await {
            tries += 1;
            if tries == 10 || !e.to_string().contains("Address already in use") {
                return Err(e);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // It forks and writes its pid file.
        for _ in 0..100 {
            if dnsmasq_pid(dir).is_some() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(HvError::Io(format!("dnsmasq did not start (see {})", p("dnsmasq.log"))))
    }

    pub async fn dnsmasq_stop(&self, dir: &Path) {
        if let Some(pid) = dnsmasq_pid(dir) {
            self.dnsmasq_kill(dir, pid).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn dnsmasq_kill(&self, dir: &Path, pid: u32) {
        let _ = nix_kill(pid, "TERM");
        for _ in 0..100 {
            if dnsmasq_pid(dir).is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = nix_kill(pid, "KILL");
    }
}

/// The pid of the dnsmasq of `dir`, if it runs (its command line names the directory).
pub fn dnsmasq_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("dnsmasq.pid")).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains(&dir.display().to_string()).then_some(pid)
}

fn nix_kill(pid: u32, signal: &str) -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status()
}

/// The network, gateway (first address) and prefix of an IPv4 subnet `a.b.c.d/n` (n from 16 to 29).
pub fn subnet_parse(s: &str) -> Option<(Ipv4Addr, Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    if !(16..=29).contains(&len) {
        return None;
    }
    let mask = u32::MAX << (32 - len);
    let net = u32::from(ip) & mask;
    if net != u32::from(ip) {
        return None;
    }
    Some((Ipv4Addr::from(net), Ipv4Addr::from(net + 1), len))
}

/// The addresses a subnet gives VMs: after the gateway, before the broadcast address.
pub fn subnet_hosts(net: Ipv4Addr, len: u8) -> impl Iterator<Item = Ipv4Addr> {
    let n = u32::from(net);
    let size = 1u32 << (32 - len);
    (n + 2..n + size - 1).map(Ipv4Addr::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_and_subnets_parse() {
        let id = Uuid::now_v7();
        assert!(tap_name("52:54:00:ab:cd:ef").len() <= 15 && bridge_name(id).len() <= 15);
        assert_eq!(
            subnet_parse("10.77.0.0/24"),
            Some(("10.77.0.0".parse().unwrap(), "10.77.0.1".parse().unwrap(), 24))
        );
        assert_eq!(subnet_parse("10.77.0.1/24"), None, "not the network's address");
        assert_eq!(subnet_parse("10.0.0.0/8"), None, "too large");
        let hosts: Vec<_> = subnet_hosts("10.77.0.0".parse().unwrap(), 29).collect();
        assert_eq!(hosts.first().unwrap().to_string(), "10.77.0.2");
        assert_eq!(hosts.last().unwrap().to_string(), "10.77.0.6");
    }
}
