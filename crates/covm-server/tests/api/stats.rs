//! What a running VM uses of its host (`GET /vms/{vm}/stats`), through the node agent.

use covm_client::ClientError;
use covm_types::ErrorCode;
use covm_types::vm::{PowerAction, TaskState, VmConfig};

use crate::common::{TestServer, task_done};

fn vm(name: &str) -> VmConfig {
    VmConfig { memory_mib: 64, ..VmConfig::named(name).unwrap() }
}

#[tokio::test]
async fn a_vm_that_is_off_has_no_stats_and_a_running_simulated_one_uses_nothing() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.vm_create(&vm("a")).await.unwrap();
    match c.vm_stats("a").await {
        Err(ClientError::Api { status: 409, error, .. }) => assert_eq!(error.code, ErrorCode::VmNotRunning),
        other => panic!("stats of a VM that is off: {other:?}"),
    }
    let t = task_done(c, &c.vm_power("a", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let st = c.vm_stats("a").await.unwrap();
    assert_eq!((st.pid, st.cpu_seconds, st.memory_rss_bytes), (None, 0.0, 0), "a simulated VM has no process");
    assert_eq!(st.memory_configured_bytes, 64 << 20);
    assert!(!st.node.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_qemu_uses_cpu_time_and_memory_as_its_host_counts_them() {
    if crate::qemu::skip() {
        return;
    }
    let s = TestServer::start_with(covm_server::Driver::Qemu).await;
    let c = &s.admin;
    // Firmware only (no guest): QEMU runs and its vCPU spins in the firmware.
    c.vm_create(&vm("fw")).await.unwrap();
    let t = task_done(c, &c.vm_power("fw", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    let first = c.vm_stats("fw").await.unwrap();
    let pid = first.pid.expect("a QEMU process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(status.contains("qemu-system"), "the pid is QEMU's: {status}");
    assert!(first.memory_rss_bytes > 1 << 20, "{first:?}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let second = c.vm_stats("fw").await.unwrap();
    assert!(second.cpu_seconds >= first.cpu_seconds && second.cpu_seconds > 0.0, "{first:?} then {second:?}");
    assert!(second.sampled_at > first.sampled_at);
    task_done(c, &c.vm_power("fw", PowerAction::Off, None).await.unwrap()).await;
    assert!(c.vm_stats("fw").await.is_err(), "a VM that was powered off has no stats");
}
