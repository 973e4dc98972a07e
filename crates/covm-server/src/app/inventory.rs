//! The inventory tree: folders, datastores, networks, pools and hosts, and listing what is in a folder.
//!
//! Every object sits in a folder; permissions granted on a folder reach what is below it. Folder names
//! are unique within their parent; other objects' names are unique per kind, so `datastore:local` or a
//! bare name names one object. Lists are filtered by the store in SQL to what the caller may view.

use covm_types::ErrorCode;
use std::path::Path;

use covm_store::{NewObject, ObjectRecord};
use covm_types::api::{
    DatastoreCreate, DatastoreView, FolderCreate, FolderView, HostView, ListQuery, NetworkView, ObjectKind, ObjectRef,
    Page, PoolCreate, PoolView, Quota,
};
use covm_types::{Error, Name, Privilege, ROOT_ID};
use serde_json::json;
use uuid::Uuid;

use super::host::{fs_capacity, host_facts};
use super::{App, Ctx, EventExt, system_event};

const LIST_LIMIT_DEFAULT: u32 = 100;
const LIST_LIMIT_MAX: u32 = 1000;

pub(crate) fn parent_path(o: &ObjectRecord) -> String {
    match o.path.rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((p, _)) => p.into(),
    }
}

fn folder_view(o: &ObjectRecord) -> FolderView {
    FolderView { id: o.id, name: o.name.clone(), path: o.path.clone(), parent: o.parent_id, created_at: o.created_at }
}

fn datastore_view(o: &ObjectRecord) -> DatastoreView {
    let path = o.spec["path"].as_str().unwrap_or_default().to_owned();
    let (capacity_bytes, free_bytes) = fs_capacity(Path::new(&path)).unwrap_or((0, 0));
    DatastoreView {
        id: o.id,
        name: o.name.clone(),
        path,
        folder: parent_path(o),
        capacity_bytes,
        free_bytes,
        created_at: o.created_at,
    }
}

fn pool_view(o: &ObjectRecord) -> PoolView {
    PoolView {
        id: o.id,
        name: o.name.clone(),
        quota: serde_json::from_value(o.spec["quota"].clone()).unwrap_or_default(),
        folder: parent_path(o),
        created_at: o.created_at,
    }
}

fn host_view(o: &ObjectRecord) -> HostView {
    let s = &o.spec;
    HostView {
        id: o.id,
        name: o.name.clone(),
        cpus: s["cpus"].as_u64().unwrap_or(0) as u32,
        memory_mib: s["memory_mib"].as_u64().unwrap_or(0),
        kvm: s["kvm"].as_bool().unwrap_or(false),
        kvm_kind: s["kvm_kind"].as_str().unwrap_or("none").to_owned(),
        folder: parent_path(o),
        seen_at: s["seen_at"].as_str().and_then(|t| t.parse().ok()).unwrap_or(o.created_at),
    }
}

/// A host name made into a valid object name (`Build-7.example` → `build-7.example`).
fn host_name(hostname: &str) -> String {
    let s: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    let s = s.trim_start_matches(['.', '_', '-']).chars().take(Name::MAX_LEN).collect::<String>();
    if Name::parse(&s).is_ok() { s } else { "localhost".into() }
}

