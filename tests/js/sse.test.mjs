// The client over Server-Sent Events (`transport: "sse"`), under node:test with a fake
// EventSource and mocked timers: the same rules, options and statuses as over a WebSocket.
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";

import { SessionSync } from "../../asgi_session_sync/static/session-sync.js";
import { FakePage, FakeServer, patch, update } from "./fake-browser.mjs";

let server;
let page;
let applied; // [session, event] per onSession call
let statuses; // [status, delay] per onStatus call
let events; // events passed to onEvent

beforeEach(() => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  server = new FakeServer();
  page = new FakePage().install();
  applied = [];
  statuses = [];
  events = [];
});

afterEach(() => {
  page.uninstall();
  mock.timers.reset();
  mock.restoreAll();
});

/** A started client over SSE; jitter 0 makes every delay its ceiling. */
function client(options = {}) {
  return new SessionSync({
    url: "http://example.test/sse/sessions/s1",
    transport: "sse",
    EventSourceImpl: server.EventSource,
    onSession: (session, event) => applied.push([session, event]),
    onStatus: (status, detail) => statuses.push([status, detail.delay]),
    onEvent: (event) => events.push(event),
    jitter: 0,
    minDelay: 100,
    ...options,
  }).start();
}

const versions = () => applied.map(([, event]) => event.version);
const names = () => statuses.map(([status]) => status);
const sinces = () => server.sinces;

test("opens an EventSource, applies the snapshot and patches, and passes app events on", () => {
  const sync = client();
  const stream = server.last;
  assert.equal(stream.url, "http://example.test/sse/sessions/s1");
  assert.equal(stream.withCredentials, false);
  stream.open();
  stream.send(update(7, { text: "a" }));
  stream.send(patch(7, 8, [{ op: "append", path: "/text", offset: 1, value: "😀" }]));
  stream.send(patch(8, 9, [{ op: "append", path: "/text", offset: 3, value: "b" }]));
  stream.send({ type: "progress", done: 3 }, null); // the app's own event: unnamed
  assert.deepEqual(versions(), [7, 8, 9]);
  assert.deepEqual(sync.session, { text: "a😀b" });
  assert.deepEqual(events, [{ type: "progress", done: 3 }]);
  assert.equal(sync.status, "live");
  assert.equal(sync.socket, stream);
  sync.close();
  assert.equal(stream.closedByClient, true);
  assert.equal(sync.status, "closed");
});

test("a path or a ws: URL becomes the page's http: or https: URL", () => {
  const sync = client({ url: "wss://example.test/sse/sessions/s1?x=1" });
  assert.equal(server.last.url, "https://example.test/sse/sessions/s1?x=1");
  sync.close();
  const plain = client({ url: "ws://example.test/sse/sessions/s1", withCredentials: true });
  assert.equal(server.last.url, "http://example.test/sse/sessions/s1");
  assert.equal(server.last.withCredentials, true);
  plain.close();
});

test("a gap closes the EventSource and opens a new one with ?since=<its version>", () => {
  const sync = client();
  const first = server.last;
  first.open();
  first.send(update(3));
  first.send(patch(5, 6, [])); // base ahead: a patch was lost
  assert.equal(first.closedByClient, true); // no Last-Event-ID retry of its own
  assert.equal(sync.status, "syncing");
  mock.timers.tick(100);
  server.last.open();
  server.last.send(update(6));
  assert.deepEqual(sinces(), [null, "3"]);
  assert.deepEqual(versions(), [3, 6]);
  assert.equal(sync.status, "live");
  sync.close();
});

test("an invalid patch keeps the state and reopens with since", (t) => {
  t.mock.method(console, "warn", () => {});
  const sync = client();
  server.last.open();
  server.last.send(update(3, { text: "ab" }));
  server.last.send(patch(3, 4, [{ op: "append", path: "/text", offset: 1, value: "c" }]));
  assert.deepEqual(sync.session, { text: "ab" });
  assert.equal(server.sockets[0].closedByClient, true);
  mock.timers.tick(100);
  assert.deepEqual(sinces(), [null, "3"]);
  sync.close();
});

test("a dropped stream is reopened by the client, after the backoff, with since", () => {
  const sync = client({ minDelay: 100 });
  server.last.open();
  server.last.send(update(4));
  server.last.fail(); // CONNECTING: the browser would retry by itself, at a fixed delay
  assert.equal(server.sockets[0].closedByClient, true);
  assert.equal(sync.status, "stale");
  assert.deepEqual(statuses.at(-1), ["stale", 100]);
  mock.timers.tick(99);
  assert.equal(server.sockets.length, 1);
  mock.timers.tick(1);
  server.last.open();
  assert.deepEqual(sinces(), [null, "4"]);
  assert.deepEqual(names(), ["connecting", "live", "stale", "live"]);
  sync.close();
});

test("each failed attempt grows the delay, an HTTP error (CLOSED) included", () => {
  const sync = client({ minDelay: 100, maxDelay: 1000 });
  const scheduled = [];
  sync.options.onState = (state, detail) => {
    if (state === "reconnecting" && detail.delay > 0) scheduled.push(detail.delay);
  };
  for (let i = 0; i < 5; i++) {
    server.last.fail(i % 2 === 0 ? 0 : 2); // refused, or a 502 from a proxy
    mock.timers.tick(scheduled.at(-1));
  }
  assert.deepEqual(scheduled, [100, 200, 400, 800, 1000]);
  assert.equal(server.sockets.length, 6);
  assert.equal(sync.status, "connecting");
  sync.close();
});

test("an attempt that never opens is abandoned after connectTimeout and retried", () => {
  const sync = client({ connectTimeout: 1000 });
  mock.timers.tick(999);
  assert.equal(server.last.closedByClient, null);
  mock.timers.tick(1);
  assert.equal(server.sockets[0].closedByClient, true);
  mock.timers.tick(100);
  assert.equal(server.sockets.length, 2);
  sync.close();
});

test("heartbeatInterval does not drop a quiet stream: its heartbeats are comments", () => {
  const sync = client({ heartbeatInterval: 1000 });
  server.last.open();
  server.last.send(update(1));
  mock.timers.tick(60_000); // the server's ": heartbeat" comments never reach the page
  assert.equal(server.sockets.length, 1);
  assert.equal(sync.status, "live");
  sync.close();
});

test("offline, then back online: reopened at once with since", () => {
  const sync = client();
  server.last.open();
  server.last.send(update(2));
  page.goOffline();
  assert.equal(sync.status, "offline");
  page.goOnline();
  assert.equal(server.sockets[0].closedByClient, true);
  server.last.open();
  assert.deepEqual(sinces(), [null, "2"]);
  assert.equal(sync.status, "live");
  sync.close();
});

test("reconnect() closes the stream and opens a new one now", () => {
  const sync = client();
  server.last.open();
  server.last.send(update(2));
  sync.reconnect();
  assert.equal(server.sockets[0].closedByClient, true);
  assert.deepEqual(sinces(), [null, "2"]);
  sync.close();
});

test("events of a closed stream are ignored", () => {
  const sync = client();
  const first = server.last;
  first.open();
  first.send(update(2));
  sync.reconnect();
  first.send(update(9)); // a late event from the stream given up
  first.fail();
  assert.deepEqual(versions(), [2]);
  assert.equal(server.sockets.length, 2);
  sync.close();
});

test("a transport other than websocket or sse is refused", () => {
  assert.throws(() => client({ transport: "polling" }), TypeError);
});
