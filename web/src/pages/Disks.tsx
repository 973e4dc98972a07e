import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { Link, useNavigate, useParams } from "react-router";
import { api, request, seg, unwrap, type DiskView } from "../api/client";
import { usePrivileges } from "../auth";
import { ErrorMessage, fmtBytes, fmtTime, Loading } from "../components/common";

const GiB = 1024 ** 3;

function toBytes(gib: string): number {
  // A multiple of 512 bytes, as the API requires.
  return Math.round((Number(gib) * GiB) / 512) * 512;
}

function useDatastores() {
  return useQuery({
    queryKey: ["datastores"],
    queryFn: () => unwrap(api.GET("/api/v1/datastores", { params: { query: { limit: 1000 } } })),
  });
}

function useVmNames() {
  return useQuery({
    queryKey: ["vms", "names"],
    queryFn: async () => (await unwrap(api.GET("/api/v1/vms", { params: { query: { limit: 1000 } } }))).items,
    staleTime: 10_000,
  });
}

function CreateDisk() {
  const qc = useQueryClient();
  const privs = usePrivileges();
  const ds = useDatastores();
  const [name, setName] = useState("");
  const [datastore, setDatastore] = useState("");
  const [size, setSize] = useState("10");
  const [format, setFormat] = useState<"qcow2" | "raw">("qcow2");
  const m = useMutation({
    mutationFn: () =>
      unwrap(
        api.POST("/api/v1/disks", {
          body: { name, datastore: datastore || ds.data?.items[0]?.name || "", capacity_bytes: toBytes(size), format },
        }),
      ),
    onSuccess: () => {
      setName("");
      void qc.invalidateQueries({ queryKey: ["disks"] });
    },
  });
  const submit = (e: FormEvent) => {
    e.preventDefault();
    m.mutate();
  };
  return (
    <form className="panel" onSubmit={submit} aria-label="Create disk">
      <h3>New disk</h3>
      <div className="row">
        <label>
          Disk name
          <input value={name} onChange={(e) => setName(e.target.value)} required pattern="[a-z0-9][a-z0-9._\-]{0,62}" />
        </label>
        <label>
          Datastore
          <select value={datastore} onChange={(e) => setDatastore(e.target.value)}>
            {ds.data?.items.map((d) => (
              <option key={d.id} value={d.name}>
                {d.name} ({fmtBytes(d.free_bytes)} free)
              </option>
            ))}
          </select>
        </label>
        <label>
          Size (GiB)
          <input type="number" min={0.001} step="any" value={size} onChange={(e) => setSize(e.target.value)} required />
        </label>
        <label>
          Format
          <select value={format} onChange={(e) => setFormat(e.target.value as "qcow2" | "raw")}>
            <option>qcow2</option>
            <option>raw</option>
          </select>
        </label>
        <button type="submit" {...privs.need("Disk.Create", m.isPending)}>
          Create disk
        </button>
      </div>
      <ErrorMessage error={m.error} />
      <ErrorMessage error={ds.error} />
    </form>
  );
}

