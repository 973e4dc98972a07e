// The live feed (`GET /api/v1/events` as server-sent events): pure helpers to parse
// events, map them to the query-cache keys they make stale, track the last sequence
// number seen and choose the URL to (re)open the stream with.

export interface FeedEvent {
  seq: number;
  time: string;
  actor: string;
  kind: string;
  object_kind: string;
  object_id?: string | null;
  object_name?: string | null;
  version_before?: number | null;
  version_after?: number | null;
  patch?: unknown;
  data?: unknown;
  request_id?: string | null;
  hash?: string;
}

export type PresenceState = "viewing" | "editing";

export interface PresenceEntry {
  user: string;
  state: PresenceState;
  since: string;
}

export interface PresenceMessage {
  vm: string;
  entries: PresenceEntry[];
}

export type QueryKey = readonly unknown[];

export const FEED_PATH = "/api/v1/events";

/** Parses the `data` of a default SSE message; `null` when it is not an event. */
export function parseEvent(data: string): FeedEvent | null {
  let v: unknown;
  try {
    v = JSON.parse(data);
  } catch {
    return null;
  }
  if (typeof v !== "object" || v === null) return null;
  const e = v as Record<string, unknown>;
  if (typeof e.seq !== "number" || typeof e.kind !== "string" || typeof e.object_kind !== "string") return null;
  return {
    ...(e as unknown as FeedEvent),
    actor: typeof e.actor === "string" ? e.actor : "-",
    time: typeof e.time === "string" ? e.time : "",
  };
}

/** Parses the `data` of a named `presence` SSE message. */
export function parsePresence(data: string): PresenceMessage | null {
  try {
    const v = JSON.parse(data) as Record<string, unknown>;
    if (typeof v?.vm !== "string" || !Array.isArray(v.entries)) return null;
    const entries = (v.entries as unknown[]).filter(
      (x): x is PresenceEntry =>
        typeof x === "object" &&
        x !== null &&
        typeof (x as PresenceEntry).user === "string" &&
        ((x as PresenceEntry).state === "viewing" || (x as PresenceEntry).state === "editing"),
    );
    return { vm: v.vm, entries };
  } catch {
    return null;
  }
}

function dataField(e: FeedEvent, key: string): string | undefined {
  const d = e.data;
  if (typeof d === "object" && d !== null && !Array.isArray(d)) {
    const v = (d as Record<string, unknown>)[key];
    if (typeof v === "string" && v) return v;
  }
  return undefined;
}

/**
 * The query keys an event makes stale. Keys are prefixes (TanStack Query matches them
 * partially), built by the same conventions as `queryKeys` below.
 */
export function keysForEvent(e: FeedEvent): QueryKey[] {
  const keys: QueryKey[] = [];
  const add = (...k: unknown[]) => {
    if (!keys.some((x) => x.length === k.length && x.every((y, i) => y === k[i]))) keys.push(k);
  };
  const ids = [e.object_id, e.object_name].filter((x): x is string => typeof x === "string" && x !== "");
  const kind = e.kind;

  switch (e.object_kind) {
    case "vm":
      add("vms");
      for (const id of ids) {
        add("vm", id);
        add("vm-versions", id);
      }
      if (kind === "vm.created" || kind === "vm.deleted" || kind.startsWith("vm.config") || kind === "vm.renamed") {
        add("inventory");
      }
      if (kind.startsWith("vm.disk") || kind.startsWith("disk.")) add("disks");
      break;
    case "disk":
      add("disks");
      for (const id of ids) add("disk", id);
      add("inventory");
      // Attach, detach and move change the VMs that hold the disk.
      if (/attach|detach|move/.test(kind)) {
        add("vms");
        const vm = dataField(e, "vm");
        const to = dataField(e, "to_vm");
        if (vm || to) {
          if (vm) add("vm", vm);
          if (to) add("vm", to);
        } else add("vm");
      }
      break;
    case "task":
      add("tasks");
      for (const id of ids) add("task", id);
      break;
    case "user":
    case "group":
    case "role":
    case "permission":
    case "token":
      add("admin");
      add("session");
      add("inventory");
      break;
    case "folder":
    case "datastore":
    case "network":
    case "pool":
    case "host":
      add("inventory");
      add(`${e.object_kind}s`);
      break;
  }
  // A file uploaded to or deleted from a datastore.
  if (kind.startsWith("datastore.file.")) {
    if (e.object_name) add("datastore-files", e.object_name);
    else add("datastore-files");
  }
  if (kind.startsWith("task.")) {
    add("tasks");
    const task = dataField(e, "task") ?? dataField(e, "task_id");
    if (task) add("task", task);
    else if (e.object_kind !== "task") add("task");
  }
  if (kind.startsWith("permission.") || kind.startsWith("role.") || kind.startsWith("group.")) {
    add("admin");
    add("session");
  }
  return keys;
}

