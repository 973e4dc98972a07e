//! Against real QEMU with the test guest (`scripts/build-test-guest`, cached in `target/test-guest`).
//! CI installs QEMU (`scripts/install-qemu`); set `COVM_SKIP_QEMU=1` to skip these on a machine
//! without it. Guests run under TCG here (this machine's KVM is a slow nested one).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use covm_client::{ChangeOptions, Client, ClientError};
use covm_types::disk::{DetachQuery, DiskClone, DiskMove};
use covm_types::vm::{BootDevice, PowerAction, PowerState, TaskState, VmChange, VmConfig};

use crate::common::{TestServer, attach, attachment, name, new_disk, task_done, vm_named};
use crate::openapi::repo_file;

pub fn skip() -> bool {
    if crate::common::on_postgres() {
        // The store is what the PostgreSQL run is about; QEMU runs once, with SQLite.
        return true;
    }
    if std::env::var_os("COVM_SKIP_QEMU").is_some() {
        eprintln!("COVM_SKIP_QEMU is set: skipping a real-QEMU test");
        return true;
    }
    false
}

/// The test guest, built once (the script caches it).
fn guest() -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let dir = repo_file("target/test-guest");
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !*built {
        let status = std::process::Command::new(repo_file("scripts/build-test-guest"))
            .arg(&dir)
            .status()
            .expect("build-test-guest runs");
        assert!(status.success(), "scripts/build-test-guest failed");
        *built = true;
    }
    dir
}

pub async fn qemu_server() -> TestServer {
    let s = TestServer::start_with(covm_server::Driver::Qemu).await;
    guest_files(&s);
    s
}

/// The test guest's kernel and initramfs in the server's `local` datastore, under `guest/`.
pub fn guest_files(s: &TestServer) {
    let g = guest();
    let ds = s.dir.path().join("datastores/local/guest");
    std::fs::create_dir_all(&ds).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(g.join(f), ds.join(f)).unwrap();
    }
}

/// A config that boots the test guest, with a NIC on each of these networks.
pub fn guest_config(name: &str, networks: &[&str]) -> VmConfig {
    let nics = networks.iter().map(|n| serde_json::from_value(serde_json::json!({ "network": n })).unwrap()).collect();
    VmConfig {
        memory_mib: 128,
        kernel: Some("local:guest/vmlinuz".into()),
        initrd: Some("local:guest/initrd.img".into()),
        cmdline: Some("console=ttyS0 quiet panic=-1".into()),
        nics,
        ..vm_named(name)
    }
}

pub async fn guest_vm(c: &Client, name: &str) {
    c.vm_create(&guest_config(name, &[])).await.unwrap();
}

