// Debian's Chromium (never a downloaded browser), with the flags it needs as root on this machine
// (no sandbox; no background connections, which the closed network refuses). Shared by the browser
// tests (playwright.config.ts) and the bench (bench/live.mjs).
export const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];
