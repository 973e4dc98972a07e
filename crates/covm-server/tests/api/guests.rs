//! From a template to a guest people can reach, with real QEMU and the test guest
//! (`scripts/build-test-guest`: virtio-net with udhcpc, an httpd on 8080, a cidata CD read at boot,
//! qemu-guest-agent): a linked clone of a template boots with its own cloud-init seed (which passes
//! `cloud-init schema`), answers on a forwarded port from 127.0.0.1, tells its address through the
//! agent, takes SSH keys through it, takes a quiesced snapshot (freeze and thaw) and shuts down through it.

use std::time::{Duration, Instant};

use covm_types::snapshot::{Consistency, SnapshotCreate};
use covm_types::vm::{
    CloneCustomize, CloudInit, CloudInitUser, GuestSshKeys, PowerAction, PowerState, TaskState, VmClone, VmConfig,
};

use crate::common::{TestServer, attachment, name, new_disk, task_done};
use crate::guest_snapshots::Tty;
use crate::qemu::{qemu_server, serial_wait, skip, state_wait};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVx3dw0r2Kc0e9vJYHb3lKq4Yb8M0gVbZQ2PpJ0qX1s ann@laptop";

/// A free TCP port on loopback (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An HTTP GET of `/` on 127.0.0.1:port, retried until the guest's httpd answers.
async fn http_get(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    loop {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(("127.0.0.1", port))).await
        {
            let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n").await;
            let mut body = String::new();
            if tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await.is_ok()
                && body.contains("200")
            {
                return body;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "nothing answers on 127.0.0.1:{port}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn template(s: &TestServer) {
    let c = &s.admin;
    c.disk_create(&new_disk("tpl-root", 16 << 20)).await.unwrap();
    let cfg = VmConfig {
        disks: vec![attachment("tpl-root", "scsi0", 0)],
        cloud_init: Some(CloudInit { users: vec![], ..Default::default() }),
        ..crate::qemu::guest_config("tpl", &["user"])
    };
    c.vm_create(&cfg).await.unwrap();
    c.vm_template("tpl").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_clone_boots_with_its_seed_a_forwarded_port_and_its_guest_agent() {
    if skip() {
        return;
    }
    let s = qemu_server().await;
    let c = &s.admin;
    template(&s).await;
    let user = CloudInitUser { name: "ann".into(), ssh_authorized_keys: vec![KEY.into()], sudo: true };
    let cz = CloneCustomize { hostname: None, users: Some(vec![user]), network: None };
    let p =
        VmClone { name: name("web"), linked: None, folder: None, pool: None, customize: Some(cz), description: None };
    let t0 = Instant::now();
    let web = c.vm_clone("tpl", &p).await.unwrap();
    eprintln!("linked clone: {:.0} ms", t0.elapsed().as_secs_f64() * 1000.0);
    // A port forward from 127.0.0.1 to the guest's httpd.
    let port = free_port();
    let mut nics = serde_json::to_value(&web.config.nics).unwrap();
    nics[0]["port_forwards"] = serde_json::json!([{ "host_port": port, "guest_port": 8080 }]);
    c.vm_change("web", &serde_json::json!({ "nics": nics }), &Default::default()).await.unwrap();

    let t0 = Instant::now();
    let t = task_done(c, &c.vm_power("web", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    // The guest read its seed: the instance id is the clone's id, the host name its name.
    let line = serial_wait(c, "web", "COVM-CIDATA instance-id=", 1).await;
    assert!(line.contains(&format!("instance-id={} hostname=web", web.id)), "{line}");
    let files = serial_wait(c, "web", "COVM-CIDATA-FILES", 1).await;
    assert!(files.contains("meta-data") && files.contains("user-data"), "{files}");
    let ip_line = serial_wait(c, "web", "COVM-GUEST-IP eth0=", 1).await;
    let printed = ip_line.split("COVM-GUEST-IP eth0=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    eprintln!("power-on to the guest's DHCP address: {:.1} s", t0.elapsed().as_secs_f64());
    // The user-data covm wrote passes cloud-init's own schema check.
    let seed = s.dir.path().join("vms").join(web.id.to_string()).join("seed/user-data");
    let user_data = std::fs::read_to_string(&seed).unwrap();
    assert!(user_data.starts_with("#cloud-config\n") && user_data.contains(KEY), "{user_data}");
    let out = std::process::Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&seed)
        .output()
        .expect("cloud-init (Debian's package) runs");
    assert!(
        out.status.success(),
        "cloud-init schema refused covm's user-data:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The forwarded port reaches the guest's listener from 127.0.0.1.
    let body = http_get(port).await;
    assert!(body.contains("COVM-HTTP-OK"), "{body}");

    // The agent tells the same address the guest printed, and the runtime keeps it.
    let started = Instant::now();
    let info = loop {
        let info = c.vm_guest("web").await.unwrap();
        if info.agent && info.ipv4().is_some() {
            break info;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the agent never told an address: {info:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("power-on to the address known through the agent: {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(info.ipv4().as_deref(), Some(printed.as_str()));
    assert_eq!(info.hostname.as_deref(), Some("web"));
    assert!(info.os.as_deref().unwrap_or_default().contains("covm test guest"), "{info:?}");
    let rt = c.vm("web").await.unwrap().runtime.guest.expect("kept in the runtime");
    assert_eq!(rt.ipv4().as_deref(), Some(printed.as_str()));

    // SSH keys through the agent land in the guest.
    let keys = GuestSshKeys { user: "root".into(), keys: vec![KEY.into()], replace: false };
    c.vm_guest_ssh_keys("web", &keys).await.unwrap();
    let mut tty = Tty::open(&s, c, "web").await;
    assert_eq!(tty.ask(c, "web", "KEYS", "grep -c ann@laptop /root/.ssh/authorized_keys").await, "1");

    // A quiesced snapshot freezes and thaws the guest's file systems around the disks' tags.
    let snap = SnapshotCreate {
        name: name("q1"),
        description: None,
        memory: false,
        exclude: vec![],
        consistency: Consistency::Quiesced,
    };
    let q1 = c.snapshot_create("web", &snap).await.unwrap();
    assert_eq!((q1.consistency, q1.frozen_filesystems), (Consistency::Quiesced, Some(1)), "the guest's /data froze");
    // Thawed again: the guest writes to it.
    assert_eq!(tty.ask(c, "web", "THAW", "echo x > /data/after && cat /data/after").await, "x");

    // Shutdown goes through the agent.
    let t = task_done(c, &c.vm_power("web", PowerAction::Shutdown, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    assert!(t.message.unwrap_or_default().contains("guest agent"), "shut down through the agent");
    serial_wait(c, "web", "COVM-GUEST-SHUTDOWN", 1).await;
    state_wait(c, "web", PowerState::Off).await;
}

/// A NIC plugged into a running guest carries traffic (a forward through it reaches the guest's
/// listener once the guest configured it), and unplugged, it is gone from the guest; the first NIC
/// keeps its QEMU name throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_is_plugged_into_a_running_guest_and_unplugged_again() {
    if skip() {
        return;
    }
    let s = qemu_server().await;
    let c = &s.admin;
    c.vm_create(&crate::qemu::guest_config("hp", &["user"])).await.unwrap();
    let t = task_done(c, &c.vm_power("hp", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(c, "hp", "COVM-GUEST-IP eth0=", 1).await;
    let mut tty = Tty::open(&s, c, "hp").await;
    assert_eq!(tty.ask(c, "hp", "NICS", "ls /sys/class/net | grep -c eth").await, "1");

    // The link of a NIC goes down and up live (QEMU knows it by its MAC).
    let v = c.vm("hp").await.unwrap();
    let mut nics = serde_json::to_value(&v.config.nics).unwrap();
    nics[0]["connected"] = serde_json::json!(false);
    let v = c.vm_change("hp", &serde_json::json!({ "nics": nics.clone() }), &Default::default()).await.unwrap();
    assert!(!v.config.nics[0].connected);
    assert_eq!(tty.ask(c, "hp", "DOWN", "cat /sys/class/net/eth0/carrier").await, "0");
    nics[0]["connected"] = serde_json::json!(true);
    c.vm_change("hp", &serde_json::json!({ "nics": nics }), &Default::default()).await.unwrap();
    assert_eq!(tty.ask(c, "hp", "UP", "cat /sys/class/net/eth0/carrier").await, "1");

    let port = free_port();
    let before = c.vm("hp").await.unwrap().version;
    let n = serde_json::json!({ "network": "user", "port_forwards": [{ "host_port": port, "guest_port": 8080 }] });
    let v = c.vm_nic_add("hp", &n, false).await.unwrap();
    assert_eq!((v.version, v.config.nics.len()), (before + 1, 2));
    assert_eq!(v.runtime.running_version, Some(v.version), "a live change: nothing pending");
    let mac = v.config.nics[1].mac.clone().unwrap();
    // The guest sees it; once it asks DHCP on it, the forward through it reaches its listener.
    let started = Instant::now();
    while tty.ask(c, "hp", &format!("PLUG{}", started.elapsed().as_millis()), "ls /sys/class/net | grep -c eth").await
        != "2"
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the guest never saw the new NIC");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Both user networks are 10.0.2.0/24: the guest answers through eth1 once eth0 is down.
    tty.line("ip link set eth0 down; udhcpc -i eth1 -s /bin/dhcp-script -q -n -t 5").await;
    serial_wait(c, "hp", "COVM-GUEST-IP eth1=", 1).await;
    assert!(http_get(port).await.contains("COVM-HTTP-OK"));
    // Unplugged: gone from the guest and from the config.
    let v = c.vm_nic_remove("hp", &mac, false).await.unwrap();
    assert_eq!(v.config.nics.len(), 1);
    assert_eq!(tty.ask(c, "hp", "UNPLUG", "ls /sys/class/net | grep -c eth").await, "1");
    task_done(c, &c.vm_power("hp", PowerAction::Off, None).await.unwrap()).await;
}
