import { cpus, expect, feedLive, openVm, save, test } from "./fixtures";

// Records, in the page, every EventSource the app opens and the feed events each one got,
// so that the test can tell a resumed feed from a refetch.
function recordFeeds() {
  type Rec = { url: string; seqs: number[]; es: EventSource };
  const w = window as unknown as { __feeds: Rec[] };
  w.__feeds = [];
  const Orig = window.EventSource;
  class Recording extends Orig {
    constructor(url: string | URL, init?: EventSourceInit) {
      super(url, init);
      const rec: Rec = { url: String(url), seqs: [], es: this };
      w.__feeds.push(rec);
      this.addEventListener("message", (m) => {
        try {
          const seq = JSON.parse((m as MessageEvent).data)?.seq;
          if (typeof seq === "number") rec.seqs.push(seq);
        } catch {
          // not JSON
        }
      });
    }
  }
  window.EventSource = Recording as typeof EventSource;
}

test("bob's feed resumes after he was offline and shows what he missed", async ({ ann, bob, api }) => {
  const vm = "vm-offline";
  await bob.page.addInitScript(recordFeeds);
  await openVm(ann.page, vm);
  await bob.page.goto(`/vms/${vm}`);
  await openVm(bob.page, vm);
  await feedLive(bob.page);

  // A first change that bob sees live, so that his feed has a position to resume from.
  await cpus(ann.page).fill("2");
  await save(ann.page);
  await expect(cpus(bob.page)).toHaveValue("2", { timeout: 5_000 });
  const seen = await bob.page.evaluate(() =>
    Math.max(...(window as unknown as { __feeds: { seqs: number[] }[] }).__feeds.flatMap((f) => f.seqs)),
  );
  expect(seen).toBeGreaterThan(0);

  // Bob goes offline. Chromium's offline emulation may leave an open EventSource alone,
  // so the feed is also blocked and the open stream closed, as a dropped connection would be.
  await bob.context.setOffline(true);
  await bob.page.waitForTimeout(500);
  const states = await bob.page.evaluate(() =>
    (window as unknown as { __feeds: { es: EventSource }[] }).__feeds.map((f) => f.es.readyState),
  );
  test.info().annotations.push({ type: "EventSource readyStates after setOffline(true)", description: JSON.stringify(states) });
  await bob.page.route("**/api/v1/events**", (r) => r.abort("internetdisconnected"));
  await bob.page.evaluate(() => {
    for (const f of (window as unknown as { __feeds: { es: EventSource }[] }).__feeds) f.es.close();
  });
  await expect(bob.page.getByRole("status").filter({ hasText: "Reconnecting" })).toBeVisible();

  await cpus(ann.page).fill("3");
  await save(ann.page);
  const v = await api.vm(vm);
  expect(v.config.cpus).toBe(3);
  // Offline, bob cannot know yet.
  await bob.page.waitForTimeout(1_000);
  await expect(cpus(bob.page)).toHaveValue("2");

  await bob.page.unroute("**/api/v1/events**");
  await bob.context.setOffline(false);
  await expect(cpus(bob.page)).toHaveValue("3", { timeout: 10_000 });
  await feedLive(bob.page);

  // The feed was reopened after the last event bob had seen, and that stream brought
  // him the missed event.
  const feeds = await bob.page.evaluate(() =>
    (window as unknown as { __feeds: { url: string; seqs: number[] }[] }).__feeds.map((f) => ({ url: f.url, seqs: f.seqs })),
  );
  const resumed = feeds.filter((f) => new URL(f.url, "http://x").searchParams.get("after") === String(seen));
  expect(resumed.length, JSON.stringify(feeds)).toBeGreaterThan(0);
  await expect
    .poll(async () =>
      (
        await bob.page.evaluate(() =>
          (window as unknown as { __feeds: { url: string; seqs: number[] }[] }).__feeds
            .filter((f) => f.url.includes("after="))
            .flatMap((f) => f.seqs),
        )
      ).some((s) => s > seen),
    )
    .toBe(true);
});
