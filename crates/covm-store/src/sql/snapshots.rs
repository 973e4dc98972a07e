//! The SQL of VM snapshots (the [`crate::SnapshotStore`] half of [`sql_store!`]).

macro_rules! sql_snapshots {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
        fn snapshot_row(r: &$Row) -> Result<SnapshotRecord> {
            Ok(SnapshotRecord {
                id: uuid(r.get("id"))?,
                owner_id: uuid(r.get("owner_id"))?,
                name: r.get("name"),
                doc: json(r.get("doc"))?,
                created_at: time(r.get("created_at"))?,
            })
        }

        #[async_trait]
        impl SnapshotStore for $Store {
            async fn snapshot_insert(&self, s: SnapshotRecord, event: NewEvent) -> Result<EventRecord> {
                let mut tx = self.begin().await?;
                sqlx::query("INSERT INTO snapshots (id, owner_id, name, doc, created_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(s.id.to_string())
                    .bind(s.owner_id.to_string())
                    .bind(&s.name)
                    .bind(s.doc.to_string())
                    .bind(time_to_db(s.created_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("snapshot"))?;
                finish(tx, event).await
            }

            async fn snapshots_of(&self, owner: Uuid) -> Result<Vec<SnapshotRecord>> {
                let rows = sqlx::query("SELECT * FROM snapshots WHERE owner_id = $1 ORDER BY created_at, id")
                    .bind(owner.to_string())
                    .fetch_all(&self.reader)
                    .await
                    .map_err(db_err("list snapshots"))?;
                rows.iter().map(snapshot_row).collect()
            }

            async fn snapshot_update(&self, id: Uuid, doc: serde_json::Value, event: NewEvent) -> Result<bool> {
                let mut tx = self.begin().await?;
                let n = sqlx::query("UPDATE snapshots SET doc = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(doc.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("update a snapshot"))?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                finish(tx, event).await?;
                Ok(true)
            }

            async fn snapshots_all(&self) -> Result<Vec<SnapshotRecord>> {
                let rows = sqlx::query("SELECT * FROM snapshots ORDER BY created_at, id")
                    .fetch_all(&self.reader)
                    .await
                    .map_err(db_err("list snapshots"))?;
                rows.iter().map(snapshot_row).collect()
            }

            async fn snapshot_get(&self, id: Uuid) -> Result<Option<SnapshotRecord>> {
                sqlx::query("SELECT * FROM snapshots WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err("read a snapshot"))?
                    .as_ref()
                    .map(snapshot_row)
                    .transpose()
            }

            async fn snapshot_remove(&self, id: Uuid, event: NewEvent) -> Result<bool> {
                let mut tx = self.begin().await?;
                let n = sqlx::query("DELETE FROM snapshots WHERE id = $1")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("delete a snapshot"))?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                finish(tx, event).await?;
                Ok(true)
            }
        }
    };
}
