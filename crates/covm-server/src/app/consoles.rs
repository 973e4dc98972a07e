//! Consoles for browsers: single-use tickets (a WebSocket cannot send `Authorization`) and one shared
//! connection per VM to its serial console.
//!
//! QEMU's serial socket takes one client at a time, so every WebSocket on a VM's serial console shares
//! one [`SerialLink`]: what the guest writes goes to all of them, what any of them types goes to the
//! guest (as people sharing a terminal expect). The link ends with its last user or with the VM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use covm_types::vm::{ConsoleTicket, PowerState};
use covm_types::{Error, ErrorCode, Privilege};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::streams::StreamGuard;
use super::{App, Ctx, RequestInfo};

/// How long a console ticket works.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// How much of the serial log a new console shows first.
const SERIAL_BACKLOG: u64 = 16 * 1024;

struct Ticket {
    /// The session it was made with (the console runs as it, and ends when it does).
    token: String,
    vm: Uuid,
    expires: Instant,
}

#[derive(Default)]
pub struct Consoles {
    tickets: Mutex<HashMap<String, Ticket>>,
    serial: Mutex<HashMap<Uuid, Weak<SerialLink>>>,
}

/// The one connection of this replica to a VM's serial socket.
pub struct SerialLink {
    input: mpsc::Sender<Bytes>,
    output: broadcast::Receiver<Bytes>,
}

/// One user's view of a serial console: what the guest wrote lately, then what it writes.
pub struct SerialSession {
    pub backlog: Vec<u8>,
    pub output: broadcast::Receiver<Bytes>,
    pub input: mpsc::Sender<Bytes>,
    /// Keeps the link open while this session lives.
    _link: Arc<SerialLink>,
}

impl Consoles {
    fn ticket_new(&self, token: String, vm: Uuid) -> String {
        let ticket = hex::encode(rand::rng().random::<[u8; 24]>());
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        tickets.retain(|_, t| t.expires > now);
        tickets.insert(ticket.clone(), Ticket { token, vm, expires: now + TICKET_TTL });
        ticket
    }

    fn ticket_take(&self, ticket: &str) -> Option<Ticket> {
        let t = self.tickets.lock().unwrap_or_else(|e| e.into_inner()).remove(ticket)?;
        (t.expires > Instant::now()).then_some(t)
    }
}

/// Copies between the socket and the link's channels until the guest's side closes or nobody uses
/// the link any more.
async fn serial_pump(
    stream: tokio::net::UnixStream,
    mut input: mpsc::Receiver<Bytes>,
    output: broadcast::Sender<Bytes>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = output.send(Bytes::copy_from_slice(&buf[..n]));
                }
            },
            keys = input.recv() => match keys {
                Some(k) => {
                    if wr.write_all(&k).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
}

fn tail_bytes(path: &std::path::Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return vec![] };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut out = Vec::new();
    let _ = f.read_to_end(&mut out);
    out
}

impl App {
    /// A single-use ticket to a VM's consoles, for the caller's session (`token`).
    pub async fn console_ticket(&self, ctx: &Ctx, token: &str, vm: &str) -> Result<ConsoleTicket, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmInteractConsole).await?;
        let ticket = self.consoles().ticket_new(token.to_owned(), rec.object.id);
        let ttl = chrono::Duration::from_std(TICKET_TTL).unwrap_or_default();
        Ok(ConsoleTicket { ticket, expires_at: Utc::now() + ttl })
    }

    /// The caller of a ticket (it works once) and the VM it is for.
    pub async fn console_ticket_redeem(&self, req: &Arc<RequestInfo>, ticket: &str) -> Result<(Ctx, Uuid), Error> {
        let t = self.consoles().ticket_take(ticket).ok_or_else(|| {
            Error::unauthenticated("the console ticket is unknown, used or expired; ask for a new one")
        })?;
        Ok((self.authenticate(req, &t.token).await?, t.vm))
    }

    /// Joins the shared connection to a running VM's serial console (needs
    /// `VirtualMachine.Interact.ConsoleInteract`); `only` is the VM a ticket was made for.
    pub async fn vm_serial_attach(
        &self,
        ctx: &Ctx,
        vm: &str,
        only: Option<Uuid>,
    ) -> Result<(SerialSession, StreamGuard), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if only.is_some_and(|id| id != rec.object.id) {
            return Err(Error::unauthenticated("the console ticket is for another VM"));
        }
        self.require(ctx, &rec.object, Privilege::VmInteractConsole).await?;
        if !matches!(super::node::runtime_of(&rec).power_state, PowerState::Running | PowerState::Paused) {
            return Err(Error::conflict(ErrorCode::VmNotRunning, format!("{} is not running", rec.object.name)));
        }
        let agent = self.agent_for(&rec)?;
        let guard = self.stream_open(ctx, Some((rec.object.id, Privilege::VmInteractConsole)))?;
        let id = rec.object.id;
        let live = |w: Option<&Weak<SerialLink>>| w.and_then(Weak::upgrade).filter(|l| !l.input.is_closed());
        let existing = live(self.consoles().serial.lock().unwrap_or_else(|e| e.into_inner()).get(&id));
        let link = match existing {
            Some(l) => l,
            None => {
                let stream = tokio::net::UnixStream::connect(agent.serial_socket(id)).await.map_err(|_| {
                    Error::conflict(ErrorCode::ConsoleUnavailable, "the VM's serial console is not available")
                })?;
                let (in_tx, in_rx) = mpsc::channel(64);
                let (out_tx, out_rx) = broadcast::channel(256);
                let mut map = self.consoles().serial.lock().unwrap_or_else(|e| e.into_inner());
                // Another request may have connected meanwhile: the first link stays, this one closes.
                match live(map.get(&id)) {
                    Some(l) => l,
                    None => {
                        tokio::spawn(serial_pump(stream, in_rx, out_tx));
                        let l = Arc::new(SerialLink { input: in_tx, output: out_rx });
                        map.retain(|_, w| w.strong_count() > 0);
                        map.insert(id, Arc::downgrade(&l));
                        l
                    }
                }
            }
        };
        // Subscribed before the log is read: a byte may show twice, none is lost.
        let output = link.output.resubscribe();
        let backlog = tail_bytes(&agent.serial_log(id), SERIAL_BACKLOG);
        Ok((SerialSession { backlog, output, input: link.input.clone(), _link: link }, guard))
    }
}
