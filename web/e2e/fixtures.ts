// Shared helpers: covm's URL as baseURL, the admin's API for checks, and signing in
// through the real sign-in form in a fresh browser context per user.

import { test as base, expect, type Browser, type BrowserContext, type Page } from "@playwright/test";
import { loadState, type E2eState } from "./env";

export interface VmView {
  id: string;
  name: string;
  version: number;
  config: { cpus?: number; memory_mib?: number; [k: string]: unknown };
  runtime: { power_state?: string; [k: string]: unknown };
}

export class Api {
  constructor(private s: E2eState) {}
  async call<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
    const r = await fetch(`${this.s.url}/api/v1${path}`, {
      method,
      headers: {
        authorization: `Bearer ${this.s.adminToken}`,
        "x-covm-csrf": "1",
        ...(body !== undefined ? { "content-type": "application/json" } : {}),
      },
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
    return (text ? JSON.parse(text) : null) as T;
  }
  vm(name: string) {
    return this.call<VmView>("GET", `/vms/${encodeURIComponent(name)}`);
  }
}

export interface User {
  context: BrowserContext;
  page: Page;
}

/** A fresh context signed in as `user` through the sign-in form, then on `path`. */
export async function signIn(browser: Browser, s: E2eState, user: string, path = "/"): Promise<User> {
  const context = await browser.newContext({ baseURL: s.url });
  const page = await context.newPage();
  await page.goto(`/signin?next=${encodeURIComponent(path)}`);
  await page.getByLabel("User").fill(user);
  await page.getByLabel("Password").fill(s.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL((u) => u.pathname === path.split("?")[0]);
  return { context, page };
}

/** Opens a VM page and waits for its form. */
export async function openVm(page: Page, vm: string) {
  if (new URL(page.url()).pathname !== `/vms/${vm}`) await page.goto(`/vms/${encodeURIComponent(vm)}`);
  await expect(page.getByRole("heading", { level: 1, name: vm })).toBeVisible();
  await expect(page.getByLabel("CPUs", { exact: true })).toBeVisible();
}

/** Waits until the tab's live feed is open (the header's indicator says "Live"). */
export async function feedLive(page: Page) {
  await expect(page.getByRole("status").filter({ hasText: /^Live$/ })).toBeVisible();
}

export const cpus = (page: Page) => page.getByLabel("CPUs", { exact: true });
export const memory = (page: Page) => page.getByLabel("Memory (MiB)", { exact: true });
export const saveButton = (page: Page) => page.getByRole("button", { name: "Save", exact: true });

export async function save(page: Page) {
  await saveButton(page).click();
  await expect(page.getByRole("status").filter({ hasText: /Saved as version \d+\./ })).toBeVisible();
}

export const test = base.extend<{ state: E2eState; api: Api; ann: User; bob: User }, object>({
  state: async ({}, use) => use(loadState()),
  baseURL: async ({}, use) => use(loadState().url),
  api: async ({ state }, use) => use(new Api(state)),
  ann: async ({ browser, state }, use) => {
    const u = await signIn(browser, state, "ann");
    await use(u);
    await u.context.close();
  },
  bob: async ({ browser, state }, use) => {
    const u = await signIn(browser, state, "bob");
    await use(u);
    await u.context.close();
  },
});

export { expect };
