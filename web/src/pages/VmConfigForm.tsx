// The VM config form: a draft over a base version. It never overwrites unsaved edits
// when someone else saves (a banner says who changed what), and on a 412 it rebases the
// draft with a three-way merge, asking only about fields both sides changed.

import { useQuery, useQueryClient } from "@tanstack/react-query";
import { useEffect, useMemo, useState, type FormEvent } from "react";
import { useNavigate } from "react-router";
import { applyPatch, type Operation } from "rfc6902";
import { api, ApiError, request, seg, unwrap, type Schemas, type VmConfig, type VmView } from "../api/client";
import type { Privileges } from "../auth";
import { Dialog, ErrorMessage } from "../components/common";
import type { FeedEvent } from "../feed";
import { useFeedEvents } from "../live";
import {
  changedPaths,
  clone,
  deepEqual,
  isEmptyPatch,
  mergePatch,
  pathToString,
  resolve,
  threeWayMerge,
  topFields,
  type Choice,
  type Json,
  type MergeResult,
} from "../merge";

type Nic = Schemas["Nic"];
type DiskAttachment = Schemas["DiskAttachment"];
type StaleDetails = Schemas["StaleDetails"];

interface Base {
  version: number;
  config: VmConfig;
}

interface ConflictState {
  result: MergeResult;
  theirs: Base;
  author: string;
}

