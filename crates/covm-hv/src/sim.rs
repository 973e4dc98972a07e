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
    /// When true, simulated guests do not release unplugged devices until [`SimDriver::release_devices`].
    pub sticky_devices: Arc<std::sync::atomic::AtomicBool>,
    blocks: Blocks,
}

type Blocks = Arc<Mutex<HashMap<Uuid, crate::BlockState>>>;

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

    /// A sticky guest lets go of the devices it was asked to release (late, after covm gave up).
    pub fn release_devices(&self, id: Uuid, devices: &[&str]) {
        let mut b = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = b.get_mut(&id) {
            st.devices.retain(|d| !devices.contains(&d.as_str()));
        }
        drop(b);
        for d in devices {
            self.send(id, HvEvent::DeviceDeleted((*d).to_owned()));
        }
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
    blocks: Blocks,
    sticky: Arc<std::sync::atomic::AtomicBool>,
    /// The image file of each format node, and its passphrase if it is encrypted (for internal
    /// snapshots, which change the files themselves).
    files: HashMap<String, (std::path::PathBuf, Option<crate::secret::DiskKey>)>,
}

impl SimVm {
    fn blocks(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, crate::BlockState>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }
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
        if let Some(m) = &spec.restore {
            // Nothing to load into a simulated guest; the snapshot must be there all the same.
            if !crate::img::snapshot_tags(&m.state).await?.contains(&m.tag) {
                return Err(HvError::Start(format!("the state image has no snapshot {}", m.tag)));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.id, tx.clone());
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).remove(&spec.id);
        Ok(Box::new(SimVm {
            id: spec.id,
            tx,
            rx,
            running: self.running.clone(),
            deaf: self.deaf_guests.load(std::sync::atomic::Ordering::Relaxed),
            blocks: self.blocks.clone(),
            sticky: self.sticky_devices.clone(),
            files: spec.disks.iter().map(|d| (d.node.clone(), (d.path.clone(), d.key.clone()))).collect(),
        }))
    }

    async fn adopt(&self, id: Uuid, _run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>, HvError> {
        // Simulated VMs live in this driver's memory: one that still runs is adopted with a new channel.
        if !self.is_running(id) {
            return Ok(None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx.clone());
        Ok(Some(Box::new(SimVm {
            id,
            tx,
            rx,
            running: self.running.clone(),
            deaf: false,
            blocks: self.blocks.clone(),
            sticky: self.sticky_devices.clone(),
            files: HashMap::new(),
        })))
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

    async fn set_link(&mut self, _mac: &str, _up: bool) -> Result<(), HvError> {
        Ok(())
    }

    async fn nic_add(&mut self, _nic: &crate::NicSpec) -> Result<(), HvError> {
        Ok(())
    }

    async fn nic_del(&mut self, mac: &str) -> Result<bool, HvError> {
        let _ = self.tx.send(HvEvent::DeviceDeleted(crate::nic_id(mac)));
        Ok(true)
    }

    async fn blockdev_add(&mut self, d: &crate::DiskSpec) -> Result<(), HvError> {
        self.files.insert(d.node.clone(), (d.path.clone(), d.key.clone()));
        let mut b = self.blocks();
        let st = b.entry(self.id).or_default();
        for n in [d.node.clone(), format!("{}-file", d.node)] {
            if !st.nodes.contains(&n) {
                st.nodes.push(n);
            }
        }
        Ok(())
    }

    async fn device_add(&mut self, d: &crate::DiskSpec) -> Result<(), HvError> {
        let mut b = self.blocks();
        let st = b.entry(self.id).or_default();
        if !st.nodes.contains(&d.node) {
            return Err(HvError::Qmp(format!("Cannot find device='' nor node-name='{}'", d.node)));
        }
        if !st.devices.contains(&d.node) {
            st.devices.push(d.node.clone());
        }
        Ok(())
    }

    async fn device_del(&mut self, node: &str) -> Result<bool, HvError> {
        let mut b = self.blocks();
        let st = b.entry(self.id).or_default();
        let Some(i) = st.devices.iter().position(|d| d == node) else { return Ok(false) };
        if !self.sticky.load(std::sync::atomic::Ordering::Relaxed) {
            // A simulated guest releases at once.
            st.devices.remove(i);
            let _ = self.tx.send(HvEvent::DeviceDeleted(node.to_owned()));
        }
        Ok(true)
    }

    async fn blockdev_del(&mut self, node: &str) -> Result<(), HvError> {
        let mut b = self.blocks();
        let st = b.entry(self.id).or_default();
        if st.devices.iter().any(|d| d == node) {
            return Err(HvError::Qmp(format!("Node '{node}' is busy: node is used as backing hd of a device")));
        }
        st.nodes.retain(|n| *n != node && *n != format!("{node}-file"));
        Ok(())
    }

    async fn block_query(&mut self) -> Result<crate::BlockState, HvError> {
        let mut st = self.blocks().get(&self.id).cloned().unwrap_or_default();
        st.nodes.sort();
        st.devices.sort();
        Ok(st)
    }

    async fn block_resize(&mut self, _node: &str, _size: u64) -> Result<(), HvError> {
        Ok(())
    }

    /// A simulated VM holds no lock on its files: the tags are made with `qemu-img`, all or none.
    async fn snapshot_internal(&mut self, nodes: &[String], tag: &str) -> Result<(), HvError> {
        let mut files = Vec::new();
        for n in nodes {
            let f = self.files.get(n).ok_or_else(|| HvError::Command {
                class: "DeviceNotFound".into(),
                desc: format!("Cannot find device='{n}' nor node-name='{n}'"),
            })?;
            files.push(f.clone());
        }
        for (i, (f, k)) in files.iter().enumerate() {
            if let Err(e) = crate::img::snapshot_create(f, tag, k.as_ref()).await {
                for (g, k) in &files[..i] {
                    let _ = crate::img::snapshot_delete(g, tag, k.as_ref()).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// A simulated VM has no memory to save: the tags go into its disks and its state image.
    async fn snapshot_save(&mut self, m: &crate::MemoryState) -> Result<(), HvError> {
        m.state_image().await?;
        self.files.insert(crate::STATE_NODE.into(), (m.state.clone(), None));
        {
            let mut b = self.blocks();
            let st = b.entry(self.id).or_default();
            if !st.nodes.iter().any(|n| n == crate::STATE_NODE) {
                st.nodes.push(crate::STATE_NODE.into());
            }
        }
        self.snapshot_internal(&m.devices(), &m.tag).await
    }

    async fn snapshot_delete_internal(&mut self, node: &str, tag: &str) -> Result<(), HvError> {
        match self.files.get(node) {
            Some((f, k)) => crate::img::snapshot_delete(f, tag, k.as_ref()).await,
            None => Ok(()),
        }
    }

    async fn next_event(&mut self) -> HvEvent {
        self.rx.recv().await.unwrap_or(HvEvent::Exited { status: None, log_tail: vec![] })
    }
}
