import { describe, expect, it } from "vitest";
import {
  applyMergePatch,
  changedPaths,
  deepEqual,
  getAt,
  isEmptyPatch,
  mergePatch,
  pathToString,
  resolve,
  setAt,
  threeWayMerge,
  topFields,
  type Json,
} from "./merge";

const base = {
  name: "web-1",
  description: "front end",
  cpus: 2,
  memory_mib: 2048,
  annotations: { owner: "alice", tier: "web" },
  autostart: { enabled: false as boolean, order: 1 },
  disks: [{ disk: "web-1-root", controller: "scsi0", unit: 0 }],
  nics: [{ network: "lan", model: "virtio-net", mac: "52:54:00:00:00:01" }],
} satisfies Json;

function edit(f: (d: typeof base) => void) {
  const d = JSON.parse(JSON.stringify(base));
  f(d);
  return d;
}

describe("deepEqual", () => {
  it("compares structurally and ignores undefined keys", () => {
    expect(deepEqual({ a: 1, b: [1, { c: 2 }] }, { b: [1, { c: 2 }], a: 1 })).toBe(true);
    expect(deepEqual({ a: 1, b: undefined }, { a: 1 })).toBe(true);
    expect(deepEqual([1, 2], [2, 1])).toBe(false);
    expect(deepEqual({ a: null }, {})).toBe(false);
    expect(deepEqual(1, "1")).toBe(false);
    expect(deepEqual([], {})).toBe(false);
  });
});

describe("changedPaths", () => {
  it("finds nothing for equal documents", () => {
    expect(changedPaths(base, edit(() => {}))).toEqual([]);
  });
  it("finds scalar and nested changes, additions and deletions", () => {
    const side = edit((d) => {
      d.cpus = 4;
      (d.annotations as Record<string, string>).owner = "bob";
      delete (d.annotations as Record<string, string | undefined>).tier;
      (d as Record<string, unknown>).folder = "/team-a";
    });
    expect(changedPaths(base, side).map(pathToString)).toEqual([
      "annotations.owner",
      "annotations.tier",
      "cpus",
      "folder",
    ]);
  });
  it("treats arrays as atomic values", () => {
    const side = edit((d) => {
      d.disks[0].unit = 1;
    });
    expect(changedPaths(base, side)).toEqual([["disks"]]);
  });
  it("reports a whole replaced value at its path", () => {
    expect(changedPaths({ a: { b: 1 } }, { a: 5 })).toEqual([["a"]]);
    expect(changedPaths(1, 2)).toEqual([[]]);
  });
  it("names top-level fields", () => {
    expect(topFields([["annotations", "a"], ["annotations", "b"], ["cpus"]])).toEqual(["annotations", "cpus"]);
  });
});

