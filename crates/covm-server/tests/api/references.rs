//! The reference-authorization matrix: every field of a VM config that names an object is authorized
//! as its own endpoint would authorize it, whichever request carries the config (`POST /vms`,
//! `PATCH /vms/{vm}`, `POST /vms/{vm}/revert`).
//!
//! The list of fields comes from the config's schema in the OpenAPI document: every string field is
//! either a reference (with the kind of object, the privilege it needs and the objects to try) or a
//! plain value, and a new string field that is neither fails the test until someone decides.

use covm_client::Client;
use covm_types::api::{DatastoreCreate, NetworkCreate, NetworkKind, PoolCreate};
use covm_types::disk::{DetachQuery, DiskAttach, DiskCreate, DiskMove};
use covm_types::vm::{VmChange, VmConfig};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{TestServer, attach, attachment, name, new_disk, vm_named};

/// The string fields of a config that are plain values, not references.
const PLAIN: &[&str] = &[
    "name",
    "description",
    "cmdline",
    "annotations.*",
    "controllers[].id",
    "disks[].controller",
    "nics[].mac",
    "nics[].port_forwards[].host_addr",
    "cloud_init.hostname",
    "cloud_init.users[].name",
    "cloud_init.users[].ssh_authorized_keys[]",
    "cloud_init.user_data",
];

/// A reference field: the privilege it needs on the object, and the value naming the hidden
/// (`/team-b`) and the visible-but-not-granted (`/shared`) object.
struct Reference {
    field: &'static str,
    privilege: &'static str,
    hidden: &'static str,
    visible: &'static str,
}

const REFERENCES: &[Reference] = &[
    Reference { field: "folder", privilege: "VirtualMachine.Inventory.Create", hidden: "/team-b", visible: "/shared" },
    Reference { field: "pool", privilege: "Resource.AssignVMToPool", hidden: "pool-b", visible: "pool-ro" },
    Reference { field: "nics[].network", privilege: "Network.Assign", hidden: "net-b", visible: "net-ro" },
    Reference { field: "disks[].disk", privilege: "Disk.Attach", hidden: "disk-b", visible: "disk-ro" },
    Reference { field: "kernel", privilege: "Datastore.Browse", hidden: "ds-b:iso/x.iso", visible: "ds-ro:iso/x.iso" },
    Reference { field: "initrd", privilege: "Datastore.Browse", hidden: "ds-b:iso/x.iso", visible: "ds-ro:iso/x.iso" },
    Reference { field: "cdrom", privilege: "Datastore.Browse", hidden: "ds-b:iso/x.iso", visible: "ds-ro:iso/x.iso" },
];

/// The string-valued leaves of a schema, as `a.b`, `list[].c`, `map.*`.
fn string_fields(doc: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return string_fields(doc, &doc["components"]["schemas"][name], path, out);
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        for s in schema[key].as_array().into_iter().flatten() {
            string_fields(doc, s, path, out);
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(a) => a.iter().filter_map(|t| t.as_str()).collect(),
        _ => vec![],
    };
    let join = |k: &str| if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
    if types.contains(&"string") && schema["enum"].is_null() && !out.contains(&path.to_owned()) {
        out.push(path.to_owned());
    }
    if types.contains(&"array") {
        string_fields(doc, &schema["items"], &format!("{path}[]"), out);
    }
    for (k, v) in schema["properties"].as_object().into_iter().flatten() {
        string_fields(doc, v, &join(k), out);
    }
    if schema["additionalProperties"].is_object() {
        string_fields(doc, &schema["additionalProperties"], &join("*"), out);
    }
}

#[test]
fn every_string_field_of_a_config_is_a_reference_or_a_plain_value() {
    let doc = serde_json::to_value(covm_server::http::openapi()).unwrap();
    let mut fields = Vec::new();
    string_fields(&doc, &doc["components"]["schemas"]["VmConfig"], "", &mut fields);
    assert!(fields.len() > 8, "{fields:?}");
    for f in &fields {
        assert!(
            PLAIN.contains(&f.as_str()) || REFERENCES.iter().any(|r| r.field == f),
            "the config field {f} is new: decide whether it names an object (add it to REFERENCES, and make \
             app::refs authorize it) or is a plain value (add it to PLAIN)"
        );
    }
    for r in REFERENCES {
        assert!(fields.iter().any(|f| f == r.field), "{} is no longer in the config", r.field);
    }
}

