//! `covm disk …`: first-class disks.

use anyhow::bail;
use clap::Subcommand;
use covm_client::Client;
use covm_types::disk::{DiskClone, DiskCreate, DiskImport, DiskMove, DiskView};

use crate::output::Out;

#[derive(Subcommand)]
pub enum DiskSnapshotCmd {
    Create {
        disk: String,
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    Ls {
        disk: String,
    },
    /// Put the disk back to the snapshot (no running VM may hold it).
    Revert {
        disk: String,
        snapshot: String,
    },
    Rm {
        disk: String,
        snapshot: String,
    },
}

#[derive(clap::Subcommand)]
pub enum DiskCmd {
    /// Create a disk: `covm disk create data-1 --size 64M`.
    Create {
        name: String,
        /// Bytes, or with K, M, G or T (powers of 1024).
        #[arg(long)]
        size: String,
        #[arg(long, default_value = "local")]
        datastore: String,
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// `multi_writer` lets several VMs write (raw only).
        #[arg(long, default_value = "none", value_parser = ["none", "multi_writer"])]
        sharing: String,
        #[arg(long)]
        folder: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// Encrypt the image (LUKS in qcow2, AES-256-XTS) with a key covm keeps wrapped.
        #[arg(long)]
        encrypted: bool,
    },
    Ls,
    /// A disk with what qemu-img says of its image.
    Info {
        name: String,
    },
    /// Grow a disk to SIZE.
    Resize {
        name: String,
        size: String,
    },
    /// Copy a disk into a new one.
    Clone {
        name: String,
        new_name: String,
        /// Encrypt the copy (a copy of an encrypted disk always is).
        #[arg(long)]
        encrypted: bool,
    },
    /// Make a disk of an image file already inside a datastore.
    Import {
        name: String,
        #[arg(long, default_value = "local")]
        datastore: String,
        /// The file, relative to the datastore's directory.
        #[arg(long)]
        path: String,
    },
    /// Move a disk from the VM that holds it to another (hot on running VMs); on any failure it stays
    /// where it was.
    Move {
        name: String,
        /// The VM it goes to.
        #[arg(long)]
        to: String,
        #[arg(long)]
        controller: Option<String>,
        #[arg(long)]
        unit: Option<u32>,
    },
    Rm {
        name: String,
    },
    /// A disk's own snapshots: create, ls, revert, rm.
    #[command(subcommand)]
    Snapshot(DiskSnapshotCmd),
}

/// `64M` → 67108864.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let Ok(n) = num.parse::<u64>() else { bail!("{s} is not a size (like 64M or 10G)") };
    n.checked_mul(mult).ok_or_else(|| anyhow::anyhow!("{s} is too large"))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{:.0} MiB", b as f64 / (1 << 20) as f64),
        b => format!("{b} B"),
    }
}

fn print(out: &Out, disks: &[DiskView]) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(disks)?);
        return Ok(());
    }
    for d in disks {
        let holders: Vec<&str> = d.attachments.iter().map(|a| a.vm.as_str()).collect();
        println!(
            "{:<20} {:<10} {:<6} {:>10}  {:<9} {}",
            d.name,
            d.datastore,
            d.format.as_str(),
            human(d.capacity_bytes),
            serde_json::to_value(d.state)?.as_str().unwrap_or("-"),
            if holders.is_empty() { "-".to_owned() } else { holders.join(",") }
        );
        if let Some(i) = &d.image {
            println!(
                "  image: {} {} virtual, {} on disk, file {}",
                i.format,
                human(i.virtual_size),
                human(i.actual_size),
                d.file
            );
        }
    }
    Ok(())
}

fn parse_name(s: &str) -> anyhow::Result<covm_types::Name> {
    covm_types::Name::parse(s).map_err(|e| anyhow::anyhow!("{s}: {e}"))
}

pub async fn run(c: &Client, out: &Out, cmd: DiskCmd) -> anyhow::Result<()> {
    match cmd {
        DiskCmd::Create { name, size, datastore, format, sharing, folder, pool, encrypted } => {
            let p = DiskCreate {
                name: parse_name(&name)?,
                datastore,
                capacity_bytes: parse_size(&size)?,
                format: serde_json::from_value(serde_json::Value::String(format.clone()))
                    .map_err(|_| anyhow::anyhow!("--format is qcow2 or raw, not {format}"))?,
                sharing: serde_json::from_value(serde_json::Value::String(sharing.clone()))
                    .map_err(|_| anyhow::anyhow!("--sharing is none or multi_writer, not {sharing}"))?,
                folder,
                pool,
                encryption: encrypted.then_some(covm_types::disk::DiskEncryption::Luks),
            };
            print(out, &[c.disk_create(&p).await?])
        }
        DiskCmd::Ls => print(out, &c.disks_all().await?),
        DiskCmd::Info { name } => print(out, &[c.disk(&name).await?]),
        DiskCmd::Resize { name, size } => print(out, &[c.disk_resize(&name, parse_size(&size)?).await?]),
        DiskCmd::Clone { name, new_name, encrypted } => print(
            out,
            &[c.disk_clone(
                &name,
                &DiskClone {
                    name: parse_name(&new_name)?,
                    encryption: encrypted.then_some(covm_types::disk::DiskEncryption::Luks),
                },
            )
            .await?],
        ),
        DiskCmd::Import { name, datastore, path } => {
            print(out, &[c.disk_import(&name, &DiskImport { datastore, path, folder: None, pool: None }).await?])
        }
        DiskCmd::Move { name, to, controller, unit } => {
            let v = c.disk_move(&name, &DiskMove { to_vm: to, controller, unit }).await?;
            out.message(&format!("{name} is attached to {} (version {})", v.name, v.version));
            Ok(())
        }
        DiskCmd::Rm { name } => {
            c.disk_delete(&name).await?;
            out.message(&format!("deleted disk {name}"));
            Ok(())
        }
        DiskCmd::Snapshot(cmd) => snapshot(c, out, cmd).await,
    }
}

async fn snapshot(c: &Client, out: &Out, cmd: DiskSnapshotCmd) -> anyhow::Result<()> {
    use covm_types::snapshot::DiskSnapshotCreate;
    match cmd {
        DiskSnapshotCmd::Create { disk, name, description } => {
            let name = covm_types::Name::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let s = c.disk_snapshot_create(&disk, &DiskSnapshotCreate { name, description }).await?;
            out.message(&format!("took snapshot {} of {disk} (tag {})", s.name, s.tag));
            Ok(())
        }
        DiskSnapshotCmd::Ls { disk } => {
            let all = c.disk_snapshots(&disk).await?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for s in all {
                    let kind = if s.kind == covm_types::snapshot::SnapshotKind::Safety { "  [safety]" } else { "" };
                    println!("{}  {}  {}{kind}", s.name, s.created_at.format("%F %T"), s.created_by);
                }
            }
            Ok(())
        }
        DiskSnapshotCmd::Revert { disk, snapshot } => {
            c.disk_snapshot_revert(&disk, &snapshot).await?;
            out.message(&format!("{disk} is back to {snapshot}"));
            Ok(())
        }
        DiskSnapshotCmd::Rm { disk, snapshot } => {
            c.disk_snapshot_delete(&disk, &snapshot).await?;
            out.message(&format!("removed snapshot {snapshot} of {disk}"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
