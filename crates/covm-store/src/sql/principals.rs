//! The SQL of users, groups, roles, grants, API tokens and sign-in failures (the [`crate::PrincipalStore`] half of [`sql_store!`]).

macro_rules! sql_principals {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
fn user_row(r: &$Row) -> Result<UserRecord> {
    Ok(UserRecord {
        id: uuid(r.get("id"))?,
        name: r.get("name"),
        password_hash: r.get("password_hash"),
        created_at: time(r.get("created_at"))?,
        mfa_secret: r.get("mfa_secret"),
        mfa_on: r.get::<i64, _>("mfa_on") != 0,
        sso_subject: r.get("sso_subject"),
        disabled: r.get::<Option<String>, _>("disabled_at").is_some(),
    })
}

fn token_row(r: &$Row) -> Result<TokenRecord> {
    let kind: String = r.get("kind");
    Ok(TokenRecord {
        id: uuid(r.get("id"))?,
        user_id: uuid(r.get("user_id"))?,
        kind: if kind == "api" { TokenKind::Api } else { TokenKind::Session },
        name: r.get("name"),
        hash: r.get("hash"),
        created_at: time(r.get("created_at"))?,
        expires_at: time(r.get("expires_at"))?,
        enroll_only: r.get::<i64, _>("enroll_only") != 0,
    })
}

async fn insert_user(tx: &mut Transaction<'static, $DB>, user: &UserRecord) -> Result<()> {
    sqlx::query("INSERT INTO users (id, name, password_hash, created_at, sso_subject) VALUES ($1, $2, $3, $4, $5)")
        .bind(user.id.to_string())
        .bind(&user.name)
        .bind(&user.password_hash)
        .bind(time_to_db(user.created_at))
        .bind(&user.sso_subject)
        .execute(&mut **tx)
        .await
        .map_err(db_err("create the user"))?;
    Ok(())
}

impl $Store {
    async fn group_members(&self, group: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT u.name FROM group_members m JOIN users u ON u.id = m.user_id
             WHERE m.group_id = $1 ORDER BY u.name",
        )
        .bind(group)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read group members"))?;
        Ok(rows.iter().map(|r| r.get("name")).collect())
    }

    async fn role_privileges(&self, role: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT privilege FROM role_privileges WHERE role_id = $1 ORDER BY privilege")
            .bind(role)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("read role privileges"))?;
        Ok(rows.iter().map(|r| r.get("privilege")).collect())
    }

    async fn role_record(&self, r: &$Row) -> Result<RoleRecord> {
        let id: String = r.get("id");
        Ok(RoleRecord {
            id: uuid(&id)?,
            name: r.get("name"),
            builtin: r.get::<i64, _>("builtin") != 0,
            privileges: self.role_privileges(&id).await?,
        })
    }
}

fn permission_row(r: &$Row) -> Result<PermissionRecord> {
    let kind: String = r.get("principal_kind");
    Ok(PermissionRecord {
        id: uuid(r.get("id"))?,
        principal_kind: if kind == "group" { PrincipalKind::Group } else { PrincipalKind::User },
        principal_id: uuid(r.get("principal_id"))?,
        principal_name: r.get::<Option<String>, _>("principal_name").unwrap_or_default(),
        role_id: uuid(r.get("role_id"))?,
        role_name: r.get("role_name"),
        object_id: uuid(r.get("object_id"))?,
        propagate: r.get::<i64, _>("propagate") != 0,
        created_at: time(r.get("created_at"))?,
        conditions: match r.get::<Option<String>, _>("conditions") {
            Some(c) => Some(serde_json::from_str(&c).map_err(|_| Error::internal("a grant's conditions are unreadable"))?),
            None => None,
        },
    })
}

#[async_trait]
impl PrincipalStore for $Store {
    async fn user_create(&self, user: UserRecord, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        insert_user(&mut tx, &user).await?;
        finish(tx, event).await
    }

