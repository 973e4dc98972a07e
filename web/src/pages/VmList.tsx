import { useInfiniteQuery } from "@tanstack/react-query";
import { Link } from "react-router";
import { api, unwrap } from "../api/client";
import { ErrorMessage, Loading, PowerBadge } from "../components/common";

export function VmListPage() {
  const q = useInfiniteQuery({
    queryKey: ["vms"],
    queryFn: ({ pageParam }) =>
      unwrap(api.GET("/api/v1/vms", { params: { query: pageParam ? { after: pageParam, limit: 200 } : { limit: 200 } } })),
    initialPageParam: "" as string,
    getNextPageParam: (last) => last.next ?? undefined,
  });
  const vms = q.data?.pages.flatMap((p) => p.items) ?? [];
  return (
    <section>
      <h1>Virtual machines</h1>
      <ErrorMessage error={q.error} />
      {q.isLoading ? <Loading what="VMs" /> : null}
      {q.data ? (
        <table className="grid">
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Power state</th>
              <th scope="col">Host</th>
              <th scope="col">CPUs</th>
              <th scope="col">Memory</th>
              <th scope="col">Folder</th>
              <th scope="col">Version</th>
              <th scope="col">Lease</th>
            </tr>
          </thead>
          <tbody>
            {vms.map((vm) => {
              const pending =
                vm.runtime.running_version !== null &&
                vm.runtime.running_version !== undefined &&
                vm.runtime.running_version < vm.version;
              return (
                <tr key={vm.id}>
                  <td>
                    <Link to={`/vms/${encodeURIComponent(vm.name)}`}>{vm.name}</Link>
                  </td>
                  <td>
                    <PowerBadge state={vm.runtime.power_state} />
                    {pending ? <span className="badge pending" title="Config changes wait for the next power cycle">pending</span> : null}
                  </td>
                  <td>{vm.runtime.host ?? "—"}</td>
                  <td className="num">{vm.config.cpus ?? "—"}</td>
                  <td className="num">{vm.config.memory_mib ? `${vm.config.memory_mib} MiB` : "—"}</td>
                  <td>{vm.config.folder ?? "/"}</td>
                  <td className="num">{vm.version}</td>
                  <td>{vm.lease ? vm.lease.holder : ""}</td>
                </tr>
              );
            })}
            {vms.length === 0 ? (
              <tr>
                <td colSpan={8} className="muted">
                  No VMs you may view.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      ) : null}
      {q.hasNextPage ? (
        <button type="button" onClick={() => q.fetchNextPage()} disabled={q.isFetchingNextPage}>
          Load more
        </button>
      ) : null}
    </section>
  );
}
