import { describe, expect, it } from "vitest";
import {
  FeedCursor,
  backoffMs,
  feedUrl,
  keysForEvent,
  othersPresent,
  parseEvent,
  parsePresence,
  patchFields,
  reopenUrl,
  type FeedEvent,
} from "./feed";

const vmId = "0b8f3a52-6a3e-4d3c-9d7e-2f1f5d0a9c11";

function ev(over: Partial<FeedEvent>): FeedEvent {
  return {
    seq: 1,
    time: "2026-01-01T00:00:00Z",
    actor: "alice",
    kind: "vm.config.changed",
    object_kind: "vm",
    object_id: vmId,
    object_name: "web-1",
    data: {},
    ...over,
  };
}

describe("parseEvent", () => {
  it("parses an EventView", () => {
    const e = parseEvent(
      JSON.stringify({
        seq: 42,
        time: "2026-01-01T00:00:00Z",
        actor: "bob",
        kind: "vm.config.changed",
        object_kind: "vm",
        object_id: vmId,
        object_name: "web-1",
        version_before: 3,
        version_after: 4,
        patch: [{ op: "replace", path: "/cpus", value: 4 }],
        data: {},
        hash: "ab",
      }),
    );
    expect(e?.seq).toBe(42);
    expect(e?.actor).toBe("bob");
    expect(e?.version_after).toBe(4);
  });
  it("rejects what is not an event", () => {
    expect(parseEvent("not json")).toBeNull();
    expect(parseEvent("null")).toBeNull();
    expect(parseEvent('{"seq":"1","kind":"x","object_kind":"vm"}')).toBeNull();
    expect(parseEvent('{"seq":1,"object_kind":"vm"}')).toBeNull();
  });
  it("fills a missing actor", () => {
    expect(parseEvent('{"seq":1,"kind":"x","object_kind":"vm","time":"t","data":{}}')?.actor).toBe("-");
  });
});

describe("parsePresence", () => {
  it("parses entries and drops malformed ones", () => {
    const p = parsePresence(
      JSON.stringify({
        vm: vmId,
        entries: [
          { user: "bob", state: "editing", since: "t" },
          { user: "carol", state: "sleeping", since: "t" },
          { nope: 1 },
        ],
      }),
    );
    expect(p).toEqual({ vm: vmId, entries: [{ user: "bob", state: "editing", since: "t" }] });
    expect(parsePresence("{}")).toBeNull();
    expect(parsePresence("garbage")).toBeNull();
  });
  it("lists other users once each, editing first", () => {
    const others = othersPresent(
      [
        { user: "me", state: "editing", since: "t" },
        { user: "zed", state: "viewing", since: "t" },
        { user: "bob", state: "viewing", since: "t" },
        { user: "bob", state: "editing", since: "t" },
      ],
      "me",
    );
    expect(others.map((e) => [e.user, e.state])).toEqual([
      ["bob", "editing"],
      ["zed", "viewing"],
    ]);
  });
});

