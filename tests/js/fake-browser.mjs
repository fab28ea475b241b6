// A fake WebSocket and the page events (online, visibilitychange) the client listens to, for
// driving session-sync.js under node:test with mocked timers. Not a test file itself.

/**
 * Every socket (or event stream) the client opened, in order; the test plays the server on
 * each. Give the client `WebSocketImpl: server.WebSocket` or `EventSourceImpl:
 * server.EventSource`.
 */
export class FakeServer {
  constructor() {
    /** @type {(FakeWebSocket | FakeEventSource)[]} */
    this.sockets = [];
    const server = this;
    this.WebSocket = class extends FakeWebSocket {
      constructor(url, protocols) {
        super(url, protocols);
        server.sockets.push(this);
      }
    };
    this.EventSource = class extends FakeEventSource {
      constructor(url, init) {
        super(url, init);
        server.sockets.push(this);
      }
    };
  }

  /** The newest socket. */
  get last() {
    return this.sockets[this.sockets.length - 1];
  }

  /** The `since` query parameter of each attempt, null where absent. */
  get sinces() {
    return this.sockets.map((socket) => new URL(socket.url).searchParams.get("since"));
  }
}

export class FakeWebSocket {
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0; // CONNECTING
    /** Set when the client closed this socket: {code, reason}. */
    this.closedByClient = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
  }

  /** The server accepts. */
  open() {
    this.readyState = 1;
    this.onopen?.({ type: "open" });
  }

  /** The server sends one frame: an object is sent as JSON, a string as is. */
  send(frame) {
    const data = typeof frame === "string" ? frame : JSON.stringify(frame);
    this.onmessage?.({ type: "message", data });
  }

  /** The server (or the network) closes the connection. */
  drop(code = 1006) {
    this.readyState = 3;
    this.onerror?.({ type: "error" });
    this.onclose?.({ type: "close", code, reason: "" });
  }

  /** The attempt fails with an error and no close, as Node.js's WebSocket does when refused. */
  fail() {
    this.onerror?.({ type: "error" });
  }

  /** The client closes: like a browser, the close event comes later, if anyone still listens. */
  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ type: "close", code, reason }));
  }
}

/**
 * A fake EventSource: named events go to the listeners of their name, unnamed ones to "message"
 * (and onmessage), as a browser dispatches them; comments (heartbeats) never reach the page.
 */
export class FakeEventSource extends EventTarget {
  constructor(url, init = {}) {
    super();
    this.url = url;
    this.withCredentials = init.withCredentials === true;
    this.readyState = 0; // CONNECTING
    /** Set when the client closed this stream. */
    this.closedByClient = null;
    this.onopen = this.onmessage = this.onerror = null;
  }

  /** The server answered 200 with text/event-stream. */
  open() {
    this.readyState = 1;
    this.onopen?.({ type: "open" });
  }

  /**
   * The server sends one event: an object as JSON data, named by its session event type (as
   * the server's sse_event does) unless `name` says otherwise (null: unnamed, "message").
   */
  send(frame, name = undefined) {
    const data = typeof frame === "string" ? frame : JSON.stringify(frame);
    const session = ["session_update", "session_patch", "session_synced"];
    const type = name !== undefined ? name : session.includes(frame?.type) ? frame.type : null;
    const event = new MessageEvent(type ?? "message", { data });
    if (type === null) this.onmessage?.(event);
    this.dispatchEvent(event);
  }

  /**
   * The stream failed: `readyState` CONNECTING when the browser would retry by itself (the
   * connection dropped, the response ended), CLOSED when it gave up (an HTTP error status).
   */
  fail(readyState = 0) {
    this.readyState = readyState;
    this.onerror?.({ type: "error" });
  }

  close() {
    this.closedByClient = true;
    this.readyState = 2;
  }
}

/**
 * Installs `addEventListener` (for "online"), `document` and `navigator` (its `onLine`) on
 * globalThis; uninstall() after.
 */
export class FakePage {
  constructor() {
    this.window = new EventTarget();
    this.document = new EventTarget();
    this.document.visibilityState = "visible";
    this.navigator = { onLine: true };
    this.saved = {};
  }

  install() {
    for (const name of ["addEventListener", "removeEventListener", "document", "navigator"]) {
      this.saved[name] = Object.getOwnPropertyDescriptor(globalThis, name);
    }
    globalThis.addEventListener = this.window.addEventListener.bind(this.window);
    globalThis.removeEventListener = this.window.removeEventListener.bind(this.window);
    globalThis.document = this.document;
    // Node.js 21 and later define navigator as a getter: define, do not assign.
    Object.defineProperty(globalThis, "navigator", {
      value: this.navigator,
      configurable: true,
      writable: true,
    });
    return this;
  }

  uninstall() {
    for (const [name, descriptor] of Object.entries(this.saved)) {
      if (descriptor) Object.defineProperty(globalThis, name, descriptor);
      else delete globalThis[name];
    }
  }

  goOffline() {
    this.navigator.onLine = false;
    this.window.dispatchEvent(new Event("offline"));
  }

  goOnline() {
    this.navigator.onLine = true;
    this.window.dispatchEvent(new Event("online"));
  }

  /** @param {"visible" | "hidden"} state */
  setVisibility(state) {
    this.document.visibilityState = state;
    this.document.dispatchEvent(new Event("visibilitychange"));
  }
}

/** A session_update frame. */
export function update(version, session = { v: version }) {
  return { type: "session_update", session_id: "s1", version, session };
}

/** A session_patch frame. */
export function patch(base_version, version, operations) {
  return { type: "session_patch", session_id: "s1", base_version, version, patch: operations };
}
