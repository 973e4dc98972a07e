import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { api, unwrap } from "../api/client";
import { usePrivileges, type Privileges } from "../auth";
import { ErrorMessage, TabBar, useUrlTab, fmtTime, Loading } from "../components/common";

function useAdminMutation<T>(fn: (v: T) => Promise<unknown>) {
  const qc = useQueryClient();
  return useMutation({
    mutationFn: fn,
    onSuccess: () => void qc.invalidateQueries({ queryKey: ["admin"] }),
  });
}

function Users({ privs }: { privs: Privileges }) {
  const q = useQuery({ queryKey: ["admin", "users"], queryFn: () => unwrap(api.GET("/api/v1/users")) });
  const [name, setName] = useState("");
  const [password, setPassword] = useState("");
  const create = useAdminMutation(() => unwrap(api.POST("/api/v1/users", { body: { name, password } })));
  const del = useAdminMutation((user: string) =>
    unwrap(api.DELETE("/api/v1/users/{user}", { params: { path: { user } } })),
  );
  const manage = privs.need("Users.Manage");
  const submit = (e: FormEvent) => {
    e.preventDefault();
    create.mutate(undefined, {
      onSuccess: () => {
        setName("");
        setPassword("");
      },
    });
  };
  return (
    <section aria-label="Users" className="panel">
      <h2>Users</h2>
      <form className="row" onSubmit={submit} aria-label="Create user">
        <label>
          New user name
          <input value={name} onChange={(e) => setName(e.target.value)} required />
        </label>
        <label>
          New user password
          <input type="password" autoComplete="new-password" minLength={8} value={password} onChange={(e) => setPassword(e.target.value)} required />
        </label>
        <button type="submit" {...privs.need("Users.Manage", create.isPending)}>
          Create user
        </button>
      </form>
      <ErrorMessage error={create.error} />
      <ErrorMessage error={del.error} />
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading /> : null}
      <table className="grid">
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Two-factor</th>
            <th scope="col">Single sign-on</th>
            <th scope="col">Disabled</th>
            <th scope="col">Created</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {q.data?.map((u) => (
            <tr key={u.id}>
              <td>{u.name}</td>
              <td>{u.mfa ? "on" : "off"}</td>
              <td>{u.sso ? "yes" : "no"}</td>
              <td>{u.disabled ? "yes" : "no"}</td>
              <td>{fmtTime(u.created_at)}</td>
              <td>
                <button type="button" className="danger" {...manage} disabled={manage.disabled || del.isPending} onClick={() => del.mutate(u.name)}>
                  Delete {u.name}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function Groups({ privs }: { privs: Privileges }) {
  const q = useQuery({ queryKey: ["admin", "groups"], queryFn: () => unwrap(api.GET("/api/v1/groups")) });
  const [name, setName] = useState("");
  const [member, setMember] = useState<Record<string, string>>({});
  const create = useAdminMutation(() => unwrap(api.POST("/api/v1/groups", { body: { name } })));
  const add = useAdminMutation((v: { group: string; user: string }) =>
    unwrap(api.POST("/api/v1/groups/{group}/members", { params: { path: { group: v.group } }, body: { user: v.user } })),
  );
  const remove = useAdminMutation((v: { group: string; user: string }) =>
    unwrap(api.DELETE("/api/v1/groups/{group}/members/{user}", { params: { path: v } })),
  );
  const manage = privs.need("Users.Manage");
  return (
    <section aria-label="Groups" className="panel">
      <h2>Groups</h2>
      <form
        className="row"
        aria-label="Create group"
        onSubmit={(e) => {
          e.preventDefault();
          create.mutate(undefined, { onSuccess: () => setName("") });
        }}
      >
        <label>
          New group name
          <input value={name} onChange={(e) => setName(e.target.value)} required />
        </label>
        <button type="submit" {...privs.need("Users.Manage", create.isPending)}>
          Create group
        </button>
      </form>
      <ErrorMessage error={create.error ?? add.error ?? remove.error ?? q.error} />
      {q.isLoading ? <Loading /> : null}
      <table className="grid">
        <thead>
          <tr>
            <th scope="col">Group</th>
            <th scope="col">Members</th>
            <th scope="col">Add member</th>
          </tr>
        </thead>
        <tbody>
          {q.data?.map((g) => (
            <tr key={g.id}>
              <td>{g.name}</td>
              <td>
                <ul className="inline">
                  {g.members.map((m) => (
                    <li key={m}>
                      {m}{" "}
                      <button type="button" className="small" {...manage} onClick={() => remove.mutate({ group: g.name, user: m })}>
                        Remove {m} from {g.name}
                      </button>
                    </li>
                  ))}
                  {g.members.length === 0 ? <li className="muted">none</li> : null}
                </ul>
              </td>
              <td>
                <form
                  className="row"
                  onSubmit={(e) => {
                    e.preventDefault();
                    const user = (member[g.name] ?? "").trim();
                    if (user) add.mutate({ group: g.name, user }, { onSuccess: () => setMember({ ...member, [g.name]: "" }) });
                  }}
                >
                  <label>
                    <span className="sr-only">Member to add to {g.name}</span>
                    <input
                      value={member[g.name] ?? ""}
                      onChange={(e) => setMember({ ...member, [g.name]: e.target.value })}
                      placeholder="user"
                    />
                  </label>
                  <button type="submit" {...manage}>
                    Add to {g.name}
                  </button>
                </form>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function Roles() {
  const q = useQuery({ queryKey: ["admin", "roles"], queryFn: () => unwrap(api.GET("/api/v1/roles")) });
  return (
    <section aria-label="Roles" className="panel">
      <h2>Roles</h2>
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading /> : null}
      <table className="grid">
        <thead>
          <tr>
            <th scope="col">Role</th>
            <th scope="col">Built in</th>
            <th scope="col">Privileges</th>
          </tr>
        </thead>
        <tbody>
          {q.data?.map((r) => (
            <tr key={r.id}>
              <td>{r.name}</td>
              <td>{r.builtin ? "yes" : "no"}</td>
              <td className="privs">
                {r.privileges.length ? r.privileges.map((p) => <code key={p}>{p}</code>) : <span className="muted">none</span>}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function Permissions({ privs }: { privs: Privileges }) {
  const q = useQuery({ queryKey: ["admin", "permissions"], queryFn: () => unwrap(api.GET("/api/v1/permissions")) });
  const roles = useQuery({ queryKey: ["admin", "roles"], queryFn: () => unwrap(api.GET("/api/v1/roles")) });
  const [principal, setPrincipal] = useState("");
  const [role, setRole] = useState("");
  const [object, setObject] = useState("/");
  const [propagate, setPropagate] = useState(true);
  const grant = useAdminMutation(() =>
    unwrap(
      api.POST("/api/v1/permissions", {
        body: { principal, role: role || roles.data?.[0]?.name || "", object, propagate },
      }),
    ),
  );
  const revoke = useAdminMutation((id: string) => unwrap(api.DELETE("/api/v1/permissions/{id}", { params: { path: { id } } })));
  const modify = privs.need("Permissions.Modify");
  return (
    <section aria-label="Permissions" className="panel">
      <h2>Permissions</h2>
      <form
        className="row"
        aria-label="Grant permission"
        onSubmit={(e) => {
          e.preventDefault();
          grant.mutate(undefined);
        }}
      >
        <label>
          Principal
          <input value={principal} onChange={(e) => setPrincipal(e.target.value)} placeholder="user or group:NAME" required />
        </label>
        <label>
          Role
          <select value={role} onChange={(e) => setRole(e.target.value)}>
            {roles.data?.map((r) => (
              <option key={r.id} value={r.name}>
                {r.name}
              </option>
            ))}
          </select>
        </label>
        <label>
          Object path
          <input value={object} onChange={(e) => setObject(e.target.value)} placeholder="/team-a or datastore:local" required />
        </label>
        <label className="check">
          <input type="checkbox" checked={propagate} onChange={(e) => setPropagate(e.target.checked)} />
          Propagate
        </label>
        <button type="submit" {...privs.need("Permissions.Modify", grant.isPending)}>
          Grant
        </button>
      </form>
      <ErrorMessage error={grant.error ?? revoke.error ?? q.error} />
      {q.isLoading ? <Loading /> : null}
      <table className="grid">
        <thead>
          <tr>
            <th scope="col">Principal</th>
            <th scope="col">Role</th>
            <th scope="col">Object</th>
            <th scope="col">Propagate</th>
            <th scope="col">Created</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {q.data?.map((p) => (
            <tr key={p.id}>
              <td>{p.principal}</td>
              <td>{p.role}</td>
              <td title={p.object.id}>
                {p.object.path} <span className="muted">({p.object.kind})</span>
              </td>
              <td>{p.propagate ? "yes" : "no"}</td>
              <td>{fmtTime(p.created_at)}</td>
              <td>
                <button type="button" className="danger" {...modify} disabled={modify.disabled || revoke.isPending} onClick={() => revoke.mutate(p.id)}>
                  Revoke
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

const TABS = [
  ["users", "Users"],
  ["groups", "Groups"],
  ["roles", "Roles"],
  ["permissions", "Permissions"],
] as const;

export function AdminPage() {
  const privs = usePrivileges();
  const [tab, setTab] = useUrlTab<(typeof TABS)[number][0]>("users");
  return (
    <section>
      <h1>Administration</h1>
      <TabBar label="Administration sections" tabs={TABS} tab={tab} onSelect={setTab} />
      <div role="tabpanel" className="tabpanel">
        {tab === "users" ? <Users privs={privs} /> : null}
        {tab === "groups" ? <Groups privs={privs} /> : null}
        {tab === "roles" ? <Roles /> : null}
        {tab === "permissions" ? <Permissions privs={privs} /> : null}
      </div>
    </section>
  );
}
