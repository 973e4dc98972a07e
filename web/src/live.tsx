// The tab's one live feed: an EventSource on /api/v1/events (filtered to the object the
// page shows), which invalidates the query cache per event, carries presence, and shows
// its state in the header.

import { useQueryClient } from "@tanstack/react-query";
import {
  createContext,
  useContext,
  useEffect,
  useMemo,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import {
  FeedCursor,
  backoffMs,
  keysForEvent,
  parseEvent,
  parsePresence,
  reopenUrl,
  type FeedEvent,
  type PresenceEntry,
  type ReopenReason,
} from "./feed";

export type FeedStatus = "connecting" | "live" | "reconnecting";

type Listener = (e: FeedEvent) => void;

class PresenceStore {
  private map = new Map<string, PresenceEntry[]>();
  private subs = new Set<() => void>();
  get(vm: string): PresenceEntry[] | undefined {
    return this.map.get(vm);
  }
  set(vm: string, entries: PresenceEntry[]) {
    this.map.set(vm, entries);
    this.subs.forEach((s) => s());
  }
  subscribe = (s: () => void) => {
    this.subs.add(s);
    return () => this.subs.delete(s);
  };
}

interface FeedContext {
  status: FeedStatus;
  setFilter: (object: string | null) => void;
  listeners: Set<Listener>;
  presence: PresenceStore;
}

const Ctx = createContext<FeedContext | null>(null);

function useFeedContext(): FeedContext {
  const c = useContext(Ctx);
  if (!c) throw new Error("FeedProvider is missing");
  return c;
}

export function FeedProvider({ children }: { children: ReactNode }) {
  const qc = useQueryClient();
  const [filter, setFilter] = useState<string | null>(null);
  const [status, setStatus] = useState<FeedStatus>("connecting");
  const cursor = useRef(new FeedCursor());
  const listeners = useRef(new Set<Listener>()).current;
  const presence = useRef(new PresenceStore()).current;
  const started = useRef(false);

  useEffect(() => {
    if (typeof EventSource === "undefined") return;
    let es: EventSource | null = null;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let attempt = 0;
    let stopped = false;

    const open = (reason: ReopenReason) => {
      if (stopped) return;
      clearTimeout(timer);
      es?.close();
      // A change of filter keeps the state shown; a start or a reopen after trouble says so.
      if (reason === "start") setStatus("connecting");
      else if (reason !== "filter") setStatus("reconnecting");
      const source = new EventSource(reopenUrl(reason, filter, cursor.current), { withCredentials: true });
      es = source;
      source.onopen = () => {
        attempt = 0;
        setStatus("live");
        // Without a resume point we cannot know what was missed: refresh what is shown.
        if (reason !== "start" && reason !== "filter" && cursor.current.lastSeq === null) {
          void qc.invalidateQueries();
        }
      };
      source.onmessage = (m) => {
        const e = parseEvent(m.data);
        if (!e || !cursor.current.accept(e)) return;
        for (const key of keysForEvent(e)) void qc.invalidateQueries({ queryKey: key });
        listeners.forEach((l) => l(e));
      };
      source.addEventListener("presence", (m) => {
        const p = parsePresence((m as MessageEvent).data);
        if (p) presence.set(p.vm, p.entries);
      });
      source.onerror = () => {
        if (stopped || es !== source) return;
        setStatus("reconnecting");
        if (source.readyState === EventSource.CLOSED) {
          // A permanent error (e.g. a 401 or the server gone): check the session, which
          // sends a signed-out user to the sign-in page, and reopen later, resuming.
          void qc.invalidateQueries({ queryKey: ["session", "/"] });
          timer = setTimeout(() => open("error"), backoffMs(attempt++));
        }
      };
    };

    open(started.current ? "filter" : "start");
    started.current = true;
    const onOnline = () => open("online");
    const onOffline = () => setStatus("reconnecting");
    window.addEventListener("online", onOnline);
    window.addEventListener("offline", onOffline);
    return () => {
      stopped = true;
      clearTimeout(timer);
      es?.close();
      window.removeEventListener("online", onOnline);
      window.removeEventListener("offline", onOffline);
    };
  }, [filter, qc, listeners, presence]);

  const value = useMemo(() => ({ status, setFilter, listeners, presence }), [status, listeners, presence]);
  return <Ctx.Provider value={value}>{children}</Ctx.Provider>;
}

export function useFeedStatus(): FeedStatus {
  return useFeedContext().status;
}

/** Filters the tab's feed to one object while the calling page is shown. */
export function useFeedFilter(object: string | null | undefined) {
  const { setFilter } = useFeedContext();
  useEffect(() => {
    if (!object) return;
    setFilter(object);
    return () => setFilter(null);
  }, [object, setFilter]);
}

/** Calls `cb` for every new feed event (latest `cb` is used). */
export function useFeedEvents(cb: Listener) {
  const { listeners } = useFeedContext();
  const ref = useRef(cb);
  ref.current = cb;
  useEffect(() => {
    const l: Listener = (e) => ref.current(e);
    listeners.add(l);
    return () => {
      listeners.delete(l);
    };
  }, [listeners]);
}

/** Presence on a VM (from the feed and from heartbeats' answers). */
export function usePresenceEntries(vm: string | undefined): [PresenceEntry[], (e: PresenceEntry[]) => void] {
  const { presence } = useFeedContext();
  const entries = useSyncExternalStore(presence.subscribe, () => (vm ? presence.get(vm) : undefined));
  return [entries ?? EMPTY, (e) => vm && presence.set(vm, e)];
}

const EMPTY: PresenceEntry[] = [];

export function LiveIndicator() {
  const status = useFeedStatus();
  const label = status === "live" ? "Live" : status === "connecting" ? "Connecting…" : "Reconnecting…";
  return (
    <span className={`live live-${status}`} role="status" title="The live change feed">
      <span className="dot" aria-hidden="true" />
      {label}
    </span>
  );
}
