//! The QEMU guest agent's protocol, over the VM's `qga.sock` (a virtio-serial channel named
//! `org.qemu.guest_agent.0`): JSON commands, one per line. Each call opens the socket, synchronizes
//! with `guest-sync-delimited` (the reply starts with a 0xFF byte, so that anything left in the
//! channel by an earlier, interrupted client is skipped), sends one command and reads its answer.
//! A guest that runs no agent never answers: the call ends at its timeout with
//! [`HvError::Unavailable`], and nothing else waits on it.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::HvError;

/// How long the agent has to answer the sync before covm says the guest has none.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

fn no_agent(why: &str) -> HvError {
    HvError::Unavailable(format!("the guest agent does not answer ({why}); is qemu-guest-agent running in the guest?"))
}

/// One agent command: its `return` value. `guest-shutdown` (which never answers) is done when it is
/// sent and the agent has had a moment to act; `timeout` bounds the command's own answer.
pub async fn call(socket: &Path, command: &str, args: Value, timeout: Duration) -> Result<Value, HvError> {
    // One client at a time per channel: QEMU serves one connection on the socket.
    let lock = channel_lock(socket);
    let _one = lock.lock().await;
    let stream = tokio::time::timeout(SYNC_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| no_agent("the channel did not accept a connection"))?
        .map_err(|e| HvError::Unavailable(format!("the guest agent's channel is not there: {e}")))?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let id: u32 = rand::random::<u32>() & 0x7fff_ffff;
    let sync = json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } });
    write.write_all(format!("{sync}\n").as_bytes()).await.map_err(|e| HvError::Io(e.to_string()))?;
    tokio::time::timeout(SYNC_TIMEOUT, async {
        loop {
            // Skip to the delimiter, then read the sync's answer; an old answer is skipped too.
            let mut b = [0u8; 1];
            loop {
                read.read_exact(&mut b).await?;
                if b[0] == 0xff {
                    break;
                }
            }
            let line = line_capped(&mut read).await?;
            if serde_json::from_str::<Value>(&line).ok().and_then(|v| v["return"].as_u64()) == Some(u64::from(id)) {
                return Ok::<(), std::io::Error>(());
            }
        }
    })
    .await
    .map_err(|_| no_agent("no answer to guest-sync-delimited"))?
    .map_err(|e| no_agent(&e.to_string()))?;

    let cmd =
        if args.is_null() { json!({ "execute": command }) } else { json!({ "execute": command, "arguments": args }) };
    write.write_all(format!("{cmd}\n").as_bytes()).await.map_err(|e| HvError::Io(e.to_string()))?;
    let answered = tokio::time::timeout(timeout, line_capped(&mut read)).await.map(|r| r.map(|l| (l.len(), l)));
    if command == "guest-shutdown" {
        // It answers only with an error; silence (or the channel closing) is the guest going down.
        if let Ok(Ok((n, line))) = &answered
            && *n > 0
            && let Ok(v) = serde_json::from_str::<Value>(line)
            && let Some(e) = v.get("error")
        {
            return Err(agent_error(e));
        }
        return Ok(Value::Null);
    }
    match answered {
        Err(_) => Err(HvError::Io(format!("the guest agent did not answer {command} within {}s", timeout.as_secs()))),
        Ok(Err(e)) => Err(HvError::Io(format!("the guest agent's channel broke: {e}"))),
        Ok(Ok((0, _))) => Err(HvError::Io("the guest agent's channel closed".into())),
        Ok(Ok((_, line))) => {
            let v: Value = serde_json::from_str(line.trim_start_matches('\u{ff}'))
                .map_err(|e| HvError::Io(format!("the guest agent answered something that is not JSON: {e}")))?;
            match v.get("error") {
                Some(e) => Err(agent_error(e)),
                None => Ok(v.get("return").cloned().unwrap_or(Value::Null)),
            }
        }
    }
}

/// The longest line covm reads from a guest: a guest is not trusted to end its lines.
const LINE_MAX: u64 = 1 << 20;

/// One line from the guest, at most [`LINE_MAX`] bytes (a longer one is an error).
async fn line_capped<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let n = (&mut *read).take(LINE_MAX).read_until(b'\n', &mut buf).await?;
    if n as u64 >= LINE_MAX && buf.last() != Some(&b'\n') {
        return Err(std::io::Error::other("the guest agent sent a line longer than 1 MiB"));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn agent_error(e: &Value) -> HvError {
    HvError::Command {
        class: e["class"].as_str().unwrap_or("GenericError").to_owned(),
        desc: e["desc"].as_str().unwrap_or("the guest agent refused").to_owned(),
    }
}

fn channel_lock(socket: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<std::path::PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    // Channels of VMs gone (no socket any more) are forgotten.
    locks.retain(|p, l| p.exists() || Arc::strong_count(l) > 1);
    locks.entry(socket.to_owned()).or_default().clone()
}

/// What the agent tells of the guest: OS, host name, interfaces with addresses (each part that fails
/// is left out).
pub async fn guest_info(socket: &Path) -> Result<Value, HvError> {
    let t = Duration::from_secs(5);
    call(socket, "guest-ping", Value::Null, t).await?;
    let os = call(socket, "guest-get-osinfo", Value::Null, t).await.ok();
    let host = call(socket, "guest-get-host-name", Value::Null, t).await.ok();
    let ifs = call(socket, "guest-network-get-interfaces", Value::Null, t).await.ok();
    Ok(json!({ "os": os, "host": host, "interfaces": ifs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on a socket: answers the sync after some noise, then one command.
    #[tokio::test]
    async fn a_call_syncs_past_old_data_and_reads_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["arguments"]["id"].clone();
            // An older client's answer first, then the delimiter and the sync's answer.
            w.write_all(b"{\"return\": {}}\n\xff{\"return\": 1}\n\xff").await.unwrap();
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("guest-get-host-name"));
            w.write_all(b"{\"return\": {\"host-name\": \"g1\"}}\n").await.unwrap();
        });
        let v = call(&sock, "guest-get-host-name", Value::Null, Duration::from_secs(2)).await.unwrap();
        assert_eq!(v["host-name"], "g1");
    }

    #[tokio::test]
    async fn a_silent_channel_is_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let keep = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        });
        let e = call(&sock, "guest-ping", Value::Null, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, HvError::Unavailable(_)), "{e:?}");
        keep.abort();
    }
}
