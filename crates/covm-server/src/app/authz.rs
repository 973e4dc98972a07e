//! Authorization: resolving object references and checking privileges on them.
//!
//! The rule (DESIGN §7) is evaluated in SQL by the store (`privileges_effective`), for the caller's
//! `Viewer`: grants whose request conditions fail now are left out (`App::viewer`), and annotation
//! conditions are checked in SQL per object. This module decides what a failed check looks like. An object the caller may not view (no `System.View`) is reported as
//! not found, so that names do not leak; one it may view but not change is a 403 naming the missing
//! privilege and the object. Both are audited as `authz.denied`.

use covm_store::ObjectRecord;
use covm_types::api::{ObjectKind, ObjectRef};
use covm_types::{Error, Privilege, ROOT_ID};
use uuid::Uuid;

use super::{App, Ctx, EventExt};

/// 403: `privilege` on `obj` would come from a grant whose condition fails now.
fn condition_error(
    privilege: Privilege,
    obj: &ObjectRecord,
    (condition, grant): (covm_types::conditions::Condition, Uuid),
) -> Error {
    Error::new(
        covm_types::ErrorKind::Forbidden,
        covm_types::ErrorCode::Forbidden,
        format!(
            "privilege {} is required on {}; the grant that gives it applies only when its condition {} holds, \
             and it does not for this request",
            privilege.as_str(),
            obj.path,
            condition.as_str()
        ),
    )
    .with_details(serde_json::json!({
        "privilege": privilege.as_str(), "object": obj.path, "condition": condition.as_str(), "permission": grant,
    }))
}

impl App {
    pub fn object_ref(&self, o: &ObjectRecord) -> ObjectRef {
        ObjectRef {
            id: o.id,
            kind: o.kind,
            name: if o.id == ROOT_ID { "/".into() } else { o.name.clone() },
            path: o.path.clone(),
        }
    }

    /// Finds an object by reference, without any check: a path (`/team-a`), an id, `KIND:NAME`, or a
    /// bare name of the expected kind.
    pub async fn object_lookup(
        &self,
        reference: &str,
        kind: Option<ObjectKind>,
    ) -> Result<Option<ObjectRecord>, Error> {
        let store = self.store();
        let found = if reference.starts_with('/') {
            let path = if reference.len() > 1 { reference.trim_end_matches('/') } else { reference };
            store.object_by_path(path).await?
        } else if let Ok(id) = Uuid::parse_str(reference) {
            store.object_get(id).await?
        } else if let Some((k, name)) = reference.split_once(':')
            && let Some(k) = ObjectKind::parse(k)
        {
            store.object_by_name(k, name).await?
        } else if let Some(k) = kind {
            match k {
                // A bare folder name is a top-level folder.
                ObjectKind::Folder => store.object_by_path(&format!("/{reference}")).await?,
                _ => store.object_by_name(k, reference).await?,
            }
        } else {
            None
        };
        Ok(found.filter(|o| kind.is_none_or(|k| k == o.kind)))
    }

    /// Finds an object the caller may view; anything else is "not found" (audited when it exists).
    pub async fn object_resolve(
        &self,
        ctx: &Ctx,
        reference: &str,
        kind: Option<ObjectKind>,
        field: &str,
    ) -> Result<ObjectRecord, Error> {
        let kind_name = kind.map_or("object", |k| k.as_str());
        let Some(obj) = self.object_lookup(reference, kind).await? else {
            return Err(Error::not_found(kind_name, reference).with_field(field));
        };
        self.viewable(ctx, obj, kind_name, reference, field).await
    }

    /// `obj`, if the caller may view it; else 404 (as if it did not exist), with the denial audited.
    pub(crate) async fn viewable(
        &self,
        ctx: &Ctx,
        obj: ObjectRecord,
        kind_name: &str,
        reference: &str,
        field: &str,
    ) -> Result<ObjectRecord, Error> {
        // The root is always navigable: everyone may list it (and sees only what they may view). covm
        // finishing what a user began sees everything.
        if obj.id == ROOT_ID || ctx.system {
            return Ok(obj);
        }
        let privs = self.privileges_of(ctx, obj.id).await?;
        if !privs.iter().any(|p| p == Privilege::SystemView.as_str()) {
            // Hidden only because a grant's request conditions fail (address, hours, expiry): say which
            // (its holder knows the object). Not for annotations: that would tell which objects exist
            // among those the condition hides.
            if let Some(f) = self.condition_failure(ctx, &obj, Privilege::SystemView).await?
                && f.0 != covm_types::conditions::Condition::Annotations
            {
                self.denied(ctx, &obj, Privilege::SystemView, 403).await?;
                return Err(condition_error(Privilege::SystemView, &obj, f).with_field(field));
            }
            self.denied(ctx, &obj, Privilege::SystemView, 404).await?;
            return Err(Error::not_found(kind_name, reference).with_field(field));
        }
        Ok(obj)
    }

