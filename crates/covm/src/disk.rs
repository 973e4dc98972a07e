//! `covm disk …`: first-class disks.

use anyhow::bail;
use clap::Subcommand;
use covm_client::Client;
use covm_types::api::Page;
use covm_types::disk::DiskView;
use serde_json::json;

use crate::output::Out;

#[derive(Subcommand)]
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

pub async fn run(c: &Client, out: &Out, cmd: DiskCmd) -> anyhow::Result<()> {
    match cmd {
        DiskCmd::Create { name, size, datastore, format, sharing, folder, pool } => {
            let body = json!({
                "name": name, "datastore": datastore, "capacity_bytes": parse_size(&size)?, "format": format,
                "sharing": sharing, "folder": folder, "pool": pool,
            });
            print(out, &[c.post::<_, DiskView>("/disks", &body).await?])
        }
        DiskCmd::Ls => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    Some(a) => format!("/disks?limit=1000&after={a}"),
                    None => "/disks?limit=1000".to_owned(),
                };
                let page: Page<DiskView> = c.get(&path).await?;
                all.extend(page.items);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            print(out, &all)
        }
        DiskCmd::Info { name } => print(out, &[c.get::<DiskView>(&format!("/disks/{name}")).await?]),
        DiskCmd::Resize { name, size } => {
            let d: DiskView =
                c.post(&format!("/disks/{name}/resize"), &json!({ "capacity_bytes": parse_size(&size)? })).await?;
            print(out, &[d])
        }
        DiskCmd::Clone { name, new_name } => {
            print(out, &[c.post::<_, DiskView>(&format!("/disks/{name}/clone"), &json!({ "name": new_name })).await?])
        }
        DiskCmd::Import { name, datastore, path } => {
            let body = json!({ "datastore": datastore, "path": path });
            print(out, &[c.post::<_, DiskView>(&format!("/disks/{name}/import"), &body).await?])
        }
        DiskCmd::Move { name, to, controller, unit } => {
            let body = json!({ "to_vm": to, "controller": controller, "unit": unit });
            let v: covm_types::vm::VmView = c.post(&format!("/disks/{name}/move"), &body).await?;
            out.message(&format!("{name} is attached to {} (version {})", v.name, v.version));
            Ok(())
        }
        DiskCmd::Rm { name } => {
            c.delete(&format!("/disks/{name}")).await?;
            out.message(&format!("deleted disk {name}"));
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
