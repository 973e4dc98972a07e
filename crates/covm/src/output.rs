//! How the CLI prints: tables for people, JSON (`--json`) for scripts.

use comfy_table::{Table, presets::NOTHING};
use covm_types::api::{
    AuditVerify, EventView, FolderView, GroupView, ObjectRef, PermissionView, RoleView, UserView, Whoami,
};
use covm_types::snapshot::{SnapshotKind, SnapshotView};
use covm_types::vm::{LeaseView, VersionView, VmView};
use serde::Serialize;

pub struct Out {
    pub json: bool,
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    *t.style_mut() = NOTHING;
    t.set_header(header.to_vec());
    t
}

impl Out {
    fn print_json<T: Serialize + ?Sized>(&self, v: &T) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }

    pub fn message(&self, m: &str) {
        if self.json {
            println!("{}", serde_json::json!({ "message": m }));
        } else {
            println!("{m}");
        }
    }

    pub fn whoami(&self, w: &Whoami) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(w);
        }
        println!("user:       {}", w.user.name);
        println!("groups:     {}", if w.groups.is_empty() { "-".into() } else { w.groups.join(", ") });
        println!("object:     {} ({})", w.object.path, w.object.kind.as_str());
        println!("privileges:");
        if w.privileges.is_empty() {
            println!("  (none)");
        }
        for p in &w.privileges {
            println!("  {p}");
        }
        Ok(())
    }

    pub fn objects(&self, items: &[ObjectRef]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["PATH", "KIND", "ID"]);
        for o in items {
            t.add_row(vec![o.path.clone(), o.kind.as_str().to_owned(), o.id.to_string()]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn folder(&self, f: &FolderView) -> anyhow::Result<()> {
        self.folders(std::slice::from_ref(f))
    }

    pub fn folders(&self, items: &[FolderView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["PATH", "ID", "CREATED"]);
        for f in items {
            t.add_row(vec![f.path.clone(), f.id.to_string(), f.created_at.format("%F %T").to_string()]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn user(&self, u: &UserView) -> anyhow::Result<()> {
        self.users(std::slice::from_ref(u))
    }

    pub fn users(&self, items: &[UserView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["NAME", "ID", "CREATED"]);
        for u in items {
            t.add_row(vec![u.name.clone(), u.id.to_string(), u.created_at.format("%F %T").to_string()]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn groups(&self, items: &[GroupView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["NAME", "MEMBERS"]);
        for g in items {
            t.add_row(vec![g.name.clone(), g.members.join(", ")]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn role(&self, r: &RoleView) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(r);
        }
        println!("role:       {}{}", r.name, if r.builtin { " (built-in)" } else { "" });
        println!("privileges:");
        for p in &r.privileges {
            println!("  {p}");
        }
        Ok(())
    }

    pub fn roles(&self, items: &[RoleView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["NAME", "BUILT-IN", "PRIVILEGES"]);
        for r in items {
            t.add_row(vec![
                r.name.clone(),
                if r.builtin { "yes" } else { "no" }.into(),
                r.privileges.len().to_string(),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn permissions(&self, items: &[PermissionView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["PRINCIPAL", "ROLE", "OBJECT", "PROPAGATE", "IF", "ID"]);
        for p in items {
            let mut conds = Vec::new();
            if let Some(c) = &p.conditions {
                conds.extend(c.annotations.iter().map(|(k, v)| format!("{k}={v}")));
                conds.extend(c.source_cidrs.iter().map(|n| format!("from {n}")));
                conds.extend(c.hours_utc.iter().map(|h| format!("{h} UTC")));
                conds.extend(c.expires_at.iter().map(|e| format!("until {e}")));
            }
            t.add_row(vec![
                p.principal.clone(),
                p.role.clone(),
                p.object.path.clone(),
                if p.propagate { "yes" } else { "no" }.into(),
                if conds.is_empty() { "-".into() } else { conds.join(", ") },
                p.id.to_string(),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn values(&self, items: &[serde_json::Value]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let Some(first) = items.first().and_then(|v| v.as_object()) else {
            println!("(none)");
            return Ok(());
        };
        let keys: Vec<&String> = first.keys().filter(|k| *k != "id" && *k != "created_at").collect();
        let mut t = table(&keys.iter().map(|k| k.as_str()).collect::<Vec<_>>());
        for v in items {
            t.add_row(
                keys.iter()
                    .map(|k| match &v[k.as_str()] {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>(),
            );
        }
        println!("{t}");
        Ok(())
    }

    pub fn vms(&self, items: &[VmView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["NAME", "PATH", "POWER", "CPUS", "MEMORY", "VERSION", "LEASE"]);
        for v in items {
            t.add_row(vec![
                v.name.clone(),
                v.path.clone(),
                v.runtime.power_state.as_str().to_owned(),
                v.config.cpus.to_string(),
                format!("{} MiB", v.config.memory_mib),
                v.version.to_string(),
                v.lease.as_ref().map_or_else(|| "-".into(), |l| l.holder.clone()),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn versions(&self, items: &[VersionView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        let mut t = table(&["VERSION", "TIME", "AUTHOR", "MESSAGE", "CHANGED"]);
        for v in items {
            let changed: Vec<String> = v
                .patch
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|op| op["path"].as_str())
                .map(|p| p.trim_start_matches('/').replace('/', "."))
                .collect();
            let mut changed = changed.join(", ");
            if changed.len() > 60 {
                changed = format!("{}…", changed.chars().take(59).collect::<String>());
            }
            t.add_row(vec![
                v.version.to_string(),
                v.time.format("%F %T").to_string(),
                v.author.clone(),
                v.message.clone().unwrap_or_default(),
                changed,
            ]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn snapshot(&self, s: &SnapshotView) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(s);
        }
        println!("name:        {} ({})", s.name, s.id);
        println!("kind:        {:?}", s.kind);
        println!("version:     {}", s.config_version);
        println!("disks:       {}", s.disks.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>().join(", "));
        if !s.excluded.is_empty() {
            let ex: Vec<String> = s.excluded.iter().map(|e| format!("{} ({})", e.disk, e.reason)).collect();
            println!("excluded:    {}", ex.join(", "));
        }
        println!("created:     {} by {}", s.created_at.format("%F %T"), s.created_by);
        if let Some(e) = s.expires_at {
            println!("expires:     {}", e.format("%F %T"));
        }
        Ok(())
    }

    /// The snapshots as a tree (through `parent`), oldest first at each level.
    pub fn snapshots(&self, items: &[SnapshotView]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(items);
        }
        fn walk(items: &[SnapshotView], parent: Option<uuid::Uuid>, depth: usize) {
            let known = |p: Option<uuid::Uuid>| p.is_some_and(|p| items.iter().any(|s| s.id == p));
            for s in items.iter().filter(|s| if parent.is_none() { !known(s.parent) } else { s.parent == parent }) {
                let kind = if s.kind == SnapshotKind::Safety { " [safety]" } else { "" };
                println!("{}{} (version {}){kind}", "  ".repeat(depth), s.name, s.config_version);
                walk(items, Some(s.id), depth + 1);
            }
        }
        walk(items, None, 0);
        Ok(())
    }

    pub fn lease(&self, vm: &str, l: Option<&LeaseView>) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(&l);
        }
        match l {
            Some(l) => println!(
                "{vm}: leased by {} until {}{}",
                l.holder,
                l.expires_at.format("%F %T UTC"),
                l.token.map(|t| format!(" (token {t})")).unwrap_or_default()
            ),
            None => println!("{vm}: no lease"),
        }
        Ok(())
    }

    pub fn verify(&self, v: &AuditVerify) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(v);
        }
        match v.broken_seq {
            None => println!("ok: {} entries, hash chain intact", v.entries),
            Some(s) => println!("BROKEN at sequence number {s} ({} entries verified before it)", v.entries),
        }
        Ok(())
    }
}

/// One line a person reads: what happened, to what, in a few words.
pub fn event_summary(e: &EventView) -> String {
    let d = &e.data;
    let s = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
    match e.kind.as_str() {
        "permission.granted" | "permission.revoked" => {
            let principal = match d["principal_kind"].as_str() {
                Some("group") => format!("group:{}", s("principal_name")),
                _ => s("principal_name"),
            };
            format!("{principal} {} on {}", s("role"), s("object"))
        }
        "authz.denied" => format!("needs {} on {} ({})", s("privilege"), s("object"), d["status"]),
        "request.failed" => format!("{} {} → {} {}", s("method"), s("path"), d["status"], s("code")),
        "session.failed" | "session.rate_limited" => {
            format!("from {}: {}", s("address"), s("reason"))
        }
        "group.member_added" | "group.member_removed" => format!("user {}", s("user")),
        "vm.config.changed" => {
            let summary: Vec<&str> = d["summary"].as_array().into_iter().flatten().filter_map(|l| l.as_str()).collect();
            let versions = match (e.version_before, e.version_after) {
                (Some(a), Some(b)) => format!("v{a}→v{b} "),
                _ => String::new(),
            };
            let msg = d["message"].as_str().map(|m| format!(" ({m})")).unwrap_or_default();
            format!("{versions}{}{msg}", summary.join("; "))
        }
        k if k.starts_with("vm.lease.") => {
            let by = d["broken_by"].as_str().map(|b| format!(", broken by {b}")).unwrap_or_default();
            format!("holder {} until {}{by}", s("holder"), s("expires_at"))
        }
        _ if d.as_object().is_some_and(|o| o.is_empty()) => String::new(),
        _ => {
            let mut t = d.to_string();
            if t.len() > 100 {
                t.truncate(t.char_indices().take_while(|(i, _)| *i < 97).last().map_or(0, |(i, c)| i + c.len_utf8()));
                t.push('…');
            }
            t
        }
    }
}

pub fn print_events(out: &Out, events: &[EventView]) -> anyhow::Result<()> {
    if out.json {
        for e in events {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(());
    }
    for e in events {
        let object = match &e.object_name {
            Some(n) => format!("{} {n}", e.object_kind),
            None => e.object_kind.clone(),
        };
        println!(
            "{} #{:<6} {:<10} {:<22} {:<28} {}",
            e.time.format("%F %T%.3f"),
            e.seq,
            e.actor,
            e.kind,
            object,
            event_summary(e)
        );
    }
    Ok(())
}
