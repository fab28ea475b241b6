// applyPatch takes linear time: one working copy per patch, each container on a touched path
// copied once, not once per operation. The bounds are generous (ten times the target), so a slow
// or loaded machine passes; each test reports the time it measured as a diagnostic.
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import { test } from "node:test";

import { applyPatch } from "../../asgi_session_sync/static/session-sync.js";

const ITEMS = 50_000;
const ADDED = 5_000;

/** The best of a few runs of fn, in ms: the first run also pays for compiling the code. */
function bestOf(runs, fn) {
  let best = Infinity;
  for (let run = 0; run < runs; run++) {
    const start = performance.now();
    fn();
    best = Math.min(best, performance.now() - start);
  }
  return best;
}

const item = (i) => ({ id: i, text: `item ${i}`, done: false });

/** A 50,000-item list and, as make_patch writes them, 5,000 adds that append 5,000 items. */
function appendingPatch(path) {
  const document = { title: "list", items: Array.from({ length: ITEMS }, (_, i) => item(i)) };
  const operations = Array.from({ length: ADDED }, (_, i) => ({
    op: "add",
    path: path(ITEMS + i),
    value: item(ITEMS + i),
  }));
  return { document, operations };
}

for (const [how, path] of [
  ['"/items/-"', () => "/items/-"],
  ["explicit indices", (index) => `/items/${index}`],
]) {
  test(`5,000 adds at ${how} to a 50,000-item list take well under 500 ms (target 50 ms)`, (t) => {
    const { document, operations } = appendingPatch(path);
    let result;
    const ms = bestOf(3, () => {
      result = applyPatch(document, operations);
    });
    t.diagnostic(`5,000 adds at ${how}: ${ms.toFixed(1)} ms`);
    assert.equal(result.items.length, ITEMS + ADDED);
    assert.deepEqual(result.items[ITEMS + ADDED - 1], item(ITEMS + ADDED - 1));
    assert.equal(document.items.length, ITEMS); // the input is untouched
    assert.equal(result.items[0], document.items[0]); // and its items shared, not copied
    assert.ok(ms < 500, `${ms.toFixed(1)} ms`);
  });
}

// The benchmark of issue 19: the 5,000-add patch against the floor of copying the document once
// (structuredClone: a deep copy, which a naive "clone, then apply in place" would pay). Target:
// at most 2x the floor; asserted: under 10x, for a loaded machine. The figure is a diagnostic
// line starting with "benchmark:", which tests/test_js_client.py prints (pytest -s).
test("benchmark: the 5,000-add patch against one structuredClone of the document", (t) => {
  const { document, operations } = appendingPatch(() => "/items/-");
  let result;
  // Interleaved runs, the best of each: both see the same machine load.
  let floor = Infinity;
  let patch = Infinity;
  for (let run = 0; run < 7; run++) {
    floor = Math.min(floor, bestOf(1, () => structuredClone(document)));
    patch = Math.min(
      patch,
      bestOf(1, () => {
        result = applyPatch(document, operations);
      }),
    );
  }
  const ratio = patch / floor;
  t.diagnostic(
    `benchmark: 5,000 adds to a 50,000-item list: ${patch.toFixed(1)} ms; one structuredClone` +
      ` of the document: ${floor.toFixed(1)} ms; ${ratio.toFixed(2)}x the floor (target 2x)`,
  );
  assert.equal(result.items.length, ITEMS + ADDED);
  assert.ok(ratio < 10, `${ratio.toFixed(2)}x the floor`);
});

test("10,000 one-append patches to a 100 KB answer take well under 1 s (target 100 ms)", (t) => {
  const ms = bestOf(3, () => {
    let chat = {
      title: "chat",
      interactions: [{ prompt: "hi", response: "x".repeat(100_000), status: "streaming" }],
    };
    for (let i = 0; i < 10_000; i++) {
      const offset = chat.interactions[0].response.length;
      chat = applyPatch(chat, [
        { op: "append", path: "/interactions/0/response", offset, value: "token " },
      ]);
    }
    assert.equal(chat.interactions[0].response.length, 100_000 + 60_000);
  });
  t.diagnostic(`10,000 one-append patches: ${ms.toFixed(1)} ms`);
  assert.ok(ms < 1000, `${ms.toFixed(1)} ms`);
});

test("a patch of 10,000 appends to a 100 KB answer takes well under 500 ms (target 50 ms)", (t) => {
  const document = { answer: { text: "x".repeat(100_000) } };
  const operations = Array.from({ length: 10_000 }, (_, i) => ({
    op: "append",
    path: "/answer/text",
    offset: 100_000 + 6 * i,
    value: "token ",
  }));
  let result;
  const ms = bestOf(3, () => {
    result = applyPatch(document, operations);
  });
  t.diagnostic(`10,000 appends in one patch: ${ms.toFixed(1)} ms`);
  assert.equal(result.answer.text.length, 160_000);
  assert.equal(document.answer.text.length, 100_000);
  assert.ok(ms < 500, `${ms.toFixed(1)} ms`);
});