/// Waits until the serial console has `count` lines containing `needle`; returns the last one.
pub async fn serial_wait(c: &Client, vm: &str, needle: &str, count: usize) -> String {
    let started = Instant::now();
    loop {
        let text = c.serial(vm, 10_000).await.unwrap();
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        if hits.len() >= count {
            return hits[count - 1].to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no {needle} on {vm}'s console:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn state_wait(c: &Client, vm: &str, want: PowerState) {
    let started = Instant::now();
    while c.vm(vm).await.unwrap().runtime.power_state != want {
        assert!(started.elapsed() < Duration::from_secs(60), "{vm} did not become {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mem_kib(line: &str) -> u64 {
    line.split("mem_kib=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn a_guest_boots_takes_a_pending_change_at_the_next_boot_and_powers_itself_off() {
    if skip() {
        return;
    }
    let s = qemu_server().await;
    let c = &s.admin;
    // A guest that runs no agent (`covm-noagent`): shutdown goes by ACPI.
    let cmdline = Some("console=ttyS0 quiet panic=-1 covm-noagent".into());
    c.vm_create(&VmConfig { cmdline, ..guest_config("g1", &[]) }).await.unwrap();
    let t = task_done(c, &c.vm_power("g1", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let vm = c.vm("g1").await.unwrap();
    assert_eq!(vm.runtime.power_state, PowerState::Running);
    assert!(vm.runtime.accel.is_some() && vm.runtime.pid.is_some() && !vm.runtime.simulated);
    let ready = serial_wait(c, "g1", "COVM-GUEST-READY", 1).await;
    let before = mem_kib(&ready);

    // The serial console follows over SSE; the VNC console is a WebSocket relay of RFB.
    let mut follow = c.serial_follow("g1", 1000).await.unwrap();
    let started = Instant::now();
    loop {
        use futures::StreamExt;
        let line = tokio::time::timeout(Duration::from_secs(10), follow.next()).await.unwrap().unwrap().unwrap();
        if line.contains("COVM-GUEST-READY") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    drop(follow);
    let url = format!("{}/api/v1/vms/g1/console/vnc", s.url.replace("http://", "ws://"));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", c.token().unwrap()).parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", "binary".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "binary");
    let first = {
        use futures::StreamExt;
        tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap()
    };
    assert!(first.into_data().starts_with(b"RFB 003."), "an RFB greeting");
    drop(ws);

    // The serial console as a WebSocket opened with a ticket, as a browser does: the recent output
    // first, then what is typed and its answer, on one connection to the guest shared by two.
    {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let url = |t: String| format!("{}/api/v1/vms/g1/console/serial?ticket={t}", s.url.replace("http://", "ws://"));
        let (mut one, _) =
            tokio_tungstenite::connect_async(url(c.console_ticket("g1").await.unwrap().ticket)).await.unwrap();
        let (mut two, _) =
            tokio_tungstenite::connect_async(url(c.console_ticket("g1").await.unwrap().ticket)).await.unwrap();
        async fn read_until(
            ws: &mut (impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
            what: &str,
        ) -> String {
            let mut seen = String::new();
            let started = Instant::now();
            while !seen.contains(what) {
                let left = Duration::from_secs(30).saturating_sub(started.elapsed());
                match tokio::time::timeout(left, ws.next()).await {
                    Ok(Some(Ok(m))) => seen.push_str(&String::from_utf8_lossy(&m.into_data())),
                    other => panic!("no {what} in the serial console ({other:?}): {seen}"),
                }
            }
            seen
        }
        read_until(&mut one, "COVM-GUEST-READY").await;
        read_until(&mut two, "COVM-GUEST-READY").await;
        one.send(Message::Text("\necho covm-ws-$((6*7))\n".into())).await.unwrap();
        read_until(&mut two, "covm-ws-42").await;
        read_until(&mut one, "covm-ws-42").await;
    }

    // Hot-plug a 64 MiB disk: the guest sees it; hot-unplug: the guest sees it go.
    c.disk_create(&new_disk("hot-1", 64 << 20)).await.unwrap();
    let v = c.vm_disk_attach("g1", &attach("hot-1")).await.unwrap();
    assert_eq!(v.runtime.running_version, Some(v.version));
    serial_wait(c, "g1", "sda=67108864", 1).await;
    // Grown while attached to the running VM: block_resize, and the guest sees the new size.
    let d = c.disk_resize("hot-1", 128 << 20).await.unwrap();
    assert_eq!(d.capacity_bytes, 128 << 20);
    serial_wait(c, "g1", "sda=134217728", 1).await;
    // A copy of a disk a running VM writes to is refused.
    let r = c.disk_clone("hot-1", &DiskClone { name: name("copy"), encryption: None }).await;
    assert!(matches!(r, Err(ClientError::Api { status: 409, ref error, .. }) if error.code == "disk_in_use"), "{r:?}");
    c.vm_disk_detach("g1", "hot-1", &DetachQuery::default()).await.unwrap();
    // Each uevent runs its own report, and under load an older one can print last; so ask the guest
    // for a fresh report through its console until it no longer lists the disk.
    let sock = s.dir.path().join("vms").join(c.vm("g1").await.unwrap().id.to_string()).join("serial.sock");
    let started = Instant::now();
    loop {
        let before = c.serial("g1", 10_000).await.unwrap().lines().filter(|l| l.contains("COVM-BLOCKS")).count();
        if let Ok(mut stream) = tokio::net::UnixStream::connect(&sock).await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"\n/bin/blocks\n").await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = c.serial("g1", 10_000).await.unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("COVM-BLOCKS")).collect();
        if lines.len() > before && !lines.last().unwrap_or(&"").contains("sda") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the guest still sees the disk: {:?}", lines.last());
    }

    // More memory while it runs: refused, then pending with apply=next_boot.
    let more = VmChange { memory_mib: Some(256), ..Default::default() };
    let r = c.vm_change("g1", &more, &Default::default()).await;
    assert!(
        matches!(r, Err(ClientError::Api { status: 409, ref error, .. }) if error.code == "requires_power_cycle"),
        "{r:?}"
    );
    let vm = c.vm_change("g1", &more, &ChangeOptions { next_boot: true, ..Default::default() }).await.unwrap();
    // (Versions 2 and 3 were the hot attach and detach, both live.)
    assert_eq!((vm.version, vm.runtime.running_version), (4, Some(3)));

    // ACPI shutdown (this guest runs no agent, and says so): the guest answers, QEMU goes.
    let info = c.vm_guest("g1").await.unwrap();
    assert!(!info.agent && info.message.is_some(), "{info:?}");
    let pid = vm.runtime.pid.unwrap();
    let t = task_done(c, &c.vm_power("g1", PowerAction::Shutdown, Some(60)).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    assert!(t.message.as_deref().unwrap_or_default().contains("ACPI"), "{t:?}");
    serial_wait(c, "g1", "COVM-GUEST-POWERDOWN", 1).await;
    assert_eq!(c.vm("g1").await.unwrap().runtime.power_state, PowerState::Off);
    assert!(!alive(pid), "QEMU is gone after shutdown");

    // The next boot runs version 2: the guest sees the new memory size.
    task_done(c, &c.vm_power("g1", PowerAction::On, None).await.unwrap()).await;
    let after = mem_kib(&serial_wait(c, "g1", "COVM-GUEST-READY", 2).await);
    assert!(after > before + 100_000, "{before} KiB then {after} KiB");
    assert_eq!(c.vm("g1").await.unwrap().runtime.running_version, Some(4));

    // The guest powers itself off (typed into its serial console): off.
    serial_wait(c, "g1", "COVM-GUEST-READY", 2).await;
    let sock = s.dir.path().join("vms").join(c.vm("g1").await.unwrap().id.to_string()).join("serial.sock");
    let mut stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"\npoweroff -f\n").await.unwrap();
    state_wait(c, "g1", PowerState::Off).await;
    let events =
        c.events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    assert!(events.iter().any(|e| e.kind == "vm.power.changed" && e.data["reason"] == "the guest powered off"));
}

#[tokio::test]
async fn a_killed_qemu_is_crashed_and_a_restarted_covm_adopts_a_running_one() {
    if skip() {
        return;
    }
    let mut s = qemu_server().await;
    let c = s.admin.clone();
    guest_vm(&c, "g2").await;
    // A disk in the config is attached at power-on (blockdev-add + device_add), and the guest sees it.
    c.disk_create(&new_disk("data-1", 64 << 20)).await.unwrap();
    let disks = VmChange { disks: Some(vec![attachment("data-1", "scsi0", 0)]), ..Default::default() };
    c.vm_change("g2", &disks, &Default::default()).await.unwrap();
    task_done(&c, &c.vm_power("g2", PowerAction::On, None).await.unwrap()).await;
    serial_wait(&c, "g2", "COVM-GUEST-READY", 1).await;
    let blocks = serial_wait(&c, "g2", "COVM-BLOCKS", 1).await;
    assert!(blocks.contains("sda=67108864"), "{blocks}");
    let pid = c.vm("g2").await.unwrap().runtime.pid.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    state_wait(&c, "g2", PowerState::Crashed).await;
    let events =
        c.events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    let crash = events.iter().rev().find(|e| e.data["power_state"] == "crashed").expect("a crash event");
    assert!(crash.data["exit_status"].as_str().unwrap().contains('9'), "{}", crash.data);
    assert!(!crash.data["log_tail"].as_array().unwrap().is_empty(), "{}", crash.data);

    // Running again; covm stops and starts; the VM runs on, adopted, and powers off through the API.
    task_done(&c, &c.vm_power("g2", PowerAction::On, None).await.unwrap()).await;
    serial_wait(&c, "g2", "COVM-GUEST-READY", 2).await;
    let pid = c.vm("g2").await.unwrap().runtime.pid.unwrap();
    s.restart().await;
    assert!(alive(pid), "QEMU outlives covm");
    let vm = c.vm("g2").await.unwrap();
    assert_eq!((vm.runtime.power_state, vm.runtime.pid), (PowerState::Running, Some(pid)));
    // Another VM's disk moves to the adopted, running g2 and arrives in its guest.
    c.vm_create(&vm_named("src")).await.unwrap();
    c.disk_create(&new_disk("mv-1", 32 << 20)).await.unwrap();
    c.vm_disk_attach("src", &attach("mv-1")).await.unwrap();
    let moved = c.disk_move("mv-1", &DiskMove { to_vm: "g2".into(), ..Default::default() }).await.unwrap();
    assert_eq!(moved.config.disks.len(), 2);
    serial_wait(&c, "g2", "=33554432", 1).await;
    let t = task_done(&c, &c.vm_power("g2", PowerAction::Off, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    assert_eq!(c.vm("g2").await.unwrap().runtime.power_state, PowerState::Off);
    let started = Instant::now();
    while alive(pid) {
        assert!(started.elapsed() < Duration::from_secs(10), "QEMU still alive after power off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The files a process has open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).collect())
        .unwrap_or_default()
}

/// QEMU gets every image's format: a cdrom that a guest filled with a qcow2 header naming a backing
/// file, or a disk image whose header was changed to name one, never makes QEMU open a file outside
/// its datastore; a comma in a file name stays in the name.
#[tokio::test]
async fn qemu_opens_only_the_images_covm_names() {
    if skip() {
        return;
    }
    let s = qemu_server().await;
    let c = &s.admin;
    let canary = s.dir.path().join("canary.raw");
    std::fs::write(&canary, vec![0u8; 1 << 20]).unwrap();
    let iso = s.dir.path().join("datastores/local/iso");
    std::fs::create_dir_all(&iso).unwrap();
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let evil = iso.join("evil.iso");
    qemu_img(&["create", "-f", "qcow2", "-b", canary.to_str().unwrap(), "-F", "raw", evil.to_str().unwrap()]);
    let comma = iso.join("a,snapshot=on.iso");
    std::fs::write(&comma, vec![0u8; 1 << 20]).unwrap();
    let d = c.disk_create(&new_disk("d1", 1 << 20)).await.unwrap();
    let image = s.dir.path().join("datastores/local").join(&d.file);
    qemu_img(&["rebase", "-u", "-f", "qcow2", "-b", canary.to_str().unwrap(), "-F", "raw", image.to_str().unwrap()]);
    for (vm, cdrom) in [("cd1", "local:iso/evil.iso"), ("cd2", "local:iso/a,snapshot=on.iso")] {
        let config =
            VmConfig { memory_mib: 64, cdrom: Some(cdrom.into()), boot: vec![BootDevice::Cdrom], ..vm_named(vm) };
        c.vm_create(&config).await.unwrap();
    }
    c.vm_disk_attach("cd1", &attach("d1")).await.unwrap();
    for vm in ["cd1", "cd2"] {
        let t = task_done(c, &c.vm_power(vm, PowerAction::On, None).await.unwrap()).await;
        assert_eq!(t.state, TaskState::Success, "{vm}: {t:?}");
        let pid = c.vm(vm).await.unwrap().runtime.pid.unwrap();
        let files = open_files(pid);
        assert!(!files.contains(&canary), "{vm}: QEMU opened {} through an image header: {files:?}", canary.display());
        let want = if vm == "cd1" { evil.clone() } else { comma.clone() };
        assert!(files.contains(&want), "{vm}: QEMU did not open {}: {files:?}", want.display());
        if vm == "cd1" {
            assert!(files.contains(&image), "cd1: the disk is open: {files:?}");
        }
        task_done(c, &c.vm_power(vm, PowerAction::Off, None).await.unwrap()).await;
    }
}

/// The VNC relay ends within a second of its user losing the console privilege.
#[tokio::test]
async fn the_vnc_relay_ends_when_the_grant_is_revoked() {
    if skip() {
        return;
    }
    use futures::StreamExt;
    let s = qemu_server().await;
    let c = &s.admin;
    c.vm_create(&VmConfig { memory_mib: 64, ..vm_named("screen") }).await.unwrap();
    let t = task_done(c, &c.vm_power("screen", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let bob = s.user("bob").await;
    let grant = c.permission_grant("bob", "VMUser", "vm:screen", false).await.unwrap();
    let url = format!("{}/api/v1/vms/screen/console/vnc", s.url.replace("http://", "ws://"));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", bob.token().unwrap()).parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", "binary".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.into_data().starts_with(b"RFB "), "the RFB greeting");
    c.permission_revoke(&grant.id.to_string()).await.unwrap();
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) if m.is_close() => break,
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the relay was still open 3 s after the revocation"),
        }
    }
    assert!(started.elapsed() < Duration::from_millis(1500), "ended {:?} after the revocation", started.elapsed());
    task_done(c, &c.vm_power("screen", PowerAction::Off, None).await.unwrap()).await;
}