/// `{field: value}` as a config fragment.
fn fragment(field: &str, v: &str) -> Value {
    match field {
        "nics[].network" => json!({ "nics": [{ "network": v }] }),
        "disks[].disk" => json!({ "disks": [{ "disk": v, "controller": "scsi0", "unit": 0 }] }),
        // An initrd goes with a kernel (one Eve may use).
        "initrd" => json!({ "kernel": "ds-a:iso/x.iso", "initrd": v }),
        f => json!({ f: v }),
    }
}

/// The field as the error names it.
fn error_field(field: &str) -> String {
    field.replace("[]", "[0]")
}

async fn status_of(c: &Client, method: Method, path: &str, body: &Value) -> (u16, Value) {
    let resp = c.request(method, path).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

struct Env {
    s: TestServer,
    eve: Client,
    _dirs: Vec<tempfile::TempDir>,
}

async fn env() -> Env {
    let s = TestServer::start().await;
    let a = &s.admin;
    for f in ["team-a", "team-b", "shared"] {
        a.folder_create(f, "/").await.unwrap();
    }
    let mut dirs = Vec::new();
    for (ds, folder) in [("ds-a", "/team-a"), ("ds-b", "/team-b"), ("ds-ro", "/shared")] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("iso")).unwrap();
        std::fs::write(d.path().join("iso/x.iso"), b"iso").unwrap();
        let path = d.path().to_str().unwrap().into();
        a.datastore_create(&DatastoreCreate { name: name(ds), path, folder: Some(folder.into()) }).await.unwrap();
        dirs.push(d);
    }
    for (net, folder) in [("net-a", "/team-a"), ("net-b", "/team-b"), ("net-ro", "/shared")] {
        let folder = Some(folder.into());
        a.network_create(&NetworkCreate {
            name: name(net),
            kind: NetworkKind::User,
            bridge: None,
            folder,
            vlan: None,
            subnet: None,
        })
        .await
        .unwrap();
    }
    for (pool, folder) in [("pool-a", "/team-a"), ("pool-b", "/team-b"), ("pool-ro", "/shared")] {
        let folder = Some(folder.into());
        a.pool_create(&PoolCreate { name: name(pool), quota: Default::default(), folder }).await.unwrap();
    }
    for (disk, folder) in
        [("disk-a", "/team-a"), ("disk-held", "/team-a"), ("disk-b", "/team-b"), ("disk-ro", "/shared")]
    {
        let create = DiskCreate { datastore: "ds-a".into(), folder: Some(folder.into()), ..new_disk(disk, 1 << 20) };
        a.disk_create(&create).await.unwrap();
    }
    a.vm_create(&VmConfig { folder: "/team-a".into(), pool: "pool-a".into(), ..vm_named("holder") }).await.unwrap();
    a.vm_disk_attach("holder", &attach("disk-held")).await.unwrap();
    let eve = s.user("eve").await;
    a.permission_grant("eve", "VMCreator", "/team-a", true).await.unwrap();
    a.permission_grant("eve", "ReadOnly", "/shared", true).await.unwrap();
    eve.vm_create(&VmConfig { folder: "/team-a".into(), pool: "pool-a".into(), ..vm_named("ve") }).await.unwrap();
    Env { s, eve, _dirs: dirs }
}

