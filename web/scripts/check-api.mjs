// Regenerates the API types into a temporary file and fails when they differ from
// the committed src/api/schema.d.ts (run `npm run gen:api` to update it).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dir = mkdtempSync(join(tmpdir(), "covm-api-"));
const out = join(dir, "schema.d.ts");
try {
  execFileSync(
    process.execPath,
    [join(root, "node_modules/openapi-typescript/bin/cli.js"), join(root, "../openapi/covm.json"), "-o", out],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  const want = readFileSync(out, "utf8");
  const have = readFileSync(join(root, "src/api/schema.d.ts"), "utf8");
  if (want !== have) {
    console.error("src/api/schema.d.ts is out of date with ../openapi/covm.json: run `npm run gen:api`");
    process.exit(1);
  }
  console.log("src/api/schema.d.ts is up to date");
} finally {
  rmSync(dir, { recursive: true, force: true });
}
