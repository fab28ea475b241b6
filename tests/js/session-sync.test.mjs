// The browser client's connection and ordering rules, under node:test with a fake WebSocket and
// mocked timers (setTimeout and Date advance only when a test ticks them).
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import { SessionSync } from "../../asgi_session_sync/static/session-sync.js";
import { FakePage, FakeServer, patch, update } from "./fake-browser.mjs";

let server;
let page;
let applied; // [session, event] per onSession call
let states; // [state, delay] per onState call
let events; // events passed to onEvent

beforeEach(() => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  server = new FakeServer();
  page = new FakePage().install();
  applied = [];
  states = [];
  events = [];
});

afterEach(() => {
  page.uninstall();
  mock.timers.reset();
  mock.restoreAll();
});

/** A started client; jitter 0 makes every delay its ceiling. */
function client(options = {}) {
  return new SessionSync({
    url: "ws://example.test/ws/sessions/s1",
    WebSocketImpl: server.WebSocket,
    onSession: (session, event) => applied.push([session, event]),
    onState: (state, detail) => states.push([state, detail.delay]),
    onEvent: (event) => events.push(event),
    jitter: 0,
    ...options,
  }).start();
}

/** The delays of the scheduled reconnects, in order. */
const delays = () => states.filter(([s, d]) => s === "reconnecting" && d > 0).map(([, d]) => d);
const versions = () => applied.map(([, event]) => event.version);

/** Let the scheduled reconnect fire. */
function waitOut(delay) {
  mock.timers.tick(delay);
}

describe("backoff", () => {
  for (const code of [1011, 1012, 1013, 1006]) {
    test(`a server closing with ${code} right after accepting is retried with growing delays`, () => {
      const sync = client({ minDelay: 100, maxDelay: 1000 });
      for (let i = 0; i < 6; i++) {
        server.last.open();
        server.last.send(update(1));
        server.last.drop(code);
        waitOut(delays().at(-1));
      }
      assert.deepEqual(delays(), [100, 200, 400, 800, 1000, 1000]);
      assert.equal(server.sockets.length, 7);
      sync.close();
    });
  }

  test("the backoff resets only after a connection stayed open for stableAfter ms", () => {
    const sync = client({ minDelay: 100, stableAfter: 3000 });
    server.last.drop(1006); // never opened
    waitOut(100);
    server.last.open();
    mock.timers.tick(2999); // one ms short of stable
    server.last.drop(1006);
    waitOut(200);
    server.last.open();
    mock.timers.tick(3000); // stable
    server.last.drop(1012);
    waitOut(100);
    assert.deepEqual(delays(), [100, 200, 100]);
    sync.close();
  });

  test("each delay lies between ceiling * (1 - jitter) and the ceiling", () => {
    mock.method(Math, "random", () => 1);
    const sync = client({ minDelay: 1000, jitter: 0.5 });
    server.last.drop();
    waitOut(500);
    server.last.drop();
    assert.deepEqual(delays(), [500, 1000]); // random() = 1 takes the full jitter off
    sync.close();
  });

  test("a close code in stopOnCodes stops the client for good", () => {
    const sync = client();
    server.last.open();
    server.last.drop(4403);
    mock.timers.tick(60_000);
    assert.equal(sync.state, "closed");
    assert.equal(server.sockets.length, 1);
    assert.deepEqual(
      states.map(([s]) => s),
      ["connecting", "live", "closed"],
    );
    page.goOnline(); // stopped for good: coming online does not bring it back
    assert.equal(server.sockets.length, 1);
  });

  test("options that are not delays in ms are refused at construction", () => {
    for (const bad of [-1, Number.NaN, Infinity, "5s"]) {
      assert.throws(() => client({ heartbeatInterval: bad }), RangeError);
      assert.throws(() => client({ stableAfter: bad }), RangeError);
    }
    assert.throws(() => client({ factor: 0.5 }), RangeError);
    assert.throws(() => client({ jitter: 1.5 }), RangeError);
    assert.throws(() => new SessionSync({ url: "/ws" }), TypeError);
  });
});

