import { createHmac } from "node:crypto";
import { expect, test } from "./fixtures";

/** RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, of a base32 secret; `step` counts from now. */
function totp(secret: string, step = 0): string {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = "";
  for (const c of secret.replace(/=+$/, "").toUpperCase()) bits += alphabet.indexOf(c).toString(2).padStart(5, "0");
  const key = Buffer.from(bits.match(/.{8}/g)!.map((b) => parseInt(b, 2)));
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(Date.now() / 30_000) + step));
  const h = createHmac("sha1", key).update(counter).digest();
  const o = h[h.length - 1] & 0xf;
  return String((h.readUInt32BE(o) & 0x7fffffff) % 1_000_000).padStart(6, "0");
}

test("a user with two-factor sign-in is asked for the code and gets in with it", async ({ browser, state, api }) => {
  // mo turns two-factor sign-in on for himself (through the API, as the CLI would).
  await api.call("POST", "/users", { name: "mo", password: state.password });
  const session = await fetch(`${state.url}/api/v1/session`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: "mo", password: state.password }),
  }).then((r) => r.json());
  const auth = { authorization: `Bearer ${session.token}`, "content-type": "application/json" };
  const enrollment = await fetch(`${state.url}/api/v1/users/mo/mfa`, { method: "POST", headers: auth }).then((r) => r.json());
  const confirmed = await fetch(`${state.url}/api/v1/users/mo/mfa/confirm`, {
    method: "POST",
    headers: auth,
    body: JSON.stringify({ code: totp(enrollment.secret) }),
  });
  expect(confirmed.status).toBe(204);

  const context = await browser.newContext({ baseURL: state.url });
  const page = await context.newPage();
  await page.goto("/tasks");
  await page.getByLabel("User").fill("mo");
  await page.getByLabel("Password").fill(state.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  // A wrong code is refused with a message; the right one (the next step's: the server takes one
  // step of skew, and the step used to confirm cannot be used again) signs in.
  const code = page.getByLabel("Code", { exact: true });
  await expect(code).toBeVisible();
  await code.fill("000000");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("alert")).toBeVisible();
  await code.fill(totp(enrollment.secret, 1));
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL((u) => u.pathname === "/tasks");
  await expect(page.getByRole("button", { name: "Sign out" })).toBeVisible();
  await context.close();
});
