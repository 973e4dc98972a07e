import { lazy, Suspense, type ReactNode } from "react";
import { Route, Routes } from "react-router";
import { RequireSession, UnauthenticatedRedirect } from "./auth";
import { Layout } from "./components/Layout";
import { FeedProvider } from "./live";
import { NotFoundPage } from "./pages/NotFound";
import { EnrollPage, SignInPage } from "./pages/SignIn";
import { VmListPage } from "./pages/VmList";

// The pages beyond the first (the VM list) load when first opened: the first page carries only what
// it shows (docs/BENCHMARKS.md, the web UI's initial JavaScript).
const VmPage = lazy(() => import("./pages/VmPage").then((m) => ({ default: m.VmPage })));
const DisksPage = lazy(() => import("./pages/Disks").then((m) => ({ default: m.DisksPage })));
const DiskPage = lazy(() => import("./pages/Disks").then((m) => ({ default: m.DiskPage })));
const DatastorePage = lazy(() => import("./pages/Datastore").then((m) => ({ default: m.DatastorePage })));
const TasksPage = lazy(() => import("./pages/Tasks").then((m) => ({ default: m.TasksPage })));
const AuditPage = lazy(() => import("./pages/Audit").then((m) => ({ default: m.AuditPage })));
const AdminPage = lazy(() => import("./pages/Admin").then((m) => ({ default: m.AdminPage })));

function Page({ children }: { children: ReactNode }) {
  return <Suspense fallback={<p className="loading">Loading…</p>}>{children}</Suspense>;
}

export function App() {
  return (
    <>
      <UnauthenticatedRedirect />
      <Routes>
        <Route path="/signin" element={<SignInPage />} />
        <Route path="/enroll" element={<EnrollPage />} />
        <Route
          element={
            <RequireSession>
              <FeedProvider>
                <Layout />
              </FeedProvider>
            </RequireSession>
          }
        >
          <Route index element={<VmListPage />} />
          <Route path="vms/:name" element={<Page><VmPage /></Page>} />
          <Route path="disks" element={<Page><DisksPage /></Page>} />
          <Route path="disks/:name" element={<Page><DiskPage /></Page>} />
          <Route path="datastores/:name" element={<Page><DatastorePage /></Page>} />
          <Route path="tasks" element={<Page><TasksPage /></Page>} />
          <Route path="audit" element={<Page><AuditPage /></Page>} />
          <Route path="admin" element={<Page><AdminPage /></Page>} />
          <Route path="*" element={<NotFoundPage />} />
        </Route>
      </Routes>
    </>
  );
}
