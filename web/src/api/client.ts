// The API client: openapi-fetch over the generated types, plus a small hand-written
// `request` for the calls that carry covm's own headers (If-Match, Covm-Lease) and read the
// answer's ETag. Every call is same-origin under /api/v1 with the session cookie; every
// request that is not GET/HEAD carries the CSRF header.

import createClient, { type Middleware } from "openapi-fetch";
import type { components, paths } from "./schema";

export type Schemas = components["schemas"];
export type VmView = Schemas["VmView"];
export type VmConfig = Schemas["VmConfig"];
export type DiskView = Schemas["DiskView"];
export type TaskView = Schemas["TaskView"];
export type EventView = Schemas["EventView"];
export type Privilege = Schemas["Privilege"];
export type LeaseView = Schemas["LeaseView"];
export type ObjectRef = Schemas["ObjectRef"];

export const CSRF_HEADER = "X-Covm-Csrf";

/** An error answer of the API (or a network failure, with status 0). */
export class ApiError extends Error {
  status: number;
  code: string;
  field?: string | null;
  details?: unknown;

  constructor(status: number, code: string, message: string, field?: string | null, details?: unknown) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field;
    this.details = details;
  }

  static async fromResponse(res: Response): Promise<ApiError> {
    let body: unknown = undefined;
    try {
      body = await res.clone().json();
    } catch {
      /* not JSON */
    }
    return ApiError.fromBody(res.status, body, res.statusText);
  }

  static fromBody(status: number, body: unknown, fallback?: string): ApiError {
    const err = (body as { error?: { code?: string; message?: string; field?: string | null; details?: unknown } })
      ?.error;
    if (err && typeof err.message === "string") {
      return new ApiError(status, err.code ?? "unknown", err.message, err.field, err.details);
    }
    return new ApiError(status, "unknown", `The server answered ${status}${fallback ? ` ${fallback}` : ""}.`);
  }
}

type UnauthenticatedHandler = () => void;
let onUnauthenticated: UnauthenticatedHandler = () => {};

/** Set by the app: called on any 401 (except from the sign-in call itself). */
export function setUnauthenticatedHandler(h: UnauthenticatedHandler) {
  onUnauthenticated = h;
}

function needsCsrf(method: string | undefined): boolean {
  const m = (method ?? "GET").toUpperCase();
  return m !== "GET" && m !== "HEAD";
}

function isSignIn(url: string, method: string): boolean {
  return method.toUpperCase() === "POST" && new URL(url, "http://x").pathname === "/api/v1/session";
}

function noticeUnauthenticated(url: string, method: string, status: number) {
  if (status === 401 && !isSignIn(url, method)) onUnauthenticated();
}

const middleware: Middleware = {
  onRequest({ request }) {
    if (needsCsrf(request.method)) request.headers.set(CSRF_HEADER, "1");
    return request;
  },
  onResponse({ request, response }) {
    noticeUnauthenticated(request.url, request.method, response.status);
    return response;
  },
};

function origin(): string {
  return typeof window !== "undefined" ? window.location.origin : "http://localhost";
}

export const api = createClient<paths>({
  baseUrl: origin(),
  credentials: "same-origin",
});
api.use(middleware);

/**
 * Unwraps an openapi-fetch result: the data, or throws an ApiError. Use as
 * `await unwrap(api.GET("/api/v1/vms"))`.
 */
export async function unwrap<T>(
  p: Promise<{ data?: T; error?: unknown; response: Response }>,
): Promise<T> {
  const { data, error, response } = await p;
  if (!response.ok) throw ApiError.fromBody(response.status, error, response.statusText);
  return data as T;
}

export interface RequestOptions {
  method?: string;
  body?: unknown;
  headers?: Record<string, string>;
  contentType?: string;
  keepalive?: boolean;
}

/** A hand-written request: JSON in, `{data, response}` out, or throws an ApiError. */
export async function request<T = unknown>(
  path: string,
  opts: RequestOptions = {},
): Promise<{ data: T; response: Response }> {
  const method = opts.method ?? "GET";
  const headers: Record<string, string> = { Accept: "application/json", ...opts.headers };
  if (needsCsrf(method)) headers[CSRF_HEADER] = "1";
  let body: string | undefined;
  if (opts.body !== undefined) {
    headers["Content-Type"] = opts.contentType ?? "application/json";
    body = JSON.stringify(opts.body);
  }
  let res: Response;
  try {
    res = await fetch(path, { method, headers, body, credentials: "same-origin", keepalive: opts.keepalive });
  } catch (e) {
    throw new ApiError(0, "network", `The server cannot be reached (${(e as Error).message}).`);
  }
  noticeUnauthenticated(path, method, res.status);
  if (!res.ok) throw await ApiError.fromResponse(res);
  let data: unknown = undefined;
  if (res.status !== 204) {
    const text = await res.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = text;
      }
    }
  }
  return { data: data as T, response: res };
}

/** The version in an `ETag` header (`"7"`, `W/"7"`, `7`). */
export function etagVersion(res: Response): number | null {
  const raw = res.headers.get("ETag");
  if (!raw) return null;
  const m = raw.match(/(\d+)/);
  return m ? Number(m[1]) : null;
}

/** A path segment, escaped. */
export function seg(s: string | number): string {
  return encodeURIComponent(String(s));
}
