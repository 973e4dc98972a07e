import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { lazy, Suspense, useEffect, useState } from "react";
import { useNavigate, useParams } from "react-router";
import { api, ApiError, request, seg, unwrap, type LeaseView, type VmView } from "../api/client";
import { presenceDelete, presenceGet, presencePut } from "../api/extra";
import { usePrivileges, useWhoami, type Privileges } from "../auth";
import { ErrorMessage, TabBar, useUrlTab, fmtTime, Loading, PowerBadge, TaskFollow } from "../components/common";
import { othersPresent, type PresenceState } from "../feed";
import { useFeedFilter, usePresenceEntries } from "../live";
import { VmConfigForm } from "./VmConfigForm";
import { VmHistory } from "./VmHistory";

const Consoles = lazy(() => import("./Consoles"));

export function vmQuery(name: string) {
  return {
    queryKey: ["vm", name],
    queryFn: () => unwrap(api.GET("/api/v1/vms/{vm}", { params: { path: { vm: name } } })),
  };
}

const HEARTBEAT_MS = 10_000;

/** Tells the server I am on this VM's page, every 10 s, and that I left. */
function usePresenceHeartbeat(vmId: string | undefined, state: PresenceState) {
  const [, setEntries] = usePresenceEntries(vmId);
  useEffect(() => {
    if (!vmId) return;
    let stopped = false;
    const beat = () =>
      presencePut(vmId, state)
        .then((e) => !stopped && setEntries(e))
        .catch(() => {});
    void beat();
    const t = setInterval(beat, HEARTBEAT_MS);
    return () => {
      stopped = true;
      clearInterval(t);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [vmId, state]);
  useEffect(() => {
    if (!vmId) return;
    presenceGet(vmId)
      .then(setEntries)
      .catch(() => {});
    const onHide = () => presenceDelete(vmId, true);
    window.addEventListener("pagehide", onHide);
    return () => {
      window.removeEventListener("pagehide", onHide);
      presenceDelete(vmId);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [vmId]);
}

function ViewingNow({ vmId, me }: { vmId: string; me: string | undefined }) {
  const [entries] = usePresenceEntries(vmId);
  const others = othersPresent(entries, me);
  return (
    <section aria-label="Viewing now" className="presence">
      <span className="muted">Viewing now:</span>{" "}
      {others.length === 0 ? (
        <span className="muted">only you</span>
      ) : (
        <ul className="inline">
          {others.map((e) => (
            <li key={e.user} className={`presence-${e.state}`} title={`since ${fmtTime(e.since)}`}>
              {e.user} <span className="muted">({e.state})</span>
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}

function LeasePanel({
  vm,
  me,
  privs,
  token,
  setToken,
}: {
  vm: VmView;
  me: string | undefined;
  privs: Privileges;
  token: number | null;
  setToken: (t: number | null) => void;
}) {
  const qc = useQueryClient();
  const [ttl, setTtl] = useState(900);
  const lease = vm.lease;
  const mine = !!lease && lease.holder === me;
  const path = `/api/v1/vms/${seg(vm.id)}/lease`;
  const m = useMutation({
    mutationFn: async (op: "acquire" | "renew" | "release" | "break") => {
      if (op === "acquire") return (await request<LeaseView>(path, { method: "POST", body: { ttl_s: ttl } })).data;
      if (op === "renew")
        return (
          await request<LeaseView>(path, {
            method: "PUT",
            body: { ttl_s: ttl },
            headers: token !== null ? { "Covm-Lease": String(token) } : {},
          })
        ).data;
      await request(op === "break" ? `${path}?force=true` : path, { method: "DELETE" });
      return null;
    },
    onSuccess: (l) => {
      setToken(l?.token ?? null);
      void qc.invalidateQueries({ queryKey: ["vm"] });
    },
  });
  const edit = privs.need("VirtualMachine.Config.Edit", m.isPending);
  return (
    <section aria-label="Lease" className="panel lease">
      <h3>Edit lease</h3>
      {lease ? (
        <p>
          {mine ? "You hold the lease" : <>Leased by <strong>{lease.holder}</strong></>} until {fmtTime(lease.expires_at)}
          {mine && token !== null ? <span className="muted"> (fencing token {token})</span> : null}
        </p>
      ) : (
        <p className="muted">Nobody holds the lease.</p>
      )}
      <div className="row">
        <label>
          Lease time
          <select value={ttl} onChange={(e) => setTtl(Number(e.target.value))}>
            <option value={300}>5 minutes</option>
            <option value={900}>15 minutes</option>
            <option value={1800}>30 minutes</option>
            <option value={3600}>1 hour</option>
          </select>
        </label>
        {!lease ? (
          <button type="button" {...edit} onClick={() => m.mutate("acquire")}>
            Acquire lease
          </button>
        ) : mine ? (
          <>
            <button type="button" {...edit} onClick={() => m.mutate("renew")}>
              Renew lease
            </button>
            <button type="button" disabled={m.isPending} onClick={() => m.mutate("release")}>
              Release lease
            </button>
          </>
        ) : (
          <button type="button" {...privs.need("VirtualMachine.Lease.Break", m.isPending)} onClick={() => m.mutate("break")}>
            Break lease
          </button>
        )}
      </div>
      <ErrorMessage error={m.error} />
    </section>
  );
}

const POWER: { action: "on" | "shutdown" | "off" | "reset"; label: string; priv: Parameters<Privileges["need"]>[0]; when: (s: string) => boolean }[] = [
  { action: "on", label: "Power on", priv: "VirtualMachine.Interact.PowerOn", when: (s) => s === "off" || s === "crashed" },
  { action: "shutdown", label: "Shut down", priv: "VirtualMachine.Interact.PowerOff", when: (s) => s === "running" },
  { action: "off", label: "Power off", priv: "VirtualMachine.Interact.PowerOff", when: (s) => s !== "off" },
  { action: "reset", label: "Reset", priv: "VirtualMachine.Interact.Reset", when: (s) => s === "running" || s === "paused" },
];

function PowerPanel({ vm, privs }: { vm: VmView; privs: Privileges }) {
  const qc = useQueryClient();
  const [task, setTask] = useState<string | null>(null);
  const m = useMutation({
    mutationFn: (action: "on" | "shutdown" | "off" | "reset") =>
      unwrap(api.POST("/api/v1/vms/{vm}/power", { params: { path: { vm: vm.id } }, body: { action } })),
    onSuccess: (t) => {
      setTask(t?.id ?? null);
      void qc.invalidateQueries({ queryKey: ["vm"] });
      void qc.invalidateQueries({ queryKey: ["tasks"] });
    },
  });
  const state = vm.runtime.power_state ?? "off";
  return (
    <section aria-label="Power" className="panel">
      <h3>Power</h3>
      <div className="row">
        <PowerBadge state={state} />
        {POWER.map((p) => {
          const n = privs.need(p.priv, m.isPending);
          const off = !p.when(state) || !!vm.config.template;
          return (
            <button
              key={p.action}
              type="button"
              disabled={n.disabled || off}
              title={
                n.title ??
                (vm.config.template ? "A template is never powered on: clone it" : off ? `Not while the VM is ${state}` : undefined)
              }
              onClick={() => m.mutate(p.action)}
            >
              {p.label}
            </button>
          );
        })}
      </div>
      {task ? <TaskFollow id={task} /> : null}
      <ErrorMessage error={m.error} />
    </section>
  );
}

/** Make a template of the VM; clone it (linked from a template), with a user and an SSH key for cloud-init. */
function ProvisionPanel({ vm, privs }: { vm: VmView; privs: Privileges }) {
  const qc = useQueryClient();
  const navigate = useNavigate();
  const isTemplate = !!vm.config.template;
  const [name, setName] = useState("");
  const [linked, setLinked] = useState(true);
  const [user, setUser] = useState("");
  const [key, setKey] = useState("");
  const template = useMutation({
    mutationFn: () => unwrap(api.POST("/api/v1/vms/{vm}/template", { params: { path: { vm: vm.id } } })),
    onSuccess: () => void qc.invalidateQueries({ queryKey: ["vm"] }),
  });
  const clone = useMutation({
    mutationFn: () =>
      unwrap(
        api.POST("/api/v1/vms/{vm}/clone", {
          params: { path: { vm: vm.id } },
          body: {
            name,
            linked: isTemplate ? linked : false,
            customize: user ? { users: [{ name: user, ssh_authorized_keys: key.trim() ? [key.trim()] : [], sudo: true }] } : undefined,
          },
        }),
      ),
    onSuccess: (v) => {
      void qc.invalidateQueries({ queryKey: ["vms"] });
      if (v) navigate(`/vms/${encodeURIComponent(v.name)}`);
    },
  });
  const off = (vm.runtime.power_state ?? "off") === "off";
  const mark = privs.need("VirtualMachine.Provisioning.MarkAsTemplate", template.isPending);
  const can = privs.need(isTemplate ? "VirtualMachine.Provisioning.DeployTemplate" : "VirtualMachine.Provisioning.Clone", clone.isPending);
  return (
    <section aria-label="Clone" className="panel">
      <h3>{isTemplate ? "Deploy from this template" : "Clone"}</h3>
      {!isTemplate ? (
        <div className="row">
          <button
            type="button"
            disabled={mark.disabled || !off}
            title={mark.title ?? (off ? undefined : "Power the VM off first")}
            onClick={() => template.mutate()}
          >
            Make template
          </button>
        </div>
      ) : null}
      <form
        className="stack"
        onSubmit={(e) => {
          e.preventDefault();
          clone.mutate();
        }}
      >
        <label>
          New VM name
          <input value={name} onChange={(e) => setName(e.target.value)} required />
        </label>
        {isTemplate ? (
          <label className="check">
            <input type="checkbox" checked={linked} onChange={(e) => setLinked(e.target.checked)} /> Linked clone (qcow2
            overlays on the template&apos;s disks)
          </label>
        ) : null}
        <label>
          Guest user (cloud-init)
          <input value={user} onChange={(e) => setUser(e.target.value)} placeholder="optional" />
        </label>
        <label>
          SSH public key
          <textarea value={key} onChange={(e) => setKey(e.target.value)} rows={2} placeholder="ssh-ed25519 AAAA… you@host" />
        </label>
        <div className="row">
          <button type="submit" {...can}>
            Clone
          </button>
        </div>
      </form>
      <ErrorMessage error={template.error ?? clone.error} />
    </section>
  );
}

function PendingChanges({ vm }: { vm: VmView }) {
  const running = vm.runtime.running_version;
  const pending = running !== null && running !== undefined && running < vm.version;
  const q = useQuery({
    queryKey: ["vm-versions", vm.id, "diff", running, vm.version],
    queryFn: () =>
      unwrap(api.GET("/api/v1/vms/{vm}/diff", { params: { path: { vm: vm.id }, query: { from: running!, to: vm.version } } })),
    enabled: pending,
  });
  if (!pending) return null;
  return (
    <div className="pending-box" aria-label="Pending changes">
      <strong>Pending until the next power cycle</strong> (running version {running}, config version {vm.version}):
      <ErrorMessage error={q.error} />
      <ul>{q.data?.summary.map((l) => <li key={l}>{l}</li>)}</ul>
    </div>
  );
}

function Summary({ vm }: { vm: VmView }) {
  const r = vm.runtime;
  const rows: [string, React.ReactNode][] = [
    ["Power state", <PowerBadge state={r.power_state} />],
    ["Host", r.host ?? "—"],
    ["Node", r.node ?? "—"],
    ["PID", r.pid ?? "—"],
    ["Since", fmtTime(r.since)],
    ["Acceleration", r.accel ?? "—"],
    ["Config version", vm.version],
    ["Running version", r.running_version ?? "—"],
    ["Generation", r.generation ?? 0],
    ["Path", vm.path],
    ["CPUs", vm.config.cpus ?? "—"],
    ["Memory", vm.config.memory_mib ? `${vm.config.memory_mib} MiB` : "—"],
    ["Machine / firmware", `${vm.config.machine ?? "—"} / ${vm.config.firmware ?? "—"}`],
  ];
  if (r.simulated) rows.push(["Driver", "simulated (no QEMU process)"]);
  if (vm.config.template) rows.push(["Template", "yes: read-only, the source of clones"]);
  const g = r.guest;
  if (g) {
    const ips = (g.interfaces ?? []).flatMap((i) => i.addresses ?? []).filter((a) => !a.startsWith("fe80"));
    rows.push([
      "Guest",
      g.agent ? `${ips.join(", ") || "no address yet"}${g.hostname ? ` (${g.hostname})` : ""}${g.os ? ` — ${g.os}` : ""}` : "no guest agent",
    ]);
  }
  return (
    <section aria-label="Summary" className="panel">
      <h3>Summary</h3>
      <table className="kv">
        <tbody>
          {rows.map(([k, v]) => (
            <tr key={k}>
              <th scope="row">{k}</th>
              <td>{v}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <PendingChanges vm={vm} />
    </section>
  );
}

type Tab = "summary" | "history" | "console";
const TABS: [Tab, string][] = [
  ["summary", "Summary"],
  ["history", "History"],
  ["console", "Console"],
];

export function VmPage() {
  const { name = "" } = useParams();
  const [tab, setTab] = useUrlTab<Tab>("summary");
  const q = useQuery(vmQuery(name));
  const vm = q.data;
  const me = useWhoami().data?.user.name;
  const privs = usePrivileges(vm?.id);
  const [dirty, setDirty] = useState(false);
  const [token, setToken] = useState<number | null>(null);
  useFeedFilter(vm?.id);
  usePresenceHeartbeat(vm?.id, dirty ? "editing" : "viewing");

  // The fencing token: from my acquire/renew, or from the VM view (only its holder sees it).
  const leaseToken = vm?.lease && vm.lease.holder === me ? (vm.lease.token ?? token) : null;
  useEffect(() => {
    if (vm && (!vm.lease || vm.lease.holder !== me)) setToken(null);
  }, [vm, me]);

  if (q.error) {
    if (q.error instanceof ApiError && q.error.status === 404) {
      return (
        <section>
          <h1>{name}</h1>
          <ErrorMessage error={q.error} />
        </section>
      );
    }
    return <ErrorMessage error={q.error} />;
  }
  if (!vm) return <Loading what={name} />;

  return (
    <div className="vm-page">
      <div className="page-head">
        <h1>
          <span className="icon icon-vm" aria-hidden="true" /> {vm.name}
        </h1>
        <PowerBadge state={vm.runtime.power_state} />
        {vm.lease ? <span className="badge lease-badge">leased by {vm.lease.holder}</span> : null}
        {vm.config.template ? <span className="badge">template</span> : null}
        <span className="spacer" />
        <ViewingNow vmId={vm.id} me={me} />
      </div>
      {vm.config.description ? <p className="description">{vm.config.description}</p> : null}
      <TabBar label="VM sections" tabs={TABS} tab={tab} onSelect={setTab} />
      <div role="tabpanel" className="tabpanel">
        {tab === "summary" ? (
          <div className="columns">
            <Summary vm={vm} />
            <div>
              <PowerPanel vm={vm} privs={privs} />
              <LeasePanel vm={vm} me={me} privs={privs} token={leaseToken} setToken={setToken} />
              <ProvisionPanel vm={vm} privs={privs} />
            </div>
          </div>
        ) : null}
        {/* The form stays mounted (hidden) so that a draft survives switching tabs. */}
        <div hidden={tab !== "summary"}>
          <VmConfigForm vm={vm} routeName={name} privs={privs} leaseToken={leaseToken} me={me} onDirtyChange={setDirty} />
        </div>
        {tab === "history" ? <VmHistory vm={vm} privs={privs} leaseToken={leaseToken} /> : null}
        {tab === "console" ? (
          <Suspense fallback={<Loading what="the console" />}>
            <Consoles vm={vm} privs={privs} />
          </Suspense>
        ) : null}
      </div>
    </div>
  );
}
