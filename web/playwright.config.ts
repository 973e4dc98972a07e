import { defineConfig } from "@playwright/test";
import { CHROMIUM, CHROMIUM_ARGS } from "./e2e/chromium.mjs";

// End-to-end tests against a real covm (QEMU driver) started by e2e/global-setup.ts,
// which serves its embedded UI. Run with `npm run e2e` (COVM_BIN overrides the binary).
export default defineConfig({
  testDir: "./e2e",
  // Two cores and QEMU under TCG: one test at a time.
  workers: 1,
  fullyParallel: false,
  retries: 0,
  timeout: 60_000,
  expect: { timeout: 10_000 },
  globalSetup: "./e2e/global-setup.ts",
  globalTeardown: "./e2e/global-teardown.ts",
  reporter: [["list"], ["./e2e/summary-reporter.ts"]],
  outputDir: "./test-results",
  use: {
    browserName: "chromium",
    headless: true,
    launchOptions: { executablePath: CHROMIUM, args: CHROMIUM_ARGS },
    screenshot: "only-on-failure",
    trace: "off",
    actionTimeout: 10_000,
    navigationTimeout: 15_000,
  },
});