#[tokio::test]
async fn references_in_a_config_are_authorized_as_at_their_own_endpoint() {
    let Env { s, eve, _dirs } = env().await;
    let admin = &s.admin;
    // Eve may use what is hers: every reference to a team-a object is accepted.
    let own = json!({ "name": "own", "folder": "/team-a", "pool": "pool-a", "nics": [{ "network": "net-a" }],
        "disks": [{ "disk": "disk-a", "controller": "scsi0", "unit": 0 }], "cdrom": "ds-a:iso/x.iso" });
    let (status, body) = status_of(&eve, Method::POST, "/vms", &own).await;
    assert_eq!(status, 201, "{body}");
    admin.vm_delete("own").await.unwrap();

    for r in REFERENCES {
        for (value, hidden) in [(r.hidden, true), (r.visible, false)] {
            let (want_status, want_code) = if hidden { (404, "not_found") } else { (403, "forbidden") };
            let case = format!("{} = {value}", r.field);
            let check = |(status, body): (u16, Value), how: &str| {
                assert_eq!(status, want_status, "{how} with {case}: {body}");
                assert_eq!(body["error"]["code"], want_code, "{how} with {case}: {body}");
                if hidden {
                    // The answer names the field at fault.
                    let field = if how.ends_with("/disks") { "disk".to_owned() } else { error_field(r.field) };
                    assert_eq!(body["error"]["field"], field, "{how} with {case}: {body}");
                } else {
                    assert_eq!(body["error"]["details"]["privilege"], r.privilege, "{how} with {case}: {body}");
                }
            };
            // The dedicated endpoint answers the same.
            if r.field == "disks[].disk" {
                let dedicated = status_of(&eve, Method::POST, "/vms/ve/disks", &json!({ "disk": value })).await;
                check(dedicated, "POST /vms/ve/disks");
            }
            let before = eve.vm("ve").await.unwrap().version;

            let mut create = json!({ "name": "new", "folder": "/team-a", "pool": "pool-a" });
            json_patch::merge(&mut create, &fragment(r.field, value));
            check(status_of(&eve, Method::POST, "/vms", &create).await, "POST /vms");

            check(status_of(&eve, Method::PATCH, "/vms/ve", &fragment(r.field, value)).await, "PATCH /vms/ve");

            // Admin puts the reference in and takes it out again; Eve's revert to that version is refused.
            let with = admin.vm_change("ve", &fragment(r.field, value), &Default::default()).await.unwrap();
            let without = admin.vm_revert("ve", 1, None).await.unwrap();
            assert_eq!(without.config.folder, "/team-a");
            let after = eve.vm("ve").await.unwrap().version;
            let revert = status_of(&eve, Method::POST, "/vms/ve/revert", &json!({ "version": with.version })).await;
            check(revert, "POST /vms/ve/revert");
            assert_eq!(eve.vm("ve").await.unwrap().version, after, "{case}: a refused revert writes nothing");
            assert!(after > before);
            assert!(admin.vms(&Default::default()).await.unwrap().items.iter().all(|v| v.name != "new"));
        }
    }
}

#[tokio::test]
async fn disk_rules_hold_for_disks_named_in_a_config() {
    let Env { s, eve, _dirs } = env().await;
    let admin = &s.admin;
    let held = json!({ "disks": [{ "disk": "disk-held", "controller": "scsi0", "unit": 0 }] });
    // The one-writer rule, for Eve and for admin alike, as at POST /vms/{vm}/disks.
    for c in [&eve, admin] {
        let dedicated = status_of(c, Method::POST, "/vms/ve/disks", &json!({ "disk": "disk-held" })).await;
        assert_eq!((dedicated.0, dedicated.1["error"]["code"].as_str()), (409, Some("disk_in_use")));
        let (status, body) = status_of(c, Method::PATCH, "/vms/ve", &held).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("disk_in_use")), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("holder"), "{body}");
        let mut create = json!({ "name": "new", "folder": "/team-a", "pool": "pool-a" });
        json_patch::merge(&mut create, &held);
        let (status, body) = status_of(c, Method::POST, "/vms", &create).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("disk_in_use")), "{body}");
    }
    // Read-only beside read-only is fine; turning one read-write is checked again.
    admin.vm_disk_detach("holder", "disk-held", &DetachQuery::default()).await.unwrap();
    admin.vm_disk_attach("holder", &DiskAttach { read_only: true, ..attach("disk-held") }).await.unwrap();
    let ro = json!({ "disks": [{ "disk": "disk-held", "controller": "scsi0", "unit": 0, "read_only": true }] });
    let v = eve.vm_change("ve", &ro, &Default::default()).await.unwrap();
    let generation = v.config.disks[0].generation;
    assert!(generation > 0, "covm sets the generation");
    let (status, body) = status_of(&eve, Method::PATCH, "/vms/ve", &held).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("disk_in_use")), "{body}");
    // A client cannot pick a generation: an unchanged attachment keeps covm's.
    let forged = json!({ "disks": [{ "disk": "disk-held", "controller": "scsi0", "unit": 0, "read_only": true, "generation": 1 }],
        "description": "x" });
    let v = eve.vm_change("ve", &forged, &Default::default()).await.unwrap();
    assert_eq!(v.config.disks[0].generation, generation);
    // The same disk twice in one config is refused.
    let twice = json!({ "disks": [{ "disk": "disk-a", "controller": "scsi0", "unit": 0 },
        { "disk": "disk-a", "controller": "scsi0", "unit": 1 }] });
    let (status, body) = status_of(&eve, Method::PATCH, "/vms/ve", &twice).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("disks[1].disk")), "{body}");

    // A revert re-checks as of now: a disk removed since, and attached read-write elsewhere meanwhile,
    // is not attached again.
    let no_disks = VmChange { disks: Some(vec![]), ..Default::default() };
    eve.vm_change("ve", &no_disks, &Default::default()).await.unwrap();
    let with = eve.vm_disk_attach("ve", &attach("disk-a")).await.unwrap();
    eve.vm_disk_detach("ve", "disk-a", &DetachQuery::default()).await.unwrap();
    admin.vm_disk_attach("holder", &attach("disk-a")).await.unwrap();
    for c in [&eve, admin] {
        let (status, body) = status_of(c, Method::POST, "/vms/ve/revert", &json!({ "version": with.version })).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("disk_in_use")), "{body}");
    }
    assert!(eve.vm("ve").await.unwrap().config.disks.is_empty());
    // Once free, the revert attaches it (a new generation) and the disk shows the attachment.
    admin.vm_disk_detach("holder", "disk-a", &DetachQuery::default()).await.unwrap();
    let v = eve.vm_revert("ve", with.version, None).await.unwrap();
    assert_eq!(v.config.disks.len(), 1);
    assert!(v.config.disks[0].generation > with.config.disks[0].generation);
    let d = eve.disk("disk-a").await.unwrap();
    assert_eq!(d.attachments.len(), 1);
    // No lock is left behind.
    assert_eq!(s.scalar("SELECT COUNT(*) FROM op_locks").await, 0);
}

