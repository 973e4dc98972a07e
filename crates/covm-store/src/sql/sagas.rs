//! The SQL of sagas and their operation locks (the [`crate::SagaStore`] half of [`sql_store!`]).

macro_rules! sql_sagas {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
fn saga_row(r: &$Row) -> Result<SagaRecord> {
    let done: String = r.get("done");
    Ok(SagaRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        state: stored("saga state", r.get("state"), SagaState::parse)?,
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        data: json(r.get("data"))?,
        done: serde_json::from_str(&done).map_err(|_| Error::internal("bad saga steps in the database"))?,
        current: r.get("current"),
        error: r.get("error"),
        owner: uuid(r.get("owner"))?,
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

fn lock_row(r: &$Row) -> Result<OpLock> {
    Ok(OpLock {
        object_id: uuid(r.get("object_id"))?,
        saga_id: uuid(r.get("saga_id"))?,
        kind: r.get("kind"),
        actor: r.get("actor"),
        taken_at: time(r.get("taken_at"))?,
    })
}

impl $Store {
    pub(crate) async fn saga_begin_impl(&self, s: SagaRecord, locks: &[Uuid]) -> Result<Option<OpLock>> {
        let mut tx = self.begin().await?;
        for id in locks {
            let held = sqlx::query("SELECT * FROM op_locks WHERE object_id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err("read an operation lock"))?;
            if let Some(r) = held {
                return lock_row(&r).map(Some);
            }
        }
        sqlx::query(
            "INSERT INTO sagas (id, kind, state, actor, request_id, data, done, current, error, created_at, updated_at,
                owner)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(s.id.to_string())
        .bind(&s.kind)
        .bind(s.state.as_str())
        .bind(&s.actor)
        .bind(&s.request_id)
        .bind(s.data.to_string())
        .bind(serde_json::to_string(&s.done).unwrap_or_default())
        .bind(&s.current)
        .bind(&s.error)
        .bind(time_to_db(s.created_at))
        .bind(time_to_db(s.updated_at))
        .bind(s.owner.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err("record a saga"))?;
        for id in locks {
            sqlx::query("INSERT INTO op_locks (object_id, saga_id, kind, actor, taken_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(id.to_string())
                .bind(s.id.to_string())
                .bind(&s.kind)
                .bind(&s.actor)
                .bind(time_to_db(s.created_at))
                .execute(&mut *tx)
                .await
                .map_err(db_err("take an operation lock"))?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(None)
    }

    pub(crate) async fn saga_update_impl(&self, s: &SagaRecord, end: bool) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE sagas SET state = $2, data = $3, done = $4, current = $5, error = $6, updated_at = $7 WHERE id = $1",
        )
        .bind(s.id.to_string())
        .bind(s.state.as_str())
        .bind(s.data.to_string())
        .bind(serde_json::to_string(&s.done).unwrap_or_default())
        .bind(&s.current)
        .bind(&s.error)
        .bind(time_to_db(s.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("record a saga's progress"))?;
        if end {
            sqlx::query("DELETE FROM op_locks WHERE saga_id = $1")
                .bind(s.id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db_err("release operation locks"))?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    pub(crate) async fn sagas_unfinished_impl(&self) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query("SELECT * FROM sagas WHERE state = 'running' ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list sagas"))?;
        rows.iter().map(saga_row).collect()
    }

    pub(crate) async fn saga_get_impl(&self, id: Uuid) -> Result<Option<SagaRecord>> {
        sqlx::query("SELECT * FROM sagas WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a saga"))?
            .as_ref()
            .map(saga_row)
            .transpose()
    }

    pub(crate) async fn op_lock_get_impl(&self, object: Uuid) -> Result<Option<OpLock>> {
        sqlx::query("SELECT * FROM op_locks WHERE object_id = $1")
            .bind(object.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read an operation lock"))?
            .as_ref()
            .map(lock_row)
            .transpose()
    }
}

#[async_trait]
impl SagaStore for $Store {
    async fn saga_begin(&self, saga: SagaRecord, locks: &[Uuid]) -> Result<Option<OpLock>> {
        self.saga_begin_impl(saga, locks).await
    }

    async fn saga_update(&self, saga: &SagaRecord) -> Result<()> {
        self.saga_update_impl(saga, false).await
    }

    async fn saga_end(&self, saga: &SagaRecord) -> Result<()> {
        self.saga_update_impl(saga, true).await
    }

    async fn saga_unlock(&self, id: Uuid) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM op_locks WHERE saga_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("release operation locks"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn sagas_unfinished(&self) -> Result<Vec<SagaRecord>> {
        self.sagas_unfinished_impl().await
    }

    async fn saga_get(&self, id: Uuid) -> Result<Option<SagaRecord>> {
        self.saga_get_impl(id).await
    }

    async fn op_lock_get(&self, object: Uuid) -> Result<Option<OpLock>> {
        self.op_lock_get_impl(object).await
    }
}
    };
}
