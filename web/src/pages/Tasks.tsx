import { useQuery } from "@tanstack/react-query";
import { Link } from "react-router";
import { api, unwrap } from "../api/client";
import { ErrorMessage, fmtTime, Loading, TERMINAL } from "../components/common";

export function TasksPage() {
  const q = useQuery({
    queryKey: ["tasks"],
    queryFn: () => unwrap(api.GET("/api/v1/tasks", { params: { query: { limit: 200 } } })),
    // The feed invalidates tasks as they progress; poll slowly as a fallback while some run.
    refetchInterval: (query) => (query.state.data?.some((t) => !TERMINAL.includes(t.state)) ? 3000 : false),
  });
  return (
    <section>
      <h1>Tasks</h1>
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading what="tasks" /> : null}
      {q.data ? (
        <table className="grid">
          <thead>
            <tr>
              <th scope="col">Task</th>
              <th scope="col">Object</th>
              <th scope="col">Actor</th>
              <th scope="col">State</th>
              <th scope="col">Progress</th>
              <th scope="col">Started</th>
              <th scope="col">Updated</th>
              <th scope="col">Message</th>
            </tr>
          </thead>
          <tbody>
            {q.data.map((t) => {
              const err = t.error as { message?: string } | string | null | undefined;
              const errText = typeof err === "string" ? err : err?.message;
              return (
                <tr key={t.id}>
                  <td title={t.id}>{t.kind}</td>
                  <td>
                    {t.object_name && t.kind.startsWith("vm.") ? (
                      <Link to={`/vms/${encodeURIComponent(t.object_name)}`}>{t.object_name}</Link>
                    ) : (
                      (t.object_name ?? "—")
                    )}
                  </td>
                  <td>{t.actor}</td>
                  <td>
                    <span className={`badge state-${t.state}`}>{t.state}</span>
                  </td>
                  <td>
                    <progress max={100} value={t.progress} aria-label={`Progress of ${t.kind}`} /> {t.progress}%
                  </td>
                  <td>{fmtTime(t.created_at)}</td>
                  <td>{fmtTime(t.updated_at)}</td>
                  <td>
                    {t.message ?? ""}
                    {errText ? <span className="error-text"> {errText}</span> : null}
                  </td>
                </tr>
              );
            })}
            {q.data.length === 0 ? (
              <tr>
                <td colSpan={8} className="muted">
                  No tasks.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}