describe("liveness", () => {
  test("a socket silent for 2.5 heartbeat intervals is dropped and resumed", () => {
    const sync = client({ heartbeatInterval: 1000, minDelay: 100 });
    const first = server.last;
    first.open();
    first.send(update(4));
    mock.timers.tick(2499);
    assert.equal(first.closedByClient, null);
    assert.equal(server.sockets.length, 1);
    mock.timers.tick(1);
    assert.equal(first.closedByClient?.code, 1000);
    assert.match(first.closedByClient.reason, /no frame for 2500 ms/);
    assert.equal(sync.state, "reconnecting");
    waitOut(100);
    assert.deepEqual(server.sinces, [null, "4"]);
    sync.close();
  });

  test("heartbeats keep the socket alive and never reach onEvent", () => {
    const sync = client({ heartbeatInterval: 1000 });
    server.last.open();
    server.last.send(update(1));
    for (let i = 0; i < 20; i++) {
      mock.timers.tick(1000);
      server.last.send({ type: "heartbeat" });
    }
    assert.equal(server.sockets.length, 1);
    assert.equal(server.last.closedByClient, null);
    assert.deepEqual(events, []);
    assert.equal(sync.state, "live");
    sync.close();
  });

  test("any frame counts as a sign of life, not only heartbeats", () => {
    const sync = client({ heartbeatInterval: 1000 });
    server.last.open();
    for (let i = 0; i < 10; i++) {
      mock.timers.tick(2000);
      server.last.send(update(i));
    }
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("without a heartbeat, a quiet socket is never dropped", () => {
    const sync = client();
    server.last.open();
    mock.timers.tick(3_600_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(sync.state, "live");
    sync.close();
  });

  test("going online after offline reconnects at once, with since", () => {
    const sync = client();
    const first = server.last;
    first.open();
    first.send(update(7));
    page.goOffline();
    page.goOnline();
    assert.equal(first.closedByClient?.code, 1000);
    assert.equal(server.sockets.length, 2);
    assert.deepEqual(server.sinces, [null, "7"]);
    sync.close();
  });

  test("repeated online events keep a healthy socket", () => {
    const sync = client();
    const first = server.last;
    first.open();
    first.send(update(7));
    for (let n = 0; n < 20; n++) page.goOnline();
    assert.equal(first.closedByClient, null);
    assert.equal(server.sockets.length, 1);
    page.goOffline();
    mock.timers.tick(1000);
    first.send(update(8)); // the socket proved itself after the network came back
    page.goOnline();
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("a full state older than an applied patch on the same connection is ignored", () => {
    const sync = client();
    const first = server.last;
    first.open();
    first.send(update(10));
    first.drop();
    mock.timers.tick(60_000);
    const second = server.last; // resumed with since=10: the server sends no snapshot
    second.open();
    second.send(patch(10, 11, [{ op: "replace", path: "/v", value: 11 }]));
    second.send(update(10));
    assert.equal(sync.version, 11);
    assert.deepEqual(sync.session, { v: 11 });
    sync.close();
  });

  test("going online during a backoff wait connects at once, and only once", () => {
    const sync = client({ minDelay: 5000 });
    server.last.drop();
    page.goOnline();
    assert.equal(server.sockets.length, 2);
    mock.timers.tick(10_000); // the cancelled wait does not open a third socket
    assert.equal(server.sockets.length, 2);
    sync.close();
  });

  test("a page visible after a long hidden time reconnects when its socket looks stale", () => {
    const sync = client({ staleAfter: 60_000 });
    const first = server.last;
    first.open();
    first.send(update(2));
    page.setVisibility("hidden");
    mock.timers.tick(60_000);
    page.setVisibility("visible");
    assert.equal(first.closedByClient?.code, 1000);
    assert.deepEqual(server.sinces, [null, "2"]);
    sync.close();
  });

  test("a page visible again after a short hidden time keeps its socket, however quiet", () => {
    const sync = client({ staleAfter: 60_000 });
    server.last.open();
    mock.timers.tick(120_000); // a quiet session: nothing to send
    page.setVisibility("hidden");
    mock.timers.tick(59_999);
    page.setVisibility("visible");
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("a page hidden long keeps a socket that received frames recently", () => {
    const sync = client({ staleAfter: 60_000 });
    server.last.open();
    page.setVisibility("hidden");
    mock.timers.tick(59_000);
    server.last.send(update(1));
    mock.timers.tick(5_000);
    page.setVisibility("visible");
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("with a heartbeat, a page hidden for 2.5 intervals checks at once when visible", () => {
    const sync = client({ heartbeatInterval: 10_000 });
    server.last.open();
    page.setVisibility("hidden");
    // A frozen page: its timers did not run, so Date moves on without them.
    mock.timers.setTime(Date.now() + 25_000);
    page.setVisibility("visible");
    assert.equal(server.last.closedByClient, null); // the new socket, opened at once
    assert.equal(server.sockets[0].closedByClient?.code, 1000);
    assert.equal(server.sockets.length, 2);
    sync.close();
  });

  test("after close(), online and visibility events do nothing", () => {
    const sync = client();
    server.last.open();
    sync.close();
    page.goOnline();
    page.setVisibility("hidden");
    mock.timers.tick(120_000);
    page.setVisibility("visible");
    assert.equal(server.sockets.length, 1);
    assert.equal(sync.state, "closed");
  });
});

describe("reconnect()", () => {
  test("drops the socket and connects again now, resuming", () => {
    const sync = client();
    const first = server.last;
    first.open();
    first.send(update(5));
    sync.reconnect();
    assert.equal(first.closedByClient?.code, 1000);
    assert.deepEqual(server.sinces, [null, "5"]);
    // The old socket's late events are ignored.
    first.send(update(99));
    assert.deepEqual(versions(), [5]);
    sync.close();
  });

  test("does nothing before start() or after close()", () => {
    const sync = new SessionSync({
      url: "ws://example.test/ws",
      WebSocketImpl: server.WebSocket,
      onSession: () => {},
    });
    sync.reconnect();
    assert.equal(server.sockets.length, 0);
    sync.start();
    sync.close();
    sync.reconnect();
    assert.equal(server.sockets.length, 1);
  });
});

describe("applying full states", () => {
  test("the first session_update of each connection wins, even when older", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(10));
    server.last.drop();
    waitOut(delays().at(-1));
    server.last.open();
    server.last.send(update(1, { restored: true })); // the session was restored from a backup
    assert.deepEqual(versions(), [10, 1]);
    assert.deepEqual(sync.session, { restored: true });
    assert.equal(sync.version, 1);
    // Later ones on the same connection apply only if newer.
    server.last.send(update(1));
    server.last.send(update(0));
    server.last.send(update(2));
    assert.deepEqual(versions(), [10, 1, 2]);
    server.last.drop();
    waitOut(delays().at(-1));
    assert.deepEqual(server.sinces, [null, "10", "2"]);
    sync.close();
  });

  test("a first snapshot without a version clears the version, so the next attempt has no since", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(3));
    sync.reconnect();
    server.last.open();
    server.last.send({ type: "session_update", session_id: "s1", session: { v: "new" } });
    assert.equal(sync.version, null);
    sync.reconnect();
    assert.deepEqual(server.sinces, [null, "3", null]);
    sync.close();
  });

  test("after session_synced, an older session_update on that connection is ignored", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(5));
    sync.reconnect();
    server.last.open();
    server.last.send({ type: "session_synced", session_id: "s1", version: 5 });
    server.last.send(update(4));
    assert.deepEqual(versions(), [5]);
    assert.equal(events.length, 1);
    assert.equal(events[0].type, "session_synced");
    sync.close();
  });

  test("other events reach onEvent; text that is not JSON and binary frames are ignored", () => {
    const sync = client();
    server.last.open();
    server.last.send("not json");
    server.last.onmessage({ data: new ArrayBuffer(4) });
    server.last.send({ type: "token", text: "hi" });
    assert.deepEqual(events, [{ type: "token", text: "hi" }]);
    assert.deepEqual(applied, []);
    sync.close();
  });
});

describe("large versions", () => {
  const A = "9007199254740993"; // 2^53 + 1: as a JSON number it would read as 2^53
  const B = "9007199254740994";

  test("two consecutive versions beyond 2^53 are both applied, and since carries the digits", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(A));
    server.last.send(update(B));
    server.last.send(update(A)); // late duplicate of the older one
    assert.deepEqual(versions(), [A, B]);
    sync.reconnect();
    assert.equal(server.sinces[1], B);
    sync.close();
  });

  test("negative versions beyond -2^53 order by value too", () => {
    const sync = client();
    server.last.open();
    server.last.send(update("-9007199254740994"));
    server.last.send(update("-9007199254740993"));
    server.last.send(update(-5));
    assert.deepEqual(versions(), ["-9007199254740994", "-9007199254740993", -5]);
    sync.close();
  });

  test("a big version sent as a JSON number still goes out as digits, never as 1e+21", () => {
    const sync = client();
    server.last.open();
    server.last.send('{"type":"session_update","session_id":"s1","version":2e21,"session":{}}');
    sync.reconnect();
    assert.equal(server.sinces[1], "2000000000000000000000");
    sync.close();
  });

  test("patches chain across versions beyond 2^53", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(A, { n: 0 }));
    server.last.send(patch(A, B, [{ op: "replace", path: "/n", value: 1 }]));
    server.last.send(patch(B, "9007199254740995", [{ op: "replace", path: "/n", value: 2 }]));
    assert.deepEqual(sync.session, { n: 2 });
    assert.equal(sync.version, "9007199254740995");
    sync.close();
  });
});

