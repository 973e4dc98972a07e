//! Users, groups, roles and permissions (grants of a role to a user or group on an object).
//!
//! Managing users and groups needs `Users.Manage` on the root; defining roles needs
//! `Permissions.Modify` on the root; granting or revoking needs `Permissions.Modify` on the object
//! granted on. Everyone may read the role definitions and the privilege list (they are not inventory),
//! and change their own password.

use covm_store::{PermissionFilter, PermissionRecord, PrincipalKind, RoleRecord, UserRecord};
use covm_types::ErrorCode;
use covm_types::api::{
    GroupCreate, GroupMemberAdd, GroupView, PasswordSet, PermissionCreate, PermissionQuery, PermissionView, RoleCreate,
    RoleView, UserCreate, UserView,
};
use covm_types::{Error, Privilege, ROOT_ID};
use serde_json::json;
use uuid::Uuid;

use super::auth::{password_check, password_hash, user_view};
use super::{App, Ctx, EventExt};

fn role_view(r: &RoleRecord) -> RoleView {
    let mut privileges: Vec<Privilege> = r.privileges.iter().filter_map(|p| p.parse().ok()).collect();
    privileges.sort();
    RoleView { id: r.id, name: r.name.clone(), builtin: r.builtin, privileges }
}

fn group_view(g: &covm_store::GroupRecord) -> GroupView {
    GroupView { id: g.id, name: g.name.clone(), members: g.members.clone(), created_at: g.created_at }
}

/// Role names: like object names, but capitals are allowed (`VMUser`).
fn role_name_check(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            covm_types::ErrorKind::InvalidRequest,
            ErrorCode::InvalidName,
            "a role name has 1 to 63 letters, digits, '.', '_' or '-', and starts with a letter or digit",
        )
        .with_field("name"))
    }
}

impl App {
    pub(crate) async fn user_find(&self, name: &str, field: &str) -> Result<UserRecord, Error> {
        let found = match Uuid::parse_str(name) {
            Ok(id) => self.store().user_get(id).await?,
            Err(_) => self.store().user_by_name(name).await?,
        };
        found.ok_or_else(|| Error::not_found("user", name).with_field(field))
    }

    async fn group_find(&self, name: &str, field: &str) -> Result<covm_store::GroupRecord, Error> {
        self.store().group_by_name(name).await?.ok_or_else(|| Error::not_found("group", name).with_field(field))
    }

    pub async fn user_create(&self, ctx: &Ctx, p: UserCreate) -> Result<UserView, Error> {
        self.require_global(ctx, Privilege::UsersManage).await?;
        password_check("password", &p.password)?;
        let user = UserRecord {
            id: Uuid::now_v7(),
            name: p.name.to_string(),
            password_hash: password_hash(p.password).await?,
            created_at: covm_store::now(),
            mfa_secret: None,
            mfa_on: false,
            sso_subject: None,
            disabled: false,
        };
        let ev = ctx.event("user.created", "user", Some(user.id), &user.name).scope(ROOT_ID);
        self.store().user_create(user.clone(), ev).await.map_err(|e| match e.code.as_str() {
            "already_exists" => {
                Error::conflict(ErrorCode::AlreadyExists, format!("a user named {} already exists", user.name))
                    .with_field("name")
            }
            _ => e,
        })?;
        self.committed();
        Ok(user_view(&user))
    }

    pub async fn users_list(&self, ctx: &Ctx) -> Result<Vec<UserView>, Error> {
        self.require_global(ctx, Privilege::SystemRead).await?;
        Ok(self.store().users_list().await?.iter().map(user_view).collect())
    }

    pub async fn user_get(&self, ctx: &Ctx, name: &str) -> Result<UserView, Error> {
        let user = self.user_find(name, "user").await?;
        if user.id != ctx.user_id {
            self.require_global(ctx, Privilege::SystemRead).await?;
        }
        Ok(user_view(&user))
    }

    /// Sets a password: one's own, or anyone's with `Users.Manage`. Ends the user's sessions.
    pub async fn user_password_set(&self, ctx: &Ctx, name: &str, p: PasswordSet) -> Result<(), Error> {
        let user = self.user_find(name, "user").await?;
        if user.id != ctx.user_id {
            self.require_global(ctx, Privilege::UsersManage).await?;
        }
        if user.sso_subject.is_some() {
            // A password would sign in around the identity provider (its groups, its disabling).
            return Err(Error::conflict(
                ErrorCode::Conflict,
                format!("{} signs in through single sign-on and has no password in covm", user.name),
            ));
        }
        password_check("password", &p.password)?;
        let ev = ctx.event("user.password_changed", "user", Some(user.id), &user.name).audit_only();
        // The session it was changed in stays when users change their own; every other one ends.
        let keep = (user.id == ctx.user_id).then_some(ctx.token_id);
        self.store().user_password_set(user.id, password_hash(p.password).await?, keep, ev).await?;
        self.caches().tokens_clear();
        Ok(())
    }

