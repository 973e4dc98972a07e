import { expect, openVm, test } from "./fixtures";

test("ann makes a template and deploys a linked clone with her SSH key", async ({ ann, api }) => {
  const page = ann.page;
  await api.call("POST", "/vms", { name: "vm-golden", memory_mib: 64 });
  await openVm(page, "vm-golden");
  const panel = page.getByRole("region", { name: "Clone" });
  await panel.getByRole("button", { name: "Make template" }).click();
  await expect(page.locator(".page-head .badge", { hasText: "template" })).toBeVisible();
  await expect(page.getByRole("region", { name: "Clone" }).getByRole("heading")).toHaveText("Deploy from this template");
  await expect(page.getByRole("region", { name: "Power" }).getByRole("button", { name: "Power on" })).toBeDisabled();

  const deploy = page.getByRole("region", { name: "Clone" });
  await deploy.getByLabel("New VM name").fill("vm-from-golden");
  await deploy.getByLabel("Guest user (cloud-init)").fill("ann");
  await deploy.getByLabel("SSH public key").fill("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVx ann@laptop");
  await page.screenshot({ path: "test-results/clone-form.png", fullPage: true });
  await deploy.getByRole("button", { name: "Clone" }).click();
  await page.waitForURL((u) => u.pathname === "/vms/vm-from-golden");
  await expect(page.getByRole("heading", { level: 1, name: "vm-from-golden" })).toBeVisible();
  const v = await api.vm("vm-from-golden");
  const ci = v.config.cloud_init as { hostname?: string; users?: { name: string; ssh_authorized_keys: string[] }[] };
  expect(ci.hostname).toBe("vm-from-golden");
  expect(ci.users?.[0].name).toBe("ann");
  expect(ci.users?.[0].ssh_authorized_keys[0]).toContain("ann@laptop");
  const tpl = await api.vm("vm-golden");
  expect(tpl.config.template).toBe(true);
});
