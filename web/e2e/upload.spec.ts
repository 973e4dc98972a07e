import { createHash } from "node:crypto";
import { expect, test } from "./fixtures";

test("a file uploads to a datastore in parts with a progress bar, and shows in its list", async ({ ann, state }) => {
  const { page } = ann;
  // 20 MiB and a bit: three parts of 8 MiB.
  const bytes = Buffer.alloc(20 * 1024 * 1024 + 4321);
  for (let i = 0; i < bytes.length; i += 4096) bytes[i] = (i / 4096) % 251;
  await page.goto("/datastores/local");
  await expect(page.getByRole("heading", { name: "Datastore local" })).toBeVisible();
  await page.getByLabel("File", { exact: true }).setInputFiles({ name: "e2e.iso", mimeType: "application/octet-stream", buffer: bytes });
  await page.getByLabel("Path in the datastore").fill("iso/e2e.iso");
  await page.getByRole("button", { name: "Upload", exact: true }).click();
  await expect(page.getByRole("status").filter({ hasText: "local:iso/e2e.iso uploaded" })).toBeVisible({ timeout: 30_000 });
  await expect(page.getByRole("row", { name: /iso\/e2e\.iso/ })).toContainText("20.0 MiB");

  // What arrived is what was sent.
  const r = await fetch(`${state.url}/api/v1/datastores/local/files/iso%2Fe2e.iso`, {
    headers: { authorization: `Bearer ${state.adminToken}` },
  });
  expect(r.status).toBe(200);
  const got = Buffer.from(await r.arrayBuffer());
  expect(createHash("sha256").update(got).digest("hex")).toBe(createHash("sha256").update(bytes).digest("hex"));

  // Deleted from the page.
  await page.getByRole("button", { name: "Delete iso/e2e.iso" }).click();
  await expect(page.getByRole("row", { name: /iso\/e2e\.iso/ })).toHaveCount(0);
});