function show(v: Json | undefined): string {
  if (v === undefined) return "(not set)";
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

/** What the server has now: the base with the 412's patch applied, or a fresh read. */
async function theirsAfter412(vmId: string, base: Base, details: StaleDetails | undefined): Promise<Base> {
  if (details && Array.isArray(details.patch) && typeof details.current_version === "number") {
    const doc = clone(base.config) as unknown as object;
    const results = applyPatch(doc, details.patch as unknown as Operation[]);
    if (results.every((r) => r === null)) return { version: details.current_version, config: doc as VmConfig };
  }
  const vm = await unwrap(api.GET("/api/v1/vms/{vm}", { params: { path: { vm: vmId } } }));
  return { version: vm.version, config: vm.config };
}

function ConflictDialog({
  state,
  onResolve,
  onCancel,
}: {
  state: ConflictState;
  onResolve: (choices: Choice[]) => void;
  onCancel: () => void;
}) {
  const n = state.result.conflicts.length;
  const [choices, setChoices] = useState<Choice[]>(() => Array(n).fill("mine"));
  return (
    <Dialog title="Conflicting changes" onClose={onCancel}>
      <p>
        <strong>{state.author}</strong> saved version {state.theirs.version} while you were editing. Your other
        changes were merged; {n === 1 ? "this field was" : "these fields were"} changed by both of you:
      </p>
      <table className="grid conflicts">
        <thead>
          <tr>
            <th scope="col">Field</th>
            <th scope="col">Base</th>
            <th scope="col">Theirs ({state.author})</th>
            <th scope="col">Yours</th>
            <th scope="col">Keep</th>
          </tr>
        </thead>
        <tbody>
          {state.result.conflicts.map((c, i) => {
            const field = pathToString(c.path);
            return (
              <tr key={field}>
                <th scope="row">{field}</th>
                <td>
                  <code>{show(c.base)}</code>
                </td>
                <td>
                  <code>{show(c.theirs)}</code>
                </td>
                <td>
                  <code>{show(c.yours)}</code>
                </td>
                <td>
                  <fieldset className="choice">
                    <legend className="sr-only">Keep for {field}</legend>
                    {(["mine", "theirs"] as Choice[]).map((ch) => (
                      <label key={ch} className="check">
                        <input
                          type="radio"
                          name={`keep-${i}`}
                          checked={choices[i] === ch}
                          onChange={() => setChoices(choices.map((x, j) => (j === i ? ch : x)))}
                        />
                        {ch === "mine" ? "Mine" : "Theirs"}
                      </label>
                    ))}
                  </fieldset>
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      <div className="row buttons">
        <button type="button" className="primary" onClick={() => onResolve(Array(n).fill("mine"))}>
          Keep mine
        </button>
        <button type="button" onClick={() => onResolve(Array(n).fill("theirs"))}>
          Keep theirs
        </button>
        <button type="button" onClick={() => onResolve(choices)}>
          Save with these choices
        </button>
        <button type="button" onClick={onCancel}>
          Cancel
        </button>
      </div>
    </Dialog>
  );
}

export function VmConfigForm({
  vm,
  routeName,
  privs,
  leaseToken,
  me,
  onDirtyChange,
}: {
  vm: VmView;
  routeName: string;
  privs: Privileges;
  leaseToken: number | null;
  me: string | undefined;
  onDirtyChange: (dirty: boolean) => void;
}) {
  const qc = useQueryClient();
  const navigate = useNavigate();
  const [base, setBase] = useState<Base>({ version: vm.version, config: vm.config });
  const [draft, setDraft] = useState<VmConfig>(() => clone(vm.config));
  const [message, setMessage] = useState("");
  const [nextBoot, setNextBoot] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const [saving, setSaving] = useState(false);
  const [saved, setSaved] = useState<string | null>(null);
  const [conflict, setConflict] = useState<ConflictState | null>(null);
  const [lastEvent, setLastEvent] = useState<FeedEvent | null>(null);

  const dirty = !deepEqual(draft, base.config);
  useEffect(() => onDirtyChange(dirty), [dirty, onDirtyChange]);

  // A newer version on the server: take it silently unless I have unsaved edits.
  useEffect(() => {
    if (vm.version > base.version && !dirty && !saving && !conflict) {
      setBase({ version: vm.version, config: vm.config });
      setDraft(clone(vm.config));
    }
  }, [vm, base.version, dirty, saving, conflict]);

  useFeedEvents((e) => {
    if (e.object_id === vm.id && e.version_after) setLastEvent(e);
  });

  const ahead = vm.version > base.version && dirty;
  const author = useQuery({
    queryKey: ["vm-versions", vm.id, "v", vm.version],
    queryFn: () =>
      unwrap(api.GET("/api/v1/vms/{vm}/versions/{n}", { params: { path: { vm: vm.id, n: vm.version } } })),
    enabled: ahead && lastEvent?.version_after !== vm.version,
  });
  const changedBy = lastEvent?.version_after === vm.version ? lastEvent.actor : (author.data?.author ?? "Someone");
  const changedFields = useMemo(
    () => (ahead ? topFields(changedPaths(base.config as Json, vm.config as Json)) : []),
    [ahead, base.config, vm.config],
  );

  const set = <K extends keyof VmConfig>(k: K, v: VmConfig[K]) => {
    setSaved(null);
    setDraft((d) => {
      const next = { ...d, [k]: v };
      if (v === undefined) delete next[k];
      return next;
    });
  };

  const save = async (b: Base, d: VmConfig) => {
    setSaving(true);
    setError(null);
    setSaved(null);
    try {
      for (let attempt = 0; attempt < 4; attempt++) {
        const patch = mergePatch(b.config as Json, d as Json);
        if (isEmptyPatch(patch)) {
          setBase(b);
          setDraft(clone(d));
          return;
        }
        const q = new URLSearchParams();
        if (message.trim()) q.set("message", message.trim());
        if (nextBoot) q.set("apply", "next_boot");
        const headers: Record<string, string> = { "If-Match": `"${b.version}"` };
        if (leaseToken !== null) headers["Covm-Lease"] = String(leaseToken);
        try {
          const { data } = await request<VmView>(`/api/v1/vms/${seg(vm.id)}${q.size ? `?${q}` : ""}`, {
            method: "PATCH",
            body: patch,
            contentType: "application/merge-patch+json",
            headers,
          });
          setBase({ version: data.version, config: data.config });
          setDraft(clone(data.config));
          setMessage("");
          setSaved(`Saved as version ${data.version}.`);
          qc.setQueryData(["vm", routeName], data);
          void qc.invalidateQueries({ queryKey: ["vms"] });
          void qc.invalidateQueries({ queryKey: ["vm-versions", vm.id] });
          if (data.name !== routeName) navigate(`/vms/${encodeURIComponent(data.name)}`, { replace: true });
          return;
        } catch (e) {
          if (!(e instanceof ApiError) || e.status !== 412) throw e;
          const details = e.details as StaleDetails | undefined;
          const theirs = await theirsAfter412(vm.id, b, details);
          const result = threeWayMerge(b.config as Json, theirs.config as Json, d as Json);
          if (result.conflicts.length) {
            setBase(theirs);
            setDraft(result.merged as VmConfig);
            setConflict({ result, theirs, author: details?.author ?? "Someone" });
            return;
          }
          // Disjoint changes: rebase on theirs and try again with the new ETag.
          b = theirs;
          d = result.merged as VmConfig;
          setBase(b);
          setDraft(clone(d));
        }
      }
      throw new Error("The VM kept changing while saving; try again.");
    } catch (e) {
      setError(e);
    } finally {
      setSaving(false);
    }
  };

  const onSubmit = (e: FormEvent) => {
    e.preventDefault();
    void save(base, draft);
  };

  const reload = () => {
    setBase({ version: vm.version, config: vm.config });
    setDraft(clone(vm.config));
    setError(null);
  };

  const leasedByOther = !!vm.lease && vm.lease.holder !== me;
  const edit = privs.need("VirtualMachine.Config.Edit");
  const canEditAny = ["VirtualMachine.Config.Edit", "VirtualMachine.Config.CPUCount", "VirtualMachine.Config.Memory"].some(
    (p) => privs.can(p as never),
  );
  const saveTitle = leasedByOther
    ? `Leased by ${vm.lease!.holder}: their lease must end first`
    : !canEditAny
      ? "You lack the privilege VirtualMachine.Config.Edit"
      : !dirty
        ? "Nothing to save"
        : undefined;

  return (
    <form className="panel config-form" onSubmit={onSubmit} aria-label="Configuration">
      <h3>
        Configuration <span className="muted">(version {base.version}{dirty ? ", unsaved changes" : ""})</span>
      </h3>
      {ahead ? (
        <div className="banner" role="status">
          {changedBy} changed {changedFields.length ? changedFields.join(", ") : "the configuration"} (version{" "}
          {vm.version}).{" "}
          <button type="button" onClick={reload}>
            Reload
          </button>{" "}
          <span className="muted">(discards your edits; saving instead merges them)</span>
        </div>
      ) : null}
      <div className="form-grid">
        <label>
          Name
          <input value={draft.name} onChange={(e) => set("name", e.target.value)} {...edit} required />
        </label>
        <label>
          CPUs
          <input
            type="number"
            min={1}
            max={256}
            value={draft.cpus ?? ""}
            onChange={(e) => set("cpus", e.target.value === "" ? undefined : Number(e.target.value))}
            {...privs.need("VirtualMachine.Config.CPUCount")}
          />
        </label>
        <label>
          Memory (MiB)
          <input
            type="number"
            min={16}
            step={1}
            value={draft.memory_mib ?? ""}
            onChange={(e) => set("memory_mib", e.target.value === "" ? undefined : Number(e.target.value))}
            {...privs.need("VirtualMachine.Config.Memory")}
          />
        </label>
        <label className="wide">
          Description
          <textarea
            rows={2}
            value={draft.description ?? ""}
            onChange={(e) => set("description", e.target.value)}
            {...edit}
          />
        </label>
      </div>

      <fieldset>
        <legend>Autostart</legend>
        <div className="row">
          <label className="check">
            <input
              type="checkbox"
              checked={!!draft.autostart?.enabled}
              onChange={(e) => set("autostart", { ...draft.autostart, enabled: e.target.checked })}
              {...edit}
            />
            Start with the host
          </label>
          <label>
            Order
            <input
              type="number"
              value={draft.autostart?.order ?? ""}
              onChange={(e) =>
                set("autostart", { ...draft.autostart, order: e.target.value === "" ? undefined : Number(e.target.value) })
              }
              {...edit}
            />
          </label>
          <label>
            Delay (s)
            <input
              type="number"
              min={0}
              value={draft.autostart?.delay_s ?? ""}
              onChange={(e) =>
                set("autostart", { ...draft.autostart, delay_s: e.target.value === "" ? undefined : Number(e.target.value) })
              }
              {...edit}
            />
          </label>
        </div>
      </fieldset>

      <DisksEditor
        disks={draft.disks ?? []}
        controllers={(draft.controllers ?? []).map((c) => c.id)}
        onChange={(d) => set("disks", d)}
        privs={privs}
      />
      <NicsEditor nics={draft.nics ?? []} onChange={(n) => set("nics", n)} privs={privs} />
      <AnnotationsEditor
        annotations={draft.annotations ?? {}}
        onChange={(a) => set("annotations", a)}
        disabled={edit.disabled}
        title={edit.title}
      />

      <div className="row save-row">
        <label>
          Change note
          <input value={message} onChange={(e) => setMessage(e.target.value)} placeholder="why (for the history)" />
        </label>
        <label className="check">
          <input type="checkbox" checked={nextBoot} onChange={(e) => setNextBoot(e.target.checked)} />
          If running, keep next-boot changes pending
        </label>
        <button type="submit" className="primary" disabled={saving || !dirty || leasedByOther || !canEditAny} title={saveTitle}>
          Save
        </button>
        <button type="button" disabled={!dirty || saving} onClick={reload}>
          Discard changes
        </button>
        {saving ? <span className="muted">Saving…</span> : null}
        {saved ? (
          <span role="status" className="ok">
            {saved}
          </span>
        ) : null}
      </div>
      <ErrorMessage error={error} />
      {conflict ? (
        <ConflictDialog
          state={conflict}
          onCancel={() => setConflict(null)}
          onResolve={(choices) => {
            const c = conflict;
            setConflict(null);
            const merged = resolve(c.result, choices) as VmConfig;
            setDraft(merged);
            void save(c.theirs, merged);
          }}
        />
      ) : null}
    </form>
  );
}

function useNames(kind: "disks" | "networks") {
  return useQuery({
    queryKey: [kind, "names"],
    queryFn: async () => {
      const page =
        kind === "disks"
          ? await unwrap(api.GET("/api/v1/disks", { params: { query: { limit: 1000 } } }))
          : await unwrap(api.GET("/api/v1/networks", { params: { query: { limit: 1000 } } }));
      return page.items.map((x) => x.name);
    },
    staleTime: 30_000,
  });
}

function DisksEditor({
  disks,
  controllers,
  onChange,
  privs,
}: {
  disks: DiskAttachment[];
  controllers: string[];
  onChange: (d: DiskAttachment[]) => void;
  privs: Privileges;
}) {
  const names = useNames("disks");
  const [disk, setDisk] = useState("");
  const add = privs.need("VirtualMachine.Config.AddExistingDisk");
  const remove = privs.need("VirtualMachine.Config.RemoveDisk");
  const edit = privs.need("VirtualMachine.Config.Edit");
  const update = (i: number, d: Partial<DiskAttachment>) => onChange(disks.map((x, j) => (j === i ? { ...x, ...d } : x)));
  const addDisk = () => {
    if (!disk) return;
    const controller = controllers[0] ?? "scsi0";
    const used = disks.filter((d) => d.controller === controller).map((d) => d.unit);
    let unit = 0;
    while (used.includes(unit)) unit++;
    onChange([...disks, { disk, controller, unit }]);
    setDisk("");
  };
  return (
    <fieldset>
      <legend>Disks</legend>
      <table className="grid compact">
        <thead>
          <tr>
            <th scope="col">Disk</th>
            <th scope="col">Controller</th>
            <th scope="col">Unit</th>
            <th scope="col">Read-only</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {disks.map((d, i) => (
            <tr key={`${d.disk}-${i}`}>
              <td>{d.disk}</td>
              <td>
                <label className="sr-label">
                  <span className="sr-only">Controller of {d.disk}</span>
                  <select value={d.controller} onChange={(e) => update(i, { controller: e.target.value })} {...edit}>
                    {[...new Set([d.controller, ...controllers])].map((c) => (
                      <option key={c}>{c}</option>
                    ))}
                  </select>
                </label>
              </td>
              <td>
                <label className="sr-label">
                  <span className="sr-only">Unit of {d.disk}</span>
                  <input
                    type="number"
                    min={0}
                    className="narrow"
                    value={d.unit}
                    onChange={(e) => update(i, { unit: Number(e.target.value) })}
                    {...edit}
                  />
                </label>
              </td>
              <td>
                <label className="check">
                  <input type="checkbox" checked={!!d.read_only} onChange={(e) => update(i, { read_only: e.target.checked })} {...edit} />
                  <span className="sr-only">Read-only {d.disk}</span>
                </label>
              </td>
              <td>
                <button type="button" {...remove} onClick={() => onChange(disks.filter((_, j) => j !== i))}>
                  Remove {d.disk}
                </button>
              </td>
            </tr>
          ))}
          {disks.length === 0 ? (
            <tr>
              <td colSpan={5} className="muted">
                No disks.
              </td>
            </tr>
          ) : null}
        </tbody>
      </table>
      <div className="row">
        <label>
          Add disk
          <input list="disk-names" value={disk} onChange={(e) => setDisk(e.target.value)} {...add} />
          <datalist id="disk-names">
            {names.data?.map((n) => <option key={n} value={n} />)}
          </datalist>
        </label>
        <button type="button" {...add} disabled={add.disabled || !disk} onClick={addDisk}>
          Add to list
        </button>
      </div>
    </fieldset>
  );
}

function NicsEditor({ nics, onChange, privs }: { nics: Nic[]; onChange: (n: Nic[]) => void; privs: Privileges }) {
  const networks = useNames("networks");
  const dev = privs.need("VirtualMachine.Config.AddRemoveDevice");
  const edit = privs.need("VirtualMachine.Config.Edit");
  const update = (i: number, n: Partial<Nic>) => onChange(nics.map((x, j) => (j === i ? { ...x, ...n } : x)));
  const nets = networks.data ?? [];
  return (
    <fieldset>
      <legend>Network adapters</legend>
      <table className="grid compact">
        <thead>
          <tr>
            <th scope="col">#</th>
            <th scope="col">Network</th>
            <th scope="col">Model</th>
            <th scope="col">MAC</th>
            <th scope="col">Connected</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {nics.map((n, i) => (
            <tr key={i}>
              <td>{i}</td>
              <td>
                <label className="sr-label">
                  <span className="sr-only">Network of adapter {i}</span>
                  <select value={n.network} onChange={(e) => update(i, { network: e.target.value })} {...dev}>
                    {[...new Set([n.network, ...nets])].map((x) => (
                      <option key={x}>{x}</option>
                    ))}
                  </select>
                </label>
              </td>
              <td>
                <label className="sr-label">
                  <span className="sr-only">Model of adapter {i}</span>
                  <select
                    value={n.model ?? "virtio-net"}
                    onChange={(e) => update(i, { model: e.target.value as Nic["model"] })}
                    {...dev}
                  >
                    <option>virtio-net</option>
                    <option>e1000</option>
                  </select>
                </label>
              </td>
              <td>
                <code>{n.mac ?? "(assigned on save)"}</code>
              </td>
              <td>
                <label className="check">
                  <input
                    type="checkbox"
                    checked={n.connected ?? true}
                    onChange={(e) => update(i, { connected: e.target.checked })}
                    {...edit}
                  />
                  <span className="sr-only">Adapter {i} connected</span>
                </label>
              </td>
              <td>
                <button type="button" {...dev} onClick={() => onChange(nics.filter((_, j) => j !== i))}>
                  Remove adapter {i}
                </button>
              </td>
            </tr>
          ))}
          {nics.length === 0 ? (
            <tr>
              <td colSpan={6} className="muted">
                No network adapters.
              </td>
            </tr>
          ) : null}
        </tbody>
      </table>
      <button
        type="button"
        {...dev}
        disabled={dev.disabled || nets.length === 0}
        onClick={() => onChange([...nics, { network: nets[0], model: "virtio-net" }])}
      >
        Add network adapter
      </button>
    </fieldset>
  );
}

function AnnotationsEditor({
  annotations,
  onChange,
  disabled,
  title,
}: {
  annotations: Record<string, string>;
  onChange: (a: Record<string, string>) => void;
  disabled: boolean;
  title?: string;
}) {
  const [key, setKey] = useState("");
  const [value, setValue] = useState("");
  const entries = Object.entries(annotations).sort(([a], [b]) => a.localeCompare(b));
  return (
    <fieldset>
      <legend>Annotations</legend>
      <table className="grid compact">
        <thead>
          <tr>
            <th scope="col">Key</th>
            <th scope="col">Value</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {entries.map(([k, v]) => (
            <tr key={k}>
              <td>{k}</td>
              <td>
                <label className="sr-label">
                  <span className="sr-only">Annotation {k}</span>
                  <input
                    value={v}
                    onChange={(e) => onChange({ ...annotations, [k]: e.target.value })}
                    disabled={disabled}
                    title={title}
                  />
                </label>
              </td>
              <td>
                <button
                  type="button"
                  disabled={disabled}
                  title={title}
                  onClick={() => {
                    const next = { ...annotations };
                    delete next[k];
                    onChange(next);
                  }}
                >
                  Remove {k}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <div className="row">
        <label>
          Annotation key
          <input value={key} onChange={(e) => setKey(e.target.value)} disabled={disabled} title={title} />
        </label>
        <label>
          Annotation value
          <input value={value} onChange={(e) => setValue(e.target.value)} disabled={disabled} title={title} />
        </label>
        <button
          type="button"
          disabled={disabled || !key.trim()}
          title={title}
          onClick={() => {
            onChange({ ...annotations, [key.trim()]: value });
            setKey("");
            setValue("");
          }}
        >
          Add annotation
        </button>
      </div>
    </fieldset>
  );
}
