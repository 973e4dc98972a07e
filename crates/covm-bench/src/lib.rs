//! covm-bench: scenarios that load a covm server and check that nothing was lost.
//!
//! Every scenario returns a [`Report`]: figures for people and machines, and `violations` — the one
//! number that must be 0. The checker never trusts the server's word alone: it compares what clients
//! were told (acknowledged versions, lease tokens) with the stored history and the event log, and what
//! each feed subscriber received with the log itself.

pub mod disks;
pub mod encryption;
pub mod power;
pub mod provision;
pub mod scale;
pub mod server;
pub mod snapshots;
pub mod storm;
pub mod tls;
pub mod upload;

use serde::Serialize;

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<f64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        Percentiles {
            count: samples.len(),
            p50: r(at(0.50)),
            p95: r(at(0.95)),
            p99: r(at(0.99)),
            max: r(*samples.last().unwrap_or(&0.0)),
        }
    }
}

/// The outcome of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub params: serde_json::Value,
    pub figures: serde_json::Value,
    /// Consistency violations found by the checker; 0 is the only good value.
    pub violations: usize,
    /// What each violation was (the first 50).
    pub violation_details: Vec<String>,
}

impl Report {
    /// A table for people.
    pub fn print(&self) {
        println!("scenario: {}", self.scenario);
        println!("params:   {}", self.params);
        if let Some(f) = self.figures.as_object() {
            for (k, v) in f {
                println!("  {k:<24} {v}");
            }
        }
        println!("violations: {}", self.violations);
        for v in &self.violation_details {
            println!("  VIOLATION {v}");
        }
    }
}

/// Collects violations with their descriptions.
#[derive(Default)]
pub struct Violations {
    pub count: usize,
    pub details: Vec<String>,
}

impl Violations {
    pub fn add(&mut self, what: String) {
        self.count += 1;
        if self.details.len() < 50 {
            self.details.push(what);
        }
    }
}

/// A qcow2 disk of `bytes` in the datastore `local`.
pub fn disk_spec(name: &str, bytes: u64) -> covm_types::disk::DiskCreate {
    covm_types::disk::DiskCreate::new(covm_types::Name::parse(name).expect("a valid disk name"), "local", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.count, p.p50, p.p95, p.p99, p.max), (100, 51.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }
}
