//! The SQL of the inventory tree: objects, their paths and closure rows, and who may see them (the [`crate::InventoryStore`] half of [`sql_store!`]).

macro_rules! sql_inventory {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
pub(crate) fn object_row(r: &$Row) -> Result<ObjectRecord> {
    let kind: String = r.get("kind");
    Ok(ObjectRecord {
        id: uuid(r.get("id"))?,
        kind: ObjectKind::parse(&kind).ok_or_else(|| Error::internal(format!("bad kind {kind}")))?,
        name: r.get("name"),
        parent_id: uuid_opt(r.get("parent_id"))?,
        path: r.get("path"),
        spec: json(r.get("spec"))?,
        created_at: time(r.get("created_at"))?,
    })
}

/// Inserts an object under its parent folder with its path and closure rows, inside the caller's write
/// transaction; a taken path, or a taken name of a kind other than folder, is a conflict.
pub(crate) async fn object_insert(tx: &mut Transaction<'static, $DB>, object: NewObject) -> Result<ObjectRecord> {
    let parent = sqlx::query("SELECT path, kind FROM objects WHERE id = $1")
        .bind(object.parent_id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read the parent folder"))?
        .ok_or_else(|| Error::not_found("folder", &object.parent_id.to_string()))?;
    if parent.get::<String, _>("kind") != "folder" {
        return Err(Error::invalid("parent", "the parent is not a folder"));
    }
    let parent_path: String = parent.get("path");
    let path = if parent_path == "/" { format!("/{}", object.name) } else { format!("{parent_path}/{}", object.name) };
    let taken =
        sqlx::query("SELECT kind FROM objects WHERE path = $1 OR (kind = $2 AND kind <> 'folder' AND name = $3)")
            .bind(&path)
            .bind(object.kind.as_str())
            .bind(&object.name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_err("check the name"))?;
    if let Some(r) = taken {
        let kind: String = r.get("kind");
        return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a {kind} named {} already exists", object.name))
            .with_field("name"));
    }
    let rec = ObjectRecord {
        id: object.id,
        kind: object.kind,
        name: object.name,
        parent_id: Some(object.parent_id),
        path,
        spec: object.spec,
        created_at: now(),
    };
    let id = rec.id.to_string();
    sqlx::query(
        "INSERT INTO objects (id, kind, name, parent_id, path, spec, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(rec.kind.as_str())
    .bind(&rec.name)
    .bind(object.parent_id.to_string())
    .bind(&rec.path)
    .bind(rec.spec.to_string())
    .bind(time_to_db(rec.created_at))
    .execute(&mut **tx)
    .await
    .map_err(db_err("create an object"))?;
    sqlx::query(
        "INSERT INTO closure (object_id, ancestor_id, depth)
         SELECT $1, ancestor_id, depth + 1 FROM closure WHERE object_id = $2
         UNION ALL SELECT $1, $1, 0",
    )
    .bind(&id)
    .bind(object.parent_id.to_string())
    .execute(&mut **tx)
    .await
    .map_err(db_err("create an object"))?;
    Ok(rec)
}

impl $Store {
    async fn root_ensure(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let root = ROOT_ID.to_string();
        sqlx::query(
            "INSERT INTO objects (id, kind, name, parent_id, path, spec, created_at)
             VALUES ($1, 'folder', '', NULL, '/', '{}', $2) ON CONFLICT DO NOTHING",
        )
        .bind(&root)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create the root folder"))?;
        sqlx::query("INSERT INTO closure (object_id, ancestor_id, depth) VALUES ($1, $1, 0) ON CONFLICT DO NOTHING")
            .bind(&root)
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the root folder"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

}

/// Renames or moves a VM's object (a VM has no children, so only its own path and closure change).
async fn object_place(
    tx: &mut Transaction<'static, $DB>,
    obj: &ObjectRecord,
    name: &str,
    parent: Uuid,
) -> Result<()> {
    if obj.name == name && obj.parent_id == Some(parent) {
        return Ok(());
    }
    let parent_path: String = sqlx::query("SELECT path FROM objects WHERE id = $1 AND kind = 'folder'")
        .bind(parent.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read a folder"))?
        .ok_or_else(|| Error::invalid("folder", "the folder no longer exists"))?
        .get("path");
    let path = if parent_path == "/" { format!("/{name}") } else { format!("{parent_path}/{name}") };
    let taken = sqlx::query("SELECT 1 FROM objects WHERE id <> $3 AND (path = $1 OR (kind = 'vm' AND name = $2))")
        .bind(&path)
        .bind(name)
        .bind(obj.id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("check the name"))?;
    if taken.is_some() {
        return Err(
            Error::conflict(ErrorCode::AlreadyExists, format!("the name {name} is taken (at {path})")).with_field("name")
        );
    }
    let id = obj.id.to_string();
    sqlx::query("UPDATE objects SET name = $2, parent_id = $3, path = $4 WHERE id = $1")
        .bind(&id)
        .bind(name)
        .bind(parent.to_string())
        .bind(&path)
        .execute(&mut **tx)
        .await
        .map_err(db_err("move a VM"))?;
    if obj.parent_id != Some(parent) {
        sqlx::query("DELETE FROM closure WHERE object_id = $1 AND depth > 0")
            .bind(&id)
            .execute(&mut **tx)
            .await
            .map_err(db_err("move a VM"))?;
        sqlx::query(
            "INSERT INTO closure (object_id, ancestor_id, depth)
             SELECT $1, ancestor_id, depth + 1 FROM closure WHERE object_id = $2",
        )
        .bind(&id)
        .bind(parent.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db_err("move a VM"))?;
    }
    Ok(())
}

/// An object's spec as the transaction sees it (None: no such object).
async fn spec_read(tx: &mut Transaction<'static, $DB>, id: Uuid) -> Result<Option<serde_json::Value>> {
    sqlx::query("SELECT spec FROM objects WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read an object"))?
        .map(|r| json(&r.get::<String, _>("spec")))
        .transpose()
}

async fn spec_write(tx: &mut Transaction<'static, $DB>, id: Uuid, spec: &serde_json::Value) -> Result<()> {
    sqlx::query("UPDATE objects SET spec = $2 WHERE id = $1")
        .bind(id.to_string())
        .bind(spec.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db_err("update an object"))?;
    Ok(())
}

#[async_trait]
impl InventoryStore for $Store {
    async fn object_get(&self, id: Uuid) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o WHERE o.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_by_path(&self, path: &str) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o WHERE o.path = $1",
        )
        .bind(path)
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_by_name(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
             WHERE o.kind = $1 AND o.name = $2 ORDER BY o.path LIMIT 1",
        )
        .bind(kind.as_str())
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_children(&self, parent: Uuid, viewer: Option<&Viewer>) -> Result<Vec<ObjectRecord>> {
        let rows = match viewer {
            None => {
                sqlx::query(
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.parent_id = $1 ORDER BY o.name",
                )
                .bind(parent.to_string())
                .fetch_all(&self.reader)
                .await
            }
            Some(viewer) => {
                sqlx::query(concat!(
                    visibility_cte!("$3"),
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.parent_id = $2 AND EXISTS (
                    SELECT 1 FROM closure c JOIN visible v ON v.id = c.object_id WHERE c.ancestor_id = o.id)
                 ORDER BY o.name"
                ))
                .bind(viewer.user.to_string())
                .bind(parent.to_string())
                .bind(viewer.excluded_param())
                .fetch_all(&self.reader)
                .await
            }
        }
        .map_err(db_err("list a folder"))?;
        rows.iter().map(object_row).collect()
    }

    async fn objects_list(
        &self,
        kind: ObjectKind,
        viewer: Option<&Viewer>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ObjectRecord>> {
        let after = after.unwrap_or("");
        let rows = match viewer {
            None => {
                sqlx::query(
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.kind = $1 AND o.path > $2 AND o.id <> $4 ORDER BY o.path LIMIT $3",
                )
                .bind(kind.as_str())
                .bind(after)
                .bind(limit as i64)
                .bind(ROOT_ID.to_string())
                .fetch_all(&self.reader)
                .await
            }
            Some(viewer) => {
                sqlx::query(concat!(
                    visibility_cte!("$6"),
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at
                 FROM objects o JOIN visible v ON v.id = o.id
                 WHERE o.kind = $2 AND o.path > $3 AND o.id <> $5 ORDER BY o.path LIMIT $4"
                ))
                .bind(viewer.user.to_string())
                .bind(kind.as_str())
                .bind(after)
                .bind(limit as i64)
                .bind(ROOT_ID.to_string())
                .bind(viewer.excluded_param())
                .fetch_all(&self.reader)
                .await
            }
        }
        .map_err(db_err("list objects"))?;
        rows.iter().map(object_row).collect()
    }

    async fn object_create(&self, object: NewObject, event: NewEvent) -> Result<(ObjectRecord, EventRecord)> {
        let mut tx = self.begin().await?;
        let rec = object_insert(&mut tx, object).await?;
        let ev = append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok((rec, ev))
    }

    async fn object_spec_set(&self, id: Uuid, spec: serde_json::Value) -> Result<()> {
        let mut tx = self.begin().await?;
        spec_write(&mut tx, id, &spec).await?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn object_specs_swap(
        &self,
        specs: Vec<(Uuid, serde_json::Value, serde_json::Value)>,
        event: NewEvent,
    ) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        for (id, expected, spec) in specs {
            if spec_read(&mut tx, id).await? != Some(expected) {
                return Err(Error::conflict(ErrorCode::Conflict, "an object changed meanwhile; try again"));
            }
            spec_write(&mut tx, id, &spec).await?;
        }
        finish(tx, event).await
    }

    async fn object_spec_update(
        &self,
        id: Uuid,
        expected: &serde_json::Value,
        spec: serde_json::Value,
        event: NewEvent,
    ) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let Some(current) = spec_read(&mut tx, id).await? else {
            return Err(Error::not_found("object", &id.to_string()));
        };
        if &current != expected {
            return Err(Error::conflict(ErrorCode::Conflict, "the object changed meanwhile; try again"));
        }
        spec_write(&mut tx, id, &spec).await?;
        finish(tx, event).await
    }

    async fn object_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        if id == ROOT_ID {
            return Err(Error::conflict(ErrorCode::RootFolder, "the root folder cannot be deleted"));
        }
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        let children: i64 = sqlx::query("SELECT COUNT(*) AS n FROM objects WHERE parent_id = $1")
            .bind(&id_s)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("count children"))?
            .get("n");
        if children > 0 {
            return Err(Error::conflict(
                ErrorCode::FolderNotEmpty,
                format!("the folder holds {children} objects; delete or move them first"),
            )
            .with_details(serde_json::json!({ "children": children })));
        }
        let n = sqlx::query("DELETE FROM objects WHERE id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete an object"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("object", &id_s));
        }
        finish(tx, event).await
    }

    async fn objects_visible(&self, viewer: &Viewer) -> Result<Vec<Uuid>> {
        let rows = sqlx::query(concat!(visibility_cte!("$2"), "SELECT id FROM visible"))
            .bind(viewer.user.to_string())
            .bind(viewer.excluded_param())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("compute visibility"))?;
        rows.iter().map(|r| uuid(r.get("id"))).collect()
    }
}
    };
}
