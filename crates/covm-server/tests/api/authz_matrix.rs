//! The authorization matrix: every endpoint, called by a user holding each built-in role on `/`
//! (propagating), and the status it gets. The result must equal `tests/golden/authz_matrix.txt`, and
//! every endpoint of the OpenAPI document (and the service routes) must have a row, so that a new
//! endpoint cannot ship without its line. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p covm-server --test api authz_matrix` and review the diff.

use std::collections::BTreeSet;

use covm_client::Client;
use covm_types::BuiltinRole;
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{PASSWORD, TestServer};
use crate::openapi::repo_file;

struct Env {
    s: TestServer,
    scratch: tempfile::TempDir,
    /// One session per role (signing in costs an argon2 hash).
    sessions: Vec<(BuiltinRole, Client)>,
    /// A task of admin's on vm-shared.
    task: uuid::Uuid,
}

/// Lower-case user name for a role.
fn tag(role: BuiltinRole) -> String {
    format!("r-{}", role.name().to_lowercase())
}

/// Every endpoint the matrix knows, as `METHOD /path/template`.
const ENDPOINTS: &[&str] = &[
    "POST /api/v1/session",
    "GET /api/v1/session",
    "DELETE /api/v1/session",
    "GET /api/v1/tokens",
    "POST /api/v1/tokens",
    "DELETE /api/v1/tokens/{id}",
    "GET /api/v1/users",
    "POST /api/v1/users",
    "GET /api/v1/users/{user}",
    "DELETE /api/v1/users/{user}",
    "PUT /api/v1/users/{user}/password",
    "POST /api/v1/users/{user}/mfa",
    "POST /api/v1/users/{user}/mfa/confirm",
    "DELETE /api/v1/users/{user}/mfa",
    "GET /api/v1/policies/mfa",
    "POST /api/v1/policies/mfa",
    "POST /api/v1/keys/rotate",
    "GET /api/v1/sso",
    "GET /api/v1/sso/login",
    "GET /api/v1/sso/callback",
    "POST /api/v1/sso/device",
    "POST /api/v1/sso/device/poll",
    "GET /api/v1/groups",
    "POST /api/v1/groups",
    "POST /api/v1/groups/{group}/members",
    "DELETE /api/v1/groups/{group}/members/{user}",
    "GET /api/v1/privileges",
    "GET /api/v1/roles",
    "POST /api/v1/roles",
    "GET /api/v1/roles/{role}",
    "GET /api/v1/permissions",
    "POST /api/v1/permissions",
    "DELETE /api/v1/permissions/{id}",
    "GET /api/v1/inventory",
    "GET /api/v1/folders",
    "POST /api/v1/folders",
    "GET /api/v1/folders/{folder}",
    "DELETE /api/v1/folders/{folder}",
    "GET /api/v1/datastores",
    "POST /api/v1/datastores",
    "GET /api/v1/datastores/{datastore}",
    "GET /api/v1/datastores/{datastore}/files",
    "PUT /api/v1/datastores/{datastore}/files/{path}",
    "GET /api/v1/datastores/{datastore}/files/{path}",
    "DELETE /api/v1/datastores/{datastore}/files/{path}",
    "GET /api/v1/networks",
    "POST /api/v1/networks",
    "GET /api/v1/networks/{net}",
    "DELETE /api/v1/networks/{net}",
    "PUT /api/v1/networks/{net}/forwards",
    "GET /api/v1/pools",
    "POST /api/v1/pools",
    "GET /api/v1/hosts",
    "GET /api/v1/vms",
    "POST /api/v1/vms",
    "GET /api/v1/vms/{vm}",
    "PATCH /api/v1/vms/{vm}",
    "DELETE /api/v1/vms/{vm}",
    "GET /api/v1/vms/{vm}/versions",
    "GET /api/v1/vms/{vm}/versions/{n}",
    "GET /api/v1/vms/{vm}/diff",
    "POST /api/v1/vms/{vm}/revert",
    "POST /api/v1/vms/{vm}/template",
    "POST /api/v1/vms/{vm}/clone",
    "GET /api/v1/vms/{vm}/guest",
    "POST /api/v1/vms/{vm}/nics",
    "DELETE /api/v1/vms/{vm}/nics/{mac}",
    "POST /api/v1/vms/{vm}/guest/password",
    "POST /api/v1/vms/{vm}/guest/ssh-keys",
    "GET /api/v1/vms/{vm}/lease",
    "POST /api/v1/vms/{vm}/lease",
    "PUT /api/v1/vms/{vm}/lease",
    "DELETE /api/v1/vms/{vm}/lease",
    "GET /api/v1/disks",
    "POST /api/v1/disks",
    "GET /api/v1/disks/{disk}",
    "DELETE /api/v1/disks/{disk}",
    "POST /api/v1/disks/{disk}/resize",
    "POST /api/v1/disks/{disk}/clone",
    "POST /api/v1/disks/{disk}/import",
    "POST /api/v1/disks/{disk}/move",
    "POST /api/v1/vms/{vm}/disks",
    "DELETE /api/v1/vms/{vm}/disks/{disk}",
    "GET /api/v1/vms/{vm}/block",
    "GET /api/v1/vms/{vm}/stats",
    "GET /api/v1/vms/{vm}/snapshots",
    "POST /api/v1/vms/{vm}/snapshots",
    "GET /api/v1/vms/{vm}/snapshots/{snap}",
    "PATCH /api/v1/vms/{vm}/snapshots/{snap}",
    "DELETE /api/v1/vms/{vm}/snapshots/{snap}",
    "POST /api/v1/vms/{vm}/snapshots/{snap}/revert",
    "GET /api/v1/disks/{disk}/snapshots",
    "POST /api/v1/disks/{disk}/snapshots",
    "DELETE /api/v1/disks/{disk}/snapshots/{snap}",
    "POST /api/v1/disks/{disk}/snapshots/{snap}/revert",
    "POST /api/v1/vms/{vm}/power",
    "GET /api/v1/vms/{vm}/console/serial",
    "GET /api/v1/vms/{vm}/console/vnc",
    "POST /api/v1/vms/{vm}/console/ticket",
    "GET /api/v1/vms/{vm}/presence",
    "PUT /api/v1/vms/{vm}/presence",
    "DELETE /api/v1/vms/{vm}/presence",
    "GET /api/v1/tasks",
    "GET /api/v1/tasks/{id}",
    "GET /api/v1/events",
    "GET /api/v1/audit",
    "GET /api/v1/audit/verify",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /api/v1/openapi.json",
];

