import { useInfiniteQuery, useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState } from "react";
import { api, request, seg, unwrap, type VmView } from "../api/client";
import type { Privileges } from "../auth";
import { ErrorMessage, fmtTime, Loading } from "../components/common";

export function VmHistory({ vm, privs, leaseToken }: { vm: VmView; privs: Privileges; leaseToken: number | null }) {
  const qc = useQueryClient();
  const versions = useInfiniteQuery({
    queryKey: ["vm-versions", vm.id, "list"],
    queryFn: ({ pageParam }) =>
      unwrap(
        api.GET("/api/v1/vms/{vm}/versions", {
          params: { path: { vm: vm.id }, query: pageParam ? { before: pageParam, limit: 50 } : { limit: 50 } },
        }),
      ),
    initialPageParam: 0,
    getNextPageParam: (last) => {
      const min = Math.min(...last.items.map((v) => v.version));
      return last.next && Number.isFinite(min) && min > 1 ? min : undefined;
    },
  });
  const items = versions.data?.pages.flatMap((p) => p.items) ?? [];
  const [from, setFrom] = useState<number | null>(null);
  const [to, setTo] = useState<number | null>(null);
  const [shown, setShown] = useState<{ from: number; to: number } | null>(null);
  const [nextBoot, setNextBoot] = useState(false);
  const diff = useQuery({
    queryKey: ["vm-versions", vm.id, "diff", shown?.from, shown?.to],
    queryFn: () =>
      unwrap(
        api.GET("/api/v1/vms/{vm}/diff", { params: { path: { vm: vm.id }, query: { from: shown!.from, to: shown!.to } } }),
      ),
    enabled: !!shown,
  });
  const revert = useMutation({
    mutationFn: async (version: number) => {
      const headers: Record<string, string> = { "If-Match": `"${vm.version}"` };
      if (leaseToken !== null) headers["Covm-Lease"] = String(leaseToken);
      return (
        await request<VmView>(`/api/v1/vms/${seg(vm.id)}/revert`, {
          method: "POST",
          body: { version, message: `revert to version ${version}`, next_boot: nextBoot || undefined },
          headers,
        })
      ).data;
    },
    onSuccess: () => {
      void qc.invalidateQueries({ queryKey: ["vm"] });
      void qc.invalidateQueries({ queryKey: ["vm-versions", vm.id] });
    },
  });
  const edit = privs.need("VirtualMachine.Config.Edit", revert.isPending);
  const lo = from !== null && to !== null ? Math.min(from, to) : null;
  const hi = from !== null && to !== null ? Math.max(from, to) : null;

  return (
    <section aria-label="History" className="panel">
      <h3>History</h3>
      <ErrorMessage error={versions.error} />
      {versions.isLoading ? <Loading what="versions" /> : null}
      <div className="row">
        <button
          type="button"
          disabled={lo === null || lo === hi}
          onClick={() => lo !== null && hi !== null && setShown({ from: lo, to: hi })}
        >
          Show diff
        </button>
        <span className="muted">Pick two versions (From and To).</span>
        <label className="check">
          <input type="checkbox" checked={nextBoot} onChange={(e) => setNextBoot(e.target.checked)} />
          Revert: if running, keep next-boot changes pending
        </label>
      </div>
      <ErrorMessage error={revert.error} />
      {revert.data ? <p role="status" className="ok">Reverted: now at version {revert.data.version}.</p> : null}
      <table className="grid">
        <thead>
          <tr>
            <th scope="col">From</th>
            <th scope="col">To</th>
            <th scope="col">Version</th>
            <th scope="col">Author</th>
            <th scope="col">Time</th>
            <th scope="col">Message</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {items.map((v) => (
            <tr key={v.version}>
              <td>
                <label className="check">
                  <input type="radio" name="diff-from" checked={from === v.version} onChange={() => setFrom(v.version)} />
                  <span className="sr-only">From version {v.version}</span>
                </label>
              </td>
              <td>
                <label className="check">
                  <input type="radio" name="diff-to" checked={to === v.version} onChange={() => setTo(v.version)} />
                  <span className="sr-only">To version {v.version}</span>
                </label>
              </td>
              <td className="num">{v.version}</td>
              <td>{v.author}</td>
              <td>{fmtTime(v.time)}</td>
              <td>{v.message ?? ""}</td>
              <td>
                <button
                  type="button"
                  {...edit}
                  disabled={edit.disabled || v.version === vm.version}
                  title={edit.title ?? (v.version === vm.version ? "This is the current version" : undefined)}
                  onClick={() => revert.mutate(v.version)}
                >
                  Revert to {v.version}
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {versions.hasNextPage ? (
        <button type="button" onClick={() => versions.fetchNextPage()}>
          Older versions
        </button>
      ) : null}
      {shown ? (
        <div className="diff" aria-label="Diff">
          <h4>
            Changes from version {shown.from} to {shown.to}
          </h4>
          <ErrorMessage error={diff.error} />
          {diff.data ? (
            <>
              {diff.data.summary.length ? (
                <ul className="diff-lines">
                  {diff.data.summary.map((l, i) => (
                    <li key={i}>
                      <code>{l}</code>
                    </li>
                  ))}
                </ul>
              ) : (
                <p className="muted">No differences.</p>
              )}
              <details>
                <summary>JSON Patch</summary>
                <pre>{JSON.stringify(diff.data.patch, null, 2)}</pre>
              </details>
            </>
          ) : null}
        </div>
      ) : null}
    </section>
  );
}