describe("threeWayMerge", () => {
  it("merges disjoint edits without conflicts", () => {
    const theirs = edit((d) => {
      d.cpus = 4;
    });
    const yours = edit((d) => {
      d.memory_mib = 4096;
      d.description = "new";
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([]);
    expect(r.merged).toEqual(
      edit((d) => {
        d.cpus = 4;
        d.memory_mib = 4096;
        d.description = "new";
      }),
    );
  });

  it("accepts the same edit on both sides", () => {
    const theirs = edit((d) => {
      d.cpus = 8;
      d.nics = [];
    });
    const yours = edit((d) => {
      d.cpus = 8;
      d.nics = [];
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([]);
    expect(r.merged).toEqual(theirs);
  });

  it("keeps one side when only it changed", () => {
    const theirs = edit((d) => {
      d.name = "web-2";
    });
    expect(threeWayMerge(base, theirs, base).merged).toEqual(theirs);
    expect(threeWayMerge(base, base, theirs).merged).toEqual(theirs);
  });

  it("reports conflicting scalars with base, theirs and yours", () => {
    const theirs = edit((d) => {
      d.cpus = 4;
      d.description = "theirs";
    });
    const yours = edit((d) => {
      d.cpus = 6;
      d.memory_mib = 1024;
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([{ path: ["cpus"], base: 2, theirs: 4, yours: 6 }]);
    // Non-conflicting changes of both sides are in; the conflict holds theirs until resolved.
    expect(getAt(r.merged, ["description"])).toBe("theirs");
    expect(getAt(r.merged, ["memory_mib"])).toBe(1024);
    expect(getAt(r.merged, ["cpus"])).toBe(4);
    expect(getAt(resolve(r, ["mine"]), ["cpus"])).toBe(6);
    expect(getAt(resolve(r, ["theirs"]), ["cpus"])).toBe(4);
  });

  it("merges nested objects key by key", () => {
    const theirs = edit((d) => {
      d.annotations.owner = "bob";
      d.autostart.enabled = true;
    });
    const yours = edit((d) => {
      (d.annotations as Record<string, string>).env = "prod";
      d.autostart.order = 5;
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([]);
    expect(getAt(r.merged, ["annotations"])).toEqual({ owner: "bob", tier: "web", env: "prod" });
    expect(getAt(r.merged, ["autostart"])).toEqual({ enabled: true, order: 5 });
  });

  it("reports a nested conflict at its full path", () => {
    const theirs = edit((d) => {
      d.annotations.owner = "bob";
    });
    const yours = edit((d) => {
      d.annotations.owner = "carol";
      d.annotations.tier = "db";
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([{ path: ["annotations", "owner"], base: "alice", theirs: "bob", yours: "carol" }]);
    expect(getAt(r.merged, ["annotations", "tier"])).toBe("db");
  });

  it("merges an object both sides added from nothing", () => {
    const r = threeWayMerge({}, { console: { vnc: true } }, { console: { serial: true } });
    expect(r.conflicts).toEqual([]);
    expect(r.merged).toEqual({ console: { vnc: true, serial: true } });
  });

  it("treats arrays as atomic: different list edits conflict", () => {
    const theirs = edit((d) => {
      d.disks = [...d.disks, { disk: "data", controller: "scsi0", unit: 1 }];
    });
    const yours = edit((d) => {
      d.disks = [{ ...d.disks[0], unit: 3 }];
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts.map((c) => c.path)).toEqual([["disks"]]);
    expect(r.conflicts[0].base).toEqual(base.disks);
    expect(r.conflicts[0].theirs).toEqual(theirs.disks);
    expect(r.conflicts[0].yours).toEqual(yours.disks);
    expect(getAt(resolve(r, ["mine"]), ["disks"])).toEqual(yours.disks);
  });

  it("takes a list changed on one side only", () => {
    const yours = edit((d) => {
      d.nics = [];
    });
    const theirs = edit((d) => {
      d.cpus = 3;
    });
    const r = threeWayMerge(base, theirs, yours);
    expect(r.conflicts).toEqual([]);
    expect(getAt(r.merged, ["nics"])).toEqual([]);
    expect(getAt(r.merged, ["cpus"])).toBe(3);
  });

  it("handles deletions: one-sided delete merges, delete vs change conflicts", () => {
    const theirs = edit((d) => {
      delete (d.annotations as Record<string, unknown>).tier;
    });
    const yours = edit((d) => {
      d.annotations.owner = "zed";
    });
    const r1 = threeWayMerge(base, theirs, yours);
    expect(r1.conflicts).toEqual([]);
    expect(getAt(r1.merged, ["annotations"])).toEqual({ owner: "zed" });

    const yours2 = edit((d) => {
      d.annotations.tier = "db";
    });
    const r2 = threeWayMerge(base, theirs, yours2);
    expect(r2.conflicts).toEqual([{ path: ["annotations", "tier"], base: "web", theirs: undefined, yours: "db" }]);
    expect(getAt(r2.merged, ["annotations"])).toEqual({ owner: "alice" });
    expect(getAt(resolve(r2, ["mine"]), ["annotations"])).toEqual({ owner: "alice", tier: "db" });
  });

  it("deleting on both sides is no conflict", () => {
    const del = edit((d) => {
      delete (d as Record<string, unknown>).description;
    });
    const r = threeWayMerge(base, del, del);
    expect(r.conflicts).toEqual([]);
    expect(getAt(r.merged, ["description"])).toBeUndefined();
  });

  it("handles null values as values", () => {
    const r = threeWayMerge({ cdrom: "iso:a.iso" }, { cdrom: null }, { cdrom: "iso:b.iso" });
    expect(r.conflicts).toEqual([{ path: ["cdrom"], base: "iso:a.iso", theirs: null, yours: "iso:b.iso" }]);
    const r2 = threeWayMerge({ cdrom: "iso:a.iso" }, { cdrom: null }, { cdrom: "iso:a.iso", cpus: 2 });
    expect(r2.merged).toEqual({ cdrom: null, cpus: 2 });
  });

  it("conflicts when one side replaces an object with a scalar", () => {
    const r = threeWayMerge({ a: { b: 1 } }, { a: 7 }, { a: { b: 2 } });
    expect(r.conflicts).toEqual([{ path: ["a"], base: { b: 1 }, theirs: 7, yours: { b: 2 } }]);
  });

  it("does not share structure with its inputs", () => {
    const theirs = edit((d) => {
      d.cpus = 9;
    });
    const r = threeWayMerge(base, theirs, base);
    (r.merged as { annotations: Record<string, string> }).annotations.owner = "mutated";
    expect(theirs.annotations.owner).toBe("alice");
  });
});

describe("setAt / getAt", () => {
  it("sets and removes nested values without mutating", () => {
    const doc = { a: { b: 1 } };
    expect(setAt(doc, ["a", "c"], 2)).toEqual({ a: { b: 1, c: 2 } });
    expect(setAt(doc, ["a", "b"], undefined)).toEqual({ a: {} });
    expect(setAt(doc, ["x", "y"], true)).toEqual({ a: { b: 1 }, x: { y: true } });
    expect(doc).toEqual({ a: { b: 1 } });
    expect(getAt(doc, ["a", "b", "c"])).toBeUndefined();
  });
});

describe("mergePatch", () => {
  it("is empty for equal documents", () => {
    const p = mergePatch(base, edit(() => {}));
    expect(p).toEqual({});
    expect(isEmptyPatch(p)).toBe(true);
  });
  it("carries changed scalars, whole arrays, nested objects and nulls for removals", () => {
    const to = edit((d) => {
      d.cpus = 4;
      d.disks = [];
      d.annotations.owner = "bob";
      delete (d.annotations as Record<string, unknown>).tier;
      delete (d as Record<string, unknown>).description;
    });
    expect(mergePatch(base, to)).toEqual({
      cpus: 4,
      disks: [],
      annotations: { owner: "bob", tier: null },
      description: null,
    });
  });
  it("round-trips with applyMergePatch", () => {
    const to = edit((d) => {
      d.nics[0].model = "e1000";
      d.autostart = { enabled: true, order: 2 };
      (d.annotations as Record<string, string>).new = "x";
    });
    expect(applyMergePatch(base, mergePatch(base, to))).toEqual(to);
  });
  it("builds the patch of a three-way merge from base", () => {
    const theirs = edit((d) => {
      d.cpus = 4;
    });
    const yours = edit((d) => {
      d.memory_mib = 8192;
    });
    const r = threeWayMerge(base, theirs, yours);
    // Rebased on theirs, only my change is left to send.
    expect(mergePatch(theirs, r.merged)).toEqual({ memory_mib: 8192 });
    expect(mergePatch(base, r.merged)).toEqual({ cpus: 4, memory_mib: 8192 });
  });
});
