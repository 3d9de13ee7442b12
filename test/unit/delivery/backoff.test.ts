import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  backoffDelayMs,
  resolveBackoff,
} from "../../../src/delivery/backoff.js";

const settings = { initialMs: 200, maxMs: 5000 };
const almostOne = () => 0.999999;

describe("backoff", () => {
  it("doubles the ceiling per attempt up to the cap", () => {
    const ceilings = [0, 1, 2, 3, 4, 5, 6, 20, 100].map((attempt) =>
      backoffDelayMs(attempt, settings, almostOne),
    );
    assert.deepEqual(
      ceilings,
      [199, 399, 799, 1599, 3199, 4999, 4999, 4999, 4999],
    );
  });

  it("draws with full jitter from zero up to the ceiling", () => {
    assert.equal(
      backoffDelayMs(3, settings, () => 0),
      0,
    );
    assert.equal(
      backoffDelayMs(3, settings, () => 0.5),
      800,
    );
    for (let index = 0; index < 1000; index++) {
      const delay = backoffDelayMs(index % 10, settings);
      assert.ok(delay >= 0 && delay < 5000, String(delay));
    }
  });

  it("treats a negative attempt as the first", () => {
    assert.equal(backoffDelayMs(-4, settings, almostOne), 199);
  });

  it("fills in defaults of 200 and 5000 ms and refuses nonsense", () => {
    assert.deepEqual(resolveBackoff(undefined), settings);
    assert.deepEqual(resolveBackoff({ initialMs: 10 }), {
      initialMs: 10,
      maxMs: 5000,
    });
    assert.throws(() => resolveBackoff({ initialMs: 0 }), RangeError);
    assert.throws(
      () => resolveBackoff({ initialMs: 100, maxMs: 50 }),
      RangeError,
    );
  });
});
