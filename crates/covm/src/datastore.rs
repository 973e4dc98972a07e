//! `covm datastore …`: files in a datastore (ISOs, images to import, kernels).

use std::path::PathBuf;

use clap::Subcommand;
use comfy_table::{Table, presets::NOTHING};
use covm_client::Client;
use covm_types::disk::FileView;
use sha2::Digest;

use crate::output::Out;

#[derive(Subcommand)]
pub enum DatastoreCmd {
    /// Upload a local file: `covm datastore upload local debian.iso iso/debian.iso`. It goes in parts
    /// (a broken upload resumes where the server stands when run again) and its SHA-256 is checked.
    Upload {
        datastore: String,
        file: PathBuf,
        /// The path in the datastore (default: the file's name).
        path: Option<String>,
        /// The size of each part, in MiB.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        part_mib: u64,
        /// Do not compute and check the SHA-256 (saves reading the file twice).
        #[arg(long)]
        no_checksum: bool,
    },
    /// The files of a datastore, with the VMs that name them.
    Ls { datastore: String },
    /// Download a file to a local path (`-` for standard output).
    Download { datastore: String, path: String, to: PathBuf },
    /// Delete a file no VM names.
    Rm { datastore: String, path: String },
}

fn print(out: &Out, files: &[FileView]) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(files)?);
        return Ok(());
    }
    let mut t = Table::new();
    *t.style_mut() = NOTHING;
    t.set_header(vec!["PATH", "SIZE", "MODIFIED", "USED BY"]);
    for f in files {
        t.add_row(vec![
            f.path.clone(),
            indicatif::HumanBytes(f.size).to_string(),
            f.modified.format("%F %T").to_string(),
            f.used_by.join(", "),
        ]);
    }
    println!("{t}");
    Ok(())
}

async fn sha256_of(file: &std::path::Path) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(file).await?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

pub async fn run(c: &Client, out: &Out, cmd: DatastoreCmd) -> anyhow::Result<()> {
    match cmd {
        DatastoreCmd::Upload { datastore, file, path, part_mib, no_checksum } => {
            let path = match path {
                Some(p) => p,
                None => file.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| {
                    anyhow::anyhow!("{} has no file name; give the path in the datastore", file.display())
                })?,
            };
            let sha = match no_checksum {
                true => None,
                false => Some(sha256_of(&file).await?),
            };
            // A bar on stderr for people (indicatif draws nothing when stderr is not a terminal).
            let bar = match out.json {
                true => indicatif::ProgressBar::hidden(),
                false => indicatif::ProgressBar::new(0),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template("[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("#> "),
            );
            let v = c
                .datastore_upload(&datastore, &path, &file, part_mib << 20, sha.as_deref(), |at, total| {
                    bar.set_length(total);
                    bar.set_position(at);
                })
                .await?;
            bar.finish_and_clear();
            match v.file {
                Some(f) if !out.json => out.message(&format!("{}:{} ({} bytes)", f.datastore, f.path, f.size)),
                Some(f) => print(out, &[f])?,
                None => anyhow::bail!("the upload did not complete"),
            }
            Ok(())
        }
        DatastoreCmd::Ls { datastore } => print(out, &c.datastore_files(&datastore).await?),
        DatastoreCmd::Download { datastore, path, to } => {
            use futures::StreamExt;
            use std::io::Write;
            let resp = c.datastore_file_get(&datastore, &path).await?;
            let mut sink: Box<dyn Write> = match to.as_os_str() == "-" {
                true => Box::new(std::io::stdout().lock()),
                false => Box::new(std::io::BufWriter::new(std::fs::File::create(&to)?)),
            };
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                sink.write_all(&chunk?)?;
            }
            sink.flush()?;
            Ok(())
        }
        DatastoreCmd::Rm { datastore, path } => {
            c.datastore_file_delete(&datastore, &path).await?;
            out.message(&format!("deleted {datastore}:{path}"));
            Ok(())
        }
    }
}
