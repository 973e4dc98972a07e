//! Serving HTTP on a listening socket, with limits that keep covm answering under idle or slow
//! clients.
//!
//! - **A connection cap** below the process's file limit, with room kept for the work itself (the
//!   database, QEMU sockets, images, log files): at the cap, a new connection closes the one that has
//!   been idle longest, so idle clients cannot crowd out working ones.
//! - **Header and idle timeout** ([`HEADER_TIMEOUT`]): a request's headers must arrive within it, and
//!   a keep-alive connection that sends no next request within it is closed (hyper starts the same
//!   timer whenever it waits for a request head).
//! - **Body timeout**: a request body must arrive whole within `http::extract::BODY_TIMEOUT`
//!   (408 otherwise), so a body dripped a byte at a time cannot hold a connection.
//! - **The file limit**: at start covm raises its soft `RLIMIT_NOFILE` to the hard one where it can.
//!
//! Long-lived streams (the event feed, consoles) are connections too; each user may hold only a few
//! (`app::streams`), so they cannot take the cap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

/// How long a client may take to send a request's headers, and how long an idle keep-alive
/// connection stays open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept for covm's own work, beside connections.
const FILES_RESERVED: u64 = 128;
/// The cap when the file limit allows more.
pub const CONNECTIONS_DEFAULT: usize = 4096;

/// Raises the soft open-file limit to the hard one (where it can) and returns the connection cap
/// that leaves room for work: `wanted` (default [`CONNECTIONS_DEFAULT`]), at most the limit less
/// [`FILES_RESERVED`], at least 16.
pub fn connection_cap(wanted: Option<usize>) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    };
    let room = soft.saturating_sub(FILES_RESERVED).max(16);
    let cap = wanted.unwrap_or(CONNECTIONS_DEFAULT).min(usize::try_from(room).unwrap_or(usize::MAX)).max(16);
    if wanted.is_some_and(|w| w > cap) {
        tracing::warn!(wanted, cap, open_files = soft, "the connection cap is lowered to fit the open-file limit");
    }
    cap
}

/// What the accept loop knows of one connection: requests (or response bodies) in flight, when it
/// last did anything, and a switch that closes it.
struct Conn {
    active: AtomicUsize,
    last: Mutex<Instant>,
    close: Notify,
}

/// The open connections, to pick one to close when the cap is reached.
#[derive(Default)]
struct Conns(Mutex<HashMap<u64, Arc<Conn>>>);

impl Conns {
    /// Closes the connection that has been idle longest (none in flight); whether there was one.
    fn evict_idle(&self) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = map
            .values()
            .filter(|c| c.active.load(Ordering::Relaxed) == 0)
            .min_by_key(|c| *c.last.lock().unwrap_or_else(|p| p.into_inner()));
        match oldest {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Marks a connection busy while a request and its response body are in flight.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(c: &Arc<Conn>) -> Busy {
        c.active.fetch_add(1, Ordering::Relaxed);
        *c.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Busy(c.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` until `shutdown` fires; then lets requests in flight finish.
///
/// At the cap, a new connection makes room by closing the connection that has been idle longest
/// (connected, no request in flight), so idle clients cannot crowd out working ones; when every
/// connection is busy, the new one waits a moment and is closed if no room comes.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    cap: usize,
    tls: Option<Arc<crate::tls::Tls>>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(cap));
    let conns = Arc::new(Conns::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut next_id = 0u64;
    tracing::info!(max_connections = cap, header_timeout_s = HEADER_TIMEOUT.as_secs(), "accepting connections");
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of files or a connection reset before accept: wait a moment, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                conns.evict_idle();
                match tokio::time::timeout(Duration::from_millis(200), permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        tracing::warn!(%addr, max_connections = cap, "at the connection cap with every connection busy; closing a new one");
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn =
            Arc::new(Conn { active: AtomicUsize::new(0), last: Mutex::new(Instant::now()), close: Notify::new() });
        conns.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id, conn.clone());
        let state = conn.clone();
        let secure = tls.is_some();
        let svc = tower::ServiceExt::map_request(router.clone(), move |mut req: axum::extract::Request<_>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            if secure {
                req.extensions_mut().insert(Secure);
            }
            req
        });
        let svc = tower::ServiceExt::map_future(svc, move |fut| {
            let busy = Busy::new(&state);
            async move {
                let resp: axum::response::Response = fut.await?;
                // Busy until the response body ends (an event stream lasts).
                Ok::<_, std::convert::Infallible>(resp.map(|b| {
                    axum::body::Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                        let _ = &busy;
                        f
                    }))
                }))
            }
        });
        let stop = stop_rx.clone();
        let conns = conns.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            match acceptor {
                None => serve_conn(stream, svc, stop, &conn, addr).await,
                Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_conn(stream, svc, stop, &conn, addr).await,
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                },
            }
            conns.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    // Requests in flight finish (the caller bounds the wait).
    let _ = permits.acquire_many(u32::try_from(cap).unwrap_or(u32::MAX)).await;
    Ok(())
}

/// Marks a request that came over TLS (for `Strict-Transport-Security`).
#[derive(Debug, Clone, Copy)]
pub struct Secure;

/// Serves HTTP/1.1 on one connection (plain or TLS) until it ends, the accept loop closes it to
/// make room, or the server stops (then requests in flight finish).
async fn serve_conn<I, S>(io: I, svc: S, mut stop: watch::Receiver<bool>, conn: &Conn, addr: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let svc = TowerToHyperService::new(svc);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
    let http = builder.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(http);
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::select! {
        r = http.as_mut() => log_end(r, addr),
        () = conn.close.notified() => tracing::debug!(%addr, "closed an idle connection to make room"),
        () = stopping => {
            http.as_mut().graceful_shutdown();
            log_end(http.await, addr);
        }
    }
}

fn log_end(r: Result<(), hyper::Error>, addr: SocketAddr) {
    if let Err(e) = r
        && !e.is_incomplete_message()
    {
        tracing::debug!(%addr, error = %e, "connection ended");
    }
}
