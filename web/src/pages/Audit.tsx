import { useMutation, useQuery } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { api, unwrap } from "../api/client";
import { usePrivileges } from "../auth";
import { ErrorMessage, fmtTime, Loading } from "../components/common";

interface Filters {
  actor: string;
  kind: string;
  object: string;
  since: string;
  until: string;
}

const EMPTY: Filters = { actor: "", kind: "", object: "", since: "", until: "" };

function iso(local: string): string | undefined {
  if (!local) return undefined;
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

export function AuditPage() {
  const privs = usePrivileges();
  const [form, setForm] = useState<Filters>(EMPTY);
  const [filters, setFilters] = useState<Filters>(EMPTY);
  // The cursors of the pages before the current one (for "Previous").
  const [cursors, setCursors] = useState<(string | undefined)[]>([]);
  const [after, setAfter] = useState<string | undefined>(undefined);

  const q = useQuery({
    queryKey: ["audit", filters, after],
    queryFn: () =>
      unwrap(
        api.GET("/api/v1/audit", {
          params: {
            query: {
              actor: filters.actor || undefined,
              kind: filters.kind || undefined,
              object: filters.object || undefined,
              since: iso(filters.since),
              until: iso(filters.until),
              after: after !== undefined ? Number(after) : undefined,
              limit: 100,
            },
          },
        }),
      ),
  });
  const verify = useMutation({ mutationFn: () => unwrap(api.GET("/api/v1/audit/verify")) });

  const apply = (e: FormEvent) => {
    e.preventDefault();
    setFilters(form);
    setCursors([]);
    setAfter(undefined);
  };
  const set = (k: keyof Filters) => (e: React.ChangeEvent<HTMLInputElement>) => setForm({ ...form, [k]: e.target.value });
  const canRead = privs.need("Audit.Read");

  return (
    <section>
      <h1>Audit log</h1>
      <form className="panel filters" onSubmit={apply} aria-label="Audit filters">
        <div className="row">
          <label>
            Actor
            <input value={form.actor} onChange={set("actor")} />
          </label>
          <label>
            Kind
            <input value={form.kind} onChange={set("kind")} placeholder="vm.config.changed or authz." />
          </label>
          <label>
            Object
            <input value={form.object} onChange={set("object")} placeholder="object id" />
          </label>
          <label>
            Since
            <input type="datetime-local" value={form.since} onChange={set("since")} />
          </label>
          <label>
            Until
            <input type="datetime-local" value={form.until} onChange={set("until")} />
          </label>
          <button type="submit">Apply filters</button>
          <button
            type="button"
            onClick={() => {
              setForm(EMPTY);
              setFilters(EMPTY);
              setCursors([]);
              setAfter(undefined);
            }}
          >
            Clear
          </button>
        </div>
      </form>
      <div className="row">
        <button type="button" {...canRead} disabled={canRead.disabled || verify.isPending} onClick={() => verify.mutate()}>
          Verify chain
        </button>
        {verify.data ? (
          <span role="status" className={verify.data.ok ? "ok" : "error-text"}>
            {verify.data.ok
              ? `The chain is intact: ${verify.data.entries} entries verified.`
              : `The chain is broken at seq ${verify.data.broken_seq ?? "?"} (${verify.data.entries} entries checked).`}
          </span>
        ) : null}
      </div>
      <ErrorMessage error={verify.error} />
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading what="the audit log" /> : null}
      {q.data ? (
        <>
          <table className="grid">
            <thead>
              <tr>
                <th scope="col">Seq</th>
                <th scope="col">Time</th>
                <th scope="col">Actor</th>
                <th scope="col">Kind</th>
                <th scope="col">Object</th>
                <th scope="col">Versions</th>
                <th scope="col">Data</th>
              </tr>
            </thead>
            <tbody>
              {q.data.items.map((e) => (
                <tr key={e.seq}>
                  <td className="num">{e.seq}</td>
                  <td>{fmtTime(e.time)}</td>
                  <td>{e.actor}</td>
                  <td>{e.kind}</td>
                  <td title={e.object_id ?? undefined}>
                    {e.object_kind} {e.object_name ?? ""}
                  </td>
                  <td>{e.version_after != null ? `${e.version_before ?? "–"} → ${e.version_after}` : ""}</td>
                  <td>
                    <code className="data">{e.data && JSON.stringify(e.data) !== "{}" ? JSON.stringify(e.data) : ""}</code>
                  </td>
                </tr>
              ))}
              {q.data.items.length === 0 ? (
                <tr>
                  <td colSpan={7} className="muted">
                    No entries.
                  </td>
                </tr>
              ) : null}
            </tbody>
          </table>
          <div className="row">
            <button
              type="button"
              disabled={cursors.length === 0}
              onClick={() => {
                setAfter(cursors[cursors.length - 1]);
                setCursors(cursors.slice(0, -1));
              }}
            >
              Previous page
            </button>
            <button
              type="button"
              disabled={!q.data.next}
              onClick={() => {
                setCursors([...cursors, after]);
                setAfter(q.data.next ?? undefined);
              }}
            >
              Next page
            </button>
          </div>
        </>
      ) : null}
    </section>
  );
}