    async fn user_bootstrap(&self, user: UserRecord, role: Uuid, event: NewEvent) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("count users"))?
            .get("n");
        if n > 0 {
            return Ok(false);
        }
        insert_user(&mut tx, &user).await?;
        sqlx::query(
            "INSERT INTO permissions (id, principal_kind, principal_id, role_id, object_id, propagate, created_at)
             VALUES ($1, 'user', $2, $3, $4, 1, $5)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(user.id.to_string())
        .bind(role.to_string())
        .bind(ROOT_ID.to_string())
        .bind(time_to_db(user.created_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("grant the first user"))?;
        append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(true)
    }

    async fn user_get(&self, id: Uuid) -> Result<Option<UserRecord>> {
        sqlx::query("SELECT id, name, password_hash, created_at, mfa_secret, mfa_on, sso_subject, disabled_at FROM users WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a user"))?
            .as_ref()
            .map(user_row)
            .transpose()
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>> {
        sqlx::query("SELECT id, name, password_hash, created_at, mfa_secret, mfa_on, sso_subject, disabled_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a user"))?
            .as_ref()
            .map(user_row)
            .transpose()
    }

    async fn users_list(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT id, name, password_hash, created_at, mfa_secret, mfa_on, sso_subject, disabled_at FROM users ORDER BY name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list users"))?;
        rows.iter().map(user_row).collect()
    }

    async fn user_password_set(
        &self,
        id: Uuid,
        password_hash: String,
        keep: Option<Uuid>,
        event: NewEvent,
    ) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(password_hash)
            .execute(&mut *tx)
            .await
            .map_err(db_err("set a password"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("user", &id.to_string()));
        }
        // A new password ends every other session of the user; API tokens stay.
        sqlx::query("DELETE FROM tokens WHERE user_id = $1 AND kind = 'session' AND id <> $2")
            .bind(id.to_string())
            .bind(keep.map(|k| k.to_string()).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(db_err("end sessions"))?;
        finish(tx, event).await
    }

    async fn user_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query("DELETE FROM permissions WHERE principal_kind = 'user' AND principal_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete the user's grants"))?;
        let n = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete the user"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("user", &id_s));
        }
        finish(tx, event).await
    }

    async fn user_groups(&self, user: Uuid) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT g.name FROM group_members m JOIN groups g ON g.id = m.group_id
             WHERE m.user_id = $1 ORDER BY g.name",
        )
        .bind(user.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read a user's groups"))?;
        Ok(rows.iter().map(|r| r.get("name")).collect())
    }

    async fn group_create(&self, id: Uuid, name: &str, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO groups (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(time_to_db(now()))
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the group"))?;
        finish(tx, event).await
    }

    async fn group_by_name(&self, name: &str) -> Result<Option<GroupRecord>> {
        let Some(r) = sqlx::query("SELECT id, name, created_at FROM groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a group"))?
        else {
            return Ok(None);
        };
        let id: String = r.get("id");
        Ok(Some(GroupRecord {
            id: uuid(&id)?,
            name: r.get("name"),
            members: self.group_members(&id).await?,
            created_at: time(r.get("created_at"))?,
        }))
    }

    async fn groups_list(&self) -> Result<Vec<GroupRecord>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM groups ORDER BY name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list groups"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.get("id");
            out.push(GroupRecord {
                id: uuid(&id)?,
                name: r.get("name"),
                members: self.group_members(&id).await?,
                created_at: time(r.get("created_at"))?,
            });
        }
        Ok(out)
    }

    async fn group_member_add(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(group.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("add a group member"))?;
        finish(tx, event).await
    }

    async fn group_member_remove(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND user_id = $2")
            .bind(group.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("remove a group member"))?;
        finish(tx, event).await
    }

    async fn role_upsert_builtin(&self, id: Uuid, name: &str, privileges: &[&str]) -> Result<()> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query(
            "INSERT INTO roles (id, name, builtin, created_at) VALUES ($1, $2, 1, $3)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(&id_s)
        .bind(name)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create a built-in role"))?;
        sqlx::query("DELETE FROM role_privileges WHERE role_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("refresh a built-in role"))?;
        for p in privileges {
            sqlx::query("INSERT INTO role_privileges (role_id, privilege) VALUES ($1, $2)")
                .bind(&id_s)
                .bind(*p)
                .execute(&mut *tx)
                .await
                .map_err(db_err("refresh a built-in role"))?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn role_create(&self, role: RoleRecord, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = role.id.to_string();
        sqlx::query("INSERT INTO roles (id, name, builtin, created_at) VALUES ($1, $2, 0, $3)")
            .bind(&id_s)
            .bind(&role.name)
            .bind(time_to_db(now()))
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the role"))?;
        for p in &role.privileges {
            sqlx::query("INSERT INTO role_privileges (role_id, privilege) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(&id_s)
                .bind(p)
                .execute(&mut *tx)
                .await
                .map_err(db_err("create the role"))?;
        }
        finish(tx, event).await
    }

    async fn role_by_name(&self, name: &str) -> Result<Option<RoleRecord>> {
        let r = sqlx::query("SELECT id, name, builtin FROM roles WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a role"))?;
        match r {
            Some(r) => Ok(Some(self.role_record(&r).await?)),
            None => Ok(None),
        }
    }

    async fn roles_list(&self) -> Result<Vec<RoleRecord>> {
        let rows = sqlx::query("SELECT id, name, builtin FROM roles ORDER BY builtin DESC, name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list roles"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.role_record(r).await?);
        }
        Ok(out)
    }

    async fn permission_create(&self, grant: NewGrant, event: NewEvent) -> Result<(PermissionRecord, EventRecord)> {
        let NewGrant { id, principal, role, object, propagate, conditions } = grant;
        let conditions = conditions.as_ref();
        let mut tx = self.begin().await?;
        // One grant per principal and object: a new grant replaces the old one (as in vSphere), with
        // its conditions.
        sqlx::query(
            "DELETE FROM permission_annotations WHERE permission_id IN (
                SELECT id FROM permissions WHERE principal_kind = $1 AND principal_id = $2 AND object_id = $3)",
        )
        .bind(principal.0.as_str())
        .bind(principal.1.to_string())
        .bind(object.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err("replace a grant's conditions"))?;
        let conditions_json = match conditions {
            Some(c) if !c.is_empty() => {
                Some(serde_json::to_string(c).map_err(|_| Error::internal("conditions could not be written"))?)
            }
            _ => None,
        };
        sqlx::query(
            "INSERT INTO permissions (id, principal_kind, principal_id, role_id, object_id, propagate, created_at,
                                      conditions)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (principal_kind, principal_id, object_id)
             DO UPDATE SET id = excluded.id, role_id = excluded.role_id, propagate = excluded.propagate,
                           created_at = excluded.created_at, conditions = excluded.conditions",
        )
        .bind(id.to_string())
        .bind(principal.0.as_str())
        .bind(principal.1.to_string())
        .bind(role.to_string())
        .bind(object.to_string())
        .bind(propagate as i64)
        .bind(time_to_db(now()))
        .bind(conditions_json)
        .execute(&mut *tx)
        .await
        .map_err(db_err("grant a permission"))?;
        for (k, v) in conditions.map(|c| &c.annotations).into_iter().flatten() {
            sqlx::query("INSERT INTO permission_annotations (permission_id, key, value) VALUES ($1, $2, $3)")
                .bind(id.to_string())
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await
                .map_err(db_err("keep a grant's condition"))?;
        }
        let ev = append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        let rec =
            self.permission_get(id).await?.ok_or_else(|| Error::internal("a new grant could not be read back"))?;
        Ok((rec, ev))
    }

    async fn permission_get(&self, id: Uuid) -> Result<Option<PermissionRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("{PERMISSION_SELECT} WHERE p.id = $1"));
        sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await
            .map_err(db_err("read a grant"))?
            .as_ref()
            .map(permission_row)
            .transpose()
    }

    async fn permission_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM permissions WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("revoke a permission"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("permission", &id.to_string()));
        }
        finish(tx, event).await
    }

    async fn permissions_list(&self, filter: PermissionFilter) -> Result<Vec<PermissionRecord>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{cte} {PERMISSION_SELECT}
             WHERE ($2 IS NULL OR p.object_id = $2) AND ($3 IS NULL OR p.principal_id = $3)
               AND ($1 IS NULL OR p.object_id IN (SELECT id FROM visible))
             ORDER BY p.created_at, p.id",
            cte = visibility_cte!("$4")
        ));
        let rows = sqlx::query(sql)
            .bind(filter.viewer.as_ref().map(|v| v.user.to_string()))
            .bind(filter.object_id.map(|u| u.to_string()))
            .bind(filter.principal_id.map(|u| u.to_string()))
            .bind(filter.viewer.as_ref().map(Viewer::excluded_param).unwrap_or_default())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list grants"))?;
        rows.iter().map(permission_row).collect()
    }

    async fn condition_annotation_keys(&self) -> Result<std::collections::BTreeSet<String>> {
        let rows = sqlx::query("SELECT DISTINCT key FROM permission_annotations")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("read the conditions' annotations"))?;
        Ok(rows.iter().map(|r| r.get("key")).collect())
    }

    async fn grants_conditional(&self, user: Uuid) -> Result<Vec<PermissionRecord>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{PERMISSION_SELECT}
             WHERE p.conditions IS NOT NULL
               AND ((p.principal_kind = 'user' AND p.principal_id = $1)
                 OR (p.principal_kind = 'group'
                     AND p.principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1)))
             ORDER BY p.id"
        ));
        let rows = sqlx::query(sql)
            .bind(user.to_string())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("read conditional grants"))?;
        rows.iter().map(permission_row).collect()
    }

    async fn privileges_effective(&self, viewer: &Viewer, object: Uuid) -> Result<Vec<String>> {
        let rows = sqlx::query(concat!(object_privileges_cte!("$3"), "SELECT privilege FROM eff ORDER BY privilege"))
            .bind(viewer.user.to_string())
            .bind(object.to_string())
            .bind(viewer.excluded_param())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("compute privileges"))?;
        Ok(rows.iter().map(|r| r.get("privilege")).collect())
    }

    async fn user_mfa_begin(&self, id: Uuid, secret: &str, recovery: &[String], event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        let n = sqlx::query("UPDATE users SET mfa_secret = $2, mfa_on = 0, mfa_step = 0 WHERE id = $1 AND mfa_on = 0")
            .bind(&id_s)
            .bind(secret)
            .execute(&mut *tx)
            .await
            .map_err(db_err("begin two-factor enrollment"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::new(
                covm_types::ErrorKind::Conflict,
                ErrorCode::MfaState,
                "two-factor sign-in is already on for this user; turn it off first",
            ));
        }
        sqlx::query("DELETE FROM mfa_recovery WHERE user_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("forget recovery codes"))?;
        for h in recovery {
            sqlx::query("INSERT INTO mfa_recovery (user_id, hash) VALUES ($1, $2)")
                .bind(&id_s)
                .bind(h)
                .execute(&mut *tx)
                .await
                .map_err(db_err("keep a recovery code"))?;
        }
        finish(tx, event).await
    }

    async fn user_mfa_enable(&self, id: Uuid, step: i64, session: Option<Uuid>, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        let n = sqlx::query(
            "UPDATE users SET mfa_on = 1, mfa_step = $2 WHERE id = $1 AND mfa_on = 0 AND mfa_secret IS NOT NULL",
        )
        .bind(&id_s)
        .bind(step)
        .execute(&mut *tx)
        .await
        .map_err(db_err("turn two-factor sign-in on"))?
        .rows_affected();
        if n == 0 {
            return Err(Error::new(
                covm_types::ErrorKind::Conflict,
                ErrorCode::MfaState,
                "no two-factor enrollment to confirm: enroll first (POST /users/{user}/mfa)",
            ));
        }
        let session = session.map(|s| s.to_string()).unwrap_or_default();
        sqlx::query("UPDATE tokens SET enroll_only = 0 WHERE user_id = $1 AND id = $2")
            .bind(&id_s)
            .bind(&session)
            .execute(&mut *tx)
            .await
            .map_err(db_err("lift an enroll-only session"))?;
        sqlx::query("DELETE FROM tokens WHERE user_id = $1 AND enroll_only = 1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("end enroll-only sessions"))?;
        finish(tx, event).await
    }

    async fn user_mfa_clear(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query("UPDATE users SET mfa_secret = NULL, mfa_on = 0, mfa_step = 0 WHERE id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("turn two-factor sign-in off"))?;
        sqlx::query("DELETE FROM mfa_recovery WHERE user_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("forget recovery codes"))?;
        finish(tx, event).await
    }

    async fn user_disabled_set(&self, id: Uuid, disabled: bool, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query("UPDATE users SET disabled_at = $2 WHERE id = $1")
            .bind(&id_s)
            .bind(disabled.then(|| time_to_db(now())))
            .execute(&mut *tx)
            .await
            .map_err(db_err("disable a user"))?;
        if disabled {
            sqlx::query("DELETE FROM tokens WHERE user_id = $1")
                .bind(&id_s)
                .execute(&mut *tx)
                .await
                .map_err(db_err("end a user's sessions and tokens"))?;
        }
        finish(tx, event).await
    }

    async fn user_mfa_step_use(&self, id: Uuid, step: i64) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE users SET mfa_step = $2 WHERE id = $1 AND mfa_step < $2")
            .bind(id.to_string())
            .bind(step)
            .execute(&mut *tx)
            .await
            .map_err(db_err("use a one-time code"))?
            .rows_affected();
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(n == 1)
    }

    async fn user_recovery_use(&self, id: Uuid, hash: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE mfa_recovery SET used_at = $3 WHERE user_id = $1 AND hash = $2 AND used_at IS NULL",
        )
        .bind(id.to_string())
        .bind(hash)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("use a recovery code"))?
        .rows_affected();
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(n == 1)
    }

    async fn token_create(&self, token: TokenRecord, event: Option<NewEvent>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tokens (id, user_id, kind, name, hash, created_at, expires_at, enroll_only)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(token.id.to_string())
        .bind(token.user_id.to_string())
        .bind(token.kind.as_str())
        .bind(&token.name)
        .bind(&token.hash)
        .bind(time_to_db(token.created_at))
        .bind(time_to_db(token.expires_at))
        .bind(i64::from(token.enroll_only))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create the token"))?;
        if let Some(e) = event {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        sqlx::query("SELECT id, user_id, kind, name, hash, created_at, expires_at, enroll_only FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a token"))?
            .as_ref()
            .map(token_row)
            .transpose()
    }

    async fn tokens_list(&self, user: Uuid, kind: TokenKind) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, user_id, kind, name, hash, created_at, expires_at, enroll_only FROM tokens
             WHERE user_id = $1 AND kind = $2 ORDER BY created_at",
        )
        .bind(user.to_string())
        .bind(kind.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("list tokens"))?;
        rows.iter().map(token_row).collect()
    }

    async fn token_delete(&self, user: Uuid, id: Uuid, event: Option<NewEvent>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM tokens WHERE id = $1 AND user_id = $2")
            .bind(id.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete a token"))?
            .rows_affected();
        if n > 0
            && let Some(e) = event
        {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(n > 0)
    }

    async fn signin_reserve(&self, account: &str, at: DateTime<Utc>, policy: SigninPolicy) -> Result<Option<u64>> {
        // In the write transaction: every replica's writers queue, so check and count are one step.
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT failures, first_at, last_at FROM signin_failures WHERE account = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err("read failed sign-ins"))?;
        let now = match row {
            Some(r) => Some(SigninFailures {
                failures: r.get("failures"),
                first_at: time(r.get("first_at"))?,
                last_at: time(r.get("last_at"))?,
            }),
            None => None,
        };
        if let Some(f) = &now {
            let wait = policy.wait(f, at);
            if wait > 0 {
                return Ok(Some(wait));
            }
        }
        let (failures, first_at) = match now {
            Some(f) if at - f.first_at <= policy.window => (f.failures + 1, f.first_at),
            _ => (1, at),
        };
        sqlx::query(
            "INSERT INTO signin_failures (account, failures, first_at, last_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (account) DO UPDATE SET failures = excluded.failures, first_at = excluded.first_at,
             last_at = excluded.last_at",
        )
        .bind(account)
        .bind(failures)
        .bind(time_to_db(first_at))
        .bind(time_to_db(at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("count a sign-in attempt"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(None)
    }

    async fn signin_forgive(&self, account: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE signin_failures SET failures = failures - 1 WHERE account = $1 AND failures > 0")
            .bind(account)
            .execute(&mut *tx)
            .await
            .map_err(db_err("count a sign-in"))?;
        tx.commit().await.map_err(db_err("commit"))
    }
}
    };
}
