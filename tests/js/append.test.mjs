// The `append` operation (protocol v3: LLM answers streamed as text appended to a string), from
// the vectors the server's tests read too (tests/vectors/append.json): each case's patch, applied
// to its document by applyPatch, gives its result, or fails and leaves the document as it was.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { applyPatch } from "../../asgi_session_sync/static/session-sync.js";

// A list of {name, document, patch, result} or {name, document, patch, error: true}.
const VECTORS = JSON.parse(
  readFileSync(new URL("../vectors/append.json", import.meta.url), "utf8"),
);

/** Freeze a value deeply, so any mutation by applyPatch throws (ES modules are strict). */
function deepFreeze(value) {
  if (value !== null && typeof value === "object") {
    Object.values(value).forEach(deepFreeze);
    Object.freeze(value);
  }
  return value;
}

describe("shared append vectors", () => {
  test("cover successes and failures, astral text, and every case the spec names", () => {
    assert.ok(VECTORS.length >= 30, `${VECTORS.length} vectors`);
    assert.equal(new Set(VECTORS.map((v) => v.name)).size, VECTORS.length);
    for (const vector of VECTORS) {
      const keys = Object.keys(vector).sort().join(",");
      assert.ok(
        keys === "document,name,patch,result" || keys === "document,error,name,patch",
        `${vector.name}: ${keys}`,
      );
      if ("error" in vector) assert.equal(vector.error, true, vector.name);
    }
    const errors = VECTORS.filter((v) => v.error);
    assert.ok(errors.length >= 10 && errors.length < VECTORS.length);
    assert.ok(VECTORS.some((v) => /[\u{10000}-\u{10FFFF}]/u.test(JSON.stringify(v.document))));
  });

  for (const { name, document, patch, result, error } of VECTORS) {
    test(name, () => {
      const before = structuredClone(document);
      const frozen = deepFreeze(structuredClone(document));
      const operations = deepFreeze(structuredClone(patch));
      if (error) {
        const failed = /^JSON Patch operation \d+ failed: /;
        assert.throws(() => applyPatch(frozen, operations), { name: "Error", message: failed });
        assert.deepEqual(frozen, before);
      } else {
        assert.deepEqual(applyPatch(frozen, operations), result);
      }
    });
  }
});

describe("append", () => {
  const apply = (document, operations) => applyPatch(deepFreeze(document), operations);

  test("a wrong offset names the string's length in UTF-16 code units and the offset", () => {
    assert.throws(
      () => apply({ t: "a😀" }, [{ op: "append", path: "/t", offset: 2, value: "b" }]),
      {
        message:
          'JSON Patch operation 0 failed: append failed: the string at "/t" is 3 UTF-16 code ' +
          "units long, not the offset 2",
      },
    );
  });

  test("a target that is not a string is named with its JSON type", () => {
    const cases = [
      [{ t: 1 }, "a number"],
      [{ t: {} }, "an object"],
      [{ t: [] }, "an array"],
      [{ t: null }, "null"],
      [{ t: true }, "a boolean"],
    ];
    for (const [document, type] of cases) {
      const expected = `append failed: the value at "/t" is ${type}, not a string`;
      assert.throws(() => apply(document, [{ op: "append", path: "/t", offset: 0, value: "x" }]), {
        message: `JSON Patch operation 0 failed: ${expected}`,
      });
    }
  });

  test("a malformed append says which member is wrong", () => {
    const document = { t: "a" };
    for (const offset of [undefined, -1, 0.5, "1", true, 2 ** 53, NaN, Infinity]) {
      assert.throws(() => apply(document, [{ op: "append", path: "/t", offset, value: "b" }]), {
        message:
          'JSON Patch operation 0 failed: "append" needs an "offset" that is a whole number ' +
          "from 0 to 2^53 - 1",
      });
    }
    for (const value of [undefined, 1, null, ["b"], { b: 1 }]) {
      assert.throws(() => apply(document, [{ op: "append", path: "/t", offset: 1, value }]), {
        message: 'JSON Patch operation 0 failed: "append" needs a string "value"',
      });
    }
    const pathless = { op: "append", offset: 1, value: "b" };
    assert.throws(() => apply(document, [pathless]), /"append" needs a "path"/);
  });

  test("the largest offset is accepted as a number (and fails only on the length)", () => {
    const operation = { op: "append", path: "/t", offset: Number.MAX_SAFE_INTEGER, value: "b" };
    assert.throws(() => apply({ t: "a" }, [operation]), /is 1 UTF-16 code units long/);
  });

  test("the document before a refused patch is kept, and stays the caller's", () => {
    const document = deepFreeze({ chat: { text: "Hello", status: "streaming" }, other: [1] });
    assert.throws(() =>
      applyPatch(document, [
        { op: "append", path: "/chat/text", offset: 5, value: " world" },
        { op: "replace", path: "/chat/status", value: "complete" },
        { op: "append", path: "/chat/text", offset: 5, value: "!" }, // stale offset
      ]),
    );
    assert.deepEqual(document, { chat: { text: "Hello", status: "streaming" }, other: [1] });
  });
});

