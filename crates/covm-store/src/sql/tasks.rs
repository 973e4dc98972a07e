//! The SQL of tasks (long operations) (the [`crate::TaskStore`] half of [`sql_store!`]).

macro_rules! sql_tasks {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
fn task_row(r: &$Row) -> Result<TaskRecord> {
    let error: Option<String> = r.get("error");
    Ok(TaskRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        object_id: uuid_opt(r.get("object_id"))?,
        object_name: r.get("object_name"),
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        state: stored("task state", r.get("state"), TaskState::parse)?,
        progress: r.get("progress"),
        message: r.get("message"),
        error: error.as_deref().map(json).transpose()?,
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

impl $Store {
    pub(crate) async fn task_put_impl(&self, t: TaskRecord, event: Option<NewEvent>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tasks (id, kind, object_id, object_name, actor, request_id, state, progress, message, error,
                created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, progress = excluded.progress,
                message = excluded.message, error = excluded.error, updated_at = excluded.updated_at",
        )
        .bind(t.id.to_string())
        .bind(&t.kind)
        .bind(t.object_id.map(|u| u.to_string()))
        .bind(&t.object_name)
        .bind(&t.actor)
        .bind(&t.request_id)
        .bind(t.state.as_str())
        .bind(t.progress)
        .bind(&t.message)
        .bind(t.error.as_ref().map(|e| e.to_string()))
        .bind(time_to_db(t.created_at))
        .bind(time_to_db(t.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("write a task"))?;
        if let Some(e) = event {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    pub(crate) async fn task_get_impl(&self, id: Uuid) -> Result<Option<TaskRecord>> {
        sqlx::query("SELECT * FROM tasks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a task"))?
            .as_ref()
            .map(task_row)
            .transpose()
    }

    pub(crate) async fn tasks_list_impl(&self, before: Option<Uuid>, limit: u32) -> Result<Vec<TaskRecord>> {
        let rows = sqlx::query("SELECT * FROM tasks WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2")
            .bind(before.map(|u| u.to_string()))
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list tasks"))?;
        rows.iter().map(task_row).collect()
    }
}

#[async_trait]
impl TaskStore for $Store {
    async fn task_put(&self, task: TaskRecord, event: Option<NewEvent>) -> Result<()> {
        self.task_put_impl(task, event).await
    }

    async fn task_get(&self, id: Uuid) -> Result<Option<TaskRecord>> {
        self.task_get_impl(id).await
    }

    async fn tasks_list(&self, before: Option<Uuid>, limit: u32) -> Result<Vec<TaskRecord>> {
        self.tasks_list_impl(before, limit).await
    }
}
    };
}