describe("keysForEvent", () => {
  it("invalidates a VM by id and name, its versions and the VM list", () => {
    const keys = keysForEvent(ev({}));
    expect(keys).toContainEqual(["vms"]);
    expect(keys).toContainEqual(["vm", vmId]);
    expect(keys).toContainEqual(["vm", "web-1"]);
    expect(keys).toContainEqual(["vm-versions", vmId]);
    expect(keys).toContainEqual(["inventory"]);
  });
  it("a file uploaded to a datastore refreshes that datastore's files", () => {
    const keys = keysForEvent(
      ev({ kind: "datastore.file.uploaded", object_kind: "datastore", object_id: "ds1", object_name: "local" }),
    );
    expect(keys).toContainEqual(["datastore-files", "local"]);
    expect(keys).not.toContainEqual(["vms"]);
  });
  it("power changes touch the VM but not the inventory", () => {
    const keys = keysForEvent(ev({ kind: "vm.power.changed" }));
    expect(keys).toContainEqual(["vm", "web-1"]);
    expect(keys).not.toContainEqual(["inventory"]);
  });
  it("disk attach touches disks and the VM named in data", () => {
    const keys = keysForEvent(
      ev({ kind: "disk.attached", object_kind: "disk", object_id: "d1", object_name: "data", data: { vm: "web-1" } }),
    );
    expect(keys).toContainEqual(["disks"]);
    expect(keys).toContainEqual(["disk", "data"]);
    expect(keys).toContainEqual(["vm", "web-1"]);
    expect(keys).toContainEqual(["vms"]);
  });
  it("disk attach without a VM in data touches every VM", () => {
    const keys = keysForEvent(ev({ kind: "disk.detached", object_kind: "disk", object_name: "data", object_id: null }));
    expect(keys).toContainEqual(["vm"]);
  });
  it("task events touch the task list and the task", () => {
    const keys = keysForEvent(ev({ kind: "task.progress", object_kind: "task", object_id: "t1", object_name: null }));
    expect(keys).toContainEqual(["tasks"]);
    expect(keys).toContainEqual(["task", "t1"]);
  });
  it("task events on a VM name the task from data", () => {
    const keys = keysForEvent(ev({ kind: "task.progress", data: { task: "t9" } }));
    expect(keys).toContainEqual(["tasks"]);
    expect(keys).toContainEqual(["task", "t9"]);
    expect(keys).toContainEqual(["vm", vmId]);
  });
  it("permission changes refresh admin lists and my privileges", () => {
    const keys = keysForEvent(ev({ kind: "permission.granted", object_kind: "permission", object_id: "p" }));
    expect(keys).toContainEqual(["admin"]);
    expect(keys).toContainEqual(["session"]);
  });
  it("inventory objects refresh the tree", () => {
    expect(keysForEvent(ev({ kind: "folder.created", object_kind: "folder" }))).toEqual([["inventory"], ["folders"]]);
  });
  it("does not repeat keys", () => {
    const keys = keysForEvent(ev({ object_id: "same", object_name: "same" }));
    const ser = keys.map((k) => JSON.stringify(k));
    expect(new Set(ser).size).toBe(ser.length);
  });
});

describe("patchFields", () => {
  it("names the top-level fields of an RFC 6902 patch", () => {
    expect(
      patchFields([
        { op: "replace", path: "/cpus", value: 4 },
        { op: "add", path: "/annotations/owner", value: "x" },
        { op: "remove", path: "/annotations/tier" },
        { op: "replace", path: "/a~1b", value: 1 },
      ]),
    ).toEqual(["cpus", "annotations", "a/b"]);
    expect(patchFields(null)).toEqual([]);
    expect(patchFields([{ op: "replace", path: "", value: {} }])).toEqual(["(document)"]);
  });
});

describe("FeedCursor", () => {
  it("tracks the last seq and drops duplicates and older events", () => {
    const c = new FeedCursor();
    expect(c.lastSeq).toBeNull();
    expect(c.accept({ seq: 5 })).toBe(true);
    expect(c.accept({ seq: 5 })).toBe(false);
    expect(c.accept({ seq: 3 })).toBe(false);
    expect(c.accept({ seq: 6 })).toBe(true);
    expect(c.lastSeq).toBe(6);
  });
});

describe("feed URLs", () => {
  it("builds the feed URL with filter and resume point", () => {
    expect(feedUrl()).toBe("/api/v1/events");
    expect(feedUrl(vmId)).toBe(`/api/v1/events?object=${vmId}`);
    expect(feedUrl(null, 17)).toBe("/api/v1/events?after=17");
    expect(feedUrl(vmId, 0)).toBe(`/api/v1/events?object=${vmId}&after=0`);
  });
  it("resumes after errors and going online, starts live otherwise", () => {
    const c = new FeedCursor(41);
    expect(reopenUrl("start", null, c)).toBe("/api/v1/events");
    expect(reopenUrl("filter", vmId, c)).toBe(`/api/v1/events?object=${vmId}`);
    expect(reopenUrl("error", null, c)).toBe("/api/v1/events?after=41");
    expect(reopenUrl("online", vmId, c)).toBe(`/api/v1/events?object=${vmId}&after=41`);
    expect(reopenUrl("error", null, new FeedCursor())).toBe("/api/v1/events");
  });
  it("backs off up to 30 s", () => {
    expect(backoffMs(0)).toBe(1000);
    expect(backoffMs(3)).toBe(8000);
    expect(backoffMs(20)).toBe(30000);
  });
});
