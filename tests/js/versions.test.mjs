// What a version is (protocol v3), from the vectors the server's tests read too
// (tests/vectors/versions.json, checked by tests/test_version_vectors.py): each literal parses to
// the same version with JSON.parse and asVersion as with json.loads and as_version, and every
// pair orders the same way.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { asVersion, compareVersions } from "../../asgi_session_sync/static/session-sync.js";

const { vectors } = JSON.parse(
  readFileSync(new URL("../vectors/versions.json", import.meta.url), "utf8"),
);

/** 1 if a is newer, -1 if older, 0 if the same; null unless both are versions. */
function order(a, b) {
  if (a === null || b === null) return null;
  return a > b ? 1 : a < b ? -1 : 0;
}

test("the vectors are at least 40 distinct literals, with versions and non-versions", () => {
  assert.ok(vectors.length >= 40, `${vectors.length} vectors`);
  assert.equal(new Set(vectors.map((v) => v.text)).size, vectors.length);
  const expected = vectors.map((v) => v.version);
  assert.ok(expected.includes(null));
  assert.ok(expected.includes(0));
  assert.ok(expected.includes(Number.MAX_SAFE_INTEGER));
});

for (const { text, version } of vectors) {
  test(`asVersion(JSON.parse(${JSON.stringify(text)})) is ${version}`, () => {
    // strict equal is Object.is: -0 must come back as 0.
    assert.equal(asVersion(JSON.parse(text)), version);
  });
}

test("every pair of literals orders as its expected versions", () => {
  const wrong = [];
  for (const a of vectors) {
    for (const b of vectors) {
      const got = compareVersions(JSON.parse(a.text), JSON.parse(b.text));
      const want = order(a.version, b.version);
      if (!Object.is(got, want)) wrong.push([a.text, b.text, got, want]);
    }
  }
  assert.deepEqual(wrong, []);
});

test("values JSON cannot carry are not versions either", () => {
  for (const value of [undefined, NaN, Infinity, 7n, new Number(7), () => 7, Symbol("7")]) {
    assert.equal(asVersion(value), null, String(value));
    assert.equal(compareVersions(value, 7), null);
  }
});
