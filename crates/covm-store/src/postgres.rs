//! The PostgreSQL store: several covm replicas on one database behave as one server.
//!
//! - The same SQL as SQLite (`sql/`) on the same schema shape, with migrations of its own
//!   (`migrations/postgres`; sqlx runs them under an advisory lock, so replicas may start together).
//! - Every write transaction first takes one transaction-level advisory lock (`LOG_LOCK`): writers queue
//!   in the database as they queue on SQLite's one writer connection, so the log's sequence numbers are
//!   handed out gap-free and in commit order, and the hash chain holds across replicas. Reads are not
//!   held up (they see the last commit).
//! - A trigger NOTIFYs `covm_log` on every append; each replica LISTENs and wakes its feed tailer, which
//!   also polls, so a lost notification delays an event and never drops it.
//! - Each replica holds, on a connection of its own, a session-level advisory lock named by its id for
//!   as long as it lives; another replica knows it is gone when it can take that lock. The replica that
//!   runs background work (the leader) holds one more lock on the same connection. PostgreSQL lets go of
//!   both when the connection, or the replica, dies, and the next replica to ask takes over.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use covm_types::api::{AuditVerify, ObjectKind};
use covm_types::{Error, ErrorCode, ROOT_ID};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::sql::*;
use crate::*;

/// The log's write lock (transaction-level): "covm" and 1.
const LOG_LOCK: i64 = 0x636f_766d_0000_0001;
/// The background-work lock (session-level): "covm" and 2.
const LEADER_LOCK: i64 = 0x636f_766d_0000_0002;

/// A replica's lock key: the random low half of its (v7) id.
fn replica_key(id: Uuid) -> i64 {
    let b = id.as_bytes();
    i64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

/// How long a request waits for a database connection before it is told the store is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct PgStore {
    pub(crate) writer: PgPool,
    pub(crate) reader: PgPool,
    options: PgConnectOptions,
    session: tokio::sync::Mutex<Session>,
    /// Tells the log listener to stop.
    closed: Arc<tokio::sync::Notify>,
}

