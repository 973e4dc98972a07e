//! `upload`: how fast a file gets into a datastore through the API (issue 17), against `cp` of the
//! same file to the same file system. One covm (simulated driver) on loopback; the file is random
//! bytes in a temporary directory beside the server's data; every copy lands on the same file system,
//! warm page cache for all (nothing is synced), so the comparison is of the paths, not of the disk.

use std::time::Instant;

use rand::Rng;

use crate::server::Server;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadParams {
    pub runs: usize,
    pub mib: u64,
    pub part_mib: u64,
}

pub async fn upload(s: &Server, p: &UploadParams) -> anyhow::Result<Report> {
    let c = &s.admin;
    let data_dir = s.data_dir.clone().ok_or_else(|| anyhow::anyhow!("upload needs a covm the bench starts"))?;
    let ds = data_dir.join("datastores/local");
    let tmp = tempfile::Builder::new().prefix("covm-upload-").tempdir_in(data_dir.parent().unwrap_or(&data_dir))?;
    let local = tmp.path().join("file.img");
    let mut bytes = vec![0u8; (p.mib << 20) as usize];
    rand::rng().fill(&mut bytes[..]);
    std::fs::write(&local, &bytes)?;
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let rate = |t: Instant| p.mib as f64 / t.elapsed().as_secs_f64();
    let (mut cp, mut whole, mut parts, mut plain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..p.runs {
        let t = Instant::now();
        let st = std::process::Command::new("cp").arg(&local).arg(ds.join(format!("cp-{run}.img"))).status()?;
        anyhow::ensure!(st.success(), "cp failed");
        cp.push(rate(t));

        let t = Instant::now();
        let body = covm_client::file_body(tokio::fs::File::open(&local).await?, p.mib << 20);
        let v = c.datastore_file_put("local", &format!("whole-{run}.img"), None, None, body).await?;
        whole.push(rate(t));
        anyhow::ensure!(v.complete && v.received == p.mib << 20, "the whole upload did not complete: {v:?}");

        let t = Instant::now();
        let v = c
            .datastore_upload("local", &format!("parts-{run}.img"), &local, p.part_mib << 20, Some(&sha), |_, _| {})
            .await?;
        parts.push(rate(t));
        anyhow::ensure!(v.complete, "the upload in parts did not complete");

        let t = Instant::now();
        let v =
            c.datastore_upload("local", &format!("plain-{run}.img"), &local, p.part_mib << 20, None, |_, _| {}).await?;
        plain.push(rate(t));
        anyhow::ensure!(v.complete, "the upload in parts did not complete");
        for f in [format!("whole-{run}.img"), format!("parts-{run}.img"), format!("plain-{run}.img")] {
            c.datastore_file_delete("local", &f).await?;
        }
        std::fs::remove_file(ds.join(format!("cp-{run}.img")))?;
    }
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let median = |v: Vec<f64>| Percentiles::of(v).p50;
    let (cp, whole, parts, plain) = (median(cp), median(whole), median(parts), median(plain));
    Ok(Report {
        scenario: "upload".into(),
        params: serde_json::to_value(p)?,
        figures: serde_json::json!({
            "cp_mib_s": round(cp),
            "put_whole_mib_s": round(whole),
            "put_parts_mib_s": round(plain),
            "put_parts_sha256_mib_s": round(parts),
            "put_whole_vs_cp": round(whole / cp * 100.0) / 100.0,
            "put_parts_vs_cp": round(parts / cp * 100.0) / 100.0,
        }),
        violations: 0,
        violation_details: vec![],
    })
}
