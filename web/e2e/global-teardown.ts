// Powers the VMs off, ends covm and every process it started (QEMU), removes the temp dir
// (kept when COVM_E2E_KEEP=1, e.g. to read covm.log).

import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { loadState, STATE_ENV } from "./env";

function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/^\S+ \(.*\) Z/.test(stat);
  } catch {
    return false;
  }
}

/** Every process below `pid` (QEMU may run in a session of its own). */
function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(d)]);
    } catch {
      // gone
    }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      out.push(c);
      walk(c);
    }
  };
  walk(pid);
  return out;
}

function kill(pid: number, sig: NodeJS.Signals) {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

export default async function globalTeardown() {
  if (!process.env[STATE_ENV] || !existsSync(process.env[STATE_ENV]!)) return;
  const s = loadState();
  if (s.adminToken) {
    const headers = { authorization: `Bearer ${s.adminToken}`, "x-covm-csrf": "1", "content-type": "application/json" };
    for (const id of Object.values(s.vms)) {
      try {
        const vm = await (await fetch(`${s.url}/api/v1/vms/${id}`, { headers })).json();
        if (vm?.runtime?.power_state && vm.runtime.power_state !== "off") {
          await fetch(`${s.url}/api/v1/vms/${id}/power`, { method: "POST", headers, body: JSON.stringify({ action: "off" }) });
        }
      } catch {
        // covm may be gone already
      }
    }
  }
  const kids = descendants(s.pid);
  // The process group first (covm was started detached: its pid is the group id).
  try {
    process.kill(-s.pid, "SIGTERM");
  } catch {
    kill(s.pid, "SIGTERM");
  }
  const end = Date.now() + 10_000;
  while (alive(s.pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
  for (const p of [s.pid, ...kids]) if (alive(p)) kill(p, "SIGKILL");
  if (process.env.COVM_E2E_KEEP === "1") console.log(`kept ${s.root}`);
  else rmSync(s.root, { recursive: true, force: true });
}