export function DisksPage() {
  const q = useQuery({
    queryKey: ["disks"],
    queryFn: () => unwrap(api.GET("/api/v1/disks", { params: { query: { limit: 1000 } } })),
  });
  return (
    <section>
      <h1>Disks</h1>
      <CreateDisk />
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading what="disks" /> : null}
      {q.data ? (
        <table className="grid">
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Datastore</th>
              <th scope="col">Capacity</th>
              <th scope="col">Format</th>
              <th scope="col">State</th>
              <th scope="col">Attached to</th>
              <th scope="col">Sharing</th>
            </tr>
          </thead>
          <tbody>
            {q.data.items.map((d) => (
              <tr key={d.id}>
                <td>
                  <Link to={`/disks/${encodeURIComponent(d.name)}`}>{d.name}</Link>
                </td>
                <td>{d.datastore}</td>
                <td className="num">{fmtBytes(d.capacity_bytes)}</td>
                <td>{d.format}</td>
                <td>
                  <span className={`badge disk-${d.state}`}>{d.state}</span>
                </td>
                <td>
                  {d.attachments.map((a, i) => (
                    <span key={i}>
                      {i ? ", " : ""}
                      <Link to={`/vms/${encodeURIComponent(a.vm)}`}>{a.vm}</Link>
                    </span>
                  ))}
                </td>
                <td>{d.sharing}</td>
              </tr>
            ))}
            {q.data.items.length === 0 ? (
              <tr>
                <td colSpan={7} className="muted">
                  No disks.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}

function VmSelect({ label, value, onChange, exclude }: { label: string; value: string; onChange: (v: string) => void; exclude?: string[] }) {
  const vms = useVmNames();
  return (
    <label>
      {label}
      <select value={value} onChange={(e) => onChange(e.target.value)} required>
        <option value="">(choose a VM)</option>
        {vms.data
          ?.filter((v) => !exclude?.includes(v.name))
          .map((v) => (
            <option key={v.id} value={v.name}>
              {v.name}
            </option>
          ))}
      </select>
    </label>
  );
}

export function DiskPage() {
  const { name = "" } = useParams();
  const qc = useQueryClient();
  const navigate = useNavigate();
  const q = useQuery({
    queryKey: ["disk", name],
    queryFn: () => unwrap(api.GET("/api/v1/disks/{disk}", { params: { path: { disk: name } } })),
  });
  const disk = q.data;
  const privs = usePrivileges(disk?.id);
  const [size, setSize] = useState("");
  const [cloneName, setCloneName] = useState("");
  const [attachVm, setAttachVm] = useState("");
  const [readOnly, setReadOnly] = useState(false);
  const [moveVm, setMoveVm] = useState("");
  const [done, setDone] = useState<string | null>(null);

  const refresh = () => {
    void qc.invalidateQueries({ queryKey: ["disk"] });
    void qc.invalidateQueries({ queryKey: ["disks"] });
    void qc.invalidateQueries({ queryKey: ["vm"] });
    void qc.invalidateQueries({ queryKey: ["vms"] });
  };
  const op = useMutation({
    mutationFn: async (what: { kind: string; run: () => Promise<unknown> }) => {
      await what.run();
      return what.kind;
    },
    onSuccess: (kind) => {
      setDone(kind);
      refresh();
    },
    onMutate: () => setDone(null),
  });

  if (q.error) return <ErrorMessage error={q.error} />;
  if (!disk) return <Loading what={name} />;
  const d: DiskView = disk;
  const busy = op.isPending;

  return (
    <section className="disk-page">
      <div className="page-head">
        <h1>
          <span className="icon icon-disk" aria-hidden="true" /> {d.name}
        </h1>
        <span className={`badge disk-${d.state}`}>{d.state}</span>
      </div>
      <div className="panel">
      <table className="kv">
        <tbody>
          <tr>
            <th scope="row">Datastore</th>
            <td>{d.datastore}</td>
          </tr>
          <tr>
            <th scope="row">File</th>
            <td>
              <code>{d.file}</code>
            </td>
          </tr>
          <tr>
            <th scope="row">Capacity</th>
            <td>{fmtBytes(d.capacity_bytes)}</td>
          </tr>
          <tr>
            <th scope="row">Format</th>
            <td>{d.format}</td>
          </tr>
          <tr>
            <th scope="row">Sharing</th>
            <td>{d.sharing}</td>
          </tr>
          <tr>
            <th scope="row">Pool</th>
            <td>{d.pool}</td>
          </tr>
          <tr>
            <th scope="row">Created</th>
            <td>{fmtTime(d.created_at)}</td>
          </tr>
        </tbody>
      </table>
      </div>

      <section aria-label="Attachments" className="panel">
        <h3>Attachments</h3>
        <table className="grid compact">
          <thead>
            <tr>
              <th scope="col">VM</th>
              <th scope="col">Details</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {d.attachments.map((a, i) => (
              <tr key={i}>
                <td>
                  <Link to={`/vms/${encodeURIComponent(a.vm)}`}>{a.vm}</Link>
                </td>
                <td className="muted">
                  {Object.entries(a)
                    .filter(([k]) => k !== "vm")
                    .map(([k, v]) => `${k}: ${String(v)}`)
                    .join(", ")}
                </td>
                <td>
                  <button
                    type="button"
                    disabled={busy}
                    onClick={() =>
                      op.mutate({
                        kind: `Detached from ${a.vm}.`,
                        run: () =>
                          request(`/api/v1/vms/${seg(a.vm)}/disks/${seg(d.name)}?generation=${a.generation}`, { method: "DELETE" }),
                      })
                    }
                  >
                    Detach from {a.vm}
                  </button>
                </td>
              </tr>
            ))}
            {d.attachments.length === 0 ? (
              <tr>
                <td colSpan={3} className="muted">
                  Not attached.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </section>

      <div className="columns">
        <form
          className="panel"
          aria-label="Attach"
          onSubmit={(e) => {
            e.preventDefault();
            op.mutate({
              kind: `Attached to ${attachVm}.`,
              run: () =>
                request(`/api/v1/vms/${seg(attachVm)}/disks`, { method: "POST", body: { disk: d.name, read_only: readOnly } }),
            });
          }}
        >
          <h3>Attach to a VM</h3>
          <div className="row">
            <VmSelect label="VM to attach to" value={attachVm} onChange={setAttachVm} />
            <label className="check">
              <input type="checkbox" checked={readOnly} onChange={(e) => setReadOnly(e.target.checked)} />
              Read-only
            </label>
            <button type="submit" {...privs.need("Disk.Attach", busy)} disabled={busy || !attachVm || privs.need("Disk.Attach").disabled}>
              Attach
            </button>
          </div>
        </form>

        <form
          className="panel"
          aria-label="Move"
          onSubmit={(e) => {
            e.preventDefault();
            op.mutate({
              kind: `Moved to ${moveVm}.`,
              run: () => unwrap(api.POST("/api/v1/disks/{disk}/move", { params: { path: { disk: d.name } }, body: { to_vm: moveVm } })),
            });
          }}
        >
          <h3>Move to another VM</h3>
          <div className="row">
            <VmSelect label="VM to move to" value={moveVm} onChange={setMoveVm} exclude={d.attachments.map((a) => a.vm)} />
            <button type="submit" disabled={busy || !moveVm || d.attachments.length === 0} title={d.attachments.length === 0 ? "The disk is not attached" : undefined}>
              Move
            </button>
          </div>
        </form>

        <form
          className="panel"
          aria-label="Resize"
          onSubmit={(e) => {
            e.preventDefault();
            op.mutate({
              kind: "Resized.",
              run: () =>
                unwrap(
                  api.POST("/api/v1/disks/{disk}/resize", {
                    params: { path: { disk: d.name } },
                    body: { capacity_bytes: toBytes(size) },
                  }),
                ),
            });
          }}
        >
          <h3>Resize</h3>
          <div className="row">
            <label>
              New size (GiB)
              <input type="number" min={0.001} step="any" value={size} onChange={(e) => setSize(e.target.value)} required />
            </label>
            <button type="submit" {...privs.need("Disk.Extend", busy)}>
              Resize
            </button>
          </div>
        </form>

        <form
          className="panel"
          aria-label="Clone"
          onSubmit={(e) => {
            e.preventDefault();
            op.mutate({
              kind: `Cloned as ${cloneName}.`,
              run: () =>
                unwrap(api.POST("/api/v1/disks/{disk}/clone", { params: { path: { disk: d.name } }, body: { name: cloneName } })),
            });
          }}
        >
          <h3>Clone</h3>
          <div className="row">
            <label>
              Clone name
              <input value={cloneName} onChange={(e) => setCloneName(e.target.value)} required />
            </label>
            <button type="submit" {...privs.need("Disk.Create", busy)}>
              Clone
            </button>
          </div>
        </form>
      </div>

      <div className="row">
        <button
          type="button"
          className="danger"
          {...privs.need("Disk.Delete", busy)}
          onClick={() =>
            op.mutate({
              kind: "Deleted.",
              run: async () => {
                await unwrap(api.DELETE("/api/v1/disks/{disk}", { params: { path: { disk: d.name } } }));
                navigate("/disks");
              },
            })
          }
        >
          Delete disk
        </button>
      </div>
      {done ? (
        <p role="status" className="ok">
          {done}
        </p>
      ) : null}
      <ErrorMessage error={op.error} />
    </section>
  );
}