    pub async fn user_delete(&self, ctx: &Ctx, name: &str) -> Result<(), Error> {
        self.require_global(ctx, Privilege::UsersManage).await?;
        let user = self.user_find(name, "user").await?;
        if user.id == ctx.user_id {
            return Err(Error::conflict(ErrorCode::SelfDelete, "you cannot delete yourself"));
        }
        let ev = ctx.event("user.deleted", "user", Some(user.id), &user.name).scope(ROOT_ID);
        self.store().user_delete(user.id, ev).await?;
        self.caches().tokens_clear();
        self.caches().authz_changed();
        self.committed();
        Ok(())
    }

    pub async fn group_create(&self, ctx: &Ctx, p: GroupCreate) -> Result<GroupView, Error> {
        self.require_global(ctx, Privilege::UsersManage).await?;
        let id = Uuid::now_v7();
        let ev = ctx.event("group.created", "group", Some(id), p.name.as_str()).scope(ROOT_ID);
        self.store().group_create(id, p.name.as_str(), ev).await.map_err(|e| match e.code.as_str() {
            "already_exists" => {
                Error::conflict(ErrorCode::AlreadyExists, format!("a group named {} already exists", p.name))
                    .with_field("name")
            }
            _ => e,
        })?;
        self.committed();
        let g = self.group_find(p.name.as_str(), "name").await?;
        Ok(group_view(&g))
    }

    pub async fn groups_list(&self, ctx: &Ctx) -> Result<Vec<GroupView>, Error> {
        self.require_global(ctx, Privilege::SystemRead).await?;
        Ok(self.store().groups_list().await?.iter().map(group_view).collect())
    }

    pub async fn group_member_add(&self, ctx: &Ctx, group: &str, p: GroupMemberAdd) -> Result<GroupView, Error> {
        self.require_global(ctx, Privilege::UsersManage).await?;
        let g = self.group_find(group, "group").await?;
        let u = self.user_find(&p.user, "user").await?;
        let ev = ctx
            .event("group.member_added", "group", Some(g.id), &g.name)
            .scope(ROOT_ID)
            .data(json!({ "user": u.name }));
        self.store().group_member_add(g.id, u.id, ev).await?;
        self.caches().authz_changed();
        self.committed();
        Ok(group_view(&self.group_find(group, "group").await?))
    }

    pub async fn group_member_remove(&self, ctx: &Ctx, group: &str, user: &str) -> Result<(), Error> {
        self.require_global(ctx, Privilege::UsersManage).await?;
        let g = self.group_find(group, "group").await?;
        let u = self.user_find(user, "user").await?;
        if !g.members.contains(&u.name) {
            return Err(Error::not_found("member", user).with_field("user"));
        }
        let ev = ctx
            .event("group.member_removed", "group", Some(g.id), &g.name)
            .scope(ROOT_ID)
            .data(json!({ "user": u.name }));
        self.store().group_member_remove(g.id, u.id, ev).await?;
        self.caches().authz_changed();
        self.committed();
        Ok(())
    }

    pub async fn roles_list(&self) -> Result<Vec<RoleView>, Error> {
        Ok(self.store().roles_list().await?.iter().map(role_view).collect())
    }

    pub async fn role_get(&self, name: &str) -> Result<RoleView, Error> {
        let r =
            self.store().role_by_name(name).await?.ok_or_else(|| Error::not_found("role", name).with_field("role"))?;
        Ok(role_view(&r))
    }

    pub async fn role_create(&self, ctx: &Ctx, p: RoleCreate) -> Result<RoleView, Error> {
        self.require_global(ctx, Privilege::PermissionsModify).await?;
        role_name_check(&p.name)?;
        let mut privileges: Vec<String> = p.privileges.iter().map(|p| p.as_str().to_owned()).collect();
        privileges.sort();
        privileges.dedup();
        let role = RoleRecord { id: Uuid::now_v7(), name: p.name.clone(), builtin: false, privileges };
        let ev = ctx
            .event("role.created", "role", Some(role.id), &role.name)
            .scope(ROOT_ID)
            .data(json!({ "privileges": role.privileges }));
        self.store().role_create(role.clone(), ev).await.map_err(|e| match e.code.as_str() {
            "already_exists" => {
                Error::conflict(ErrorCode::AlreadyExists, format!("a role named {} already exists", p.name))
                    .with_field("name")
            }
            _ => e,
        })?;
        self.committed();
        Ok(role_view(&role))
    }

