import type { Page } from "@playwright/test";
import { cpus, expect, openVm, save, saveButton, test } from "./fixtures";

async function conflict(ann: Page, bob: Page, theirs: number, yours: number) {
  await cpus(ann).fill(String(theirs));
  await cpus(bob).fill(String(yours));
  await save(ann);
  await saveButton(bob).click();
  const dialog = bob.getByRole("dialog", { name: "Conflicting changes" });
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText("ann");
  return dialog;
}

test("both change CPUs: bob's dialog names ann, shows base/theirs/yours; keep mine, then keep theirs", async ({ ann, bob, api }) => {
  const vm = "vm-conflict";
  await openVm(ann.page, vm);
  await openVm(bob.page, vm);
  const base = (await api.vm(vm)).config.cpus;

  // Round 1: bob keeps his value.
  let dialog = await conflict(ann.page, bob.page, 2, 5);
  const row = dialog.getByRole("row", { name: /cpus/ });
  await expect(dialog.getByRole("columnheader", { name: "Theirs (ann)" })).toBeVisible();
  await expect(row.getByRole("cell").nth(0)).toHaveText(String(base)); // base
  await expect(row.getByRole("cell").nth(1)).toHaveText("2"); // theirs
  await expect(row.getByRole("cell").nth(2)).toHaveText("5"); // yours
  await dialog.getByRole("button", { name: "Keep mine" }).click();
  await expect(dialog).toBeHidden();
  await expect(bob.page.getByRole("status").filter({ hasText: /Saved as version \d+\./ })).toBeVisible();
  expect((await api.vm(vm)).config.cpus).toBe(5);
  await expect(cpus(ann.page)).toHaveValue("5", { timeout: 5_000 });

  // Round 2: bob takes ann's value.
  dialog = await conflict(ann.page, bob.page, 6, 7);
  await dialog.getByRole("button", { name: "Keep theirs" }).click();
  await expect(dialog).toBeHidden();
  await expect(cpus(bob.page)).toHaveValue("6");
  const after = await api.vm(vm);
  expect(after.config.cpus).toBe(6);
  await expect(bob.page.getByRole("form", { name: "Configuration" })).not.toContainText("unsaved changes");
});
