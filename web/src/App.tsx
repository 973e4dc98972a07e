import { Route, Routes } from "react-router";
import { RequireSession, UnauthenticatedRedirect } from "./auth";
import { Layout } from "./components/Layout";
import { FeedProvider } from "./live";
import { AdminPage } from "./pages/Admin";
import { AuditPage } from "./pages/Audit";
import { DatastorePage } from "./pages/Datastore";
import { DiskPage, DisksPage } from "./pages/Disks";
import { NotFoundPage } from "./pages/NotFound";
import { EnrollPage, SignInPage } from "./pages/SignIn";
import { TasksPage } from "./pages/Tasks";
import { VmListPage } from "./pages/VmList";
import { VmPage } from "./pages/VmPage";

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
          <Route path="vms/:name" element={<VmPage />} />
          <Route path="disks" element={<DisksPage />} />
          <Route path="disks/:name" element={<DiskPage />} />
          <Route path="datastores/:name" element={<DatastorePage />} />
          <Route path="tasks" element={<TasksPage />} />
          <Route path="audit" element={<AuditPage />} />
          <Route path="admin" element={<AdminPage />} />
          <Route path="*" element={<NotFoundPage />} />
        </Route>
      </Routes>
    </>
  );
}
