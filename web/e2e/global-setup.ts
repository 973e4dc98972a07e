// Starts a real covm (QEMU driver) on loopback with a fresh data directory, creates the
// users and VMs the tests use, and writes what the tests need to a JSON file whose path
// goes to the tests in COVM_E2E_STATE.

import { execFileSync, spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { STATE_ENV, type E2eState } from "./env";

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const REPO = resolve(WEB, "..");
export const PASSWORD = "e2e-password-1";

/** One plain VM per test that edits, so that the tests do not see each other's versions. */
export const PLAIN_VMS = ["vm-live", "vm-presence", "vm-merge", "vm-conflict", "vm-history", "vm-readonly", "vm-offline"];

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => ok(port));
    });
  });
}

async function waitHealthy(url: string, log: string, timeoutMs = 30_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      const r = await fetch(`${url}/healthz`);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > end) throw new Error(`covm did not become healthy at ${url} (log: ${log})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function api<T = unknown>(url: string, token: string, method: string, path: string, body?: unknown): Promise<T> {
  const r = await fetch(`${url}/api/v1${path}`, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      "x-covm-csrf": "1",
      ...(body !== undefined ? { "content-type": "application/json" } : {}),
    },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return (text ? JSON.parse(text) : null) as T;
}

export default async function globalSetup() {
  const bin = resolve(WEB, process.env.COVM_BIN ?? "../target/debug/covm");
  if (!existsSync(bin)) throw new Error(`no covm binary at ${bin} (set COVM_BIN)`);
  // COVM_SKIP_QEMU (a machine without QEMU, as for scripts/test): no guest; the console test is left out.
  const qemu = !process.env.COVM_SKIP_QEMU;
  const guest = join(REPO, "target/test-guest");
  if (qemu && (!existsSync(join(guest, "vmlinuz")) || !existsSync(join(guest, "initrd.img")))) {
    execFileSync(join(REPO, "scripts/build-test-guest"), ["target/test-guest"], { cwd: REPO, stdio: "inherit" });
  }

  const root = mkdtempSync(join(tmpdir(), "covm-e2e-"));
  const dataDir = join(root, "data");
  mkdirSync(dataDir);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const log = join(root, "covm.log");
  const out = openSync(log, "a");
  // Its own process group, so that the teardown can end covm and its QEMU children together.
  const child = spawn(bin, ["serve", "--data-dir", dataDir, "--listen", `127.0.0.1:${port}`, "--driver", "qemu"], {
    detached: true,
    stdio: ["ignore", out, out],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" },
  });
  child.unref();
  const state: E2eState = { url, root, dataDir, pid: child.pid!, adminToken: "", password: PASSWORD, vms: {} };
  const stateFile = join(root, "state.json");
  // Written at once so that the teardown finds covm even when the rest of the setup fails.
  writeFileSync(stateFile, JSON.stringify(state, null, 2));
  process.env[STATE_ENV] = stateFile;

  await waitHealthy(url, log);
  const adminPassword = readFileSync(join(dataDir, "initial-admin-password"), "utf8").trim();
  const session = await fetch(`${url}/api/v1/session`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-covm-csrf": "1" },
    body: JSON.stringify({ user: "admin", password: adminPassword }),
  });
  if (!session.ok) throw new Error(`admin sign-in: ${session.status} ${await session.text()}`);
  const token = ((await session.json()) as { token: string }).token;
  state.adminToken = token;

  const roles = await api<{ items: { name: string }[] } | { name: string }[]>(url, token, "GET", "/roles");
  const names = (Array.isArray(roles) ? roles : roles.items).map((r) => r.name);
  for (const want of ["Admin", "ReadOnly"]) {
    if (!names.includes(want)) throw new Error(`no role ${want} (roles: ${names.join(", ")})`);
  }
  for (const [user, role] of [
    ["ann", "Admin"],
    ["bob", "Admin"],
    ["rita", "ReadOnly"],
  ]) {
    await api(url, token, "POST", "/users", { name: user, password: PASSWORD });
    await api(url, token, "POST", "/permissions", { principal: user, role, object: "/" });
  }

  // The QEMU test guest (scripts/build-test-guest): a kernel and an initrd with busybox on ttyS0.
  if (qemu) {
    const ds = join(dataDir, "datastores/local/guest");
    mkdirSync(ds, { recursive: true });
    for (const f of ["vmlinuz", "initrd.img"]) copyFileSync(join(guest, f), join(ds, f));
    const g = await api<{ id: string }>(url, token, "POST", "/vms", {
      name: "guest1",
      memory_mib: 128,
      kernel: "local:guest/vmlinuz",
      initrd: "local:guest/initrd.img",
      cmdline: "console=ttyS0 quiet panic=-1",
    });
    state.vms.guest1 = g.id;
  }
  for (const name of PLAIN_VMS) {
    const vm = await api<{ id: string }>(url, token, "POST", "/vms", { name, memory_mib: 64 });
    state.vms[name] = vm.id;
  }
  writeFileSync(stateFile, JSON.stringify(state, null, 2));
  console.log(`covm ${bin} on ${url} (data ${dataDir}, log ${log})`);
}
