import { expect, openVm, signIn, test } from "./fixtures";

test("ann sees bob in Viewing now while he is on the page, and no longer when he leaves", async ({ ann, bob, browser, state }) => {
  const vm = "vm-presence";
  await openVm(ann.page, vm);
  const viewing = ann.page.getByRole("region", { name: "Viewing now" });
  await expect(viewing).toContainText("only you");

  await openVm(bob.page, vm);
  await expect(viewing).toContainText("bob", { timeout: 5_000 });

  // Bob navigates away (the app says so with DELETE …/presence).
  await bob.page.getByRole("navigation", { name: "Main" }).getByRole("link").first().click();
  await expect(bob.page).not.toHaveURL(/\/vms\//);
  await expect(viewing).not.toContainText("bob", { timeout: 5_000 });
  await expect(viewing).toContainText("only you");

  // Bob comes back in another tab and closes it (pagehide: a keepalive DELETE).
  const bob2 = await signIn(browser, state, "bob", `/vms/${vm}`);
  await expect(viewing).toContainText("bob", { timeout: 5_000 });
  await bob2.page.close({ runBeforeUnload: true });
  await expect(viewing).not.toContainText("bob", { timeout: 5_000 });
  await bob2.context.close();
});
