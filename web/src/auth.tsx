// The signed-in user and their privileges on an object (`GET /session?object=`).

import { useQuery, useQueryClient } from "@tanstack/react-query";
import { useEffect, type ReactNode } from "react";
import { Navigate, useLocation, useNavigate } from "react-router";
import { api, ApiError, setUnauthenticatedHandler, unwrap, type Privilege, type Schemas } from "./api/client";

export type Whoami = Schemas["Whoami"];

export function whoamiQuery(object?: string | null) {
  const obj = object || "/";
  return {
    queryKey: ["session", obj] as const,
    queryFn: () =>
      unwrap(api.GET("/api/v1/session", { params: { query: object ? { object } : {} } })) as Promise<Whoami>,
    staleTime: 30_000,
    retry: (n: number, e: Error) => !(e instanceof ApiError && e.status < 500) && n < 2,
  };
}

export function useWhoami(object?: string | null) {
  return useQuery(whoamiQuery(object));
}

export interface Privileges {
  loading: boolean;
  can: (p: Privilege) => boolean;
  /** Props for a control that needs `p`: disabled with a title saying why. */
  need: (p: Privilege | Privilege[], busy?: boolean) => { disabled: boolean; title?: string };
}

/** My effective privileges on `object` (an id or path; the root when none). */
export function usePrivileges(object?: string | null): Privileges {
  const q = useWhoami(object);
  const set = new Set<string>(q.data?.privileges ?? []);
  const can = (p: Privilege) => set.has(p);
  return {
    loading: q.isLoading,
    can,
    need: (p, busy) => {
      const list = Array.isArray(p) ? p : [p];
      const missing = list.filter((x) => !set.has(x));
      if (q.isLoading) return { disabled: true, title: "Checking your privileges…" };
      if (missing.length) return { disabled: true, title: `You lack the privilege ${missing.join(", ")}` };
      return { disabled: !!busy };
    },
  };
}

const ENROLL_KEY = "covm-enroll-only";

export function setEnrollOnly(user: string | null) {
  if (user) sessionStorage.setItem(ENROLL_KEY, user);
  else sessionStorage.removeItem(ENROLL_KEY);
}

export function enrollOnlyUser(): string | null {
  return sessionStorage.getItem(ENROLL_KEY);
}

export function signInPath(next: string): string {
  return next && next !== "/" ? `/signin?next=${encodeURIComponent(next)}` : "/signin";
}

/** Sends any 401 to the sign-in page, keeping the path to return to. */
export function UnauthenticatedRedirect() {
  const navigate = useNavigate();
  const qc = useQueryClient();
  useEffect(() => {
    setUnauthenticatedHandler(() => {
      const here = window.location.pathname + window.location.search;
      if (window.location.pathname === "/signin") return;
      qc.removeQueries({ queryKey: ["session"] });
      navigate(signInPath(here), { replace: true });
    });
    return () => setUnauthenticatedHandler(() => {});
  }, [navigate, qc]);
  return null;
}

/** Renders its children only for a signed-in user. */
export function RequireSession({ children }: { children: ReactNode }) {
  const q = useWhoami();
  const loc = useLocation();
  // An enroll-only session (a policy requires two-factor sign-in first), as this tab noted at
  // sign-in or as the server says of the session (after a reload in a new tab).
  if (q.data?.enroll_only && !enrollOnlyUser()) setEnrollOnly(q.data.user.name);
  if (enrollOnlyUser()) return <Navigate to={`/enroll?next=${encodeURIComponent(loc.pathname + loc.search)}`} replace />;
  if (q.isLoading) return <p className="loading">Loading…</p>;
  if (q.error) {
    if (q.error instanceof ApiError && q.error.status === 401) {
      return <Navigate to={signInPath(loc.pathname + loc.search)} replace />;
    }
    return (
      <div className="center-page">
        <p role="alert" className="error">
          {q.error.message}
        </p>
      </div>
    );
  }
  return <>{children}</>;
}
