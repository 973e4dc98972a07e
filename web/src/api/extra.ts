// Endpoints the generated types do not describe yet (the server adds them now): cookie
// sign-in, presence and console tickets. Written by hand over `request`.

import type { PresenceEntry, PresenceState } from "../feed";
import { CSRF_HEADER, request, seg } from "./client";

export interface CookieSession {
  user: string;
  expires_at: string;
  enroll_only?: boolean;
}

export interface SignInBody {
  user: string;
  password: string;
  totp?: string;
  recovery_code?: string;
}

/** `POST /session` with `cookie: true`: the server sets the HttpOnly session cookie. */
export async function signIn(body: SignInBody): Promise<CookieSession> {
  const { data } = await request<CookieSession>("/api/v1/session", {
    method: "POST",
    body: { ...body, cookie: true },
  });
  return data;
}

export async function signOut(): Promise<void> {
  await request("/api/v1/session", { method: "DELETE" });
}

export interface MfaEnrollment {
  secret: string;
  otpauth_url: string;
  recovery_codes: string[];
}

export async function mfaEnroll(user: string): Promise<MfaEnrollment> {
  return (await request<MfaEnrollment>(`/api/v1/users/${seg(user)}/mfa`, { method: "POST" })).data;
}

export async function mfaConfirm(user: string, code: string): Promise<void> {
  await request(`/api/v1/users/${seg(user)}/mfa/confirm`, { method: "POST", body: { code } });
}

export async function presencePut(vm: string, state: PresenceState): Promise<PresenceEntry[]> {
  const { data } = await request<PresenceEntry[]>(`/api/v1/vms/${seg(vm)}/presence`, {
    method: "PUT",
    body: { state },
  });
  return Array.isArray(data) ? data : [];
}

export async function presenceGet(vm: string): Promise<PresenceEntry[]> {
  const { data } = await request<PresenceEntry[]>(`/api/v1/vms/${seg(vm)}/presence`);
  return Array.isArray(data) ? data : [];
}

/** Leaves a VM page; `keepalive` lets it outlive the page (on `pagehide`). */
export function presenceDelete(vm: string, keepalive = false): void {
  void fetch(`/api/v1/vms/${seg(vm)}/presence`, {
    method: "DELETE",
    headers: { [CSRF_HEADER]: "1" },
    credentials: "same-origin",
    keepalive,
  }).catch(() => {});
}

export interface ConsoleTicket {
  ticket: string;
  expires_at: string;
}

export async function consoleTicket(vm: string): Promise<ConsoleTicket> {
  return (await request<ConsoleTicket>(`/api/v1/vms/${seg(vm)}/console/ticket`, { method: "POST" })).data;
}

/** `ws(s)://host/api/v1/vms/{vm}/console/{kind}?ticket=T` for the current page. */
export function consoleUrl(vm: string, kind: "vnc" | "serial", ticket: string): string {
  const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${window.location.host}/api/v1/vms/${seg(vm)}/console/${kind}?ticket=${encodeURIComponent(ticket)}`;
}