#[tokio::test]
async fn file_references_never_name_a_disk_image() {
    let Env { s, _dirs, .. } = env().await;
    let d = s.admin.disk("disk-a").await.unwrap();
    for field in ["kernel", "initrd", "cdrom"] {
        let body = fragment(field, &format!("ds-a:{}", d.file));
        let (status, body) = status_of(&s.admin, Method::PATCH, "/vms/holder", &body).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("managed_disk_file")), "{body}");
        assert_eq!(body["error"]["field"], field);
    }
}

/// A change that names a disk racing a move of that disk: the disk never ends up written by two VMs,
/// whatever the order (the change starts from the VM as it is once it holds the disks' locks, and
/// retries when the references it did not check moved).
#[tokio::test]
async fn a_disk_named_in_a_change_and_moved_at_once_has_one_writer() {
    let Env { s, eve, _dirs } = env().await;
    let admin = s.admin.clone();
    admin.vm_create(&VmConfig { folder: "/team-b".into(), pool: "pool-b".into(), ..vm_named("w") }).await.unwrap();
    let with = VmChange { disks: Some(vec![attachment("disk-a", "scsi0", 0)]), ..Default::default() };
    for round in 0..15 {
        eve.vm_change("ve", &with, &Default::default()).await.unwrap();
        let change = VmChange { description: Some(format!("{round}")), ..with.clone() };
        let (to, opts) = (DiskMove { to_vm: "w".into(), ..Default::default() }, Default::default());
        let (a, b) = tokio::join!(eve.vm_change("ve", &change, &opts), admin.disk_move("disk-a", &to));
        let d = admin.disk("disk-a").await.unwrap();
        let writers = d.attachments.iter().filter(|a| !a.read_only).count();
        assert!(writers <= 1, "round {round}: {:?} (change: {:?}, move: {:?})", d.attachments, a.err(), b.err());
        // Put it back for the next round.
        if d.attachments.iter().any(|a| a.vm == "w") {
            admin.vm_disk_detach("w", "disk-a", &DetachQuery::default()).await.unwrap();
        }
        eve.vm_change("ve", &VmChange { disks: Some(vec![]), ..Default::default() }, &Default::default())
            .await
            .unwrap();
    }
    assert_eq!(s.scalar("SELECT COUNT(*) FROM op_locks").await, 0);
}
