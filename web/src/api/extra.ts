// Sign-in, two-factor enrollment, presence and console tickets, over the generated client (their
// bodies and answers are the OpenAPI document's), and the consoles' WebSocket URLs.

import { CSRF_HEADER, api, seg, unwrap, type Schemas } from "./client";

export type CookieSession = Schemas["SessionToken"];
export type SignInBody = Omit<Schemas["SessionCreate"], "cookie">;
export type MfaEnrollment = Schemas["MfaEnrollment"];
export type PresenceEntry = Schemas["PresenceEntry"];
export type PresenceState = Schemas["PresenceState"];
export type ConsoleTicket = Schemas["ConsoleTicket"];

/** `POST /session` with `cookie: true`: the server sets the HttpOnly session cookie. */
export async function signIn(body: SignInBody): Promise<CookieSession> {
  return unwrap(api.POST("/api/v1/session", { body: { ...body, cookie: true } }));
}

export async function signOut(): Promise<void> {
  await unwrap(api.DELETE("/api/v1/session"));
}

export async function mfaEnroll(user: string): Promise<MfaEnrollment> {
  return unwrap(api.POST("/api/v1/users/{user}/mfa", { params: { path: { user } } }));
}

export async function mfaConfirm(user: string, code: string): Promise<void> {
  await unwrap(api.POST("/api/v1/users/{user}/mfa/confirm", { params: { path: { user } }, body: { code } }));
}

export async function presencePut(vm: string, state: PresenceState): Promise<PresenceEntry[]> {
  return unwrap(api.PUT("/api/v1/vms/{vm}/presence", { params: { path: { vm } }, body: { state } }));
}

export async function presenceGet(vm: string): Promise<PresenceEntry[]> {
  return unwrap(api.GET("/api/v1/vms/{vm}/presence", { params: { path: { vm } } }));
}

/** Leaves a VM page; `keepalive` lets the request outlive the page (on `pagehide`). */
export function presenceDelete(vm: string, keepalive = false): void {
  void fetch(`/api/v1/vms/${seg(vm)}/presence`, {
    method: "DELETE",
    headers: { [CSRF_HEADER]: "1" },
    credentials: "same-origin",
    keepalive,
  }).catch(() => {});
}

export async function consoleTicket(vm: string): Promise<ConsoleTicket> {
  return unwrap(api.POST("/api/v1/vms/{vm}/console/ticket", { params: { path: { vm } } }));
}

/** `ws(s)://host/api/v1/vms/{vm}/console/{kind}?ticket=T` for the current page. */
export function consoleUrl(vm: string, kind: "vnc" | "serial", ticket: string): string {
  const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${window.location.host}/api/v1/vms/${seg(vm)}/console/${kind}?ticket=${encodeURIComponent(ticket)}`;
}