    fn permission_view(&self, p: &PermissionRecord, object: covm_types::api::ObjectRef) -> PermissionView {
        PermissionView {
            id: p.id,
            principal: match p.principal_kind {
                PrincipalKind::User => p.principal_name.clone(),
                PrincipalKind::Group => format!("group:{}", p.principal_name),
            },
            role: p.role_name.clone(),
            object,
            propagate: p.propagate,
            created_at: p.created_at,
            conditions: p.conditions.clone(),
        }
    }

    async fn principal_find(&self, principal: &str) -> Result<(PrincipalKind, Uuid, String), Error> {
        match principal.strip_prefix("group:") {
            Some(g) => {
                let g = self.group_find(g, "principal").await?;
                Ok((PrincipalKind::Group, g.id, g.name))
            }
            None => {
                let u = self.user_find(principal, "principal").await?;
                Ok((PrincipalKind::User, u.id, u.name))
            }
        }
    }

    pub async fn permission_create(&self, ctx: &Ctx, p: PermissionCreate) -> Result<PermissionView, Error> {
        let conditions = p.conditions.clone().filter(|c| !c.is_empty());
        if let Some(c) = &conditions {
            c.check("conditions")?;
        }
        let obj = self.object_resolve(ctx, &p.object, None, "object").await?;
        self.require(ctx, &obj, Privilege::PermissionsModify).await?;
        let (kind, principal_id, principal_name) = self.principal_find(&p.principal).await?;
        let role = self
            .store()
            .role_by_name(&p.role)
            .await?
            .ok_or_else(|| Error::not_found("role", &p.role).with_field("role"))?;
        let id = Uuid::now_v7();
        let ev = ctx.event("permission.granted", obj.kind.as_str(), Some(obj.id), &obj.name).data(json!({
            "permission": id, "principal": p.principal, "principal_kind": kind.as_str(),
            "principal_name": principal_name, "role": role.name, "object": obj.path, "propagate": p.propagate,
            "conditions": conditions,
        }));
        let grant = covm_store::NewGrant {
            id,
            principal: (kind, principal_id),
            role: role.id,
            object: obj.id,
            propagate: p.propagate,
            conditions,
        };
        let (rec, _) = self.store().permission_create(grant, ev).await?;
        self.caches().authz_changed();
        self.committed();
        Ok(self.permission_view(&rec, self.object_ref(&obj)))
    }

    pub async fn permissions_list(&self, ctx: &Ctx, q: PermissionQuery) -> Result<Vec<PermissionView>, Error> {
        let object_id = match &q.object {
            Some(o) => Some(self.object_resolve(ctx, o, None, "object").await?.id),
            None => None,
        };
        let principal_id = match &q.principal {
            Some(p) => Some(self.principal_find(p).await?.1),
            None => None,
        };
        let recs = self
            .store()
            .permissions_list(PermissionFilter { object_id, principal_id, viewer: Some(self.viewer(ctx).await?) })
            .await?;
        let mut out = Vec::with_capacity(recs.len());
        for r in &recs {
            if let Some(o) = self.store().object_get(r.object_id).await? {
                out.push(self.permission_view(r, self.object_ref(&o)));
            }
        }
        Ok(out)
    }

    pub async fn permission_delete(&self, ctx: &Ctx, id: Uuid) -> Result<(), Error> {
        let not_found = || Error::not_found("permission", &id.to_string());
        let rec = self.store().permission_get(id).await?.ok_or_else(not_found)?;
        let obj = self.store().object_get(rec.object_id).await?.ok_or_else(not_found)?;
        // A grant on an object the caller may not view is not there: the answer names the grant only.
        self.require(ctx, &obj, Privilege::PermissionsModify).await.map_err(|e| match e.kind {
            covm_types::ErrorKind::NotFound => not_found(),
            _ => e,
        })?;
        let ev = ctx.event("permission.revoked", obj.kind.as_str(), Some(obj.id), &obj.name).data(json!({
            "permission": id, "principal_kind": rec.principal_kind.as_str(), "principal_name": rec.principal_name,
            "role": rec.role_name, "object": obj.path, "propagate": rec.propagate,
        }));
        self.store().permission_delete(id, ev).await?;
        self.caches().authz_changed();
        self.committed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names() {
        assert!(role_name_check("VMUser").is_ok());
        assert!(role_name_check("ops.power-users").is_ok());
        assert!(role_name_check("").is_err());
        assert!(role_name_check("a b").is_err());
        assert!(role_name_check("-x").is_err());
    }
}
