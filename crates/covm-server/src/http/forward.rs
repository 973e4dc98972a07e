//! Requests about a VM that another node runs go to that node's replica. With several replicas on one
//! database, a running VM's QEMU, run files and agent are on the replica whose node powered it on; the
//! app answers such a request with 409 `vm_on_other_node` (before it changes anything), and this
//! middleware then sends the same request (method, path, headers, body) to that node's registered URL
//! and streams its answer back, so that a client, or a plain load balancer, may send anything anywhere.
//! A forwarded request carries `Covm-Forwarded` and is never forwarded again. WebSocket consoles are not
//! forwarded (the 409 names the node).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use covm_types::Error;
use covm_types::ErrorCode;
use futures::TryStreamExt;

use super::error::{ApiError, OtherNode};
use crate::app::App;

pub const FORWARDED: &str = "covm-forwarded";
const MAX_BODY: usize = 1 << 20;

/// A response that came from another replica (its failure was audited there).
#[derive(Debug, Clone)]
pub struct Forwarded;

/// The client for a replica: plain HTTP, or TLS trusting only the certificate that replica
/// registered. Clients are kept per certificate, so connections are reused.
fn client(ca_pem: Option<&str>) -> Option<reqwest::Client> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CLIENTS: OnceLock<Mutex<HashMap<Option<String>, reqwest::Client>>> = OnceLock::new();
    let mut clients = CLIENTS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let key = ca_pem.map(str::to_owned);
    if let Some(c) = clients.get(&key) {
        return Some(c.clone());
    }
    crate::tls::install_provider();
    let builder = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5));
    let built = match ca_pem {
        None => builder.build().ok()?,
        Some(pem) => match crate::tls::client_config(pem) {
            Ok(tls) => builder.tls_backend_preconfigured(tls).build().ok()?,
            Err(e) => {
                tracing::warn!(error = %e, "a replica registered a certificate that cannot be used");
                return None;
            }
        },
    };
    clients.insert(key, built.clone());
    Some(built)
}

pub async fn forward_mw(State(app): State<App>, req: Request, next: Next) -> Response {
    let about_a_vm = req.uri().path().starts_with("/api/v1/vms/");
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if !about_a_vm || upgrade || req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let (method, uri, headers) = (parts.method.clone(), parts.uri.clone(), parts.headers.clone());
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return ApiError(Error::new(
            covm_types::ErrorKind::PayloadTooLarge,
            ErrorCode::PayloadTooLarge,
            format!("a request body has at most {MAX_BODY} bytes"),
        ))
        .into_response();
    };
    let resp = next.run(Request::from_parts(parts, Body::from(bytes.clone()))).await;
    let Some(OtherNode(node)) = resp.extensions().get::<OtherNode>().cloned() else { return resp };
    let Some(covm_store::NodeAddr { url, ca_pem }) = app.node_addr(&node).await else { return resp };
    let Some(client) = client(ca_pem.as_deref()) else { return resp };
    let target = format!("{}{}", url.trim_end_matches('/'), uri.path_and_query().map_or("", |p| p.as_str()));
    let mut rb = client.request(method, &target).body(bytes);
    for (k, v) in headers.iter().filter(|(k, _)| *k != header::HOST && *k != header::CONTENT_LENGTH) {
        rb = rb.header(k, v);
    }
    rb = rb.header(FORWARDED, app.config().node_id.as_str());
    match rb.send().await {
        Ok(r) => {
            let mut out = Response::builder().status(r.status());
            for (k, v) in r.headers() {
                if k != header::TRANSFER_ENCODING && k != header::CONNECTION && k != header::CONTENT_LENGTH {
                    out = out.header(k, v);
                }
            }
            out = out.header(
                HeaderName::from_static("covm-node"),
                HeaderValue::from_str(&node).unwrap_or(HeaderValue::from_static("-")),
            );
            let stream = r.bytes_stream().map_err(std::io::Error::other);
            let mut resp = out.body(Body::from_stream(stream)).unwrap_or_else(|_| resp_error());
            resp.extensions_mut().insert(Forwarded);
            resp
        }
        Err(e) => {
            tracing::warn!(%node, %url, error = %e, "could not forward a request to the VM's node");
            resp
        }
    }
}

fn resp_error() -> Response {
    ApiError(Error::internal("a forwarded answer could not be relayed")).into_response()
}
