import { useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type ChangeEvent } from "react";
import { useParams } from "react-router";
import { api, ApiError, CSRF_HEADER, seg, unwrap, type Schemas } from "../api/client";
import { usePrivileges } from "../auth";
import { ErrorMessage, fmtBytes, fmtTime, Loading } from "../components/common";

type UploadView = Schemas["UploadView"];

/** The size of each part of an upload: progress is told per part, and a broken upload resumes. */
export const PART_BYTES = 8 << 20;

/** PUTs one part (or asks where the upload stands, with no body). */
async function putPart(ds: string, path: string, range: string, body?: Blob): Promise<UploadView> {
  const res = await fetch(`/api/v1/datastores/${seg(ds)}/files/${seg(path)}`, {
    method: "PUT",
    headers: { [CSRF_HEADER]: "1", "Content-Range": range, "Content-Type": "application/octet-stream" },
    credentials: "same-origin",
    body,
  });
  if (!res.ok) throw await ApiError.fromResponse(res);
  return (await res.json()) as UploadView;
}

/** Uploads a file in parts from where the server stands; `progress` hears the bytes it has. */
export async function uploadFile(
  ds: string,
  path: string,
  file: File,
  progress: (received: number, total: number) => void,
): Promise<UploadView> {
  const total = file.size;
  if (total === 0) {
    const res = await fetch(`/api/v1/datastores/${seg(ds)}/files/${seg(path)}`, {
      method: "PUT",
      headers: { [CSRF_HEADER]: "1", "Content-Type": "application/octet-stream" },
      credentials: "same-origin",
      body: new Blob([]),
    });
    if (!res.ok) throw await ApiError.fromResponse(res);
    return (await res.json()) as UploadView;
  }
  let at = (await putPart(ds, path, `bytes */${total}`)).received;
  progress(at, total);
  for (;;) {
    const end = Math.min(at + PART_BYTES, total);
    const v = await putPart(ds, path, `bytes ${at}-${end - 1}/${total}`, file.slice(at, end));
    at = v.received;
    progress(at, total);
    if (v.complete) return v;
  }
}

export function DatastorePage() {
  const { name = "" } = useParams();
  const qc = useQueryClient();
  const priv = usePrivileges(`datastore:${name}`);
  const files = useQuery({
    queryKey: ["datastore-files", name],
    queryFn: () => unwrap(api.GET("/api/v1/datastores/{datastore}/files", { params: { path: { datastore: name } } })),
  });
  const [file, setFile] = useState<File | null>(null);
  const [target, setTarget] = useState("");
  const [progress, setProgress] = useState<{ received: number; total: number } | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [done, setDone] = useState<string | null>(null);
  const upload = priv.need("Datastore.FileManagement", progress !== null);

  const choose = (e: ChangeEvent<HTMLInputElement>) => {
    const f = e.target.files?.[0] ?? null;
    setFile(f);
    if (f) setTarget(f.name);
  };
  const start = async () => {
    if (!file) return;
    setError(null);
    setDone(null);
    setProgress({ received: 0, total: file.size });
    try {
      const v = await uploadFile(name, target, file, (received, total) => setProgress({ received, total }));
      setDone(`${v.datastore}:${v.path} uploaded (${fmtBytes(v.total)}).`);
      setFile(null);
      await qc.invalidateQueries({ queryKey: ["datastore-files", name] });
    } catch (e) {
      setError(e);
    } finally {
      setProgress(null);
    }
  };
  const remove = async (path: string) => {
    setError(null);
    try {
      await unwrap(
        api.DELETE("/api/v1/datastores/{datastore}/files/{path}", { params: { path: { datastore: name, path } } }),
      );
      await qc.invalidateQueries({ queryKey: ["datastore-files", name] });
    } catch (e) {
      setError(e);
    }
  };
  const pct = progress && progress.total > 0 ? Math.floor((progress.received / progress.total) * 100) : 0;

  return (
    <section>
      <h1>Datastore {name}</h1>
      <div className="panel">
        <h3>Upload a file</h3>
        <div className="row">
          <label>
            File
            <input type="file" onChange={choose} disabled={upload.disabled} />
          </label>
          <label>
            Path in the datastore
            <input value={target} onChange={(e) => setTarget(e.target.value)} placeholder="iso/debian.iso" />
          </label>
          <button type="button" onClick={start} disabled={upload.disabled || !file || !target} title={upload.title}>
            Upload
          </button>
        </div>
        {progress ? (
          <p>
            <progress max={100} value={pct} aria-label="Upload progress" /> {pct}% ({fmtBytes(progress.received)} of{" "}
            {fmtBytes(progress.total)})
          </p>
        ) : null}
        {done ? <p role="status">{done}</p> : null}
        <ErrorMessage error={error} />
      </div>
      <ErrorMessage error={files.error} />
      {files.isLoading ? <Loading what="files" /> : null}
      {files.data ? (
        <table className="grid">
          <thead>
            <tr>
              <th scope="col">Path</th>
              <th scope="col">Size</th>
              <th scope="col">Modified</th>
              <th scope="col">Used by</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {files.data.length === 0 ? (
              <tr>
                <td colSpan={5} className="muted">
                  No files.
                </td>
              </tr>
            ) : null}
            {files.data.map((f) => {
              const del = priv.need("Datastore.FileManagement");
              const held = f.used_by.length > 0;
              return (
                <tr key={f.path}>
                  <td>{f.path}</td>
                  <td>{fmtBytes(f.size)}</td>
                  <td>{fmtTime(f.modified)}</td>
                  <td>{f.used_by.join(", ") || "—"}</td>
                  <td>
                    <button
                      type="button"
                      className="danger"
                      onClick={() => remove(f.path)}
                      disabled={del.disabled || held}
                      title={held ? `Named by ${f.used_by.join(", ")}` : del.title}
                    >
                      Delete {f.path}
                    </button>
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}
