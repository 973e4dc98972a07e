// Three-way merge of JSON documents (a VM config draft against a newer server version).
//
// Pure functions over plain JSON. Objects merge key by key; arrays and scalars are atomic
// values (a `disks` or `nics` list is replaced as a whole, as a JSON merge patch does).
// A key that is absent and a key set to `undefined` are the same thing.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };
/** A path of object keys from the document's root, e.g. `["annotations", "owner"]`. */
export type Path = string[];

export interface Conflict {
  path: Path;
  /** `undefined` when the key did not exist on that side. */
  base: Json | undefined;
  theirs: Json | undefined;
  yours: Json | undefined;
}

export interface MergeResult {
  /** The merged document; at each conflicting path it holds `theirs` until resolved. */
  merged: Json | undefined;
  conflicts: Conflict[];
}

export function isObject(v: unknown): v is JsonObject {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

export function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    return a.every((x, i) => deepEqual(x, b[i]));
  }
  if (isObject(a)) {
    if (!isObject(b)) return false;
    const ka = Object.keys(a).filter((k) => a[k] !== undefined);
    const kb = Object.keys(b).filter((k) => b[k] !== undefined);
    if (ka.length !== kb.length) return false;
    return ka.every((k) => deepEqual(a[k], b[k]));
  }
  return false;
}

export function clone<T>(v: T): T {
  return v === undefined ? v : (JSON.parse(JSON.stringify(v)) as T);
}

function keysOf(...objs: (JsonObject | undefined)[]): string[] {
  const keys = new Set<string>();
  for (const o of objs) if (o) for (const k of Object.keys(o)) if (o[k] !== undefined) keys.add(k);
  return [...keys].sort();
}

/** The leaf paths at which `side` differs from `base` (objects recurse, arrays are atomic). */
export function changedPaths(base: Json | undefined, side: Json | undefined, prefix: Path = []): Path[] {
  if (deepEqual(base, side)) return [];
  if (isObject(base) && isObject(side)) {
    return keysOf(base, side).flatMap((k) => changedPaths(base[k], side[k], [...prefix, k]));
  }
  return [prefix];
}

/** `a.b` for display; the root is `(document)`. */
export function pathToString(path: Path): string {
  return path.length === 0 ? "(document)" : path.join(".");
}

/** The top-level fields touched by a set of paths, e.g. for "alice changed cpus, memory_mib". */
export function topFields(paths: Path[]): string[] {
  return [...new Set(paths.map((p) => p[0] ?? "(document)"))];
}

/** Three-way merge: `theirs` and `yours` both derive from `base`. */
export function threeWayMerge(
  base: Json | undefined,
  theirs: Json | undefined,
  yours: Json | undefined,
): MergeResult {
  const conflicts: Conflict[] = [];
  const merged = mergeAt(base, theirs, yours, [], conflicts);
  return { merged, conflicts };
}

function mergeAt(
  base: Json | undefined,
  theirs: Json | undefined,
  yours: Json | undefined,
  path: Path,
  conflicts: Conflict[],
): Json | undefined {
  if (deepEqual(theirs, yours)) return clone(theirs);
  if (deepEqual(base, theirs)) return clone(yours);
  if (deepEqual(base, yours)) return clone(theirs);
  // Both sides changed it, differently. Objects on both sides merge key by key (a missing
  // or non-object base counts as empty).
  if (isObject(theirs) && isObject(yours)) {
    const b = isObject(base) ? base : {};
    const out: JsonObject = {};
    for (const k of keysOf(b, theirs, yours)) {
      const v = mergeAt(b[k], theirs[k], yours[k], [...path, k], conflicts);
      if (v !== undefined) out[k] = v;
    }
    return out;
  }
  conflicts.push({ path, base: clone(base), theirs: clone(theirs), yours: clone(yours) });
  return clone(theirs);
}

/** Reads the value at `path` (`undefined` when absent). */
export function getAt(doc: Json | undefined, path: Path): Json | undefined {
  let cur: Json | undefined = doc;
  for (const k of path) {
    if (!isObject(cur)) return undefined;
    cur = cur[k];
  }
  return cur;
}

/** Returns a copy of `doc` with `value` at `path` (`undefined` removes the key). */
export function setAt(doc: Json | undefined, path: Path, value: Json | undefined): Json | undefined {
  if (path.length === 0) return clone(value);
  const root: JsonObject = isObject(doc) ? clone(doc) : {};
  let cur = root;
  for (const k of path.slice(0, -1)) {
    if (!isObject(cur[k])) cur[k] = {};
    cur = cur[k] as JsonObject;
  }
  const last = path[path.length - 1];
  if (value === undefined) delete cur[last];
  else cur[last] = clone(value);
  return root;
}

export type Choice = "mine" | "theirs";

/** Applies a choice per conflict (by index; missing choices keep theirs) to a merge result. */
export function resolve(result: MergeResult, choices: Choice[]): Json | undefined {
  let doc = result.merged;
  result.conflicts.forEach((c, i) => {
    doc = setAt(doc, c.path, choices[i] === "mine" ? c.yours : c.theirs);
  });
  return doc;
}

/**
 * The JSON Merge Patch (RFC 7386) that turns `from` into `to`: changed keys with their new
 * value, removed keys as `null`, nested objects as nested patches, arrays whole.
 * Returns `{}` when nothing changed.
 */
export function mergePatch(from: Json | undefined, to: Json | undefined): Json {
  if (!isObject(from) || !isObject(to)) return to === undefined ? null : clone(to);
  const patch: JsonObject = {};
  for (const k of keysOf(from, to)) {
    const a = from[k];
    const b = to[k];
    if (deepEqual(a, b)) continue;
    if (b === undefined) patch[k] = null;
    else if (isObject(a) && isObject(b)) patch[k] = mergePatch(a, b);
    else patch[k] = clone(b);
  }
  return patch;
}

/** Applies a JSON Merge Patch (RFC 7386) to a document. */
export function applyMergePatch(doc: Json | undefined, patch: Json): Json | undefined {
  if (!isObject(patch)) return clone(patch);
  const out: JsonObject = isObject(doc) ? clone(doc) : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else {
      const next = applyMergePatch(out[k], v);
      if (next !== undefined) out[k] = next;
    }
  }
  return out;
}

export function isEmptyPatch(patch: Json): boolean {
  return isObject(patch) && Object.keys(patch).length === 0;
}