async fn status(c: &Client, method: Method, path: &str, body: Option<Value>) -> u16 {
    let mut rb = c.request(method, path);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    rb.send().await.expect("request sent").status().as_u16()
}

impl Env {
    async fn setup() -> Env {
        let s = TestServer::start().await;
        let a = &s.admin;
        a.user_create("target", PASSWORD).await.unwrap();
        a.group_create("g0").await.unwrap();
        a.folder_create("shared", "/").await.unwrap();
        a.vm_create(&json!({ "name": "vm-shared" })).await.unwrap();
        // A NAT network (a record only: the simulated driver makes nothing on the host), and one
        // network per role to delete.
        a.post::<_, Value>("/networks", &json!({ "name": "nat0", "kind": "nat", "subnet": "10.99.0.0/24" }))
            .await
            .unwrap();
        for role in BuiltinRole::ALL {
            a.post::<_, Value>("/networks", &json!({ "name": format!("netdel-{}", tag(role)), "kind": "user" }))
                .await
                .unwrap();
        }
        a.vm_change("vm-shared", &json!({ "cpus": 2 }), &Default::default()).await.unwrap();
        for role in BuiltinRole::ALL {
            let t = tag(role);
            a.user_create(&t, PASSWORD).await.unwrap();
            a.permission_grant(&t, role.name(), "/", true).await.unwrap();
            a.user_create(&format!("victim-{t}"), PASSWORD).await.unwrap();
            a.user_create(&format!("pw-{t}"), PASSWORD).await.unwrap();
            a.user_create(&format!("mfa-{t}"), PASSWORD).await.unwrap();
            a.user_create(&format!("m-{t}"), PASSWORD).await.unwrap();
            a.group_member_add("g0", &format!("m-{t}")).await.unwrap();
            a.folder_create(&format!("d-{t}"), "/").await.unwrap();
            a.folder_create(&format!("f-{t}"), "/").await.unwrap();
            a.folder_create(&format!("p-{t}"), "/").await.unwrap();
            a.permission_grant("target", "ReadOnly", &format!("/p-{t}"), true).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-del-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-ed-{t}") })).await.unwrap();
            a.vm_change(&format!("vm-ed-{t}"), &json!({ "cpus": 2 }), &Default::default()).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-lease-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-renew-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-att-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-det-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-mv-{t}") })).await.unwrap();
            for d in ["dd", "dr", "dc", "da", "dx", "dm"] {
                a.post::<_, serde_json::Value>(
                    "/disks",
                    &json!({ "name": format!("{d}-{t}"), "datastore": "local", "capacity_bytes": 1u64 << 20 }),
                )
                .await
                .unwrap();
            }
            a.lease_acquire(&format!("vm-lease-{t}"), 3600).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-snap-{t}") })).await.unwrap();
            a.vm_create(&json!({ "name": format!("vm-tpl-{t}") })).await.unwrap();
            let nic = json!({ "network": "user", "mac": "52:54:00:00:00:01" });
            a.vm_create(&json!({ "name": format!("vm-nic-{t}"), "nics": [nic] })).await.unwrap();
            for snap in ["s-del", "s-rev"] {
                let p = json!({ "name": snap });
                a.post::<_, Value>(&format!("/vms/vm-snap-{t}/snapshots"), &p).await.unwrap();
            }
        }
        a.post::<_, Value>("/vms/vm-shared/snapshots", &json!({ "name": "s0" })).await.unwrap();
        a.datastore_file_put("local", "shared.iso", None, None, b"iso".to_vec()).await.unwrap();
        for role in BuiltinRole::ALL {
            a.datastore_file_put("local", &format!("rm-{}.iso", tag(role)), None, None, b"iso".to_vec()).await.unwrap();
        }
        for role in BuiltinRole::ALL {
            let t = tag(role);
            for (d, snaps) in [("fcd", vec!["s-del", "s-rev"])] {
                let disk = format!("{d}-{t}");
                let body = json!({ "name": disk, "datastore": "local", "capacity_bytes": 1u64 << 20 });
                a.post::<_, Value>("/disks", &body).await.unwrap();
                for snap in snaps {
                    a.post::<_, Value>(&format!("/disks/{disk}/snapshots"), &json!({ "name": snap })).await.unwrap();
                }
            }
        }
        let mut sessions = Vec::new();
        for role in BuiltinRole::ALL {
            sessions.push((role, s.login(&tag(role)).await));
        }
        let task = s.admin.vm_power("vm-shared", covm_types::vm::PowerAction::Off, None).await.unwrap().id;
        Env { s, scratch: tempfile::tempdir().unwrap(), sessions, task }
    }

