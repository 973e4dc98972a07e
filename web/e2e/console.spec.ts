import type { Page } from "@playwright/test";
import { expect, test } from "./fixtures";

const VM = "guest1";

/**
 * The text xterm.js shows (its DOM renderer's rows), with non-breaking spaces as spaces.
 * xterm.js pauses rendering while the terminal is outside the viewport (IntersectionObserver),
 * so it is scrolled into view first, as a user would.
 */
async function termText(page: Page): Promise<string> {
  const rows = page.getByRole("region", { name: "Serial console" }).locator(".xterm-rows");
  await rows.scrollIntoViewIfNeeded();
  return rows.evaluate((el) => (el as HTMLElement).innerText.replace(/\u00a0/g, " "));
}

interface Screen {
  width: number;
  height: number;
  colours: number;
}

/** The VNC canvas: its size and the number of distinct colours on it (1 when blank). */
async function screenShot(page: Page): Promise<Screen> {
  return page
    .getByRole("region", { name: "Console", exact: true })
    .locator("canvas")
    .first()
    .evaluate((c) => {
      const canvas = c as HTMLCanvasElement;
      const none = { width: canvas.width, height: canvas.height, colours: 0 };
      if (!canvas.width || !canvas.height) return none;
      const ctx = canvas.getContext("2d");
      if (!ctx) return none;
      const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const seen = new Set<number>();
      for (let i = 0; i < d.length && seen.size < 16; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      return { ...none, colours: seen.size };
    });
}

test.describe("consoles of a real QEMU guest", () => {
  test.skip(!!process.env.COVM_SKIP_QEMU, "COVM_SKIP_QEMU: no QEMU on this machine");
  test.setTimeout(180_000);

  test.afterEach(async ({ api }) => {
    const vm = await api.vm(VM);
    if (vm.runtime.power_state !== "off") await api.call("POST", `/vms/${VM}/power`, { action: "off" });
  });

  test("power on, serial console (read and type), screen, power off", async ({ ann }) => {
    const page = ann.page;
    await page.goto(`/vms/${VM}`);
    const power = page.getByRole("region", { name: "Power" });
    await power.getByRole("button", { name: "Power on" }).click();
    await expect(page.getByRole("region", { name: "Summary" }).getByRole("row", { name: /^Power state/ })).toContainText(
      "running",
      { timeout: 30_000 },
    );

    await page.getByRole("tab", { name: "Console" }).click();
    const serial = page.getByRole("region", { name: "Serial console" });
    await expect(serial.getByText("Connected")).toBeVisible({ timeout: 15_000 });
    await expect.poll(() => termText(page), { timeout: 90_000, intervals: [500] }).toContain("COVM-GUEST-READY");

    // Type into the terminal: the guest's busybox shell computes the answer.
    await serial.locator(".xterm").click();
    await page.keyboard.type("echo e2e-$((6*7))");
    await page.keyboard.press("Enter");
    await expect.poll(() => termText(page), { timeout: 30_000, intervals: [500] }).toContain("e2e-42");

    // The screen (noVNC): a canvas that shows something.
    const screen = page.getByRole("region", { name: "Console", exact: true });
    await expect(screen.getByText("Connected", { exact: true })).toBeVisible({ timeout: 30_000 });
    await expect.poll(async () => (await screenShot(page)).colours, { timeout: 60_000, intervals: [1000] }).toBeGreaterThan(1);
    // More than one colour is also what QEMU's placeholder shows when the VM has no display
    // device at all ("This VM has no graphic display device.": 640x480, grey text on black).
    const shot = await screenShot(page);
    expect(shot.width === 640 && shot.height === 480 && shot.colours === 2, `the placeholder of a VM without a display device: ${JSON.stringify(shot)}`).toBe(false);
    await screen.locator("canvas").screenshot({ path: test.info().outputPath("screen.png") });

    await page.getByRole("tab", { name: "Summary" }).click();
    await power.getByRole("button", { name: "Power off" }).click();
    await expect(page.getByRole("region", { name: "Summary" }).getByRole("row", { name: /^Power state/ })).toContainText(
      "off",
      { timeout: 30_000 },
    );
  });
});
