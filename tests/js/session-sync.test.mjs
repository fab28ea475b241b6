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

describe("connect timeout", () => {
  test("an attempt that neither opens nor closes is abandoned and retried with backoff", () => {
    const sync = client({ connectTimeout: 1000, minDelay: 100 });
    const first = server.last;
    mock.timers.tick(999);
    assert.equal(first.closedByClient, null);
    mock.timers.tick(1);
    assert.equal(first.closedByClient?.code, 1000);
    assert.match(first.closedByClient?.reason, /not open after 1000 ms/);
    waitOut(100);
    mock.timers.tick(1000); // the second attempt hangs too: the delay grows
    waitOut(200);
    assert.equal(server.sockets.length, 3);
    assert.deepEqual(delays(), [100, 200]);
    server.last.open();
    server.last.send(update(1));
    mock.timers.tick(60_000); // an open socket is never timed out
    assert.equal(server.sockets.length, 3);
    assert.equal(sync.state, "live");
    sync.close();
  });

  test("an attempt that errors without a close is abandoned and retried with backoff", () => {
    const sync = client({ minDelay: 100 });
    server.last.open();
    server.last.send(update(4));
    server.last.drop(1006);
    waitOut(100);
    const refused = server.last;
    refused.fail(); // Node.js's WebSocket when the port is closed: no close, ever
    assert.equal(refused.closedByClient?.code, 1000);
    assert.deepEqual(delays(), [100, 200]);
    waitOut(200);
    server.last.open();
    server.last.send(update(5));
    assert.deepEqual(server.sinces, [null, "4", "4"]);
    assert.deepEqual(versions(), [4, 5]);
    assert.equal(sync.state, "live");
    sync.close();
  });

  test("an error on an open socket waits for its close, whose code decides", () => {
    const sync = client();
    server.last.open();
    server.last.fail();
    assert.equal(server.last.closedByClient, null);
    assert.equal(sync.state, "live");
    server.last.onclose({ type: "close", code: 4403, reason: "" });
    assert.equal(sync.state, "closed");
    assert.equal(server.sockets.length, 1);
  });

  test("connectTimeout 0 waits for the attempt as long as it takes", () => {
    const sync = client({ connectTimeout: 0 });
    mock.timers.tick(3_600_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(server.last.closedByClient, null);
    sync.close();
  });

  test("the default connect timeout is 8 s", () => {
    const sync = client();
    mock.timers.tick(7999);
    assert.equal(server.last.closedByClient, null);
    mock.timers.tick(1);
    assert.equal(server.sockets[0].closedByClient?.code, 1000);
    sync.close();
  });

  test("a connectTimeout that is not a number of ms >= 0 is refused", () => {
    for (const bad of [-1, Number.NaN, Infinity, "5s"]) {
      assert.throws(() => client({ connectTimeout: bad }), RangeError);
    }
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

describe("status (the names the React hook reports)", () => {
  const STATUSES = ["connecting", "live", "syncing", "stale", "offline", "closed"];

  /** A started client that records each status it reports. */
  function watched(options = {}) {
    const statuses = [];
    const sync = client({
      minDelay: 100,
      onStatus: (status, detail) => statuses.push([status, detail.delay]),
      ...options,
    });
    return { sync, statuses, names: () => statuses.map(([status]) => status) };
  }

  test("connecting until the first state, live, stale while it reconnects, live again", () => {
    const { sync, names, statuses } = watched();
    assert.equal(sync.status, "connecting");
    server.last.open();
    assert.equal(sync.status, "connecting"); // open, but nothing to show yet
    server.last.send(update(1));
    assert.equal(sync.status, "live");
    server.last.drop(1012);
    assert.equal(sync.status, "stale");
    assert.deepEqual(statuses.at(-1), ["stale", 100]); // with the wait before the retry
    waitOut(100);
    assert.equal(sync.status, "stale"); // the attempt is under way
    server.last.open();
    assert.equal(sync.status, "live"); // resumed: the server sends nothing when current
    sync.close();
    assert.deepEqual(names(), ["connecting", "live", "stale", "live", "closed"]);
  });

  test("a gap makes it syncing until the resync's first frame, then live", () => {
    const { sync, names } = watched();
    server.last.open();
    server.last.send(update(1));
    server.last.send(patch(5, 6, [])); // base ahead: a patch was lost
    assert.equal(sync.status, "syncing");
    waitOut(100);
    server.last.open();
    assert.equal(sync.status, "syncing"); // open, the snapshot still on its way
    server.last.send(update(6));
    assert.equal(sync.status, "live");
    assert.deepEqual(names(), ["connecting", "live", "syncing", "live"]);
    sync.close();
  });

  test("an invalid patch makes it syncing, and a drop meanwhile keeps it syncing", (t) => {
    t.mock.method(console, "warn", () => {});
    const { sync, names } = watched();
    server.last.open();
    server.last.send(update(1, { n: 1 }));
    server.last.send(patch(1, 2, [{ op: "test", path: "/n", value: 2 }]));
    assert.equal(sync.status, "syncing");
    waitOut(100);
    server.last.drop(1006); // the resync's attempt fails: still behind
    assert.equal(sync.status, "syncing");
    waitOut(200);
    server.last.open();
    server.last.send(update(2, { n: 2 }));
    assert.equal(sync.status, "live");
    assert.deepEqual(names(), ["connecting", "live", "syncing", "live"]);
    sync.close();
  });

  test("offline while the browser says so and nothing arrives, live again after", () => {
    const { sync, names } = watched();
    server.last.open();
    server.last.send(update(1));
    page.goOffline();
    assert.equal(sync.status, "offline");
    mock.timers.tick(10);
    server.last.send({ type: "heartbeat" }); // frames still arrive (a local server): not offline
    assert.equal(sync.status, "live");
    page.goOffline();
    page.goOnline(); // nothing arrived since: reconnect at once
    assert.equal(sync.status, "stale");
    server.last.open();
    assert.equal(sync.status, "live");
    assert.deepEqual(names(), ["connecting", "live", "offline", "live", "offline", "stale", "live"]);
    sync.close();
  });

  test("a page that starts offline is offline, and connecting once it comes online", () => {
    page.navigator.onLine = false;
    const { sync, names } = watched();
    assert.equal(sync.status, "offline");
    page.goOnline();
    assert.equal(sync.status, "connecting");
    assert.deepEqual(names(), ["offline", "connecting"]);
    sync.close();
  });

  test("closed before start(), after close() and after a final refusal", () => {
    const idle = new SessionSync({ url: "ws://example.test/ws", onSession: () => {} });
    assert.equal(idle.status, "closed");
    const { sync, names } = watched();
    server.last.open();
    server.last.send(update(1));
    server.last.drop(4403);
    assert.equal(sync.status, "closed");
    assert.deepEqual(names(), ["connecting", "live", "closed"]);
  });

  test("every status reported is one of the six the hook reports", () => {
    const { sync, statuses } = watched();
    server.last.drop();
    waitOut(100);
    server.last.open();
    server.last.send(update(1));
    server.last.send(patch(3, 4, []));
    page.goOffline();
    waitOut(200);
    page.goOnline();
    sync.close();
    assert.ok(statuses.length >= 4);
    assert.deepEqual(
      statuses.filter(([status]) => !STATUSES.includes(status)),
      [],
    );
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

  test("a later full state without a version is applied, and the version shown is kept", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(4));
    server.last.send({ type: "session_update", session_id: "s1", session: { v: "unversioned" } });
    assert.deepEqual(sync.session, { v: "unversioned" });
    assert.equal(sync.version, 4); // as the server's cursor: sent, the client's version unchanged
    server.last.send(update(3));
    assert.deepEqual(sync.session, { v: "unversioned" });
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

describe("versions (protocol v3: whole numbers from 0 to 2^53 - 1)", () => {
  test("string versions are not versions: such frames are ignored, even as a snapshot", () => {
    const sync = client();
    server.last.open();
    server.last.send(update("7")); // a digit string was an int version in protocol v2
    server.last.send(update("2026-01-01T00:00:00Z")); // a timestamp was one too
    assert.deepEqual(applied, []);
    assert.equal(sync.version, null);
    server.last.send(update(3));
    server.last.send(update("9007199254740993"));
    server.last.send(patch("3", "4", [{ op: "replace", path: "/v", value: 4 }]));
    server.last.send(patch(3, "4", [{ op: "replace", path: "/v", value: 4 }]));
    server.last.send({ type: "session_synced", session_id: "s1", version: "3" });
    assert.deepEqual(versions(), [3]);
    assert.deepEqual(sync.session, { v: 3 });
    assert.deepEqual(events, []); // the invalid session_synced went nowhere either
    assert.equal(server.sockets.length, 1); // and none of it counted as a gap
    sync.close();
  });

  test("negative, fractional and unsafe numbers are not versions", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(5));
    for (const bad of ["-1", "7.5", "9007199254740992", "9007199254740993", "1e62", "true"]) {
      server.last.send(`{"type":"session_update","session_id":"s1","version":${bad},"session":{}}`);
    }
    assert.deepEqual(versions(), [5]);
    assert.equal(sync.version, 5);
    sync.close();
  });

  test("7.0 and 7e0 are the version 7: a duplicate update, and a base patches chain from", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(7, { n: 7 }));
    server.last.send('{"type":"session_update","session_id":"s1","version":7.0,"session":{}}');
    server.last.send(
      '{"type":"session_patch","session_id":"s1","base_version":7e0,"version":8.0,' +
        '"patch":[{"op":"replace","path":"/n","value":8}]}',
    );
    assert.deepEqual(sync.session, { n: 8 });
    assert.equal(sync.version, 8);
    assert.equal(applied.length, 2);
    sync.close();
  });

  test("since carries the version as decimal digits, up to 2^53 - 1", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(1e15)); // String(1e21) would be "1e+21"; versions stop far below
    sync.reconnect();
    server.last.open();
    server.last.send(update(Number.MAX_SAFE_INTEGER));
    sync.reconnect();
    assert.deepEqual(server.sinces, [null, "1000000000000000", "9007199254740991"]);
    sync.close();
  });

  test("consecutive versions up to 2^53 - 1 are told apart", () => {
    const sync = client();
    const top = Number.MAX_SAFE_INTEGER;
    server.last.open();
    server.last.send(update(top - 2, { n: 0 }));
    server.last.send(patch(top - 2, top - 1, [{ op: "replace", path: "/n", value: 1 }]));
    server.last.send(update(top - 2)); // a late duplicate of the older one
    server.last.send(patch(top - 1, top, [{ op: "replace", path: "/n", value: 2 }]));
    assert.deepEqual(versions(), [top - 2, top - 1, top]);
    assert.deepEqual(sync.session, { n: 2 });
    sync.close();
  });
});

describe("reset", () => {
  test("a reset update with a lower version replaces the state and the version", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(10, { bad: true })); // say, a forged frame pushed the version ahead
    server.last.send(update(11, { bad: true }));
    server.last.send({ ...update(4, { good: true }), reset: true }); // the server's resync
    assert.deepEqual(versions(), [10, 11, 4]);
    assert.deepEqual(sync.session, { good: true });
    assert.equal(sync.version, 4);
    // The client goes on from the reset's version: patches chain on it, newer updates apply.
    server.last.send(patch(4, 5, [{ op: "add", path: "/n", value: 5 }]));
    server.last.send(update(5)); // a duplicate of the patch's version
    assert.deepEqual(sync.session, { good: true, n: 5 });
    sync.reconnect();
    assert.deepEqual(server.sinces, [null, "5"]);
    sync.close();
  });

  test("without reset, a lower or equal update on a live connection is ignored", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(10, { shown: true }));
    server.last.send(update(4, { older: true }));
    server.last.send(update(10, { again: true }));
    server.last.send({ ...update(3), reset: false }); // only true resets
    server.last.send({ ...update(3), reset: "true" });
    assert.deepEqual(versions(), [10]);
    assert.deepEqual(sync.session, { shown: true });
    assert.equal(sync.version, 10);
    sync.close();
  });

  test("a reset at the same version replaces the state", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(6, { local: 1 }));
    server.last.send({ ...update(6, { fromDatabase: 1 }), reset: true });
    assert.deepEqual(sync.session, { fromDatabase: 1 });
    assert.equal(applied.length, 2);
    sync.close();
  });

  test("a reset without a version clears the version, so the next attempt has no since", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(6));
    server.last.send({ type: "session_update", session_id: "s1", session: { v: 0 }, reset: true });
    assert.equal(sync.version, null);
    assert.deepEqual(sync.session, { v: 0 });
    sync.reconnect();
    assert.deepEqual(server.sinces, [null, null]);
    sync.close();
  });
});