impl App {
    /// A page of objects of one kind that the caller may view.
    pub(crate) async fn objects_page(
        &self,
        ctx: &Ctx,
        kind: ObjectKind,
        q: &ListQuery,
    ) -> Result<(Vec<ObjectRecord>, Option<String>), Error> {
        let limit = q.limit.unwrap_or(LIST_LIMIT_DEFAULT);
        if !(1..=LIST_LIMIT_MAX).contains(&limit) {
            return Err(Error::invalid("limit", format!("limit is between 1 and {LIST_LIMIT_MAX}")));
        }
        let items = self.store().objects_list(kind, Some(&self.viewer(ctx).await?), q.after.as_deref(), limit).await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|o| o.path.clone())).flatten();
        Ok((items, next))
    }

    /// The folder an object is created in: `folder` (default `/`), which the caller must hold `privilege` on.
    pub(crate) async fn placement(
        &self,
        ctx: &Ctx,
        folder: Option<&str>,
        field: &str,
        privilege: Privilege,
    ) -> Result<ObjectRecord, Error> {
        let folder = self.object_resolve(ctx, folder.unwrap_or("/"), Some(ObjectKind::Folder), field).await?;
        self.require(ctx, &folder, privilege).await?;
        Ok(folder)
    }

    pub(crate) async fn object_new(
        &self,
        ctx: &Ctx,
        kind: ObjectKind,
        name: &Name,
        parent: &ObjectRecord,
        spec: serde_json::Value,
    ) -> Result<ObjectRecord, Error> {
        let id = Uuid::now_v7();
        let ev = ctx
            .event(&format!("{}.created", kind.as_str()), kind.as_str(), Some(id), name.as_str())
            .data(json!({ "parent": parent.path, "spec": spec }));
        let (rec, _) = self
            .store()
            .object_create(NewObject { id, kind, name: name.to_string(), parent_id: parent.id, spec }, ev)
            .await?;
        self.committed();
        Ok(rec)
    }

    /// What is in a folder (`covm ls`): the children the caller may view or that lead to something it
    /// may view.
    pub async fn inventory_list(&self, ctx: &Ctx, path: Option<&str>) -> Result<Vec<ObjectRef>, Error> {
        let folder = self.object_resolve(ctx, path.unwrap_or("/"), None, "path").await?;
        let children = self.store().object_children(folder.id, Some(&self.viewer(ctx).await?)).await?;
        Ok(children.iter().map(|o| self.object_ref(o)).collect())
    }

    pub async fn folder_create(&self, ctx: &Ctx, p: FolderCreate) -> Result<FolderView, Error> {
        let parent = self.placement(ctx, p.parent.as_deref(), "parent", Privilege::FolderCreate).await?;
        let rec = self.object_new(ctx, ObjectKind::Folder, &p.name, &parent, json!({})).await?;
        Ok(folder_view(&rec))
    }

    pub async fn folders_list(&self, ctx: &Ctx, q: ListQuery) -> Result<Page<FolderView>, Error> {
        let (items, next) = self.objects_page(ctx, ObjectKind::Folder, &q).await?;
        Ok(Page { items: items.iter().map(folder_view).collect(), next })
    }

    pub async fn folder_get(&self, ctx: &Ctx, folder: &str) -> Result<FolderView, Error> {
        Ok(folder_view(&self.object_resolve(ctx, folder, Some(ObjectKind::Folder), "folder").await?))
    }

    /// Deletes an empty folder (and the grants on it).
    pub async fn folder_delete(&self, ctx: &Ctx, folder: &str) -> Result<(), Error> {
        let f = self.object_resolve(ctx, folder, Some(ObjectKind::Folder), "folder").await?;
        if f.id == ROOT_ID {
            return Err(Error::conflict(ErrorCode::RootFolder, "the root folder cannot be deleted"));
        }
        self.require(ctx, &f, Privilege::FolderDelete).await?;
        let ev = ctx
            .event("folder.deleted", "folder", Some(f.id), &f.name)
            .scope(f.parent_id.unwrap_or(ROOT_ID))
            .data(json!({ "path": f.path }));
        self.store().object_delete(f.id, ev).await?;
        self.committed();
        Ok(())
    }

    pub async fn datastore_create(&self, ctx: &Ctx, p: DatastoreCreate) -> Result<DatastoreView, Error> {
        let folder = self.placement(ctx, p.folder.as_deref(), "folder", Privilege::DatastoreConfig).await?;
        let path = Path::new(&p.path);
        if !path.is_absolute() {
            return Err(Error::invalid("path", "a datastore path is absolute"));
        }
        let canonical = path
            .canonicalize()
            .ok()
            .filter(|c| c.is_dir())
            .ok_or_else(|| Error::invalid("path", format!("{} is not an existing directory", p.path)))?;
        let rec = self.object_new(ctx, ObjectKind::Datastore, &p.name, &folder, json!({ "path": canonical })).await?;
        Ok(datastore_view(&rec))
    }

    pub async fn datastores_list(&self, ctx: &Ctx, q: ListQuery) -> Result<Page<DatastoreView>, Error> {
        let (items, next) = self.objects_page(ctx, ObjectKind::Datastore, &q).await?;
        Ok(Page { items: items.iter().map(datastore_view).collect(), next })
    }

    pub async fn datastore_get(&self, ctx: &Ctx, ds: &str) -> Result<DatastoreView, Error> {
        Ok(datastore_view(&self.object_resolve(ctx, ds, Some(ObjectKind::Datastore), "datastore").await?))
    }

    pub async fn networks_list(&self, ctx: &Ctx, q: ListQuery) -> Result<Page<NetworkView>, Error> {
        let (items, next) = self.objects_page(ctx, ObjectKind::Network, &q).await?;
        Ok(Page { items: items.iter().map(super::networks::network_view).collect(), next })
    }

    pub async fn pool_create(&self, ctx: &Ctx, p: PoolCreate) -> Result<PoolView, Error> {
        let folder = self.placement(ctx, p.folder.as_deref(), "folder", Privilege::ResourceCreatePool).await?;
        if p.quota.vcpus == Some(0) {
            return Err(Error::invalid("quota.vcpus", "a vCPU quota is at least 1 (leave it out for no limit)"));
        }
        if p.quota.memory_mib == Some(0) {
            return Err(Error::invalid(
                "quota.memory_mib",
                "a memory quota is at least 1 MiB (leave it out for no limit)",
            ));
        }
        let rec = self.object_new(ctx, ObjectKind::Pool, &p.name, &folder, json!({ "quota": p.quota })).await?;
        Ok(pool_view(&rec))
    }

    pub async fn pools_list(&self, ctx: &Ctx, q: ListQuery) -> Result<Page<PoolView>, Error> {
        let (items, next) = self.objects_page(ctx, ObjectKind::Pool, &q).await?;
        Ok(Page { items: items.iter().map(pool_view).collect(), next })
    }

    pub async fn hosts_list(&self, ctx: &Ctx, q: ListQuery) -> Result<Page<HostView>, Error> {
        let (items, next) = self.objects_page(ctx, ObjectKind::Host, &q).await?;
        Ok(Page { items: items.iter().map(host_view).collect(), next })
    }

    /// At every start: registers the local host (refreshing its facts) and, once, the default datastore
    /// `local` (inside the data dir), the network `user` and the pool `default`; with `demo`, also a
    /// small demo inventory.
    pub async fn inventory_bootstrap(&self, data_dir: &Path, demo: bool) -> Result<(), Error> {
        let store = self.store();
        let root = store.object_get(ROOT_ID).await?.ok_or_else(|| Error::internal("the root folder is missing"))?;
        let facts = host_facts();
        let spec = json!({
            "cpus": facts.cpus, "memory_mib": facts.memory_mib, "kvm": facts.kvm,
            "kvm_kind": facts.kvm_kind, "seen_at": covm_store::now(),
        });
        let host_id = store.meta_get("local_host_id").await?.and_then(|s| Uuid::parse_str(&s).ok());
        match host_id {
            Some(id) if store.object_get(id).await?.is_some() => store.object_spec_set(id, spec).await?,
            _ => {
                let id = Uuid::now_v7();
                let name = host_name(&facts.hostname);
                let ev = system_event("host.created", "host", Some(id), &name).data(json!({ "spec": spec }));
                store
                    .object_create(NewObject { id, kind: ObjectKind::Host, name, parent_id: ROOT_ID, spec }, ev)
                    .await?;
                store.meta_set("local_host_id", &id.to_string()).await?;
            }
        }
        tracing::info!(cpus = facts.cpus, memory_mib = facts.memory_mib, kvm = %facts.kvm_kind, "local host registered");

        if store.meta_get("defaults_created").await?.is_none() {
            let ds_dir = data_dir.join("datastores").join("local");
            std::fs::create_dir_all(&ds_dir).map_err(|e| {
                tracing::error!(error = %e, dir = %ds_dir.display(), "could not create the default datastore");
                Error::internal("could not create the default datastore directory")
            })?;
            let ds_dir = ds_dir.canonicalize().unwrap_or(ds_dir);
            let defaults = [
                (ObjectKind::Datastore, "local", json!({ "path": ds_dir })),
                (ObjectKind::Network, "user", json!({ "kind": "user", "bridge": null })),
                (ObjectKind::Pool, "default", json!({ "quota": Quota::default() })),
            ];
            for (kind, name, spec) in defaults {
                if store.object_by_name(kind, name).await?.is_none() {
                    let id = Uuid::now_v7();
                    let ev = system_event(&format!("{}.created", kind.as_str()), kind.as_str(), Some(id), name)
                        .data(json!({ "parent": "/", "spec": spec }));
                    store
                        .object_create(NewObject { id, kind, name: name.into(), parent_id: root.id, spec }, ev)
                        .await?;
                }
            }
            store.meta_set("defaults_created", "1").await?;
        }

        if demo && store.meta_get("demo_created").await?.is_none() {
            let demo_objects = [
                (ObjectKind::Folder, "team-a", json!({})),
                (ObjectKind::Folder, "team-b", json!({})),
                (
                    ObjectKind::Pool,
                    "small",
                    json!({ "quota": Quota { vcpus: Some(8), memory_mib: Some(8192), disk_bytes: Some(64 << 30) } }),
                ),
            ];
            for (kind, name, spec) in demo_objects {
                if self.object_lookup(&format!("/{name}"), None).await?.is_none() {
                    let id = Uuid::now_v7();
                    let ev = system_event(&format!("{}.created", kind.as_str()), kind.as_str(), Some(id), name)
                        .data(json!({ "parent": "/", "spec": spec, "demo": true }));
                    store
                        .object_create(NewObject { id, kind, name: name.into(), parent_id: root.id, spec }, ev)
                        .await?;
                }
            }
            // A VM to edit together (config only; give it a kernel to boot it).
            if let Some(folder) = self.object_lookup("/team-a", Some(ObjectKind::Folder)).await?
                && self.object_lookup("web-1", Some(ObjectKind::Vm)).await?.is_none()
            {
                let config = json!({
                    "name": "web-1", "folder": "/team-a", "pool": "small", "memory_mib": 128,
                    "nics": [{ "network": "user", "mac": "52:54:00:00:0d:01" }],
                    "annotations": { "owner": "team-a" }
                });
                let cfg: covm_types::vm::VmConfig =
                    serde_json::from_value(config).map_err(|e| Error::internal(e.to_string()))?;
                let doc = serde_json::to_value(&cfg).map_err(|e| Error::internal(e.to_string()))?;
                let id = Uuid::now_v7();
                let patch = serde_json::to_value(json_patch::diff(&json!({}), &doc)).unwrap_or_default();
                let ev = system_event("vm.created", "vm", Some(id), "web-1")
                    .data(json!({ "folder": "/team-a", "demo": true }));
                let write = covm_store::ConfigWrite {
                    config: doc,
                    name: "web-1".into(),
                    parent_id: folder.id,
                    author: "-".into(),
                    message: Some("demo".into()),
                    request_id: None,
                    patch,
                };
                let object =
                    NewObject { id, kind: ObjectKind::Vm, name: "web-1".into(), parent_id: folder.id, spec: json!({}) };
                store.vm_create(object, write, ev).await?;
            }
            store.meta_set("demo_created", "1").await?;
            tracing::info!("demo inventory created: folders /team-a and /team-b, pool small, VM /team-a/web-1");
        }
        self.committed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_made_valid() {
        assert_eq!(host_name("Build-7.Example"), "build-7.example");
        assert_eq!(host_name("-x y"), "x-y");
        assert_eq!(host_name(""), "localhost");
    }

    #[test]
    fn parent_paths() {
        let mut o = ObjectRecord {
            id: Uuid::nil(),
            kind: ObjectKind::Folder,
            name: "b".into(),
            parent_id: None,
            path: "/a/b".into(),
            spec: json!({}),
            created_at: chrono::Utc::now(),
        };
        assert_eq!(parent_path(&o), "/a");
        o.path = "/a".into();
        assert_eq!(parent_path(&o), "/");
    }
}
