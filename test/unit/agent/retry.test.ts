import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { handBackDelayMs, retryFor } from "../../../src/agent/retry.js";

describe("retryFor", () => {
  it("retries a failing step with growing pauses until it resolves", async () => {
    const pauses: number[] = [];
    let calls = 0;
    const value = await retryFor(
      async () => {
        calls += 1;
        if (calls < 3) {
          throw new Error(`no responders ${calls}`);
        }
        return "answered";
      },
      { forMs: 5000, onRetry: (_, pauseMs) => pauses.push(pauseMs) },
    );
    assert.equal(value, "answered");
    assert.deepEqual(pauses, [250, 500]);
  });

  it("gives up with the last failure when the time is used up", async () => {
    let calls = 0;
    await assert.rejects(
      retryFor(
        async () => {
          calls += 1;
          throw new Error(`no responders ${calls}`);
        },
        { forMs: 1000 },
      ),
      /no responders 3/,
    );
  });

  it("stops at once when told to", async () => {
    let calls = 0;
    await assert.rejects(
      retryFor(
        async () => {
          calls += 1;
          throw new Error("closing");
        },
        { forMs: 60_000, stopped: () => true },
      ),
      /closing/,
    );
    assert.equal(calls, 1);
  });
});

describe("handBackDelayMs", () => {
  it("doubles from 1 s per delivery and stops at 15 s", () => {
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6, 10].map(handBackDelayMs),
      [1000, 2000, 4000, 8000, 15_000, 15_000, 15_000],
    );
  });
});