describe("the session followed", () => {
  test("session events for another session are ignored, resets and patches included", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(2, { mine: true }));
    const other = (frame) => ({ ...frame, session_id: "s2" });
    server.last.send(other(update(3)));
    server.last.send(other({ ...update(1), reset: true }));
    server.last.send(other(patch(2, 3, [{ op: "add", path: "/x", value: 1 }])));
    server.last.send(other(patch(7, 8, [{ op: "add", path: "/x", value: 1 }]))); // no gap
    server.last.send(other({ type: "session_synced", version: 2 }));
    server.last.send({ type: "session_update", version: 3, session: {} }); // no session_id
    assert.equal(sync.sessionId, "s1");
    assert.deepEqual(versions(), [2]);
    assert.deepEqual(sync.session, { mine: true });
    assert.deepEqual(events, []);
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("each connection's first snapshot names the session followed", () => {
    const sync = client();
    server.last.open();
    server.last.send(update(2));
    sync.reconnect();
    server.last.open();
    server.last.send({ ...update(1, { renamed: true }), session_id: "s9" });
    server.last.send(update(5)); // s1 is no longer followed
    assert.equal(sync.sessionId, "s9");
    assert.deepEqual(sync.session, { renamed: true });
    sync.close();
  });

  test("with options.sessionId, only that session is followed, from the first frame on", () => {
    const sync = client({ sessionId: "s1" });
    server.last.open();
    server.last.send({ ...update(9), session_id: "s2" });
    server.last.send(update(1));
    assert.deepEqual(versions(), [1]);
    assert.equal(sync.sessionId, "s1");
    assert.throws(() => client({ sessionId: 7 }), TypeError);
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

  test("a streamed answer's appends are applied, each state a new object", () => {
    const sync = live(1, { answer: { text: "", status: "streaming" } });
    const append = (offset, value) => ({ op: "append", path: "/answer/text", offset, value });
    server.last.send(patch(1, 2, [append(0, "Hi 😀")]));
    server.last.send(patch(2, 3, [append(5, "!"), append(6, " Bye")]));
    server.last.send(patch(3, 4, [{ op: "replace", path: "/answer/status", value: "complete" }]));
    assert.deepEqual(sync.session, { answer: { text: "Hi 😀! Bye", status: "complete" } });
    assert.equal(sync.version, 4);
    assert.deepEqual(
      applied.map(([session]) => session.answer.text),
      ["", "Hi 😀", "Hi 😀! Bye", "Hi 😀! Bye"],
    );
    sync.close();
  });

  test("an append whose offset is not the text's length leaves the state and resyncs", (t) => {
    const warn = t.mock.method(console, "warn", () => {});
    const sync = live(1, { answer: { text: "a😀", status: "streaming" } });
    const before = sync.session;
    server.last.send(
      patch(1, 2, [
        { op: "replace", path: "/answer/status", value: "complete" },
        { op: "append", path: "/answer/text", offset: 2, value: "b" }, // "a😀" is 3 long
      ]),
    );
    assert.equal(sync.session, before);
    assert.deepEqual(before, { answer: { text: "a😀", status: "streaming" } });
    assert.equal(sync.version, 1);
    assert.equal(applied.length, 1);
    assert.match(String(warn.mock.calls[0].arguments[1]), /not the offset 2/);
    assert.equal(server.sockets[0].closedByClient?.reason, "invalid patch");
    waitOut(delays().at(-1));
    assert.deepEqual(server.sinces, [null, "1"]);
    sync.close();
  });

  test("a patch before any state is a gap: reconnect for a snapshot", () => {
    const sync = client({ minDelay: 100 });
    server.last.open();
    server.last.send(patch(1, 2, [{ op: "add", path: "/a", value: 1 }]));
    assert.equal(sync.session, undefined);
    assert.match(server.sockets[0].closedByClient?.reason, /patch gap/);
    waitOut(100);
    assert.deepEqual(server.sinces, [null, null]);
    sync.close();
  });

  test("a patch after a snapshot without a version is ignored: it can never chain", () => {
    const sync = client();
    server.last.open();
    server.last.send({ type: "session_update", session_id: "s1", session: { a: 0 } });
    server.last.send(patch(1, 2, [{ op: "replace", path: "/a", value: 1 }]));
    assert.deepEqual(sync.session, { a: 0 });
    assert.equal(server.last.closedByClient, null);
    assert.equal(server.sockets.length, 1);
    sync.close();
  });

  test("a patch that overlaps the client's version is a gap", () => {
    const sync = live(5, { n: 5 });
    server.last.send(patch(4, 6, [{ op: "replace", path: "/n", value: 6 }]));
    assert.deepEqual(sync.session, { n: 5 });
    assert.match(server.sockets[0].closedByClient?.reason, /patch gap: base_version 4, have 5/);
    sync.close();
  });

  test("a patch whose version is not greater than its base is malformed and ignored", () => {
    const sync = live(5, { n: 5 });
    server.last.send(patch(5, 5, [{ op: "replace", path: "/n", value: -1 }]));
    server.last.send(patch(5, 4, [{ op: "replace", path: "/n", value: -1 }]));
    server.last.send(patch(9, 8, [{ op: "replace", path: "/n", value: -1 }])); // not a gap either
    assert.deepEqual(sync.session, { n: 5 });
    assert.equal(server.last.closedByClient, null);
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
