//! A small QMP client: JSON lines over a unix socket. It reads the greeting, negotiates capabilities,
//! matches replies to commands by `id`, and hands asynchronous events to a channel.
//!
//! One reader task owns the read half; commands write under a mutex and wait on a oneshot for their
//! reply. When the socket closes (QEMU exited), pending commands fail and the event channel ends.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::HvError;

/// An asynchronous QMP event (`SHUTDOWN`, `STOP`, `RESUME`, `DEVICE_DELETED`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, HvError>>>>>;

pub struct Qmp {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode. Events arrive on the returned receiver.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), HvError> {
        // QEMU binds the socket before it listens: a connect in between is refused, and tried again.
        let started = std::time::Instant::now();
        let stream = loop {
            let r = tokio::time::timeout(timeout, UnixStream::connect(path))
                .await
                .map_err(|_| HvError::Qmp(format!("connecting to {} timed out", path.display())))?;
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && started.elapsed() < timeout => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => break r.map_err(HvError::os(format!("connect to the QMP socket {}", path.display())))?,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| HvError::Qmp("no QMP greeting".into()))?
            .map_err(HvError::os("read the QMP greeting"))?
            .ok_or_else(|| HvError::Qmp("the QMP socket closed before the greeting".into()))?;
        if !greeting.contains("\"QMP\"") {
            return Err(HvError::Qmp(format!("not a QMP greeting: {greeting}")));
        }
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let reader_pending = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(%line, "unreadable QMP message");
                    continue;
                };
                if let Some(name) = msg.get("event").and_then(Value::as_str) {
                    let _ = events_tx.send(QmpEvent { name: name.to_owned(), data: msg["data"].clone() });
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else { continue };
                let reply = match msg.get("error") {
                    Some(e) => Err(HvError::Command {
                        class: e["class"].as_str().unwrap_or("GenericError").to_owned(),
                        desc: e["desc"].as_str().unwrap_or("").to_owned(),
                    }),
                    None => Ok(msg.get("return").cloned().unwrap_or(Value::Null)),
                };
                if let Some(tx) = reader_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            // EOF: QEMU is gone. Fail whatever still waits.
            for (_, tx) in reader_pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                let _ = tx.send(Err(HvError::Gone));
            }
        });
        let qmp = Qmp { writer: Mutex::new(write), pending, next_id: AtomicU64::new(1), timeout };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok((qmp, events_rx))
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, HvError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        if let Err(e) = write.await {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                HvError::Gone
            } else {
                HvError::os(format!("send {command} over QMP"))(e)
            });
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(HvError::Gone),
            Err(_) => {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Err(HvError::Qmp(format!("{command} timed out after {:?}", self.timeout)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QMP server: greeting, replies by id, one event, errors for `fail`.
    async fn fake(path: std::path::PathBuf) {
        let listener = UnixListener::bind(&path).unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&l).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "fail" => json!({ "error": { "class": "DeviceNotFound", "desc": "no such device" }, "id": id }),
                "query-status" => {
                    w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n").await.unwrap();
                    json!({ "return": { "status": "paused" }, "id": id })
                }
                _ => json!({ "return": {}, "id": id }),
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn commands_replies_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = tokio::spawn(fake(path.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (qmp, mut events) = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        let status = qmp.execute("query-status", json!({})).await.unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        match qmp.execute("fail", json!({})).await {
            Err(HvError::Command { class, .. }) => assert_eq!(class, "DeviceNotFound"),
            other => panic!("{other:?}"),
        }
        server.abort();
        let _ = server.await;
        // The server is gone: the event stream ends and commands fail.
        assert!(events.recv().await.is_none());
        assert!(qmp.execute("query-status", json!({})).await.is_err());
    }
}
