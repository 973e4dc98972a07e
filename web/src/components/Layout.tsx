import { useQuery, useQueryClient } from "@tanstack/react-query";
import { useState } from "react";
import { Link, NavLink, Outlet, useNavigate } from "react-router";
import { api, unwrap, type ObjectRef } from "../api/client";
import { signOut } from "../api/extra";
import { useWhoami } from "../auth";
import { LiveIndicator } from "../live";
import { ErrorMessage } from "./common";

const KIND_ORDER = ["folder", "vm", "disk", "datastore", "network", "pool", "host"];

function linkFor(o: ObjectRef): string | null {
  if (o.kind === "vm") return `/vms/${encodeURIComponent(o.name)}`;
  if (o.kind === "disk") return `/disks/${encodeURIComponent(o.name)}`;
  if (o.kind === "datastore") return `/datastores/${encodeURIComponent(o.name)}`;
  return null;
}

function FolderChildren({ path, depth }: { path: string; depth: number }) {
  const q = useQuery({
    queryKey: ["inventory", path],
    queryFn: () => unwrap(api.GET("/api/v1/inventory", { params: { query: { path } } })),
  });
  if (q.error) return <ErrorMessage error={q.error} />;
  if (!q.data) return <div className="tree-loading muted">…</div>;
  const items = [...q.data].sort(
    (a, b) => KIND_ORDER.indexOf(a.kind) - KIND_ORDER.indexOf(b.kind) || a.name.localeCompare(b.name),
  );
  if (!items.length) return <div className="muted tree-empty">(empty)</div>;
  return (
    <ul role="group">
      {items.map((o) => (
        <TreeNode key={o.id} obj={o} depth={depth} />
      ))}
    </ul>
  );
}

function TreeNode({ obj, depth }: { obj: ObjectRef; depth: number }) {
  const [open, setOpen] = useState(false);
  const to = linkFor(obj);
  const isFolder = obj.kind === "folder";
  return (
    <li role="treeitem" aria-expanded={isFolder ? open : undefined} aria-selected={false}>
      <div className="tree-row" style={{ paddingLeft: depth * 12 }}>
        {isFolder ? (
          <button
            type="button"
            className="twisty"
            aria-label={`${open ? "Collapse" : "Expand"} ${obj.name}`}
            onClick={() => setOpen(!open)}
          >
            {open ? "▾" : "▸"}
          </button>
        ) : (
          <span className="twisty-space" />
        )}
        <span className={`icon icon-${obj.kind}`} aria-hidden="true" />
        {to ? (
          <NavLink to={to} title={obj.path}>
            {obj.name}
          </NavLink>
        ) : (
          <span title={`${obj.kind} ${obj.path}`} onClick={isFolder ? () => setOpen(!open) : undefined}>
            {obj.name}
          </span>
        )}
        {!isFolder && obj.kind !== "vm" && obj.kind !== "disk" ? <span className="muted kind"> {obj.kind}</span> : null}
      </div>
      {isFolder && open ? <FolderChildren path={obj.path} depth={depth + 1} /> : null}
    </li>
  );
}

export function InventoryTree() {
  return (
    <nav aria-label="Inventory" className="tree">
      <div className="tree-title">Inventory</div>
      <ul role="tree" aria-label="Inventory tree">
        <li role="treeitem" aria-expanded={true} aria-selected={false}>
          <div className="tree-row">
            <span className="icon icon-folder" aria-hidden="true" />
            <Link to="/">/</Link>
          </div>
          <FolderChildren path="/" depth={1} />
        </li>
      </ul>
    </nav>
  );
}

export function Layout() {
  const me = useWhoami();
  const qc = useQueryClient();
  const navigate = useNavigate();
  const [err, setErr] = useState<unknown>(null);
  const onSignOut = async () => {
    try {
      await signOut();
    } catch (e) {
      // A session already gone is signed out too.
      if (!(e instanceof Error && "status" in e && (e as { status: number }).status === 401)) {
        setErr(e);
        return;
      }
    }
    qc.clear();
    navigate("/signin", { replace: true });
  };
  return (
    <div className="app">
      <header className="topbar">
        <Link to="/" className="brand">
          covm
        </Link>
        <nav aria-label="Main" className="mainnav">
          <NavLink to="/" end>
            VMs
          </NavLink>
          <NavLink to="/disks">Disks</NavLink>
          <NavLink to="/tasks">Tasks</NavLink>
          <NavLink to="/audit">Audit</NavLink>
          <NavLink to="/admin">Admin</NavLink>
        </nav>
        <span className="spacer" />
        <LiveIndicator />
        <span className="whoami" title={me.data?.groups?.length ? `Groups: ${me.data.groups.join(", ")}` : undefined}>
          {me.data?.user.name}
        </span>
        <button type="button" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      {err ? <ErrorMessage error={err} /> : null}
      <div className="body">
        <aside className="sidebar">
          <InventoryTree />
        </aside>
        <main className="main">
          <Outlet />
        </main>
      </div>
    </div>
  );
}