/** The fields an event's RFC 6902 patch touches (top-level names), e.g. `["cpus","memory_mib"]`. */
export function patchFields(patch: unknown): string[] {
  if (!Array.isArray(patch)) return [];
  const out: string[] = [];
  for (const op of patch) {
    if (typeof op !== "object" || op === null) continue;
    const p = (op as { path?: unknown }).path;
    if (typeof p !== "string") continue;
    const first = p.split("/")[1];
    const name = first === undefined || first === "" ? "(document)" : first.replace(/~1/g, "/").replace(/~0/g, "~");
    if (!out.includes(name)) out.push(name);
  }
  return out;
}

/** Remembers the newest sequence number seen and drops repeats (after a resume). */
export class FeedCursor {
  lastSeq: number | null;

  constructor(lastSeq: number | null = null) {
    this.lastSeq = lastSeq;
  }

  /** True when the event is new (and records it); false for a duplicate or older one. */
  accept(e: Pick<FeedEvent, "seq">): boolean {
    if (this.lastSeq !== null && e.seq <= this.lastSeq) return false;
    this.lastSeq = e.seq;
    return true;
  }
}

/**
 * The URL to open the feed with: filtered to `object` when given, and resuming after
 * `after` when given (a reopen after an error or after the browser went offline).
 */
export function feedUrl(object?: string | null, after?: number | null): string {
  const q = new URLSearchParams();
  if (object) q.set("object", object);
  if (after !== null && after !== undefined) q.set("after", String(after));
  const s = q.toString();
  return s ? `${FEED_PATH}?${s}` : FEED_PATH;
}

export type ReopenReason = "start" | "filter" | "error" | "online";

/**
 * Decides the URL for (re)opening: a fresh start or a change of filter begins live (the
 * page loads the current state anyway); a reopen after an error or going offline resumes
 * from the last event seen so that nothing is missed.
 */
export function reopenUrl(reason: ReopenReason, object: string | null, cursor: FeedCursor): string {
  const resume = reason === "error" || reason === "online";
  return feedUrl(object, resume ? cursor.lastSeq : null);
}

/** Backoff for reopening after a permanent error: 1 s, 2 s, 4 s … at most 30 s. */
export function backoffMs(attempt: number): number {
  return Math.min(30_000, 1000 * 2 ** Math.max(0, attempt));
}

/** Whether a presence message is about another user (shown in "Viewing now"). */
export function othersPresent(entries: PresenceEntry[], me: string | undefined): PresenceEntry[] {
  const byUser = new Map<string, PresenceEntry>();
  for (const e of entries) {
    if (e.user === me) continue;
    const prev = byUser.get(e.user);
    // One line per user; "editing" wins over "viewing".
    if (!prev || (prev.state === "viewing" && e.state === "editing")) byUser.set(e.user, e);
  }
  return [...byUser.values()].sort((a, b) => a.user.localeCompare(b.user));
}
