import { cpus, expect, memory, openVm, save, test } from "./fixtures";

test("history: diff two versions, revert to an older one", async ({ ann, api }) => {
  const vm = "vm-history";
  const page = ann.page;
  await openVm(page, vm);
  const v1 = await api.vm(vm);

  await cpus(page).fill("2");
  await save(page);
  await memory(page).fill("96");
  await save(page);
  const v3 = await api.vm(vm);
  expect(v3.version).toBe(v1.version + 2);

  await page.getByRole("tab", { name: "History" }).click();
  const history = page.getByRole("region", { name: "History" });
  await expect(history.getByRole("row")).toHaveCount(1 + 3); // header + 3 versions
  await history.getByLabel(`From version ${v1.version}`).check();
  await history.getByLabel(`To version ${v1.version + 1}`).check();
  await history.getByRole("button", { name: "Show diff" }).click();
  const diff = history.getByLabel("Diff");
  await expect(diff).toContainText(`Changes from version ${v1.version} to ${v1.version + 1}`);
  await expect(diff).toContainText("cpus");
  await expect(diff).not.toContainText("memory_mib");

  await history.getByLabel(`To version ${v3.version}`).check();
  await history.getByRole("button", { name: "Show diff" }).click();
  await expect(diff).toContainText("memory_mib");

  await history.getByRole("button", { name: `Revert to ${v1.version}`, exact: true }).click();
  await expect(history.getByRole("status")).toHaveText(`Reverted: now at version ${v3.version + 1}.`);
  const now = await api.vm(vm);
  expect(now.version).toBe(v3.version + 1);
  expect(now.config.cpus).toBe(v1.config.cpus);
  expect(now.config.memory_mib).toBe(v1.config.memory_mib);
  await expect(history.getByRole("row")).toHaveCount(1 + 4);

  await page.getByRole("tab", { name: "Summary" }).click();
  await expect(cpus(page)).toHaveValue(String(v1.config.cpus));
  await expect(memory(page)).toHaveValue(String(v1.config.memory_mib));
});
