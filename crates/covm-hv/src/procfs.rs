//! What a VM's process uses, read from `/proc`: CPU time (`/proc/PID/stat`, user + system, in clock
//! ticks) and resident memory (`VmRSS` of `/proc/PID/status`).

use std::path::Path;

use crate::HvError;

/// A process's use of the host, now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcUse {
    /// User and system CPU time since the process started.
    pub cpu_seconds: f64,
    /// Resident memory.
    pub rss_bytes: u64,
}

/// Reads a process's use; `HvError::Gone` when it is not there.
pub fn proc_use(pid: u32) -> Result<ProcUse, HvError> {
    proc_use_at(Path::new("/proc"), pid, clock_ticks())
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn proc_use_at(proc: &Path, pid: u32, ticks: f64) -> Result<ProcUse, HvError> {
    let dir = proc.join(pid.to_string());
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HvError::Gone,
            _ => HvError::os(format!("read /proc/{pid}/{f}"))(e),
        })
    };
    let stat = read("stat")?;
    // The command name (field 2) may hold spaces and parentheses: the fields after it start after
    // the last ')'. utime and stime are fields 14 and 15, the 12th and 13th after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (tick(11), tick(12)) else {
        return Err(HvError::Io(format!("/proc/{pid}/stat is not as expected")));
    };
    let status = read("status")?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(ProcUse { cpu_seconds: (utime + stime) as f64 / ticks, rss_bytes: rss_kib * 1024 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_and_resident_memory_even_with_an_odd_command_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("42");
        std::fs::create_dir(&p).unwrap();
        // comm "(a) b)": the fields are found after the last ')'.
        let stat = "42 ((a) b)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 0 0";
        std::fs::write(p.join("stat"), stat).unwrap();
        std::fs::write(p.join("status"), "Name:\tqemu\nVmRSS:\t  2048 kB\n").unwrap();
        let u = proc_use_at(dir.path(), 42, 100.0).unwrap();
        assert_eq!(u, ProcUse { cpu_seconds: 3.0, rss_bytes: 2 << 20 });
        assert_eq!(proc_use_at(dir.path(), 43, 100.0), Err(HvError::Gone));
    }

    #[test]
    fn this_process_uses_something() {
        let u = proc_use(std::process::id()).unwrap();
        assert!(u.rss_bytes > 0);
    }
}
