//! The SQLite store: one database file in WAL mode, the embedded default.
//!
//! Writes go through a pool of exactly one connection and start with `BEGIN IMMEDIATE`, so that writers
//! queue in process instead of failing with `SQLITE_BUSY`, and the log's sequence numbers are handed out
//! in commit order. Reads use a separate pool of several connections and see committed data only.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use covm_types::api::{AuditVerify, ObjectKind};
use covm_types::{Error, ErrorCode, ROOT_ID};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::sql::*;
use crate::*;

pub struct SqliteStore {
    pub(crate) writer: SqlitePool,
    pub(crate) reader: SqlitePool,
    /// This process (one process owns a SQLite file).
    replica: std::sync::Mutex<Option<Uuid>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(file: &Path) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-4000");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            // A file does not go away like a server's connection: no ping before each use.
            .test_before_acquire(false)
            .after_release(|conn, _| Box::pin(async move { crate::sql::release_check(conn).await }))
            .connect_with(options.clone())
            .await
            .map_err(db_err("open the database"))?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await.map_err(|e| {
            tracing::error!(error = %e, "database migration failed");
            Error::internal("the database could not be migrated")
        })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await
            .map_err(db_err("open the database"))?;
        let store = SqliteStore { writer, reader, replica: Default::default() };
        store.root_ensure().await?;
        Ok(store)
    }

    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_err("begin a transaction"))
    }

    async fn replica_register_impl(&self, id: Uuid) -> Result<()> {
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        Ok(())
    }

    /// Only this process uses the file: a replica of an earlier run is gone.
    async fn replica_alive_impl(&self, id: Uuid) -> Result<bool> {
        Ok(*self.replica.lock().unwrap_or_else(|p| p.into_inner()) == Some(id))
    }

    /// Only this process uses the file.
    async fn replicas_live_impl(&self) -> Result<u32> {
        Ok(1)
    }

    async fn leader_try_impl(&self) -> Result<bool> {
        Ok(true)
    }

    async fn log_watch_impl(&self, _wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<()> {
        Ok(())
    }

    async fn signal_send_impl(&self, _channel: &str, _payload: &str) -> Result<()> {
        Ok(())
    }

    async fn signal_watch_impl(&self, _channel: &str, _on: std::sync::Arc<dyn Fn(String) + Send + Sync>) -> Result<()> {
        Ok(())
    }

    async fn close_impl(&self) {
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.writer.close().await;
        self.reader.close().await;
    }
}

sql_store!(SqliteStore, Sqlite, SqliteRow, SqlitePool, "sqlite");
