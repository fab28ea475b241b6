// applyPatch against RFC 6902 (JSON Patch) and RFC 6901 (JSON Pointer): the examples of RFC 6902
// Appendix A, every error case the RFCs define, immutability and atomicity.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { applyPatch } from "../../asgi_session_sync/static/session-sync.js";

/** Freeze a value deeply, so any mutation by applyPatch throws (ES modules are strict). */
function deepFreeze(value) {
  if (value !== null && typeof value === "object") {
    Object.values(value).forEach(deepFreeze);
    Object.freeze(value);
  }
  return value;
}

/** Apply to frozen copies of document and patch, so a test also proves nothing is mutated. */
function apply(document, operations) {
  return applyPatch(deepFreeze(structuredClone(document)), deepFreeze(structuredClone(operations)));
}

function rejects(document, operations, message) {
  assert.throws(() => apply(document, operations), (error) => {
    assert.ok(error instanceof Error);
    if (message) assert.match(error.message, message);
    return true;
  });
}

// RFC 6902 Appendix A, one vector per example: [section, title, document, patch, expected].
// `expected` undefined means the RFC calls the patch an error.
const APPENDIX_A = [
  ["A.1", "adding an object member", { foo: "bar" },
    [{ op: "add", path: "/baz", value: "qux" }], { baz: "qux", foo: "bar" }],
  ["A.2", "adding an array element", { foo: ["bar", "baz"] },
    [{ op: "add", path: "/foo/1", value: "qux" }], { foo: ["bar", "qux", "baz"] }],
  ["A.3", "removing an object member", { baz: "qux", foo: "bar" },
    [{ op: "remove", path: "/baz" }], { foo: "bar" }],
  ["A.4", "removing an array element", { foo: ["bar", "qux", "baz"] },
    [{ op: "remove", path: "/foo/1" }], { foo: ["bar", "baz"] }],
  ["A.5", "replacing a value", { baz: "qux", foo: "bar" },
    [{ op: "replace", path: "/baz", value: "boo" }], { baz: "boo", foo: "bar" }],
  ["A.6", "moving a value",
    { foo: { bar: "baz", waldo: "fred" }, qux: { corge: "grault" } },
    [{ op: "move", from: "/foo/waldo", path: "/qux/thud" }],
    { foo: { bar: "baz" }, qux: { corge: "grault", thud: "fred" } }],
  ["A.7", "moving an array element", { foo: ["all", "grass", "cows", "eat"] },
    [{ op: "move", from: "/foo/1", path: "/foo/3" }], { foo: ["all", "cows", "eat", "grass"] }],
  ["A.8", "testing a value: success", { baz: "qux", foo: ["a", 2, "c"] },
    [{ op: "test", path: "/baz", value: "qux" }, { op: "test", path: "/foo/1", value: 2 }],
    { baz: "qux", foo: ["a", 2, "c"] }],
  ["A.9", "testing a value: error", { baz: "qux" },
    [{ op: "test", path: "/baz", value: "bar" }], undefined],
  ["A.10", "adding a nested member object", { foo: "bar" },
    [{ op: "add", path: "/child", value: { grandchild: {} } }],
    { foo: "bar", child: { grandchild: {} } }],
  ["A.11", "ignoring unrecognized elements", { foo: "bar" },
    [{ op: "add", path: "/baz", value: "qux", xyz: 123 }], { foo: "bar", baz: "qux" }],
  ["A.12", "adding to a nonexistent target", { foo: "bar" },
    [{ op: "add", path: "/baz/bat", value: "qux" }], undefined],
  ["A.14", "~ escape ordering", { "/": 9, "~1": 10 },
    [{ op: "test", path: "/~01", value: 10 }], { "/": 9, "~1": 10 }],
  ["A.15", "comparing strings and numbers", { "/": 9, "~1": 10 },
    [{ op: "test", path: "/~01", value: "10" }], undefined],
  ["A.16", "adding an array value", { foo: ["bar"] },
    [{ op: "add", path: "/foo/-", value: ["abc", "def"] }], { foo: ["bar", ["abc", "def"]] }],
];

