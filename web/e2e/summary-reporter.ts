import type { FullResult, Reporter, Suite, TestError } from "@playwright/test/reporter";

// Prints one final line: `browser tests: N passed, N failed` (flaky, timed-out and
// interrupted tests count as failed; errors outside tests, e.g. in the global setup, too).
export default class SummaryReporter implements Reporter {
  private suite: Suite | undefined;
  private errors = 0;

  printsToStdio() {
    return true;
  }

  onBegin(_config: unknown, suite: Suite) {
    this.suite = suite;
  }

  onError(_error: TestError) {
    this.errors++;
  }

  onEnd(_result: FullResult) {
    let passed = 0;
    let failed = this.errors;
    let skipped = 0;
    for (const t of this.suite?.allTests() ?? []) {
      const outcome = t.outcome();
      if (outcome === "expected") passed++;
      else if (outcome === "skipped") skipped++;
      else failed++; // unexpected (failed, timed out, interrupted) or flaky
    }
    console.log(`browser tests: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
  }
}