/// The connection that holds this replica's session locks.
#[derive(Default)]
struct Session {
    conn: Option<PgConnection>,
    replica: Option<Uuid>,
    leader: bool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), runs the migrations, makes the root folder.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let options: PgConnectOptions = url.parse().map_err(|e| {
            Error::invalid("db", format!("{url} is not a PostgreSQL URL (postgres://user@host:port/database): {e}"))
        })?;
        let options = options.log_statements(tracing::log::LevelFilter::Trace);
        let writer = PgPoolOptions::new()
            .max_connections(16)
            // A database that does not answer is reported (503 store_unavailable) within seconds.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(|conn, _| Box::pin(async move { crate::sql::release_check(conn).await }))
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot connect to PostgreSQL");
                Error::new(
                    covm_types::ErrorKind::Unavailable,
                    ErrorCode::DatabaseUnavailable,
                    format!("cannot connect to PostgreSQL: {e}"),
                )
            })?;
        sqlx::migrate!("./migrations/postgres").run(&writer).await.map_err(|e| {
            tracing::error!(error = %e, "database migration failed");
            Error::internal("the database could not be migrated")
        })?;
        let store = PgStore {
            reader: writer.clone(),
            writer,
            options,
            session: Default::default(),
            closed: Default::default(),
        };
        store.root_ensure().await?;
        Ok(store)
    }

    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.writer.begin().await.map_err(db_err("begin a transaction"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LOG_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db_err("take the log's write lock"))?;
        Ok(tx)
    }

    /// The session connection, (re)connected with this replica's lock taken; a new connection means
    /// leadership was lost with the old one.
    async fn session(&self) -> Result<tokio::sync::MutexGuard<'_, Session>> {
        let mut s = self.session.lock().await;
        let alive = match s.conn.as_mut() {
            Some(c) => c.ping().await.is_ok(),
            None => false,
        };
        if !alive {
            s.conn = None;
            s.leader = false;
            let mut conn = tokio::time::timeout(ACQUIRE_TIMEOUT, self.options.connect())
                .await
                .map_err(|_| Error::store_unavailable("the database cannot be reached right now"))?
                .map_err(db_err("connect the session connection"))?;
            if let Some(id) = s.replica {
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(replica_key(id))
                    .execute(&mut conn)
                    .await
                    .map_err(db_err("take the replica's lock"))?;
            }
            s.conn = Some(conn);
        }
        Ok(s)
    }

    async fn replica_register_impl(&self, id: Uuid) -> Result<()> {
        let mut s = self.session.lock().await;
        s.replica = Some(id);
        s.conn = None;
        drop(s);
        self.session().await.map(|_| ())
    }

    /// The replicas' session locks held on this database: advisory locks on 64-bit keys
    /// (`objsubid = 1`) that are not covm's fixed locks (whose high half is `covm`).
    async fn replicas_live_impl(&self) -> Result<u32> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 1
               AND classid <> $1::bigint::oid
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(LOG_LOCK >> 32)
        .fetch_one(&self.reader)
        .await
        .map_err(db_err("count the replicas"))?
        .get("n");
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }

    async fn replica_alive_impl(&self, id: Uuid) -> Result<bool> {
        let mut s = self.session().await?;
        if s.replica == Some(id) {
            return Ok(true);
        }
        let conn = s.conn.as_mut().ok_or_else(|| Error::internal("no session connection"))?;
        let key = replica_key(id);
        let free: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS free")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err("probe a replica's lock"))?
            .get("free");
        if free {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut *conn)
                .await
                .map_err(db_err("release a probe"))?;
        }
        Ok(!free)
    }

    async fn leader_try_impl(&self) -> Result<bool> {
        let mut s = self.session().await?;
        if !s.leader {
            let conn = s.conn.as_mut().ok_or_else(|| Error::internal("no session connection"))?;
            s.leader = sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
                .bind(LEADER_LOCK)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_err("try the leader's lock"))?
                .get("got");
        }
        Ok(s.leader)
    }

    async fn log_watch_impl(&self, wake: Arc<dyn Fn() + Send + Sync>) -> Result<()> {
        // A lost connection wakes the tailer too: its poll covers the gap.
        self.listen("covm_log", Arc::new(move |_| wake())).await
    }
}

impl PgStore {
    async fn signal_send_impl(&self, channel: &str, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.writer)
            .await
            .map_err(db_err("send a signal"))?;
        Ok(())
    }

    async fn signal_watch_impl(&self, channel: &str, on: Arc<dyn Fn(String) + Send + Sync>) -> Result<()> {
        // Notes sent while the connection was lost are lost: their senders send them again.
        self.listen(channel, Arc::new(move |payload| payload.into_iter().for_each(|p| on(p)))).await
    }

    /// LISTENs on `channel` until the store closes: `on` gets each notification's payload, and None
    /// after the connection was lost (the listener reconnects at its next receive).
    async fn listen(&self, channel: &str, on: Arc<dyn Fn(Option<String>) + Send + Sync>) -> Result<()> {
        let mut listener = PgListener::connect_with(&self.reader).await.map_err(db_err("listen for notifications"))?;
        listener.listen(channel).await.map_err(db_err("listen for notifications"))?;
        let closed = self.closed.clone();
        let channel = channel.to_owned();
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    r = listener.recv() => r,
                    _ = closed.notified() => return,
                };
                match r {
                    Ok(n) => on(Some(n.payload().to_owned())),
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "a notification listener lost its connection");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        on(None);
                    }
                }
            }
        });
        Ok(())
    }

    async fn close_impl(&self) {
        self.closed.notify_waiters();
        let mut s = self.session.lock().await;
        s.replica = None;
        s.leader = false;
        if let Some(c) = s.conn.take() {
            let _ = c.close().await;
        }
    }
}

sql_store!(PgStore, Postgres, PgRow, PgPool, "postgres");
