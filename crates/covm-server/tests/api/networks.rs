//! Managed networks with real QEMU and the test guest, in a network namespace the test makes (so that
//! no packet leaves it, and nothing is left on the host): a `nat` network is a bridge, dnsmasq and an
//! nftables table; the guest gets its MAC-pinned address by DHCP and prints it, the agent tells the
//! same one, a port forward reaches the guest's listener; after a "reboot" (everything covm made on
//! the host removed while covm is down) covm makes it again; deleting the network removes it all.

use std::time::{Duration, Instant};

use covm_types::vm::{PowerAction, PowerState, TaskState};

use crate::common::{Options, TestServer, task_done};
use crate::qemu::{serial_wait, skip, state_wait};

/// A network namespace for one test, with loopback up; deleted (with what runs in it) at the end.
pub struct Netns(pub String);

impl Netns {
    pub fn make() -> Netns {
        let name = format!("covmt{:08x}", rand::random::<u32>());
        let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add failed: these tests run as root (as CI does)");
        let lo = ["netns", "exec", &name, "ip", "link", "set", "lo", "up"];
        assert!(std::process::Command::new("ip").args(lo).status().unwrap().success());
        Netns(name)
    }

    /// Runs a command in the namespace: (success, stdout).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("ip").args(["netns", "exec", &self.0]).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in it (a dnsmasq of a failed test) goes with it.
        if let Ok(out) = std::process::Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

async fn get_via(ns: &Netns, url: &str) -> String {
    let started = Instant::now();
    loop {
        let (ok, body) = ns.run(&["curl", "-s", "--max-time", "3", url]);
        if ok && !body.is_empty() {
            return body;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "nothing answers {url} in {}", ns.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_network_gives_a_pinned_address_forwards_a_port_and_comes_back_after_a_reboot() {
    if skip() {
        return;
    }
    let ns = Netns::make();
    let mut s = TestServer::start_qemu_options(Options { netns: Some(ns.0.clone()), ..Options::default() }).await;
    crate::qemu::guest_files(&s);
    let c = s.admin.clone();
    let body = serde_json::json!({ "name": "lab", "kind": "nat", "subnet": "10.77.0.0/24" });
    let net: covm_types::api::NetworkView = c.post("/networks", &body).await.unwrap();
    let bridge = net.bridge.clone().unwrap();
    assert_eq!(net.gateway.as_deref(), Some("10.77.0.1"));
    assert!(
        ns.run(&["ip", "-o", "addr", "show", "dev", &bridge]).1.contains("10.77.0.1/24"),
        "the bridge has the gateway"
    );
    assert!(ns.run(&["nft", "list", "tables"]).1.contains("covm_"), "the NAT table");
    // Nothing of it is on the host itself.
    let on_host = std::process::Command::new("ip").args(["link", "show", "dev", &bridge]).output().unwrap();
    assert!(!on_host.status.success(), "the bridge is in the namespace only");

    c.vm_create(&crate::qemu::guest_config("n1", &["lab"])).await.unwrap();
    let t0 = Instant::now();
    let t = task_done(&c, &c.vm_power("n1", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let line = serial_wait(&c, "n1", "COVM-GUEST-IP eth0=", 1).await;
    eprintln!("nat: power-on to the DHCP address: {:.1} s", t0.elapsed().as_secs_f64());
    let printed = line.split("COVM-GUEST-IP eth0=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    // The address is the one pinned to the NIC's MAC.
    let net: covm_types::api::NetworkView = c.get("/networks/lab").await.unwrap();
    let mac = c.vm("n1").await.unwrap().config.nics[0].mac.clone().unwrap();
    assert_eq!(net.leases.len(), 1, "{net:?}");
    assert_eq!(
        (net.leases[0].mac.as_str(), net.leases[0].ip.as_str(), net.leases[0].vm.as_str()),
        (mac.as_str(), printed.as_str(), "n1")
    );
    // The agent tells the same address.
    let started = Instant::now();
    loop {
        let info = c.vm_guest("n1").await.unwrap();
        if info.ipv4().as_deref() == Some(printed.as_str()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the agent says {info:?}, the guest printed {printed}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("nat: power-on to the address known through the agent: {:.1} s", t0.elapsed().as_secs_f64());

    // A port forward of the network: the host's port 18080 reaches the guest's 8080.
    let fw = serde_json::json!({ "forwards": [{ "host_port": 18080, "vm": "n1", "guest_port": 8080 }] });
    let _: serde_json::Value = c.put("/networks/lab/forwards", &fw).await.unwrap();
    assert!(get_via(&ns, &format!("http://{printed}:8080/")).await.contains("COVM-HTTP-OK"), "the guest directly");
    assert!(get_via(&ns, "http://10.77.0.1:18080/").await.contains("COVM-HTTP-OK"), "through the forward");

    // A network in use is not deleted; the error names the VM.
    match c.delete("/networks/lab").await {
        Err(covm_client::ClientError::Api { status: 409, error, .. }) => {
            assert!(error.message.contains("n1"), "{}", error.message)
        }
        other => panic!("{other:?}"),
    }

    // A "reboot": the VM is off, and everything covm made on the host is gone while covm is down.
    task_done(&c, &c.vm_power("n1", PowerAction::Off, None).await.unwrap()).await;
    state_wait(&c, "n1", PowerState::Off).await;
    s.restart_with(|| {
        for pid in String::from_utf8_lossy(
            &std::process::Command::new("ip").args(["netns", "pids", &ns.0]).output().unwrap().stdout,
        )
        .split_whitespace()
        {
            let _ = std::process::Command::new("kill").args(["-9", pid]).status();
        }
        assert!(ns.run(&["ip", "link", "del", "dev", &bridge]).0);
        assert!(ns.run(&["nft", "flush", "ruleset"]).0);
    })
    .await;
    let started = Instant::now();
    while !ns.run(&["ip", "-o", "addr", "show", "dev", &bridge]).1.contains("10.77.0.1/24")
        || !ns.run(&["nft", "list", "tables"]).1.contains("covm_")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "covm did not make the network again after its restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = s.admin.clone();
    let t = task_done(&c, &c.vm_power("n1", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let again = serial_wait(&c, "n1", "COVM-GUEST-IP eth0=", 2).await;
    assert!(again.contains(&format!("eth0={printed}")), "the same address after the reboot: {again}");
    task_done(&c, &c.vm_power("n1", PowerAction::Off, None).await.unwrap()).await;
    state_wait(&c, "n1", PowerState::Off).await;

    // Deleted: the bridge, dnsmasq and the table go.
    c.vm_delete("n1").await.unwrap();
    c.delete("/networks/lab").await.unwrap();
    assert!(!ns.run(&["ip", "link", "show", "dev", &bridge]).0, "the bridge is gone");
    assert!(!ns.run(&["nft", "list", "tables"]).1.contains("covm_"), "the table is gone");
    let pids = String::from_utf8_lossy(
        &std::process::Command::new("ip").args(["netns", "pids", &ns.0]).output().unwrap().stdout,
    )
    .into_owned();
    assert!(pids.trim().is_empty(), "nothing runs in the namespace any more: {pids}");
}

/// `bridge` networks: the NIC's tap (QEMU makes it) is a port of the existing bridge and goes with
/// QEMU; with a VLAN, an untagged member of that VLAN only — or, on a kernel without VLAN filtering,
/// the power-on is refused saying so, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_network_puts_the_nic_on_the_bridge_and_its_vlan() {
    if skip() {
        return;
    }
    let ns = Netns::make();
    assert!(ns.run(&["ip", "link", "add", "brt", "type", "bridge"]).0);
    assert!(ns.run(&["ip", "link", "set", "brt", "up"]).0);
    let s = TestServer::start_qemu_options(Options { netns: Some(ns.0.clone()), ..Options::default() }).await;
    crate::qemu::guest_files(&s);
    let c = s.admin.clone();
    let tap_gone = |tap: String| {
        let ns = &ns;
        async move {
            let started = Instant::now();
            while ns.run(&["ip", "link", "show", "dev", &tap]).0 {
                assert!(started.elapsed() < Duration::from_secs(10), "the tap {tap} went with QEMU");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Without a VLAN: a port of the bridge.
    let _: serde_json::Value =
        c.post("/networks", &serde_json::json!({ "name": "lan", "kind": "bridge", "bridge": "brt" })).await.unwrap();
    c.vm_create(&crate::qemu::guest_config("b1", &["lan"])).await.unwrap();
    let t = task_done(&c, &c.vm_power("b1", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(&c, "b1", "COVM-GUEST-READY", 1).await;
    let tap = covm_hv::net::tap_name(&c.vm("b1").await.unwrap().config.nics[0].mac.clone().unwrap());
    assert!(ns.run(&["ip", "-o", "link", "show", "dev", &tap]).1.contains("master brt"), "the tap is on the bridge");
    task_done(&c, &c.vm_power("b1", PowerAction::Off, None).await.unwrap()).await;
    state_wait(&c, "b1", PowerState::Off).await;
    tap_gone(tap).await;

    // With VLAN 10: the administrator turns VLAN filtering on (covm changes no bridge it did not make).
    // The machines of this project's CI cannot: their kernel has no 802.1Q (`CONFIG_VLAN_8021Q is not
    // set`; `vlan_filtering 1` answers "Operation not supported").
    let filtering = ns.run(&["ip", "link", "set", "dev", "brt", "type", "bridge", "vlan_filtering", "1"]).0;
    let body = serde_json::json!({ "name": "vlan10", "kind": "bridge", "bridge": "brt", "vlan": 10 });
    let _: serde_json::Value = c.post("/networks", &body).await.unwrap();
    c.vm_create(&crate::qemu::guest_config("v1", &["vlan10"])).await.unwrap();
    let mac = c.vm("v1").await.unwrap().config.nics[0].mac.clone().unwrap();
    let tap = covm_hv::net::tap_name(&mac);
    let t = task_done(&c, &c.vm_power("v1", PowerAction::On, None).await.unwrap()).await;
    if !filtering {
        eprintln!("this kernel has no VLAN filtering on bridges: checking that covm says so");
        assert_eq!(t.state, TaskState::Error, "{t:?}");
        assert!(t.message.as_deref().unwrap_or_default().contains("does not filter VLANs"), "{t:?}");
        assert_eq!(c.vm("v1").await.unwrap().runtime.power_state, PowerState::Off);
        tap_gone(tap).await;
        return;
    }
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(&c, "v1", "COVM-GUEST-READY", 1).await;
    let vlans: serde_json::Value =
        serde_json::from_str(&ns.run(&["bridge", "-j", "vlan", "show", "dev", &tap]).1).unwrap();
    let port = vlans.as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
    let v = port["vlans"].as_array().cloned().unwrap_or_default();
    assert_eq!(v.len(), 1, "one VLAN only: {vlans}");
    assert_eq!(v[0]["vlan"], 10, "{vlans}");
    let flags = v[0]["flags"].to_string();
    assert!(flags.contains("PVID") && flags.contains("Egress Untagged"), "untagged member of VLAN 10: {vlans}");
    task_done(&c, &c.vm_power("v1", PowerAction::Off, None).await.unwrap()).await;
    state_wait(&c, "v1", PowerState::Off).await;
    tap_gone(tap).await;
}