describe("RFC 6902 Appendix A", () => {
  for (const [section, title, document, operations, expected] of APPENDIX_A) {
    test(`${section} ${title}`, () => {
      if (expected === undefined) rejects(document, operations);
      else assert.deepEqual(apply(document, operations), expected);
    });
  }

  test("A.13 invalid JSON Patch document: the last duplicate member wins, and fails", () => {
    // The patch as the RFC spells it, with "op" twice; JSON.parse keeps the last, "remove",
    // whose target does not exist.
    const operations = JSON.parse('[{ "op": "add", "path": "/baz", "value": "qux", "op": "remove" }]');
    rejects({ foo: "bar" }, operations, /no member "baz"/);
  });
});

describe("JSON Pointer (RFC 6901)", () => {
  const document = { "a/b": 1, "m~n": 2, "": 3, " ": 4, "c%d": 5, "~0": 6, arr: [10, 20] };

  test("~1 unescapes to / and ~0 to ~", () => {
    assert.deepEqual(apply(document, [{ op: "test", path: "/a~1b", value: 1 }]), document);
    assert.deepEqual(apply(document, [{ op: "test", path: "/m~0n", value: 2 }]), document);
    assert.deepEqual(apply(document, [{ op: "test", path: "/~00", value: 6 }]), document);
  });

  test("the empty token and odd characters are ordinary member names", () => {
    assert.deepEqual(apply(document, [{ op: "test", path: "/", value: 3 }]), document);
    assert.deepEqual(apply(document, [{ op: "test", path: "/ ", value: 4 }]), document);
    assert.deepEqual(apply(document, [{ op: "test", path: "/c%d", value: 5 }]), document);
  });

  test("the empty pointer names the whole document", () => {
    assert.deepEqual(apply(document, [{ op: "test", path: "", value: document }]), document);
    assert.deepEqual(apply({ a: 1 }, [{ op: "replace", path: "", value: [1] }]), [1]);
    assert.deepEqual(apply({ a: 1 }, [{ op: "add", path: "", value: { b: 2 } }]), { b: 2 });
  });

  test("a ~ not followed by 0 or 1 is an error", () => {
    rejects(document, [{ op: "test", path: "/m~2n", value: 2 }], /"~" not followed by 0 or 1/);
    rejects(document, [{ op: "test", path: "/m~", value: 2 }], /"~" not followed by 0 or 1/);
  });

  test("a pointer that is not empty must start with /", () => {
    rejects(document, [{ op: "add", path: "a", value: 1 }], /start with "\/"/);
    rejects(document, [{ op: "add", path: 5, value: 1 }], /JSON Pointer string/);
    rejects(document, [{ op: "copy", from: "arr", path: "/x" }], /"from" must be ""/);
  });

  test("array indexes are decimal without leading zeros", () => {
    assert.deepEqual(apply(document, [{ op: "test", path: "/arr/0", value: 10 }]), document);
    rejects(document, [{ op: "test", path: "/arr/01", value: 20 }], /not an array index/);
    rejects(document, [{ op: "test", path: "/arr/-1", value: 20 }], /not an array index/);
    rejects(document, [{ op: "test", path: "/arr/1e0", value: 20 }], /not an array index/);
    rejects(document, [{ op: "test", path: "/arr/x", value: 20 }], /not an array index/);
  });

  test("a pointer through a scalar or a missing member is an error", () => {
    rejects(document, [{ op: "add", path: "/a~1b/c", value: 1 }], /not an object or array/);
    rejects(document, [{ op: "replace", path: "/nope/c", value: 1 }], /no value at "\/nope"/);
    rejects(document, [{ op: "test", path: "/arr/0/x", value: 1 }], /no value/);
  });
});

