// Measures the web UI against a real covm (simulated VMs, no QEMU):
//   (i)   the initial JS: gzip -9 sizes of the scripts web/dist/index.html loads at once
//   (ii)  time to the first VM list: a fresh, signed-in context, goto('/') → a VM row shown
//   (iii) save → other browser: ann saves CPUs, until bob's open page shows the new value
//
//   cd web && node bench/live.mjs       (COVM_BIN overrides ../target/debug/covm;
//                                         CHROMIUM_BIN overrides /usr/bin/chromium;
//                                         RUNS_LIST=10 RUNS_SAVE=50 change the counts)

import { spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";
import { CHROMIUM, CHROMIUM_ARGS as ARGS } from "../e2e/chromium.mjs";

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const BIN = resolve(WEB, process.env.COVM_BIN ?? "../target/debug/covm");
const RUNS_LIST = Number(process.env.RUNS_LIST ?? 10);
const RUNS_SAVE = Number(process.env.RUNS_SAVE ?? 50);
const PASSWORD = "bench-password-1";
const VM = "bench-vm";

// ---------------------------------------------------------------- (i) initial JS

function initialScripts(html) {
  const out = [];
  for (const tag of html.match(/<(script|link)\b[^>]*>/g) ?? []) {
    const attr = (name) => tag.match(new RegExp(`\\s${name}="([^"]*)"`))?.[1];
    if (tag.startsWith("<script") && attr("src")) out.push(attr("src"));
    if (tag.startsWith("<link") && attr("rel") === "modulepreload" && attr("href")) out.push(attr("href"));
  }
  return out;
}

function initialJs() {
  const html = readFileSync(join(WEB, "dist/index.html"), "utf8");
  const files = initialScripts(html).map((src) => {
    const bytes = readFileSync(join(WEB, "dist", src.replace(/^\//, "")));
    return { src, raw: bytes.length, gzip: gzipSync(bytes, { level: 9 }).length };
  });
  return { html, files, gzip: files.reduce((s, f) => s + f.gzip, 0), raw: files.reduce((s, f) => s + f.raw, 0) };
}

// ---------------------------------------------------------------- covm

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

async function startCovm() {
  const root = mkdtempSync(join(tmpdir(), "covm-bench-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const out = openSync(join(root, "covm.log"), "a");
  // The rate limits raised: this measures the UI and the feed, not the throttle.
  const child = spawn(
    BIN,
    ["serve", "--data-dir", join(root, "data"), "--listen", `127.0.0.1:${port}`, "--driver", "sim",
     "--rate-limit", "10000", "--rate-burst", "10000"],
    { detached: true, stdio: ["ignore", out, out] },
  );
  child.unref();
  const stop = () => {
    try {
      process.kill(-child.pid, "SIGTERM");
    } catch {
      /* gone */
    }
    rmSync(root, { recursive: true, force: true });
  };
  const end = Date.now() + 30_000;
  for (;;) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) break;
    } catch {
      /* not yet */
    }
    if (Date.now() > end) {
      stop();
      throw new Error(`covm did not start (${BIN})`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, root, stop };
}

async function session(url, user, password, cookie = false) {
  const r = await fetch(`${url}/api/v1/session`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-covm-csrf": "1" },
    body: JSON.stringify({ user, password, ...(cookie ? { cookie: true } : {}) }),
  });
  if (!r.ok) throw new Error(`sign-in ${user}: ${r.status} ${await r.text()}`);
  if (!cookie) return (await r.json()).token;
  const set = r.headers.get("set-cookie") ?? "";
  const [nv] = set.split(";");
  const i = nv.indexOf("=");
  return { name: nv.slice(0, i), value: nv.slice(i + 1), url, httpOnly: true, sameSite: "Strict" };
}

async function api(url, token, method, path, body) {
  const r = await fetch(`${url}/api/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "x-covm-csrf": "1", "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

// ---------------------------------------------------------------- helpers

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
/** Nearest-rank percentile. */
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
};

async function signedInPage(browser, url, cookie) {
  const context = await browser.newContext({ baseURL: url });
  await context.addCookies([cookie]);
  return { context, page: await context.newPage() };
}

// ---------------------------------------------------------------- main

const js = initialJs();
const covm = await startCovm();
let browser;
try {
  const admin = await session(covm.url, "admin", readFileSync(join(covm.root, "data/initial-admin-password"), "utf8").trim());
  for (const u of ["ann", "bob"]) {
    await api(covm.url, admin, "POST", "/users", { name: u, password: PASSWORD });
    await api(covm.url, admin, "POST", "/permissions", { principal: u, role: "Admin", object: "/" });
  }
  await api(covm.url, admin, "POST", "/vms", { name: VM, memory_mib: 64 });
  const served = await (await fetch(`${covm.url}/`)).text();
  const sameUi = JSON.stringify(initialScripts(served)) === JSON.stringify(initialScripts(js.html));

  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });

  // (ii) time to the first VM list, a fresh context each run (cold cache, signed in).
  const annCookie = await session(covm.url, "ann", PASSWORD, true);
  const listMs = [];
  for (let i = 0; i < RUNS_LIST + 1; i++) {
    const { context, page } = await signedInPage(browser, covm.url, annCookie);
    const t0 = performance.now();
    await page.goto("/");
    await page.locator(`table tbody tr a[href="/vms/${VM}"]`).waitFor({ state: "visible", timeout: 15_000 });
    const ms = performance.now() - t0;
    if (i > 0) listMs.push(ms); // the first run warms Chromium and the server up
    await context.close();
  }

  // (iii) save in ann's browser → bob's browser shows it.
  const ann = await signedInPage(browser, covm.url, annCookie);
  const bob = await signedInPage(browser, covm.url, await session(covm.url, "bob", PASSWORD, true));
  for (const u of [ann, bob]) {
    await u.page.goto(`/vms/${VM}`);
    await u.page.getByLabel("CPUs", { exact: true }).waitFor();
    await u.page.getByRole("status").filter({ hasText: /^Live$/ }).waitFor();
  }
  // t0 in ann's page: the moment the form is submitted.
  await ann.page.evaluate(() => {
    document.querySelector('form[aria-label="Configuration"]').addEventListener(
      "submit",
      () => {
        window.__t0 = Date.now();
      },
      true,
    );
  });
  const annCpus = ann.page.getByLabel("CPUs", { exact: true });
  const annSave = ann.page.getByRole("button", { name: "Save", exact: true });
  const saveMs = [];
  let current = Number(await annCpus.inputValue());
  for (let i = 0; i < RUNS_SAVE; i++) {
    const want = (current % 8) + 1 === current ? current + 1 : (current % 8) + 1;
    // t1 in bob's page: the first DOM change after which his CPUs input holds the value.
    const seen = bob.page.evaluate(
      (want) =>
        new Promise((ok) => {
          const input = [...document.querySelectorAll("label")]
            .find((l) => l.firstChild?.textContent?.trim() === "CPUs")
            ?.querySelector("input");
          const check = () => {
            if (input && input.value === String(want)) {
              const t = Date.now();
              mo.disconnect();
              clearInterval(iv);
              ok(t);
            }
          };
          const mo = new MutationObserver(check);
          mo.observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
          const iv = setInterval(check, 2);
        }),
      want,
    );
    await annCpus.fill(String(want));
    await annSave.click();
    const t1 = await seen;
    const t0 = await ann.page.evaluate(() => window.__t0);
    saveMs.push(t1 - t0);
    await ann.page.getByRole("status").filter({ hasText: /Saved as version \d+\./ }).waitFor();
    current = want;
  }

  const f = (x) => x.toFixed(0).padStart(7);
  console.log("");
  console.log("covm web UI — loopback, covm --driver sim, Chromium headless");
  console.log("measure                                   value");
  console.log("----------------------------------------  ---------------");
  console.log(`initial JS (gzip -9, ${js.files.length} files)               ${(js.gzip / 1024).toFixed(1).padStart(7)} kB  (raw ${(js.raw / 1024).toFixed(1)} kB)`);
  console.log(`time to first VM list, median of ${String(listMs.length).padEnd(2)}      ${f(median(listMs))} ms  (min ${listMs.length ? Math.min(...listMs).toFixed(0) : "-"}, max ${listMs.length ? Math.max(...listMs).toFixed(0) : "-"})`);
  console.log(`save → other browser, p50 of ${String(saveMs.length).padEnd(2)}          ${f(pct(saveMs, 50))} ms`);
  console.log(`save → other browser, p99 of ${String(saveMs.length).padEnd(2)}          ${f(pct(saveMs, 99))} ms  (max ${Math.max(...saveMs)})`);
  console.log("");
  for (const x of js.files) console.log(`  ${x.src}: ${(x.gzip / 1024).toFixed(1)} kB gzip`);
  if (!sameUi) console.log("  note: covm serves another build than web/dist (rebuild covm to embed it)");
  console.log("");
  console.log("reproduce: cd web && node bench/live.mjs   (COVM_BIN=... to pick the covm binary)");
} finally {
  await browser?.close();
  covm.stop();
}
