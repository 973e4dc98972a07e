import { expect, openVm, signIn, test } from "./fixtures";

test("a read-only user sees the VM but cannot save or power it", async ({ browser, state }) => {
  const rita = await signIn(browser, state, "rita");
  const page = rita.page;
  await openVm(page, "vm-readonly");
  await expect(page.getByRole("button", { name: "Save", exact: true })).toBeDisabled();
  await expect(page.getByLabel("CPUs", { exact: true })).toBeDisabled();
  const power = page.getByRole("region", { name: "Power" });
  for (const b of ["Power on", "Shut down", "Power off", "Reset"]) {
    await expect(power.getByRole("button", { name: b })).toBeDisabled();
  }
  await expect(page.getByRole("region", { name: "Lease" }).getByRole("button", { name: "Acquire lease" })).toBeDisabled();
  await rita.context.close();
});
