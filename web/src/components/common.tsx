import { useQuery } from "@tanstack/react-query";
import { useEffect, useId, useRef, type ReactNode } from "react";
import { useSearchParams } from "react-router";
import { api, ApiError, unwrap, type TaskView } from "../api/client";

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v % 1 === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function fmtTime(s: string | null | undefined): string {
  if (!s) return "—";
  const d = new Date(s);
  return Number.isNaN(d.getTime()) ? s : d.toLocaleString();
}

/** The sentence to show for an error, with what its details add. */
export function errorText(error: unknown): string {
  if (!(error instanceof ApiError)) return error instanceof Error ? error.message : String(error);
  const d = (error.details ?? {}) as Record<string, unknown>;
  let msg = error.message;
  const add = (s: string) => {
    if (!msg.includes(s)) msg += ` ${s}`;
  };
  switch (error.code) {
    case "leased":
      if (typeof d.holder === "string") add(`(leased by ${d.holder}${d.expires_at ? ` until ${fmtTime(String(d.expires_at))}` : ""})`);
      break;
    case "disk_in_use":
      if (typeof d.vm === "string" && !msg.includes(d.vm)) msg += ` (held by VM ${d.vm})`;
      break;
    case "in_use":
      if (Array.isArray(d.vms) && d.vms.length) add(`(attached to ${d.vms.join(", ")})`);
      break;
    case "requires_power_cycle":
      if (Array.isArray(d.fields) && d.fields.length) add(`(fields: ${d.fields.join(", ")})`);
      break;
    case "operation_in_progress":
      if (typeof d.operation === "string") add(`(${d.operation}${d.holder ? ` by ${d.holder}` : ""})`);
      break;
  }
  return msg;
}

const TITLES: Record<number, string> = {
  0: "Offline",
  400: "Invalid request",
  403: "Not allowed",
  404: "Not found",
  409: "Conflict",
  412: "Changed meanwhile",
  423: "Leased",
  429: "Too many requests",
};

export function ErrorMessage({ error }: { error: unknown }) {
  if (!error) return null;
  const status = error instanceof ApiError ? error.status : -1;
  const title = TITLES[status] ?? (status >= 500 ? "Server error" : "Error");
  return (
    <div role="alert" className="error">
      <strong>{title}:</strong> {errorText(error)}
      {error instanceof ApiError && error.field ? <span className="muted"> (field {error.field})</span> : null}
    </div>
  );
}

export function Loading({ what }: { what?: string }) {
  return <p className="loading">Loading{what ? ` ${what}` : ""}…</p>;
}

export function Dialog({
  title,
  children,
  onClose,
}: {
  title: string;
  children: ReactNode;
  onClose: () => void;
}) {
  const id = useId();
  const ref = useRef<HTMLDivElement>(null);
  useEffect(() => {
    ref.current?.focus();
    const onKey = (e: KeyboardEvent) => e.key === "Escape" && onClose();
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [onClose]);
  return (
    <div className="backdrop">
      <div role="dialog" aria-modal="true" aria-labelledby={id} className="dialog" tabIndex={-1} ref={ref}>
        <h2 id={id}>{title}</h2>
        {children}
      </div>
    </div>
  );
}

export const TERMINAL = ["success", "error", "cancelled"];

export function useTask(id: string | null | undefined) {
  return useQuery({
    queryKey: ["task", id],
    queryFn: () => unwrap(api.GET("/api/v1/tasks/{id}", { params: { path: { id: id! } } })),
    enabled: !!id,
    refetchInterval: (q) => (q.state.data && TERMINAL.includes(q.state.data.state) ? false : 1000),
  });
}

export function TaskBar({ task }: { task: TaskView }) {
  const err = task.error as { message?: string } | string | null | undefined;
  const errText = typeof err === "string" ? err : err?.message;
  return (
    <span className={`task task-${task.state}`}>
      <span>{task.kind}</span>{" "}
      <progress max={100} value={task.progress} aria-label={`${task.kind} progress`} /> {task.progress}%{" "}
      <span className={`badge state-${task.state}`}>{task.state}</span>
      {task.message ? <span className="muted"> {task.message}</span> : null}
      {task.state === "error" && errText ? <span className="error-text"> {errText}</span> : null}
    </span>
  );
}

/** Follows a task (by polling; the feed also invalidates it) and shows its progress. */
export function TaskFollow({ id }: { id: string }) {
  const q = useTask(id);
  if (q.error) return <ErrorMessage error={q.error} />;
  if (!q.data) return <span className="muted">Task {id}…</span>;
  return <TaskBar task={q.data} />;
}

export function PowerBadge({ state }: { state: string | undefined }) {
  const s = state ?? "off";
  return <span className={`badge power-${s}`}>{s}</span>;
}

/** The tab a page shows, from the URL's `?tab=` (`first` when none), and how to switch it. */
export function useUrlTab<T extends string>(first: T): [T, (t: T) => void] {
  const [params, setParams] = useSearchParams();
  const tab = (params.get("tab") as T | null) || first;
  return [tab, (t: T) => setParams(t === first ? {} : { tab: t }, { replace: true })];
}

/** A row of tabs (ARIA `tablist`); the panel is the caller's. */
export function TabBar<T extends string>({
  label,
  tabs,
  tab,
  onSelect,
}: {
  label: string;
  tabs: readonly (readonly [T, string])[];
  tab: T;
  onSelect: (t: T) => void;
}) {
  return (
    <div role="tablist" aria-label={label} className="tabs">
      {tabs.map(([t, name]) => (
        <button
          key={t}
          type="button"
          role="tab"
          aria-selected={tab === t}
          className={tab === t ? "active" : ""}
          onClick={() => onSelect(t)}
        >
          {name}
        </button>
      ))}
    </div>
  );
}