describe("operations", () => {
  test("add inserts into arrays at an index up to the length, - appends", () => {
    const document = { a: [1, 2] };
    assert.deepEqual(apply(document, [{ op: "add", path: "/a/0", value: 0 }]), { a: [0, 1, 2] });
    assert.deepEqual(apply(document, [{ op: "add", path: "/a/2", value: 3 }]), { a: [1, 2, 3] });
    assert.deepEqual(apply(document, [{ op: "add", path: "/a/-", value: 3 }]), { a: [1, 2, 3] });
    rejects(document, [{ op: "add", path: "/a/3", value: 3 }], /out of bounds/);
  });

  test("add replaces an existing member and accepts null as a value", () => {
    assert.deepEqual(apply({ a: 1 }, [{ op: "add", path: "/a", value: null }]), { a: null });
  });

  test("add, replace and test need a value", () => {
    for (const op of ["add", "replace", "test"]) {
      rejects({ a: 1 }, [{ op, path: "/a" }], new RegExp(`"${op}" needs a "value"`));
    }
  });

  test("remove and replace need an existing target", () => {
    rejects({ a: 1 }, [{ op: "remove", path: "/b" }], /no member "b"/);
    rejects({ a: 1 }, [{ op: "replace", path: "/b", value: 2 }], /no member "b"/);
    rejects({ a: [1] }, [{ op: "remove", path: "/a/1" }], /out of bounds/);
    rejects({ a: [1] }, [{ op: "replace", path: "/a/1", value: 2 }], /out of bounds/);
    rejects({ a: [1] }, [{ op: "remove", path: "/a/-" }], /"-" names no existing element/);
    rejects({ a: [1] }, [{ op: "replace", path: "/a/-", value: 2 }], /"-" names no/);
    rejects({ a: [1] }, [{ op: "test", path: "/a/-", value: 1 }], /"-" names no/);
  });

  test("remove on the whole document is an error", () => {
    rejects({ a: 1 }, [{ op: "remove", path: "" }], /whole document/);
  });

  test("replace sets an array element in place", () => {
    assert.deepEqual(apply([1, 2, 3], [{ op: "replace", path: "/1", value: 9 }]), [1, 9, 3]);
  });

  test("move needs an existing from, and cannot move a location into its own child", () => {
    rejects({ a: { b: 1 } }, [{ op: "move", path: "/c" }], /"move" needs a "from"/);
    rejects({ a: 1 }, [{ op: "move", from: "/x", path: "/c" }], /no value at "\/x"/);
    rejects({ a: { b: 1 } }, [{ op: "move", from: "/a", path: "/a/b/c" }], /own child/);
    rejects({ a: { b: 1 } }, [{ op: "move", from: "", path: "/a" }], /own child/);
    // A sibling whose name starts with the same characters is not a child.
    assert.deepEqual(apply({ a: 1 }, [{ op: "move", from: "/a", path: "/ab" }]), { ab: 1 });
  });

  test("move onto itself changes nothing", () => {
    const document = { a: [1, 2] };
    assert.deepEqual(apply(document, [{ op: "move", from: "/a/0", path: "/a/0" }]), document);
  });

  test("move to the end of an array with -", () => {
    assert.deepEqual(apply([1, 2, 3], [{ op: "move", from: "/0", path: "/-" }]), [2, 3, 1]);
  });

  test("copy needs an existing from, and makes an independent value", () => {
    rejects({ a: 1 }, [{ op: "copy", path: "/c" }], /"copy" needs a "from"/);
    rejects({ a: 1 }, [{ op: "copy", from: "/x", path: "/c" }], /no value/);
    const result = applyPatch({ a: { n: [1] } }, [{ op: "copy", from: "/a", path: "/b" }]);
    assert.deepEqual(result, { a: { n: [1] }, b: { n: [1] } });
    assert.notEqual(result.b, result.a);
    assert.notEqual(result.b.n, result.a.n);
  });

  test("test compares by JSON value: member order is irrelevant, array order is not", () => {
    const document = { o: { x: 1, y: [1, { z: null }] }, n: 1, t: true };
    const same = { y: [1, { z: null }], x: 1 };
    assert.deepEqual(apply(document, [{ op: "test", path: "/o", value: same }]), document);
    assert.deepEqual(apply(document, [{ op: "test", path: "/n", value: 1.0 }]), document);
    for (const value of [{ x: 1 }, { x: 1, y: [{ z: null }, 1] }, [1], "1", true, null]) {
      rejects(document, [{ op: "test", path: "/o", value }], /test failed/);
    }
    rejects(document, [{ op: "test", path: "/t", value: 1 }], /test failed/);
    rejects(document, [{ op: "test", path: "/n", value: [1] }], /test failed/);
    rejects(document, [{ op: "test", path: "/o/y", value: { 0: 1, 1: { z: null } } }], /test failed/);
    rejects(document, [{ op: "test", path: "/missing", value: null }], /no value/);
  });

  test("an unknown or missing op, a missing path, and a non-object operation are errors", () => {
    rejects({}, [{ op: "rename", path: "/a" }], /"op" must be one of/);
    rejects({}, [{ path: "/a", value: 1 }], /"op" must be one of/);
    rejects({}, [{ op: "add", value: 1 }], /"add" needs a "path"/);
    rejects({}, [null], /must be an object/);
    rejects({}, [["add", "/a", 1]], /must be an object/);
    rejects({}, { op: "add", path: "/a", value: 1 }, /must be an array/);
  });

  test("a member named __proto__ is an ordinary member", () => {
    const result = applyPatch({}, [{ op: "add", path: "/__proto__", value: { polluted: true } }]);
    assert.equal(Object.getPrototypeOf(result), Object.prototype);
    assert.deepEqual(Object.keys(result), ["__proto__"]);
    assert.equal({}.polluted, undefined);
    const removed = applyPatch(result, [{ op: "remove", path: "/__proto__" }]);
    assert.deepEqual(Object.keys(removed), []);
  });
});

