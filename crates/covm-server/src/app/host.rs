//! Facts about the machine covm runs on: CPUs, memory, whether KVM works and what kind it is, and the
//! capacity of a file system.

use std::path::Path;

/// What the local host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub hostname: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// `/dev/kvm` opens for reading and writing.
    pub kvm: bool,
    /// `kvm` (hardware), `kvm_pvm` (a slow nested software KVM) or `none`.
    pub kvm_kind: String,
}

pub fn host_facts() -> HostFacts {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| meminfo_total_kib(&s))
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let kvm_kind = if !kvm {
        "none"
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else {
        "kvm"
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    HostFacts { hostname, cpus, memory_mib, kvm, kvm_kind: kvm_kind.into() }
}

fn meminfo_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `(capacity, free)` bytes of the file system holding `path`.
pub fn fs_capacity(path: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = st.fragment_size() as u64;
    Ok((st.blocks() as u64 * frag, st.blocks_available() as u64 * frag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo() {
        assert_eq!(meminfo_total_kib("MemTotal:       24563000 kB\nMemFree: 1 kB\n"), Some(24_563_000));
        assert_eq!(meminfo_total_kib("nothing"), None);
    }

    #[test]
    fn facts_are_plausible() {
        let f = host_facts();
        assert!(f.cpus >= 1);
        assert!(f.memory_mib > 0);
        let (cap, free) = fs_capacity(Path::new("/")).unwrap();
        assert!(cap > 0 && free <= cap);
    }
}