describe("one working copy per patch", () => {
  test("the containers on touched paths are new, the untouched ones shared with the input", () => {
    const document = deepFreeze({ a: { list: [1, 2], text: "x" }, b: { deep: [3] } });
    const result = applyPatch(document, [
      { op: "append", path: "/a/text", offset: 1, value: "y" },
      { op: "add", path: "/a/list/-", value: 3 },
      { op: "add", path: "/a/list/-", value: 4 },
    ]);
    assert.deepEqual(result, { a: { list: [1, 2, 3, 4], text: "xy" }, b: { deep: [3] } });
    assert.notEqual(result, document);
    assert.notEqual(result.a, document.a);
    assert.notEqual(result.a.list, document.a.list);
    assert.equal(result.b, document.b);
  });

  test("a result is never changed by the next patch applied to it", () => {
    const first = applyPatch({ items: [] }, [
      { op: "add", path: "/items/-", value: { text: "" } },
      { op: "append", path: "/items/0/text", offset: 0, value: "a" },
    ]);
    deepFreeze(first); // the next patch must copy, not write, what the first one made
    const second = applyPatch(first, [
      { op: "append", path: "/items/0/text", offset: 1, value: "b" },
      { op: "add", path: "/items/-", value: { text: "c" } },
    ]);
    assert.deepEqual(first, { items: [{ text: "a" }] });
    assert.deepEqual(second, { items: [{ text: "ab" }, { text: "c" }] });
  });

  test("a container the document holds twice is copied for the path changed only", () => {
    const shared = [1];
    const document = { x: shared, y: shared };
    const result = applyPatch(document, [
      { op: "add", path: "/x/-", value: 2 },
      { op: "add", path: "/x/-", value: 3 },
    ]);
    assert.deepEqual(result, { x: [1, 2, 3], y: [1] });
    assert.equal(result.y, shared);
    assert.deepEqual(shared, [1]);
  });

  test("a copy made in the patch is independent of its source for the operations after it", () => {
    const result = applyPatch({ a: { n: [1] } }, [
      { op: "add", path: "/b", value: { n: [] } },
      { op: "copy", from: "/b", path: "/c" },
      { op: "add", path: "/c/n/-", value: 9 },
      { op: "copy", from: "/a", path: "/d" },
      { op: "add", path: "/d/n/-", value: 8 },
    ]);
    assert.deepEqual(result, { a: { n: [1] }, b: { n: [] }, c: { n: [9] }, d: { n: [1, 8] } });
  });

  test("a value moved within the patch can be changed after the move", () => {
    const document = deepFreeze({ from: { text: "a" }, to: {} });
    const result = applyPatch(document, [
      { op: "add", path: "/from/n", value: 1 },
      { op: "move", from: "/from", path: "/to/moved" },
      { op: "append", path: "/to/moved/text", offset: 1, value: "b" },
    ]);
    assert.deepEqual(result, { to: { moved: { text: "ab", n: 1 } } });
    assert.deepEqual(document, { from: { text: "a" }, to: {} });
  });

  test("an operation's value is copied in even when the patch changes it afterwards", () => {
    const value = { list: [1] };
    const operations = [
      { op: "add", path: "/v", value },
      { op: "add", path: "/v/list/-", value: 2 },
    ];
    const result = applyPatch({}, operations);
    assert.deepEqual(result, { v: { list: [1, 2] } });
    assert.deepEqual(value, { list: [1] });
  });
});
