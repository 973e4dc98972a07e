import { cpus, expect, memory, openVm, save, saveButton, test } from "./fixtures";

test("disjoint edits merge on bob's save (412, then merged automatically)", async ({ ann, bob, api }) => {
  const vm = "vm-merge";
  await openVm(ann.page, vm);
  await openVm(bob.page, vm);
  const before = await api.vm(vm);

  await memory(bob.page).fill("256"); // unsaved
  await cpus(ann.page).fill("4");
  await save(ann.page);
  // Bob's page learns of ann's version but keeps his draft.
  await expect(bob.page.getByRole("status").filter({ hasText: "ann changed cpus" })).toBeVisible({ timeout: 5_000 });
  await expect(memory(bob.page)).toHaveValue("256");

  const statuses: number[] = [];
  bob.page.on("response", (r) => {
    if (r.request().method() === "PATCH" && r.url().includes(`/api/v1/vms/`)) statuses.push(r.status());
  });
  await saveButton(bob.page).click();
  await expect(bob.page.getByRole("status").filter({ hasText: /Saved as version \d+\./ })).toBeVisible();
  await expect(bob.page.getByRole("dialog")).toHaveCount(0);
  expect(statuses).toEqual([412, 200]);

  const after = await api.vm(vm);
  expect(after.config.cpus).toBe(4);
  expect(after.config.memory_mib).toBe(256);
  expect(after.version).toBe(before.version + 2);
  // Bob's form shows the merged result.
  await expect(cpus(bob.page)).toHaveValue("4");
});
