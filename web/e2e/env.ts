// What the global setup tells the tests: where covm listens and who may sign in.
import { readFileSync } from "node:fs";

export interface E2eState {
  url: string;
  root: string;
  dataDir: string;
  pid: number;
  adminToken: string;
  password: string;
  vms: Record<string, string>;
}

export const STATE_ENV = "COVM_E2E_STATE";

export function loadState(): E2eState {
  const file = process.env[STATE_ENV];
  if (!file) throw new Error(`${STATE_ENV} is not set: run the tests with \`npm run e2e\` (global setup starts covm)`);
  return JSON.parse(readFileSync(file, "utf8")) as E2eState;
}
