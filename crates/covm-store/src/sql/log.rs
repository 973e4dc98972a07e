//! The SQL of the append-only, hash-chained log: appending, the feed and the audit queries (the [`crate::LogStore`] half of [`sql_store!`]).

macro_rules! sql_log {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
        fn event_row(r: &$Row) -> Result<EventRecord> {
            let patch: Option<String> = r.get("patch");
            Ok(EventRecord {
                seq: r.get("seq"),
                time: time(r.get("time"))?,
                actor: r.get("actor"),
                request_id: r.get("request_id"),
                kind: r.get("kind"),
                object_kind: r.get("object_kind"),
                object_id: uuid_opt(r.get("object_id"))?,
                object_name: r.get("object_name"),
                scope_id: uuid_opt(r.get("scope_id"))?,
                feed: r.get::<i64, _>("feed") != 0,
                version_before: r.get("version_before"),
                version_after: r.get("version_after"),
                patch: patch.as_deref().map(json).transpose()?,
                data: json(r.get("data"))?,
                hash: r.get("hash"),
            })
        }

        /// Appends one entry to the log inside the caller's write transaction.
        pub(crate) async fn append(tx: &mut Transaction<'static, $DB>, e: NewEvent) -> Result<EventRecord> {
            let prev = sqlx::query("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut **tx)
                .await
                .map_err(db_err("read the log"))?;
            let (prev_seq, prev_hash) = match prev {
                Some(r) => (r.get::<i64, _>("seq"), r.get::<String, _>("hash")),
                None => (0, String::new()),
            };
            let mut rec = EventRecord {
                seq: prev_seq + 1,
                time: now(),
                actor: e.actor,
                request_id: e.request_id,
                kind: e.kind,
                object_kind: e.object_kind,
                object_id: e.object_id,
                object_name: e.object_name,
                scope_id: e.scope_id,
                feed: e.feed,
                version_before: e.version_before,
                version_after: e.version_after,
                patch: e.patch,
                data: e.data,
                hash: String::new(),
            };
            rec.hash = event_hash(&prev_hash, &rec);
            sqlx::query(
                "INSERT INTO events (seq, time, actor, request_id, kind, object_kind, object_id, object_name,
            scope_id, feed, version_before, version_after, patch, data, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(rec.seq)
            .bind(time_to_db(rec.time))
            .bind(&rec.actor)
            .bind(&rec.request_id)
            .bind(&rec.kind)
            .bind(&rec.object_kind)
            .bind(rec.object_id.map(|u| u.to_string()))
            .bind(&rec.object_name)
            .bind(rec.scope_id.map(|u| u.to_string()))
            .bind(rec.feed as i64)
            .bind(rec.version_before)
            .bind(rec.version_after)
            .bind(rec.patch.as_ref().map(|p| p.to_string()))
            .bind(rec.data.to_string())
            .bind(&rec.hash)
            .execute(&mut **tx)
            .await
            .map_err(db_err("append to the log"))?;
            Ok(rec)
        }

        /// Appends the change's log entry and commits.
        pub(crate) async fn finish(mut tx: Transaction<'static, $DB>, event: NewEvent) -> Result<EventRecord> {
            let ev = append(&mut tx, event).await?;
            tx.commit().await.map_err(db_err("commit"))?;
            Ok(ev)
        }

        #[async_trait]
        impl LogStore for $Store {
            async fn event_append(&self, event: NewEvent) -> Result<EventRecord> {
                let tx = self.begin().await?;
                finish(tx, event).await
            }

            async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>> {
                let rows = sqlx::query("SELECT * FROM events WHERE seq > $1 AND feed = 1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(limit as i64)
                    .fetch_all(&self.reader)
                    .await
                    .map_err(db_err("read the log"))?;
                rows.iter().map(event_row).collect()
            }

            async fn events_after_visible(&self, after: i64, viewer: &Viewer, limit: u32) -> Result<Vec<EventRecord>> {
                let rows = sqlx::query(concat!(
                    visibility_cte!("$4"),
                    "SELECT * FROM events WHERE seq > $2 AND feed = 1 AND scope_id IN (SELECT id FROM visible)
             ORDER BY seq LIMIT $3"
                ))
                .bind(viewer.user.to_string())
                .bind(after)
                .bind(limit as i64)
                .bind(viewer.excluded_param())
                .fetch_all(&self.reader)
                .await
                .map_err(db_err("read the log"))?;
                rows.iter().map(event_row).collect()
            }

            async fn events_head(&self) -> Result<i64> {
                let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS s FROM events")
                    .fetch_one(&self.reader)
                    .await
                    .map_err(db_err("read the log"))?;
                Ok(r.get("s"))
            }

            async fn audit_query(&self, f: AuditFilter) -> Result<Vec<EventRecord>> {
                let (kind_exact, kind_prefix) = match f.kind {
                    Some(k) if k.ends_with('.') => (None, Some(format!("{}%", k.replace('%', "").replace('_', "\\_")))),
                    Some(k) => (Some(k), None),
                    None => (None, None),
                };
                let rows = sqlx::query(
                    "SELECT * FROM events
             WHERE seq > $1
               AND ($2 IS NULL OR actor = $2)
               AND ($3 IS NULL OR object_id = $3)
               AND ($4 IS NULL OR kind = $4)
               AND ($5 IS NULL OR kind LIKE $5 ESCAPE '\\')
               AND ($6 IS NULL OR time >= $6)
               AND ($7 IS NULL OR time <= $7)
             ORDER BY seq LIMIT $8",
                )
                .bind(f.after)
                .bind(f.actor)
                .bind(f.object_id.map(|u| u.to_string()))
                .bind(kind_exact)
                .bind(kind_prefix)
                .bind(f.since.map(time_to_db))
                .bind(f.until.map(time_to_db))
                .bind(f.limit as i64)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err("query the audit log"))?;
                rows.iter().map(event_row).collect()
            }

            async fn audit_verify(&self) -> Result<AuditVerify> {
                // Read in pages so that a long log does not sit in memory at once.
                let mut prev_hash = String::new();
                let mut expected_seq = 1;
                let mut entries = 0u64;
                loop {
                    let rows = sqlx::query("SELECT * FROM events WHERE seq >= $1 ORDER BY seq LIMIT 1000")
                        .bind(expected_seq)
                        .fetch_all(&self.reader)
                        .await
                        .map_err(db_err("read the log"))?;
                    if rows.is_empty() {
                        return Ok(AuditVerify { ok: true, entries, broken_seq: None });
                    }
                    for r in &rows {
                        let seq: i64 = r.get("seq");
                        let broken = AuditVerify { ok: false, entries, broken_seq: Some(expected_seq) };
                        if seq != expected_seq {
                            return Ok(broken);
                        }
                        let Ok(rec) = event_row(r) else {
                            return Ok(broken);
                        };
                        if event_hash(&prev_hash, &rec) != rec.hash {
                            return Ok(broken);
                        }
                        prev_hash = rec.hash;
                        expected_seq += 1;
                        entries += 1;
                    }
                }
            }
        }
    };
}
