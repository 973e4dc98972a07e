//! `covm-bench SCENARIO …`: starts its own covm (the `covm` binary beside this one, on a temporary data
//! dir) or targets `--url`, runs the scenario, prints a table (or `--json`), and exits non-zero when
//! the checker found a violation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use covm_bench::server::{Server, covm_binary};
use covm_bench::{Report, disks, power, scale, snapshots, storm};

#[derive(Parser)]
#[command(name = "covm-bench", about = "Load, latency and consistency checks for covm")]
struct Cli {
    /// A running covm to load instead of starting one (needs --password).
    #[arg(long, global = true)]
    url: Option<String>,
    /// The admin password of --url.
    #[arg(long, global = true, env = "COVM_BENCH_PASSWORD")]
    password: Option<String>,
    /// The covm binary to start (default: the one beside covm-bench).
    #[arg(long, global = true)]
    covm: Option<PathBuf>,
    #[arg(long, global = true)]
    json: bool,
    /// Start covm on PostgreSQL at this URL (`temp`: a throwaway PostgreSQL the bench starts with
    /// initdb in a temporary directory; needs Debian's postgresql package).
    #[arg(long, global = true)]
    db: Option<String>,
    /// How many covm replicas to start on --db; clients and subscribers are spread over them.
    #[arg(long, global = true, default_value_t = 1)]
    replicas: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// What LUKS costs the guest: dd write and read MiB/s of a plain and an encrypted disk of the test
    /// guest (real QEMU).
    EncryptedIo {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// The test guest (scripts/build-test-guest).
        #[arg(long, default_value = "target/test-guest")]
        guest: PathBuf,
    },
    /// Uploads into a datastore through the API (whole, and in parts with a SHA-256) against `cp` of the
    /// same file: MiB/s, median of the runs.
    Upload {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[arg(long, default_value_t = 64)]
        part_mib: u64,
    },
    /// A linked clone of a template against a full clone, and power-on to the clone's address (DHCP,
    /// and through the guest agent): real QEMU and the test guest.
    Provision {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        #[arg(long, default_value_t = 256)]
        fill_mib: u64,
        /// The test guest (scripts/build-test-guest DIR).
        #[arg(long, default_value = "target/test-guest")]
        guest: PathBuf,
    },
    /// What TLS costs: TLS 1.3 handshakes a second, and PATCH latency plain against TLS (kept-alive and
    /// a new connection per request). Runs its own two servers in this process.
    Tls {
        #[arg(long, default_value_t = 500)]
        handshakes: usize,
        #[arg(long, default_value_t = 300)]
        patches: usize,
    },
    /// Read-modify-write edits with If-Match by many users on a few VMs, feed subscribers, checker.
    EditStorm {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 20)]
        vms: usize,
        #[arg(long, default_value_t = 200)]
        subscribers: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Clients racing for leases and writing under them; the checker replays the lease events.
    LeaseContention {
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 4)]
        vms: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Many clients attach one disk read-write at once; exactly one may win, every round.
    AttachRace {
        #[arg(long, default_value_t = 20)]
        clients: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// N VMs, then list, filtered list and get times and the server's memory.
    InventoryScale {
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        #[arg(long, default_value_t = 50)]
        samples: usize,
    },
    /// Power-on latency to the guest's READY against the bare QEMU floor (real QEMU), and the server's
    /// memory with VMs running.
    PowerOn {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 20)]
        idle_vms: usize,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// The test guest (scripts/build-test-guest DIR).
        #[arg(long, default_value = "target/test-guest")]
        guest: PathBuf,
    },
    /// Hot attach to the guest seeing the disk, hot detach, and disk create, each beside its floor
    /// (the same QMP commands by hand; qemu-img alone). Real QEMU and the test guest.
    DiskOps {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        disk_mib: u64,
        /// The test guest (scripts/build-test-guest DIR).
        #[arg(long, default_value = "target/test-guest")]
        guest: PathBuf,
    },
    /// VM snapshot create, data revert and delete (a VM that is off) beside `qemu-img snapshot` alone.
    Snapshots {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        disk_mib: u64,
        /// How much of the disk holds data.
        #[arg(long, default_value_t = 16)]
        fill_mib: u64,
    },
    /// Snapshots of a running VM (real QEMU, the test guest): disk-only and with memory, the part QEMU
    /// takes (the guest's stall), deletes, and a memory revert.
    SnapshotsLive {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        disk_mib: u64,
        #[arg(long, default_value_t = 16)]
        fill_mib: u64,
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// The test guest (scripts/build-test-guest DIR).
        #[arg(long, default_value = "target/test-guest")]
        guest: PathBuf,
    },
}

async fn server(cli: &Cli, driver: &str) -> anyhow::Result<Server> {
    Ok(servers(cli, driver).await?.remove(0))
}