    async fn probe(&self, role: BuiltinRole, endpoint: &str) -> u16 {
        let t = tag(role);
        let c = self.sessions.iter().find(|(r, _)| *r == role).expect("a session per role").1.clone();
        let anon = self.s.anonymous();
        match endpoint {
            "POST /api/v1/session" => {
                status(&anon, Method::POST, "/session", Some(json!({ "user": t, "password": PASSWORD }))).await
            }
            "GET /api/v1/session" => status(&c, Method::GET, "/session", None).await,
            "DELETE /api/v1/session" => status(&self.s.login(&t).await, Method::DELETE, "/session", None).await,
            "GET /api/v1/tokens" => status(&c, Method::GET, "/tokens", None).await,
            "POST /api/v1/tokens" => status(&c, Method::POST, "/tokens", Some(json!({ "name": "t1" }))).await,
            "DELETE /api/v1/tokens/{id}" => {
                let tok: Value = c.post("/tokens", &json!({ "name": "t2" })).await.unwrap();
                status(&c, Method::DELETE, &format!("/tokens/{}", tok["id"].as_str().unwrap()), None).await
            }
            "GET /api/v1/users" => status(&c, Method::GET, "/users", None).await,
            "POST /api/v1/users" => {
                status(&c, Method::POST, "/users", Some(json!({ "name": format!("new-{t}"), "password": PASSWORD })))
                    .await
            }
            "GET /api/v1/users/{user}" => status(&c, Method::GET, "/users/target", None).await,
            "DELETE /api/v1/users/{user}" => status(&c, Method::DELETE, &format!("/users/victim-{t}"), None).await,
            "PUT /api/v1/users/{user}/password" => {
                status(
                    &c,
                    Method::PUT,
                    &format!("/users/pw-{t}/password"),
                    Some(json!({ "password": "another-password" })),
                )
                .await
            }
            // Another user's two-factor sign-in: enroll (Users.Manage), confirm a wrong code (Users.Manage,
            // then 400), turn off without a code (Permissions.Modify); the policy (Permissions.Modify).
            "POST /api/v1/users/{user}/mfa" => status(&c, Method::POST, &format!("/users/mfa-{t}/mfa"), None).await,
            "POST /api/v1/users/{user}/mfa/confirm" => {
                status(&c, Method::POST, &format!("/users/mfa-{t}/mfa/confirm"), Some(json!({ "code": "000000" })))
                    .await
            }
            "DELETE /api/v1/users/{user}/mfa" => {
                status(&c, Method::DELETE, &format!("/users/mfa-{t}/mfa"), Some(json!({}))).await
            }
            "GET /api/v1/policies/mfa" => status(&c, Method::GET, "/policies/mfa", None).await,
            "POST /api/v1/keys/rotate" => status(&c, Method::POST, "/keys/rotate", None).await,
            // No identity provider here: single sign-on is not found, whoever asks.
            "GET /api/v1/sso" => status(&c, Method::GET, "/sso", None).await,
            "GET /api/v1/sso/login" => status(&c, Method::GET, "/sso/login", None).await,
            "GET /api/v1/sso/callback" => status(&c, Method::GET, "/sso/callback?code=c&state=s", None).await,
            "POST /api/v1/sso/device" => status(&c, Method::POST, "/sso/device", None).await,
            "POST /api/v1/sso/device/poll" => {
                status(&c, Method::POST, "/sso/device/poll", Some(json!({ "id": uuid::Uuid::nil() }))).await
            }
            "POST /api/v1/policies/mfa" => {
                status(&c, Method::POST, "/policies/mfa", Some(json!({ "required_for": [] }))).await
            }
            "GET /api/v1/groups" => status(&c, Method::GET, "/groups", None).await,
            "POST /api/v1/groups" => {
                status(&c, Method::POST, "/groups", Some(json!({ "name": format!("g-{t}") }))).await
            }
            "POST /api/v1/groups/{group}/members" => {
                status(&c, Method::POST, "/groups/g0/members", Some(json!({ "user": "target" }))).await
            }
            "DELETE /api/v1/groups/{group}/members/{user}" => {
                status(&c, Method::DELETE, &format!("/groups/g0/members/m-{t}"), None).await
            }
            "GET /api/v1/privileges" => status(&c, Method::GET, "/privileges", None).await,
            "GET /api/v1/roles" => status(&c, Method::GET, "/roles", None).await,
            "POST /api/v1/roles" => {
                status(
                    &c,
                    Method::POST,
                    "/roles",
                    Some(json!({ "name": format!("role-{t}"), "privileges": ["System.View"] })),
                )
                .await
            }
            "GET /api/v1/roles/{role}" => status(&c, Method::GET, "/roles/ReadOnly", None).await,
            "GET /api/v1/permissions" => status(&c, Method::GET, "/permissions", None).await,
            "POST /api/v1/permissions" => {
                status(
                    &c,
                    Method::POST,
                    "/permissions",
                    Some(json!({ "principal": "target", "role": "ReadOnly", "object": format!("/f-{t}") })),
                )
                .await
            }
            "DELETE /api/v1/permissions/{id}" => {
                let grants = self
                    .s
                    .admin
                    .permissions(&covm_types::api::PermissionQuery {
                        object: Some(format!("/p-{t}")),
                        principal: Some("target".into()),
                    })
                    .await
                    .unwrap();
                status(&c, Method::DELETE, &format!("/permissions/{}", grants[0].id), None).await
            }
            "GET /api/v1/inventory" => status(&c, Method::GET, "/inventory?path=/shared", None).await,
            "GET /api/v1/folders" => status(&c, Method::GET, "/folders", None).await,
            "POST /api/v1/folders" => {
                status(&c, Method::POST, "/folders", Some(json!({ "name": format!("n-{t}"), "parent": "/shared" })))
                    .await
            }
            "GET /api/v1/folders/{folder}" => status(&c, Method::GET, "/folders/shared", None).await,
            "DELETE /api/v1/folders/{folder}" => status(&c, Method::DELETE, &format!("/folders/d-{t}"), None).await,
            "GET /api/v1/datastores" => status(&c, Method::GET, "/datastores", None).await,
            "POST /api/v1/datastores" => {
                status(
                    &c,
                    Method::POST,
                    "/datastores",
                    Some(json!({ "name": format!("ds-{t}"), "path": self.scratch.path() })),
                )
                .await
            }
            "GET /api/v1/datastores/{datastore}" => status(&c, Method::GET, "/datastores/local", None).await,
            "GET /api/v1/datastores/{datastore}/files" => {
                status(&c, Method::GET, "/datastores/local/files", None).await
            }
            "PUT /api/v1/datastores/{datastore}/files/{path}" => {
                status(&c, Method::PUT, &format!("/datastores/local/files/up-{t}.iso"), Some(json!("iso"))).await
            }
            "GET /api/v1/datastores/{datastore}/files/{path}" => {
                status(&c, Method::GET, "/datastores/local/files/shared.iso", None).await
            }
            "DELETE /api/v1/datastores/{datastore}/files/{path}" => {
                status(&c, Method::DELETE, &format!("/datastores/local/files/rm-{t}.iso"), None).await
            }
            "GET /api/v1/networks" => status(&c, Method::GET, "/networks", None).await,
            "POST /api/v1/networks" => {
                status(&c, Method::POST, "/networks", Some(json!({ "name": format!("net-{t}"), "kind": "user" }))).await
            }
            "GET /api/v1/networks/{net}" => status(&c, Method::GET, "/networks/nat0", None).await,
            "DELETE /api/v1/networks/{net}" => status(&c, Method::DELETE, &format!("/networks/netdel-{t}"), None).await,
            "PUT /api/v1/networks/{net}/forwards" => {
                status(&c, Method::PUT, "/networks/nat0/forwards", Some(json!({ "forwards": [] }))).await
            }
            "GET /api/v1/pools" => status(&c, Method::GET, "/pools", None).await,
            "POST /api/v1/pools" => {
                status(&c, Method::POST, "/pools", Some(json!({ "name": format!("pool-{t}") }))).await
            }
            "GET /api/v1/hosts" => status(&c, Method::GET, "/hosts", None).await,
            "GET /api/v1/vms" => status(&c, Method::GET, "/vms", None).await,
            "POST /api/v1/vms" => {
                status(&c, Method::POST, "/vms", Some(json!({ "name": format!("vm-new-{t}") }))).await
            }
            "GET /api/v1/vms/{vm}" => status(&c, Method::GET, "/vms/vm-shared", None).await,
            "PATCH /api/v1/vms/{vm}" => {
                status(&c, Method::PATCH, &format!("/vms/vm-ed-{t}"), Some(json!({ "annotations": { "k": "v" } })))
                    .await
            }
            "DELETE /api/v1/vms/{vm}" => status(&c, Method::DELETE, &format!("/vms/vm-del-{t}"), None).await,
            "GET /api/v1/vms/{vm}/block" => status(&c, Method::GET, "/vms/vm-shared/block", None).await,
            "GET /api/v1/vms/{vm}/stats" => status(&c, Method::GET, "/vms/vm-shared/stats", None).await,
            "GET /api/v1/vms/{vm}/snapshots" => status(&c, Method::GET, "/vms/vm-shared/snapshots", None).await,
            "GET /api/v1/disks/{disk}/snapshots" => {
                status(&c, Method::GET, &format!("/disks/fcd-{t}/snapshots"), None).await
            }
            "POST /api/v1/disks/{disk}/snapshots" => {
                status(&c, Method::POST, &format!("/disks/fcd-{t}/snapshots"), Some(json!({ "name": "s-new" }))).await
            }
            "DELETE /api/v1/disks/{disk}/snapshots/{snap}" => {
                status(&c, Method::DELETE, &format!("/disks/fcd-{t}/snapshots/s-del"), None).await
            }
            "POST /api/v1/disks/{disk}/snapshots/{snap}/revert" => {
                status(&c, Method::POST, &format!("/disks/fcd-{t}/snapshots/s-rev/revert"), None).await
            }
            "POST /api/v1/vms/{vm}/snapshots" => {
                status(&c, Method::POST, &format!("/vms/vm-snap-{t}/snapshots"), Some(json!({ "name": "s-new" }))).await
            }
            "GET /api/v1/vms/{vm}/snapshots/{snap}" => {
                status(&c, Method::GET, "/vms/vm-shared/snapshots/s0", None).await
            }
            "PATCH /api/v1/vms/{vm}/snapshots/{snap}" => {
                let p = json!({ "pinned": true });
                status(&c, Method::PATCH, &format!("/vms/vm-snap-{t}/snapshots/s-rev"), Some(p)).await
            }
            "DELETE /api/v1/vms/{vm}/snapshots/{snap}" => {
                status(&c, Method::DELETE, &format!("/vms/vm-snap-{t}/snapshots/s-del"), None).await
            }
            "POST /api/v1/vms/{vm}/snapshots/{snap}/revert" => {
                let p = json!({ "scope": "config" });
                status(&c, Method::POST, &format!("/vms/vm-snap-{t}/snapshots/s-rev/revert"), Some(p)).await
            }
            "GET /api/v1/vms/{vm}/versions" => status(&c, Method::GET, "/vms/vm-shared/versions", None).await,
            "GET /api/v1/vms/{vm}/versions/{n}" => status(&c, Method::GET, "/vms/vm-shared/versions/1", None).await,
            "GET /api/v1/vms/{vm}/diff" => status(&c, Method::GET, "/vms/vm-shared/diff?from=1&to=2", None).await,
            "POST /api/v1/vms/{vm}/revert" => {
                status(&c, Method::POST, &format!("/vms/vm-ed-{t}/revert"), Some(json!({ "version": 1 }))).await
            }
            "POST /api/v1/vms/{vm}/template" => {
                status(&c, Method::POST, &format!("/vms/vm-tpl-{t}/template"), None).await
            }
            "POST /api/v1/vms/{vm}/clone" => {
                status(&c, Method::POST, "/vms/vm-shared/clone", Some(json!({ "name": format!("cl-{t}") }))).await
            }
            "POST /api/v1/vms/{vm}/nics" => {
                status(&c, Method::POST, &format!("/vms/vm-ed-{t}/nics"), Some(json!({ "network": "user" }))).await
            }
            "DELETE /api/v1/vms/{vm}/nics/{mac}" => {
                status(&c, Method::DELETE, &format!("/vms/vm-nic-{t}/nics/52:54:00:00:00:01"), None).await
            }
            // A simulated guest has no agent: 409 where the role may ask at all.
            "GET /api/v1/vms/{vm}/guest" => status(&c, Method::GET, "/vms/vm-shared/guest", None).await,
            "POST /api/v1/vms/{vm}/guest/password" => {
                let p = json!({ "user": "root", "password": "x" });
                status(&c, Method::POST, "/vms/vm-shared/guest/password", Some(p)).await
            }
            "POST /api/v1/vms/{vm}/guest/ssh-keys" => {
                let p = json!({ "user": "root", "keys": ["ssh-ed25519 AAAA k"] });
                status(&c, Method::POST, "/vms/vm-shared/guest/ssh-keys", Some(p)).await
            }
            "GET /api/v1/vms/{vm}/lease" => status(&c, Method::GET, "/vms/vm-shared/lease", None).await,
            "POST /api/v1/vms/{vm}/lease" => {
                status(&c, Method::POST, &format!("/vms/vm-ed-{t}/lease"), Some(json!({ "ttl_s": 60 }))).await
            }
            "PUT /api/v1/vms/{vm}/lease" => {
                // Renewing needs a lease of one's own: taken just before (where the role may).
                status(&c, Method::POST, &format!("/vms/vm-renew-{t}/lease"), Some(json!({ "ttl_s": 60 }))).await;
                status(&c, Method::PUT, &format!("/vms/vm-renew-{t}/lease"), Some(json!({ "ttl_s": 60 }))).await
            }
            "DELETE /api/v1/vms/{vm}/lease" => {
                // Breaking admin's lease.
                status(&c, Method::DELETE, &format!("/vms/vm-lease-{t}/lease?force=true"), None).await
            }
            "GET /api/v1/disks" => status(&c, Method::GET, "/disks", None).await,
            "POST /api/v1/disks" => {
                status(
                    &c,
                    Method::POST,
                    "/disks",
                    Some(json!({ "name": format!("dn-{t}"), "datastore": "local", "capacity_bytes": 1u64 << 20 })),
                )
                .await
            }
            "GET /api/v1/disks/{disk}" => status(&c, Method::GET, &format!("/disks/dr-{t}"), None).await,
            "DELETE /api/v1/disks/{disk}" => status(&c, Method::DELETE, &format!("/disks/dd-{t}"), None).await,
            "POST /api/v1/disks/{disk}/resize" => {
                status(
                    &c,
                    Method::POST,
                    &format!("/disks/dr-{t}/resize"),
                    Some(json!({ "capacity_bytes": 2u64 << 20 })),
                )
                .await
            }
            "POST /api/v1/disks/{disk}/clone" => {
                status(&c, Method::POST, &format!("/disks/dc-{t}/clone"), Some(json!({ "name": format!("dcc-{t}") })))
                    .await
            }
            "POST /api/v1/disks/{disk}/import" => {
                let ds = self.s.dir.path().join("datastores/local");
                covm_hv::img::create(&ds.join(format!("imp-{t}.qcow2")), "qcow2", 1 << 20, None).await.unwrap();
                status(
                    &c,
                    Method::POST,
                    &format!("/disks/di-{t}/import"),
                    Some(json!({ "datastore": "local", "path": format!("imp-{t}.qcow2") })),
                )
                .await
            }
            "POST /api/v1/disks/{disk}/move" => {
                status(&c, Method::POST, &format!("/disks/dm-{t}/move"), Some(json!({ "to_vm": format!("vm-mv-{t}") })))
                    .await
            }
            "POST /api/v1/vms/{vm}/disks" => {
                status(&c, Method::POST, &format!("/vms/vm-att-{t}/disks"), Some(json!({ "disk": format!("da-{t}") })))
                    .await
            }
            "DELETE /api/v1/vms/{vm}/disks/{disk}" => {
                self.s
                    .admin
                    .post::<_, serde_json::Value>(
                        &format!("/vms/vm-det-{t}/disks"),
                        &json!({ "disk": format!("dx-{t}") }),
                    )
                    .await
                    .unwrap();
                status(&c, Method::DELETE, &format!("/vms/vm-det-{t}/disks/dx-{t}"), None).await
            }
            "POST /api/v1/vms/{vm}/power" => {
                status(&c, Method::POST, "/vms/vm-shared/power", Some(json!({ "action": "off" }))).await
            }
            "GET /api/v1/vms/{vm}/console/serial" => {
                status(&c, Method::GET, "/vms/vm-shared/console/serial", None).await
            }
            "POST /api/v1/vms/{vm}/console/ticket" => {
                status(&c, Method::POST, "/vms/vm-shared/console/ticket", Some(json!({}))).await
            }
            "GET /api/v1/vms/{vm}/presence" => status(&c, Method::GET, "/vms/vm-shared/presence", None).await,
            "PUT /api/v1/vms/{vm}/presence" => {
                status(&c, Method::PUT, "/vms/vm-shared/presence", Some(json!({ "state": "viewing" }))).await
            }
            "DELETE /api/v1/vms/{vm}/presence" => status(&c, Method::DELETE, "/vms/vm-shared/presence", None).await,
            "GET /api/v1/vms/{vm}/console/vnc" => {
                // A real upgrade request; vm-shared is off, so the allowed get 409.
                c.request(Method::GET, "/vms/vm-shared/console/vnc")
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
            "GET /api/v1/tasks" => status(&c, Method::GET, "/tasks", None).await,
            "GET /api/v1/tasks/{id}" => status(&c, Method::GET, &format!("/tasks/{}", self.task), None).await,
            "GET /api/v1/events" => status(&c, Method::GET, "/events", None).await,
            "GET /api/v1/audit" => status(&c, Method::GET, "/audit", None).await,
            "GET /api/v1/audit/verify" => status(&c, Method::GET, "/audit/verify", None).await,
            "GET /healthz" => status(&anon, Method::GET, "/healthz", None).await,
            "GET /readyz" => status(&anon, Method::GET, "/readyz", None).await,
            "GET /metrics" => status(&anon, Method::GET, "/metrics", None).await,
            "GET /api/v1/openapi.json" => status(&anon, Method::GET, "/api/v1/openapi.json", None).await,
            other => panic!("no probe for {other}; add one to authz_matrix.rs"),
        }
    }
}

/// Every operation of the OpenAPI document and the service routes.
fn documented_endpoints() -> BTreeSet<String> {
    let doc = serde_json::to_value(covm_server::http::openapi()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    for r in covm_server::http::SERVICE_ROUTES {
        out.insert(format!("GET {r}"));
    }
    out
}

#[test]
fn every_endpoint_has_a_row() {
    let known: BTreeSet<String> = ENDPOINTS.iter().map(|s| s.to_string()).collect();
    let documented = documented_endpoints();
    let missing: Vec<_> = documented.difference(&known).collect();
    let stale: Vec<_> = known.difference(&documented).collect();
    assert!(missing.is_empty(), "endpoints without a row in the authorization matrix: {missing:?}");
    assert!(stale.is_empty(), "rows for endpoints that do not exist: {stale:?}");
    let golden =
        std::fs::read_to_string(repo_file("crates/covm-server/tests/golden/authz_matrix.txt")).unwrap_or_default();
    for e in &documented {
        assert!(golden.lines().any(|l| l.starts_with(&format!("{e:<48}"))), "{e} has no row in the golden file");
    }
}

#[tokio::test]
async fn the_authorization_matrix_matches_the_golden_file() {
    let env = Env::setup().await;
    let mut lines = vec![format!(
        "{:<48}{}",
        "# endpoint",
        BuiltinRole::ALL.iter().map(|r| format!("{:<10}", r.name())).collect::<String>().trim_end()
    )];
    let mut endpoints: Vec<&str> = ENDPOINTS.to_vec();
    endpoints.sort_by_key(|e| {
        let (m, p) = e.split_once(' ').unwrap();
        (p, m)
    });
    for e in endpoints {
        let mut row = format!("{e:<48}");
        for role in BuiltinRole::ALL {
            row.push_str(&format!("{:<10}", env.probe(role, e).await));
        }
        lines.push(row.trim_end().to_owned());
    }
    let actual = lines.join("\n") + "\n";
    let file = repo_file("crates/covm-server/tests/golden/authz_matrix.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&file, &actual).unwrap();
    }
    let golden = std::fs::read_to_string(&file).unwrap_or_default();
    if golden != actual {
        let diff: Vec<String> =
            golden.lines().zip(actual.lines()).filter(|(g, a)| g != a).map(|(g, a)| format!("- {g}\n+ {a}")).collect();
        panic!("the authorization matrix changed (UPDATE_GOLDEN=1 to accept):\n{}", diff.join("\n"));
    }
}
