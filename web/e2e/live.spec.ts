import { cpus, expect, feedLive, openVm, save, test } from "./fixtures";

test("a save by ann shows on bob's open page without a reload", async ({ ann, bob, api }) => {
  const vm = "vm-live";
  await openVm(ann.page, vm);
  await openVm(bob.page, vm);
  await feedLive(bob.page);
  await expect(bob.page.getByLabel("CPUs", { exact: true })).toHaveValue("1");
  let reloaded = false;
  bob.page.on("framenavigated", (f) => {
    if (f === bob.page.mainFrame()) reloaded = true;
  });

  await cpus(ann.page).fill("3");
  await save(ann.page);

  await expect(cpus(bob.page)).toHaveValue("3", { timeout: 5_000 });
  // The summary table too.
  await expect(bob.page.getByRole("region", { name: "Summary" }).getByRole("row", { name: /^CPUs/ })).toContainText("3");
  expect(reloaded).toBe(false);
  expect((await api.vm(vm)).config.cpus).toBe(3);
});