/// The server(s) of a run: one, or `--replicas` on `--db`.
async fn servers(cli: &Cli, driver: &str) -> anyhow::Result<Vec<Server>> {
    if let Some(url) = &cli.url {
        let pw = cli.password.as_deref().ok_or_else(|| anyhow::anyhow!("--url needs --password"))?;
        return Ok(vec![Server::remote(url, pw).await?]);
    }
    let covm = cli.covm.clone().unwrap_or_else(covm_binary);
    let db = match cli.db.as_deref() {
        Some("temp") => Some(covm_store::testing::postgres_database().await.map_err(|e| anyhow::anyhow!(e))?),
        Some(url) => Some(url.to_owned()),
        None if cli.replicas > 1 => anyhow::bail!("--replicas needs --db (several replicas share a PostgreSQL)"),
        None => None,
    };
    let first = Server::start_on(&covm, driver, db.as_deref(), None, &[]).await?;
    let mut all = vec![first];
    for _ in 1..cli.replicas {
        let r = all[0].replica(&covm, driver, db.as_deref().unwrap_or_default()).await?;
        all.push(r);
    }
    Ok(all)
}

fn urls(servers: &[Server]) -> Vec<String> {
    if servers.len() < 2 { vec![] } else { servers.iter().map(|s| s.url.clone()).collect() }
}

async fn run(cli: Cli) -> anyhow::Result<Report> {
    match &cli.scenario {
        Scenario::EditStorm { users, vms, subscribers, duration } => {
            let all = servers(&cli, "sim").await?;
            let p = storm::StormParams {
                users: *users,
                vms: *vms,
                subscribers: *subscribers,
                duration_s: *duration,
                replicas: urls(&all),
            };
            let mut r = storm::edit_storm(&all[0].admin, &p).await?;
            r.figures["server_rss_mib"] = serde_json::json!(all.iter().map(|s| s.rss_mib()).collect::<Vec<_>>());
            r.figures["store"] = serde_json::json!(if cli.db.is_some() { "postgres" } else { "sqlite" });
            Ok(r)
        }
        Scenario::LeaseContention { clients, vms, duration } => {
            let all = servers(&cli, "sim").await?;
            let p = storm::LeaseParams { clients: *clients, vms: *vms, duration_s: *duration, replicas: urls(&all) };
            storm::lease_contention(&all[0].admin, &p).await
        }
        Scenario::AttachRace { clients, rounds } => {
            let all = servers(&cli, "sim").await?;
            let p = storm::AttachParams { clients: *clients, rounds: *rounds, replicas: urls(&all) };
            storm::attach_race(&all[0].admin, &p).await
        }
        Scenario::InventoryScale { vms, samples } => {
            let s = server(&cli, "sim").await?;
            scale::inventory_scale(&s, &scale::ScaleParams { vms: *vms, samples: *samples }).await
        }
        Scenario::PowerOn { runs, idle_vms, memory_mib, guest } => {
            let covm = cli.covm.clone().unwrap_or_else(covm_binary);
            power::power_on(
                &covm,
                guest,
                &power::PowerParams { runs: *runs, idle_vms: *idle_vms, memory_mib: *memory_mib },
            )
            .await
        }
        Scenario::EncryptedIo { runs, mib, guest } => {
            let covm = cli.covm.clone().unwrap_or_else(covm_binary);
            covm_bench::encryption::encrypted_io(
                &covm,
                guest,
                &covm_bench::encryption::IoParams { runs: *runs, mib: *mib },
            )
            .await
        }
        Scenario::Upload { runs, mib, part_mib } => {
            let s = server(&cli, "sim").await?;
            let p = covm_bench::upload::UploadParams { runs: *runs, mib: *mib, part_mib: *part_mib };
            covm_bench::upload::upload(&s, &p).await
        }
        Scenario::Provision { runs, disk_mib, fill_mib, guest } => {
            let covm = cli.covm.clone().unwrap_or_else(covm_binary);
            let p = covm_bench::provision::ProvisionParams { runs: *runs, disk_mib: *disk_mib, fill_mib: *fill_mib };
            covm_bench::provision::provision(&covm, guest, &p).await
        }
        Scenario::Tls { handshakes, patches } => {
            covm_bench::tls::tls(&covm_bench::tls::TlsParams { handshakes: *handshakes, patches: *patches }).await
        }
        Scenario::Snapshots { runs, disk_mib, fill_mib } => {
            let s = server(&cli, "sim").await?;
            let p = snapshots::SnapshotParams { runs: *runs, disk_mib: *disk_mib, fill_mib: *fill_mib };
            snapshots::snapshots(&s, &p).await
        }
        Scenario::SnapshotsLive { runs, disk_mib, fill_mib, memory_mib, guest } => {
            let covm = cli.covm.clone().unwrap_or_else(covm_binary);
            let p = snapshots::LiveParams {
                runs: *runs,
                disk_mib: *disk_mib,
                fill_mib: *fill_mib,
                memory_mib: *memory_mib,
            };
            snapshots::snapshots_live(&covm, guest, &p).await
        }
        Scenario::DiskOps { runs, disk_mib, guest } => {
            let covm = cli.covm.clone().unwrap_or_else(covm_binary);
            disks::disk_ops(&covm, guest, &disks::DiskParams { runs: *runs, disk_mib: *disk_mib }).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("covm-bench: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                r.print();
            }
            if r.violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) }
        }
        Err(e) => {
            eprintln!("covm-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
