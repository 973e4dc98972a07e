//! `inventory-scale`: N VMs, then how long a list, a filtered list, a get, and a disk's attach and
//! detach take, and the server's resident memory.

use std::time::Instant;

use covm_client::Client;
use covm_types::vm::VmListQuery;
use futures::StreamExt;
use serde_json::json;

use crate::server::Server;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleParams {
    pub vms: usize,
    /// Requests per measurement.
    pub samples: usize,
}

async fn time<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Percentiles>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        f(i).await?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Percentiles::of(ms))
}

pub async fn inventory_scale(server: &Server, p: &ScaleParams) -> anyhow::Result<Report> {
    let c: &Client = &server.admin;
    let t0 = Instant::now();
    futures::stream::iter(0..p.vms)
        .map(
            |i| async move { c.vm_create(&json!({ "name": format!("s-{i:06}"), "memory_mib": 64 })).await.map(|_| ()) },
        )
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let create_s = t0.elapsed().as_secs_f64();
    let list =
        time(p.samples, |_| async { c.vms(&VmListQuery::default()).await.map(|_| ()).map_err(Into::into) }).await?;
    let filtered = time(p.samples, |i| async move {
        let q = VmListQuery { name: Some(format!("s-{:04}", (i * 37) % (p.vms / 100).max(1))), ..Default::default() };
        c.vms(&q).await.map(|_| ()).map_err(Into::into)
    })
    .await?;
    let get = time(p.samples, |i| async move {
        c.vm(&format!("s-{:06}", (i * 7919) % p.vms)).await.map(|_| ()).map_err(Into::into)
    })
    .await?;
    // A disk attached to and detached from one VM: costs the same whatever the number of VMs (the
    // store answers a disk's holders from an index).
    c.disk_create(&crate::disk_spec("scale-disk", 1 << 20)).await?;
    let (mut attach, mut detach) = (Vec::new(), Vec::new());
    for _ in 0..p.samples {
        let t0 = Instant::now();
        c.vm_disk_attach(
            "s-000000",
            &covm_types::disk::DiskAttach {
                disk: "scale-disk".into(),
                controller: None,
                unit: None,
                read_only: false,
                next_boot: false,
            },
        )
        .await?;
        attach.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        c.vm_disk_detach("s-000000", "scale-disk", &Default::default()).await?;
        detach.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Report {
        scenario: "inventory-scale".into(),
        params: serde_json::to_value(p)?,
        figures: json!({
            "create_vms_per_s": (p.vms as f64 / create_s).round(),
            "list_first_page_ms": list,
            "filtered_list_ms": filtered,
            "get_ms": get,
            "attach_ms": Percentiles::of(attach),
            "detach_ms": Percentiles::of(detach),
            "server_rss_mib": server.rss_mib(),
        }),
        violations: 0,
        violation_details: vec![],
    })
}
