//! The simulated driver: VMs that exist only in memory, for fast tests of the app layer and for
//! `covm serve --driver sim` on machines without QEMU. By default a simulated guest answers an ACPI
//! power-down by shutting down; a test can also make a guest power itself off or crash
//! ([`SimDriver::guest_poweroff`], [`SimDriver::crash`]) — the transitions a test drives itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{AccelChoice, HvError, HvEvent, Hypervisor, VmHandle, VmSpec};

#[derive(Default)]
pub struct SimDriver {
    running: Arc<Mutex<HashMap<Uuid, mpsc::UnboundedSender<HvEvent>>>>,
    /// When true, simulated guests ignore ACPI power-down (to test the shutdown timeout).
    pub deaf_guests: std::sync::atomic::AtomicBool,
}

impl SimDriver {
    fn send(&self, id: Uuid, ev: HvEvent) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id).is_some_and(|tx| tx.send(ev).is_ok())
    }

    /// The guest powers itself off.
    pub fn guest_poweroff(&self, id: Uuid) -> bool {
        self.send(id, HvEvent::GuestShutdown)
    }

    /// The VM's process dies.
    pub fn crash(&self, id: Uuid) -> bool {
        let ok = self.send(
            id,
            HvEvent::Exited { status: Some("signal: 9 (SIGKILL)".into()), log_tail: vec!["simulated crash".into()] },
        );
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        ok
    }

    pub fn is_running(&self, id: Uuid) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }
}

struct SimVm {
    id: Uuid,
    tx: mpsc::UnboundedSender<HvEvent>,
    rx: mpsc::UnboundedReceiver<HvEvent>,
    running: Arc<Mutex<HashMap<Uuid, mpsc::UnboundedSender<HvEvent>>>>,
    deaf: bool,
}

#[async_trait]
impl Hypervisor for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn check(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, HvError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.id, tx.clone());
        Ok(Box::new(SimVm {
            id: spec.id,
            tx,
            rx,
            running: self.running.clone(),
            deaf: self.deaf_guests.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn adopt(&self, id: Uuid, _run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>, HvError> {
        // Simulated VMs live in this driver's memory: one that still runs is adopted with a new channel.
        if !self.is_running(id) {
            return Ok(None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx.clone());
        Ok(Some(Box::new(SimVm { id, tx, rx, running: self.running.clone(), deaf: false })))
    }

    fn leftover_pid(&self, _run_dir: &Path) -> Option<u32> {
        None
    }
}

#[async_trait]
impl VmHandle for SimVm {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn accel(&self) -> AccelChoice {
        AccelChoice::Tcg
    }

    async fn powerdown(&mut self) -> Result<(), HvError> {
        if !self.deaf {
            let _ = self.tx.send(HvEvent::GuestShutdown);
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HvError> {
        let _ = self.tx.send(HvEvent::Reset);
        Ok(())
    }

    async fn quit(&mut self) -> Result<(), HvError> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
        Ok(())
    }

    async fn set_link(&mut self, _nic: usize, _up: bool) -> Result<(), HvError> {
        Ok(())
    }

    async fn disk_add(&mut self, _disk: &crate::DiskSpec) -> Result<(), HvError> {
        Ok(())
    }

    async fn device_del(&mut self, node: &str) -> Result<(), HvError> {
        // A simulated guest releases at once.
        let _ = self.tx.send(HvEvent::DeviceDeleted(node.to_owned()));
        Ok(())
    }

    async fn blockdev_del(&mut self, _node: &str) -> Result<(), HvError> {
        Ok(())
    }

    async fn block_resize(&mut self, _node: &str, _size: u64) -> Result<(), HvError> {
        Ok(())
    }

    async fn next_event(&mut self) -> HvEvent {
        self.rx.recv().await.unwrap_or(HvEvent::Exited { status: None, log_tail: vec![] })
    }
}