describe("applying patches", () => {
  function live(version = 1, session = { items: [] }) {
    const sync = client({ minDelay: 100 });
    server.last.open();
    server.last.send(update(version, session));
    return sync;
  }

  test("patches chained on the client's version are applied in order, each reported", () => {
    const sync = live(1, { items: [] });
    server.last.send(patch(1, 2, [{ op: "add", path: "/items/-", value: "a" }]));
    server.last.send(patch(2, 3, [{ op: "add", path: "/items/-", value: "b" }]));
    assert.deepEqual(sync.session, { items: ["a", "b"] });
    assert.equal(sync.version, 3);
    assert.deepEqual(
      applied.map(([session, event]) => [session.items.join(""), event.type]),
      [
        ["", "session_update"],
        ["a", "session_patch"],
        ["ab", "session_patch"],
      ],
    );
    sync.close();
  });

  test("a patch not newer than the client's version is ignored", () => {
    const sync = live(5, { n: 5 });
    server.last.send(patch(4, 5, [{ op: "replace", path: "/n", value: -1 }]));
    server.last.send(patch(3, 4, [{ op: "replace", path: "/n", value: -1 }]));
    assert.deepEqual(sync.session, { n: 5 });
    assert.equal(applied.length, 1);
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("a patch whose base is ahead is a gap: reconnect with since, state untouched", () => {
    const sync = live(1, { n: 1 });
    const first = server.last;
    server.last.send(patch(2, 3, [{ op: "replace", path: "/n", value: 3 }]));
    assert.deepEqual(sync.session, { n: 1 });
    assert.equal(sync.version, 1);
    assert.equal(first.closedByClient?.code, 1000);
    waitOut(delays().at(-1));
    assert.deepEqual(server.sinces, [null, "1"]);
    // The resync's snapshot brings the client up to date; patches chain from there.
    server.last.open();
    server.last.send(update(3, { n: 3 }));
    server.last.send(patch(3, 4, [{ op: "replace", path: "/n", value: 4 }]));
    assert.deepEqual(sync.session, { n: 4 });
    sync.close();
  });

  test("a failing patch leaves the state untouched and resyncs", (t) => {
    const warn = t.mock.method(console, "warn", () => {});
    const sync = live(1, { items: ["a"], title: "t" });
    const before = sync.session;
    server.last.send(
      patch(1, 2, [
        { op: "replace", path: "/title", value: "changed" },
        { op: "remove", path: "/missing" },
      ]),
    );
    assert.equal(sync.session, before);
    assert.deepEqual(before, { items: ["a"], title: "t" });
    assert.equal(sync.version, 1);
    assert.equal(applied.length, 1);
    assert.equal(warn.mock.callCount(), 1);
    assert.equal(server.sockets[0].closedByClient?.code, 1000);
    sync.close();
  });

  test("a patch before any versioned state is ignored", () => {
    const sync = client();
    server.last.open();
    server.last.send(patch(1, 2, [{ op: "add", path: "/a", value: 1 }]));
    assert.equal(sync.session, undefined);
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("the states onSession receives are new objects; earlier ones stay as they were", () => {
    const sync = live(1, { items: [{ text: "a" }], other: { x: 1 } });
    server.last.send(patch(1, 2, [{ op: "replace", path: "/items/0/text", value: "b" }]));
    const [[first], [second]] = applied;
    assert.deepEqual(first, { items: [{ text: "a" }], other: { x: 1 } });
    assert.deepEqual(second, { items: [{ text: "b" }], other: { x: 1 } });
    assert.equal(second.other, first.other); // unchanged parts are shared
    sync.close();
  });
});