describe("application", () => {
  test("an empty patch returns the document as it is", () => {
    const document = { a: 1 };
    assert.equal(applyPatch(document, []), document);
  });

  test("the input document and operations are never mutated", () => {
    const document = { items: [{ text: "a" }], meta: { n: 1 } };
    const operations = [
      { op: "add", path: "/items/-", value: { text: "b" } },
      { op: "replace", path: "/items/0/text", value: "A" },
      { op: "move", from: "/meta/n", path: "/n" },
      { op: "copy", from: "/items/1", path: "/last" },
    ];
    const before = structuredClone([document, operations]);
    const result = apply(document, operations); // frozen inputs: a mutation would throw
    assert.deepEqual(result, {
      items: [{ text: "A" }, { text: "b" }],
      meta: {},
      n: 1,
      last: { text: "b" },
    });
    applyPatch(document, operations);
    assert.deepEqual([document, operations], before);
  });

  test("values are copied in, so the result shares nothing with the operations", () => {
    const value = { deep: [1] };
    const result = applyPatch({}, [{ op: "add", path: "/v", value }]);
    assert.notEqual(result.v, value);
    assert.notEqual(result.v.deep, value.deep);
  });

  test("a patch that fails part-way changes nothing (atomic)", () => {
    const document = deepFreeze({ a: 1, list: [1, 2] });
    assert.throws(
      () =>
        applyPatch(document, [
          { op: "replace", path: "/a", value: 2 },
          { op: "add", path: "/list/-", value: 3 },
          { op: "test", path: "/a", value: 1 }, // fails: /a is 2 by now
        ]),
      /JSON Patch operation 2 failed: test failed/,
    );
    assert.deepEqual(document, { a: 1, list: [1, 2] });
  });

  test("operations apply in sequence, each on the result of the previous", () => {
    const result = apply({}, [
      { op: "add", path: "/a", value: [] },
      { op: "add", path: "/a/-", value: 1 },
      { op: "test", path: "/a", value: [1] },
      { op: "copy", from: "/a/0", path: "/a/0" },
      { op: "remove", path: "/a/1" },
    ]);
    assert.deepEqual(result, { a: [1] });
  });
});
