//! Power, pending changes, crashes, adoption and autostart against the simulated driver (fast).

use std::sync::Arc;
use std::time::Duration;

use covm_client::{ChangeOptions, ClientError};
use covm_hv::sim::SimDriver;
use covm_types::api::{PoolCreate, Quota};
use covm_types::error::ConflictDetails;
use covm_types::vm::{Autostart, ChangePlan, PowerAction, PowerState, TaskState, VmChange, VmConfig};

use crate::common::{TestServer, name, task_done, vm_named};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code.to_string()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn power_cycle_and_pending_changes() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.vm_create(&VmConfig { memory_mib: 256, ..vm_named("web-1") }).await.unwrap();
    let t = c.vm_power("web-1", PowerAction::On, None).await.unwrap();
    assert_eq!(task_done(c, &t).await.state, TaskState::Success);
    let vm = c.vm("web-1").await.unwrap();
    assert_eq!(vm.runtime.power_state, PowerState::Running);
    assert!(vm.runtime.simulated);
    assert_eq!(vm.runtime.running_version, Some(1));
    assert_eq!(code(c.vm_power("web-1", PowerAction::On, None).await), (409, "vm_running".into()));

    // A next-boot field on a running VM: refused, naming it; the dry run says so and changes nothing.
    let both = VmChange { memory_mib: Some(512), description: Some("x".into()), ..Default::default() };
    let Err(ClientError::Api { status: 409, error, .. }) = c.vm_change("web-1", &both, &Default::default()).await
    else {
        panic!()
    };
    assert_eq!(error.code, "requires_power_cycle");
    let details: ConflictDetails = error.details_as().unwrap();
    assert_eq!(details.fields, Some(vec!["memory_mib".to_string()]));
    let plan: ChangePlan =
        serde_json::from_value(c.vm_change_plan("web-1", &both, &Default::default()).await.unwrap()).unwrap();
    assert_eq!((plan.live, plan.next_boot), (vec!["description".to_string()], vec!["memory_mib".to_string()]));
    assert!(plan.refused.unwrap().contains("memory_mib"));
    assert_eq!(c.vm("web-1").await.unwrap().version, 1);
    // With apply=next_boot it is stored and pending.
    let nb = ChangeOptions { next_boot: true, ..Default::default() };
    let vm = c.vm_change("web-1", &VmChange { memory_mib: Some(512), ..Default::default() }, &nb).await.unwrap();
    assert_eq!((vm.version, vm.runtime.running_version), (2, Some(1)));
    // A live change alone applies at once (but what is pending stays pending).
    let annotate = VmChange {
        annotations: Some(std::collections::BTreeMap::from([("k".into(), Some("v".into()))])),
        ..Default::default()
    };
    let vm = c.vm_change("web-1", &annotate, &Default::default()).await.unwrap();
    assert_eq!((vm.version, vm.runtime.running_version), (3, Some(1)));
    // Power cycle: the newest version runs.
    task_done(c, &c.vm_power("web-1", PowerAction::Off, None).await.unwrap()).await;
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Off);
    task_done(c, &c.vm_power("web-1", PowerAction::On, None).await.unwrap()).await;
    let vm = c.vm("web-1").await.unwrap();
    assert_eq!(vm.runtime.running_version, Some(3));
    // A live change with nothing pending moves running_version along.
    let now = VmChange { description: Some("now".into()), ..Default::default() };
    let vm = c.vm_change("web-1", &now, &Default::default()).await.unwrap();
    assert_eq!(vm.runtime.running_version, Some(4));
    // Reset keeps it running; shutdown (the simulated guest answers) turns it off.
    assert_eq!(
        task_done(c, &c.vm_power("web-1", PowerAction::Reset, None).await.unwrap()).await.state,
        TaskState::Success
    );
    assert_eq!(
        task_done(c, &c.vm_power("web-1", PowerAction::Shutdown, None).await.unwrap()).await.state,
        TaskState::Success
    );
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Off);
    // Off when off is done already; reset when off is refused.
    assert_eq!(
        task_done(c, &c.vm_power("web-1", PowerAction::Off, None).await.unwrap()).await.state,
        TaskState::Success
    );
    assert_eq!(
        task_done(c, &c.vm_power("web-1", PowerAction::Reset, None).await.unwrap()).await.state,
        TaskState::Error
    );
    // The feed has the power changes and the tasks.
    let kinds: Vec<String> = c
        .events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() })
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.iter().filter(|k| *k == "vm.power.changed").count() >= 6, "{kinds:?}");
    assert!(kinds.contains(&"task.progress".to_string()));
    // A running VM is not deleted.
    task_done(c, &c.vm_power("web-1", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(code(c.vm_delete("web-1").await), (409, "vm_running".into()));
}

#[tokio::test]
async fn crashes_and_guests_that_do_not_shut_down() {
    let sim = Arc::new(SimDriver::default());
    let s = TestServer::start_with(covm_server::Driver::Custom(sim.clone())).await;
    let c = &s.admin;
    let vm = c.vm_create(&vm_named("web-1")).await.unwrap();
    task_done(c, &c.vm_power("web-1", PowerAction::On, None).await.unwrap()).await;
    let mut feed = c.events_follow(None, None).await.unwrap();
    assert!(sim.crash(vm.id));
    let ev = loop {
        use futures::StreamExt;
        let ev = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap().unwrap();
        if ev.kind == "vm.power.changed" {
            break ev;
        }
    };
    assert_eq!(ev.data["power_state"], "crashed");
    assert!(ev.data["exit_status"].as_str().unwrap().contains("SIGKILL"));
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Crashed);
    task_done(c, &c.vm_power("web-1", PowerAction::Off, None).await.unwrap()).await;
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Off);

    // A guest that ignores ACPI: the shutdown gives up with a clear error and the VM keeps running.
    sim.deaf_guests.store(true, std::sync::atomic::Ordering::Relaxed);
    task_done(c, &c.vm_power("web-1", PowerAction::On, None).await.unwrap()).await;
    let t = task_done(c, &c.vm_power("web-1", PowerAction::Shutdown, Some(1)).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Error);
    assert_eq!(t.error.unwrap()["code"], "shutdown_timeout");
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Running);
    // The guest powers itself off: off.
    assert!(sim.guest_poweroff(vm.id));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.vm("web-1").await.unwrap().runtime.power_state, PowerState::Off);
}

