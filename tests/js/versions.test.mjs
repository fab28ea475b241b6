// compareVersions: ints (JSON numbers or decimal-digit strings, the wire rule for big ones) by
// exact value, timestamps as instants to the microsecond, and nothing across the two kinds.
import assert from "node:assert/strict";
import { test } from "node:test";

import { compareVersions } from "../../asgi_session_sync/static/session-sync.js";

const CASES = [
  // [a, b, expected]
  [2, 1, 1],
  [1, 1, 0],
  [1, 2, -1],
  ["9007199254740993", "9007199254740992", 1], // 2^53 + 1 and 2^53: equal as doubles
  ["9007199254740992", 9007199254740992, 0], // a digit string and a number, by value
  ["12", 9, 1], // by value, not as text
  ["007", 7, 0],
  ["-9007199254740993", "-9007199254740992", -1],
  ["123456789012345678901234567890", "123456789012345678901234567889", 1],
  ["2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z", 0],
  ["2026-01-01T00:00:00.000002Z", "2026-01-01T00:00:00.000001Z", 1],
  ["2026-01-01T00:00:00.0000019Z", "2026-01-01T00:00:00.000001Z", 0], // to the microsecond
  ["2026-01-01T00:00:00", "2026-01-01T00:00:00Z", 0],
  [1, "2026-01-01T00:00:00Z", null],
  ["9007199254740993", "2026-01-01T00:00:00Z", null],
  ["tuesday", 1, null],
  ["1.5", 1, null],
  ["+1", 1, null],
  [1.5, 1, null],
  [null, 1, null],
  [true, 1, null],
];

for (const [a, b, expected] of CASES) {
  test(`compareVersions(${JSON.stringify(a)}, ${JSON.stringify(b)}) is ${expected}`, () => {
    assert.equal(compareVersions(a, b), expected);
    assert.equal(compareVersions(b, a), expected === null ? null : -expected || 0);
  });
}