    /// Checks that the caller holds `privilege` on `obj`; audits and refuses otherwise.
    pub async fn require(&self, ctx: &Ctx, obj: &ObjectRecord, privilege: Privilege) -> Result<(), Error> {
        if ctx.system {
            return Ok(());
        }
        let privs = self.privileges_of(ctx, obj.id).await?;
        if privs.iter().any(|p| p == privilege.as_str()) {
            return Ok(());
        }
        let visible = obj.id == ROOT_ID || privs.iter().any(|p| p == Privilege::SystemView.as_str());
        // A grant that would give the privilege but whose conditions fail: the 403 names the condition
        // (its holder knows of the object anyway).
        let failed = self
            .condition_failure(ctx, obj, privilege)
            .await?
            .filter(|f| visible || f.0 != covm_types::conditions::Condition::Annotations);
        self.denied(ctx, obj, privilege, if visible || failed.is_some() { 403 } else { 404 }).await?;
        match failed {
            Some(f) => Err(condition_error(privilege, obj, f)),
            None if visible => Err(Error::forbidden(privilege.as_str(), &obj.path)),
            None => Err(Error::not_found(obj.kind.as_str(), &obj.name)),
        }
    }

    /// The first conditional grant of the caller that reaches `obj` and would give `privilege`, but
    /// whose conditions fail for this request and object: (the condition, the grant).
    async fn condition_failure(
        &self,
        ctx: &Ctx,
        obj: &ObjectRecord,
        privilege: Privilege,
    ) -> Result<Option<(covm_types::conditions::Condition, Uuid)>, Error> {
        let grants = self.store().grants_conditional(ctx.user_id).await?;
        if grants.is_empty() {
            return Ok(None);
        }
        let annotations: std::collections::BTreeMap<String, String> = match obj.kind {
            ObjectKind::Vm => self
                .store()
                .vm_get(obj.id)
                .await?
                .and_then(|v| serde_json::from_value(v.config["annotations"].clone()).ok())
                .unwrap_or_default(),
            _ => Default::default(),
        };
        let now = chrono::Utc::now();
        for g in grants {
            let Some(c) = &g.conditions else { continue };
            let Some(at) = self.store().object_get(g.object_id).await? else { continue };
            let reaches = at.id == obj.id
                || (g.propagate && (at.id == ROOT_ID || obj.path.starts_with(&format!("{}/", at.path))));
            if !reaches {
                continue;
            }
            let gives = self
                .store()
                .role_by_name(&g.role_name)
                .await?
                .is_some_and(|r| r.privileges.iter().any(|p| p == privilege.as_str()));
            if !gives {
                continue;
            }
            let failure = c.request_failure(ctx.req.addr, now).or_else(|| {
                (!c.annotations_match(&annotations)).then_some(covm_types::conditions::Condition::Annotations)
            });
            if let Some(f) = failure {
                return Ok(Some((f, g.id)));
            }
        }
        Ok(None)
    }

    /// Checks a privilege that is not about an inventory object (users, roles, audit): it is held on
    /// the root.
    pub async fn require_global(&self, ctx: &Ctx, privilege: Privilege) -> Result<(), Error> {
        let root =
            self.store().object_get(ROOT_ID).await?.ok_or_else(|| Error::internal("the root folder is missing"))?;
        self.require(ctx, &root, privilege).await
    }

    async fn denied(&self, ctx: &Ctx, obj: &ObjectRecord, privilege: Privilege, status: u16) -> Result<(), Error> {
        let ev = ctx
            .event("authz.denied", obj.kind.as_str(), Some(obj.id), &obj.name)
            .audit_only()
            .data(serde_json::json!({ "privilege": privilege.as_str(), "object": obj.path, "status": status }));
        self.store().event_append(ev).await?;
        ctx.req.mark_audited();
        Ok(())
    }
}