#[tokio::test]
async fn adoption_and_autostart_across_a_restart() {
    let sim = Arc::new(SimDriver::default());
    let mut s = TestServer::start_with(covm_server::Driver::Custom(sim.clone())).await;
    let c = s.admin.clone();
    let autostart = |order: i32| Autostart { enabled: true, order, ..Default::default() };
    c.vm_create(&vm_named("keeps-running")).await.unwrap();
    c.vm_create(&VmConfig { autostart: autostart(2), ..vm_named("second") }).await.unwrap();
    c.vm_create(&VmConfig { autostart: autostart(1), ..vm_named("first") }).await.unwrap();
    c.vm_create(&vm_named("stays-off")).await.unwrap();
    task_done(&c, &c.vm_power("keeps-running", PowerAction::On, None).await.unwrap()).await;
    let generation = c.vm("keeps-running").await.unwrap().runtime.generation;

    s.restart().await;
    // Autostart runs in the background right after the start.
    for _ in 0..50 {
        let states: Vec<PowerState> = futures::future::join_all(["second", "first"].map(|n| c.vm(n)))
            .await
            .into_iter()
            .map(|v| v.unwrap().runtime.power_state)
            .collect();
        if states.iter().all(|s| *s == PowerState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = c.vm("keeps-running").await.unwrap();
    assert_eq!(kept.runtime.power_state, PowerState::Running);
    assert!(kept.runtime.generation > generation, "a new supervisor, a new run generation");
    assert_eq!(c.vm("stays-off").await.unwrap().runtime.power_state, PowerState::Off);
    let events =
        c.events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    let starts: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "vm.power.changed" && e.data["reason"] == "autostart")
        .filter_map(|e| e.object_name.clone())
        .collect();
    assert_eq!(starts, ["first", "second"], "autostart order");
    assert!(events.iter().any(|e| e.data["adopted"] == true && e.object_name.as_deref() == Some("keeps-running")));
    // The adopted VM is managed: it powers off through the API.
    task_done(&c, &c.vm_power("keeps-running", PowerAction::Off, None).await.unwrap()).await;
    assert_eq!(c.vm("keeps-running").await.unwrap().runtime.power_state, PowerState::Off);

    // A VM whose process vanished while covm was down becomes crashed.
    task_done(&c, &c.vm_power("stays-off", PowerAction::On, None).await.unwrap()).await;
    let id = c.vm("stays-off").await.unwrap().id;
    s.restart_with(|| {
        sim.crash(id);
    })
    .await;
    let vm = c.vm("stays-off").await.unwrap();
    assert_eq!(vm.runtime.power_state, PowerState::Crashed);
    let last = c.events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    assert!(last.iter().any(|e| e.data["reason"] == "QEMU exited while covm was down"));
}

#[tokio::test]
async fn quotas_and_a_missing_qemu() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let quota = Quota { vcpus: Some(2), memory_mib: Some(1024), ..Default::default() };
    c.pool_create(&PoolCreate { name: name("tiny"), quota, folder: None }).await.unwrap();
    c.vm_create(&VmConfig { pool: "tiny".into(), cpus: 2, ..vm_named("a") }).await.unwrap();
    c.vm_create(&VmConfig { pool: "tiny".into(), cpus: 1, ..vm_named("b") }).await.unwrap();
    task_done(c, &c.vm_power("a", PowerAction::On, None).await.unwrap()).await;
    let Err(ClientError::Api { status: 409, error, .. }) = c.vm_power("b", PowerAction::On, None).await else {
        panic!()
    };
    assert_eq!(error.code, "quota_exceeded");
    assert!(error.message.contains("tiny") && error.message.contains("2 vCPUs"), "{}", error.message);

    let q = TestServer::start_with(covm_server::Driver::Custom(Arc::new(covm_hv::qemu::QemuDriver::with_binary(
        "/nonexistent/qemu-system-x86_64",
    ))))
    .await;
    q.admin.vm_create(&vm_named("a")).await.unwrap();
    let Err(ClientError::Api { status: 409, error, .. }) = q.admin.vm_power("a", PowerAction::On, None).await else {
        panic!()
    };
    assert_eq!(error.code, "hypervisor_unavailable");
    assert!(error.message.contains("qemu-system-x86"), "{}", error.message);
    // Everything else keeps working.
    q.admin.vm_change("a", &VmChange { cpus: Some(2), ..Default::default() }, &Default::default()).await.unwrap();
    let ready: serde_json::Value = q.anonymous().get("/readyz").await.unwrap();
    assert!(ready["details"].to_string().contains("qemu-system-x86"), "{ready}");
}
