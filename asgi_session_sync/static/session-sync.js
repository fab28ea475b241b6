// asgi-session-sync browser client: a dependency-free ES module, typed by session-sync.d.ts.
//
// Opens the session's WebSocket (or, with `transport: "sse"`, its Server-Sent Events stream)
// and keeps it healthy: reconnects with jittered exponential backoff (reset only once a
// connection has stayed up), gives up an attempt that neither opens nor closes within a connect
// timeout (or that errors without closing), notices a silent half-open socket by its missing
// heartbeats, reconnects at once when the network comes back. Passes the last version it
// applied as `since` on reconnect. Takes the first `session_update` of each connection, and any
// marked `"reset": true`, as the server's truth, then applies newer `session_update` and chained
// `session_patch` events (RFC 6902 JSON Patch, and protocol v3's `append` of text to a string),
// never rolling back to an older state. Reports the connection's state (onState) and the
// session's status as a page shows it (onStatus: connecting, live, syncing, stale, offline,
// closed; the React hook in session-sync-react.js reports the same).
//
//   import { SessionSync } from "/static/session-sync/session-sync.js";
//   const sync = new SessionSync({
//     url: "/ws/sessions/abc",
//     onSession: (session, event) => render(session),
//     onStatus: (status) => (badge.textContent = status),
//   }).start();
//
// The options, events and the ordering rules: docs/guides/frontend.md. What a version is
// (protocol v3) is shared with the server through tests/vectors/versions.json.

/**
 * The version a decoded JSON value stands for, or null when it is not one: a number whose value
 * is a whole number from 0 to 2^53 - 1 (Number.MAX_SAFE_INTEGER). JSON.parse has already made
 * 7, 7.0 and 7e0 the same number. Strings (even of digits), booleans, fractions, negative
 * numbers and numbers beyond 2^53 - 1 are not versions.
 * @param {unknown} value
 * @returns {number | null}
 */
export function asVersion(value) {
  // `+ 0` turns -0 (JSON "-0", "-0.0") into 0, so it prints and compares as the version 0.
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 ? value + 0 : null;
}

/**
 * Compare two versions: 1 if a is newer, -1 if older, 0 if the same, null if either is not a
 * version (see asVersion).
 * @param {unknown} a
 * @param {unknown} b
 * @returns {1 | 0 | -1 | null}
 */
export function compareVersions(a, b) {
  const x = asVersion(a);
  const y = asVersion(b);
  if (x === null || y === null) return null;
  return x > y ? 1 : x < y ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// RFC 6902 JSON Patch over RFC 6901 JSON Pointer, and protocol v3's `append` operation.
//
// A patch is applied to one working copy, a Draft: the first time the patch touches a container
// on a path it copies it, and later operations change that copy in place. So a patch copies
// each container it touches once (5,000 adds to one array copy it once, not 5,000 times:
// milliseconds, not seconds); the input document is never mutated and shares its unchanged
// parts with the result; and a patch that fails part-way is thrown away with its draft, so the
// caller still holds the document it had (atomic, RFC 6902 section 5).

const INDEX = /^(0|[1-9][0-9]*)$/;
const OPERATIONS = new Set(["add", "remove", "replace", "move", "copy", "test", "append"]);
const hasOwn = (object, key) => Object.prototype.hasOwnProperty.call(object, key);

/**
 * @param {unknown} pointer
 * @param {string} member "path" or "from", for the message
 * @returns {string[]} The reference tokens, unescaped.
 */
function parsePointer(pointer, member) {
  if (typeof pointer !== "string") throw new Error(`"${member}" must be a JSON Pointer string`);
  if (pointer === "") return [];
  if (pointer[0] !== "/") throw new Error(`"${member}" must be "" or start with "/"`);
  return pointer
    .slice(1)
    .split("/")
    .map((token) => {
      if (/~(?![01])/.test(token)) throw new Error(`"${member}" has a "~" not followed by 0 or 1`);
      // ~1 first: "~01" is the token "~1", not "/".
      return token.replace(/~1/g, "/").replace(/~0/g, "~");
    });
}

/** @param {unknown} value */
const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

/** @param {unknown} value */
const isContainer = (value) => value !== null && typeof value === "object";

/** The JSON type of a value, for messages: "a string", "an object", "null"... */
function jsonType(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}

/**
 * The index an array token names. For "add", "-" and the array's length name the slot after the
 * last element; for every other operation the element must exist.
 */
function arrayIndex(array, token, adding) {
  if (token === "-") {
    if (adding) return array.length;
    throw new Error(`"-" names no existing element`);
  }
  if (!INDEX.test(token)) throw new Error(`"${token}" is not an array index`);
  const index = Number(token);
  if (index > array.length || (index === array.length && !adding)) {
    throw new Error(`index ${token} is out of bounds (length ${array.length})`);
  }
  return index;
}

/** The value at tokens; throws when it does not exist. */
function valueAt(document, tokens) {
  let node = document;
  for (const token of tokens) {
    if (Array.isArray(node)) node = node[arrayIndex(node, token, false)];
    else if (isObject(node) && hasOwn(node, token)) node = node[token];
    else throw new Error(`no value at "/${tokens.join("/")}"`);
  }
  return node;
}

/** Set a member or element, even a member named "__proto__". */
function setMember(container, key, value) {
  // Assigning "__proto__" would call Object.prototype's setter and change the prototype; every
  // other key is an ordinary data property, which plain assignment (the fast path) creates.
  if (key === "__proto__") {
    Object.defineProperty(container, key, {
      value,
      writable: true,
      enumerable: true,
      configurable: true,
    });
  } else {
    container[key] = value;
  }
}

/** RFC 6902 §4.6 equality: same type, numbers by value, arrays in order, objects by members. */
function deepEqual(a, b) {
  if (a === b) return true;
  if (a === null || b === null || typeof a !== "object" || typeof b !== "object") return false;
  if (Array.isArray(a) || Array.isArray(b)) {
    return (
      Array.isArray(a) &&
      Array.isArray(b) &&
      a.length === b.length &&
      a.every((item, i) => deepEqual(item, b[i]))
    );
  }
  const keys = Object.keys(a);
  return (
    keys.length === Object.keys(b).length &&
    keys.every((key) => hasOwn(b, key) && deepEqual(a[key], b[key]))
  );
}

/**
 * One patch's working copy of a document, changed in place operation by operation.
 *
 * Invariant: every container in `owned` was made by this patch (a shallow copy of one of the
 * document's, or a deep copy of a value) and is referenced once, from the draft's own tree. So
 * changing it in place is seen by nobody else: not the input document, not the operations, not
 * an earlier patch's result. Every other container is shared, and is copied before a change.
 */
class Draft {
  /** @param {unknown} document */
  constructor(document) {
    /** The document as the operations so far left it. */
    this.root = document;
    /** @type {WeakSet<object>} */
    this.owned = new WeakSet();
  }

  /** The container if this patch owns it, else a shallow copy of it, owned from now on. */
  own(container) {
    if (this.owned.has(container)) return container;
    const copy = Array.isArray(container) ? container.slice() : { ...container };
    this.owned.add(copy);
    return copy;
  }

  /** A deep copy of a value (an operation's, or one "copy" duplicates), owned by this patch. */
  clone(value) {
    if (!isContainer(value)) return value;
    let copy;
    if (Array.isArray(value)) {
      copy = value.map((item) => this.clone(item));
    } else {
      copy = {};
      for (const key of Object.keys(value)) setMember(copy, key, this.clone(value[key]));
    }
    this.owned.add(copy);
    return copy;
  }

  /**
   * The container that holds the last of tokens (at least one token), owned by this patch, as
   * is every container on the way to it. A parent that is not a container is returned as it is,
   * for the operation to refuse.
   * @throws {Error} When a value on the way does not exist.
   */
  parent(tokens) {
    if (isContainer(this.root)) this.root = this.own(this.root);
    let node = this.root;
    for (let depth = 0; depth < tokens.length - 1; depth++) {
      const token = tokens[depth];
      let key;
      if (Array.isArray(node)) key = arrayIndex(node, token, false);
      else if (isObject(node) && hasOwn(node, token)) key = token;
      else throw new Error(`no value at "/${tokens.slice(0, depth + 1).join("/")}"`);
      const child = node[key];
      if (isContainer(child)) {
        const mine = this.own(child);
        if (mine !== child) setMember(node, key, mine);
        node = mine;
      } else {
        node = child;
      }
    }
    return node;
  }
}

/**
 * The key of the existing member or element that the last of tokens names in parent.
 * @throws {Error} When there is none.
 */
function existingKey(parent, tokens) {
  const token = tokens[tokens.length - 1];
  if (Array.isArray(parent)) return arrayIndex(parent, token, false);
  if (isObject(parent) && hasOwn(parent, token)) return token;
  throw new Error(`no member "${token}"`);
}

function add(draft, tokens, value) {
  if (tokens.length === 0) {
    draft.root = value;
    return;
  }
  const parent = draft.parent(tokens);
  const token = tokens[tokens.length - 1];
  if (Array.isArray(parent)) {
    const index = arrayIndex(parent, token, true);
    if (index === parent.length) parent.push(value);
    else parent.splice(index, 0, value);
  } else if (isObject(parent)) {
    setMember(parent, token, value);
  } else {
    throw new Error(`the parent of "${token}" is not an object or array`);
  }
}

function remove(draft, tokens) {
  if (tokens.length === 0) throw new Error("cannot remove the whole document");
  const parent = draft.parent(tokens);
  const key = existingKey(parent, tokens);
  if (Array.isArray(parent)) parent.splice(key, 1);
  else delete parent[key];
}

function replace(draft, tokens, value) {
  if (tokens.length === 0) {
    draft.root = value;
    return;
  }
  const parent = draft.parent(tokens);
  setMember(parent, existingKey(parent, tokens), value);
}

/**
 * Protocol v3's `append`: the string at path, whose length in UTF-16 code units (`.length`)
 * must be exactly offset, gets value added at its end.
 */
function append(draft, tokens, operation) {
  const { path, offset, value } = operation;
  if (typeof value !== "string") throw new Error(`"append" needs a string "value"`);
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new Error(`"append" needs an "offset" that is a whole number from 0 to 2^53 - 1`);
  }
  /** @param {unknown} current */
  const extend = (current) => {
    if (typeof current !== "string") {
      const type = jsonType(current);
      throw new Error(`append failed: the value at "${path}" is ${type}, not a string`);
    }
    if (current.length !== offset) {
      throw new Error(
        `append failed: the string at "${path}" is ${current.length} UTF-16 code units long, ` +
          `not the offset ${offset}`,
      );
    }
    // V8 and the other engines join strings lazily (ropes): many small appends stay cheap.
    return current + value;
  };
  if (tokens.length === 0) {
    draft.root = extend(draft.root);
    return;
  }
  const parent = draft.parent(tokens);
  const key = existingKey(parent, tokens);
  setMember(parent, key, extend(parent[key]));
}

/** @param {Record<string, unknown>} operation */
function valueOf(operation) {
  if (!hasOwn(operation, "value") || operation.value === undefined) {
    throw new Error(`"${operation.op}" needs a "value"`);
  }
  return operation.value;
}

/** Apply one operation (RFC 6902 §4, or `append`) to the draft. */
function applyOperation(draft, operation) {
  if (!isObject(operation)) throw new Error("an operation must be an object");
  const { op } = operation;
  if (typeof op !== "string" || !OPERATIONS.has(op)) {
    throw new Error(`"op" must be one of ${[...OPERATIONS].join(", ")}`);
  }
  if (!hasOwn(operation, "path")) throw new Error(`"${op}" needs a "path"`);
  const path = parsePointer(operation.path, "path");
  switch (op) {
    case "add":
      add(draft, path, draft.clone(valueOf(operation)));
      return;
    case "remove":
      remove(draft, path);
      return;
    case "replace":
      replace(draft, path, draft.clone(valueOf(operation)));
      return;
    case "append":
      append(draft, path, operation);
      return;
    case "test":
      if (!deepEqual(valueAt(draft.root, path), valueOf(operation))) {
        throw new Error(`test failed: the value at "${operation.path}" differs`);
      }
      return;
    default: {
      // move and copy
      if (!hasOwn(operation, "from")) throw new Error(`"${op}" needs a "from"`);
      const from = parsePointer(operation.from, "from");
      const value = valueAt(draft.root, from);
      if (op === "copy") {
        add(draft, path, draft.clone(value));
        return;
      }
      if (from.every((token, i) => token === path[i])) {
        if (from.length === path.length) return; // moved onto itself
        throw new Error(`cannot move "${operation.from}" into its own child`);
      }
      // The value leaves its old place before it takes the new one: still referenced once.
      remove(draft, from);
      add(draft, path, value);
    }
  }
}

/**
 * Apply a JSON Patch: RFC 6902 operations, and protocol v3's `append`
 * (`{"op": "append", "path", "offset", "value"}`: value, a string, is added to the end of the
 * string at path, whose length in UTF-16 code units must be exactly offset).
 *
 * Returns the new document; never mutates document or operations (the result shares unchanged
 * parts with document, so treat both as immutable). Each container on a path the patch touches
 * is copied at most once per patch, whatever the number of operations; after that an operation
 * costs what it would in place (appending to an array or a string is cheap; inserting into or
 * removing from the middle of an array moves the elements after it).
 * @template T
 * @param {T} document
 * @param {readonly object[]} operations
 * @returns {T}
 * @throws {Error} When the patch is invalid or an operation fails (RFC 6902 §5; an `append`
 *   whose target is not a string of length offset fails as a `test` would): nothing is applied
 *   then, and document is as it was.
 */
export function applyPatch(document, operations) {
  if (!Array.isArray(operations)) throw new Error("a JSON Patch must be an array of operations");
  const draft = new Draft(document);
  operations.forEach((operation, i) => {
    try {
      applyOperation(draft, operation);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`JSON Patch operation ${i} failed: ${message}`);
    }
  });
  return draft.root;
}

// ---------------------------------------------------------------------------------------------

const DEFAULTS = {
  transport: "websocket",
  sinceParam: "since",
  updateType: "session_update",
  patchType: "session_patch",
  minDelay: 250,
  maxDelay: 10000,
  factor: 2,
  jitter: 0.5,
  stableAfter: 5000,
  connectTimeout: 8000,
  heartbeatInterval: 0,
  staleAfter: 60000,
  stopOnCodes: [1008, 4401, 4403, 4404],
};

// A heartbeat silence is 2.5 intervals: one lost or late heartbeat is not a dead socket.
const MISSED_HEARTBEATS = 2.5;

/** Keeps one session current over a self-healing WebSocket (or Server-Sent Events stream). */
export class SessionSync {
  /** @param {object} options See SessionSyncOptions in session-sync.d.ts. */
  constructor(options) {
    if (!options || !options.url || typeof options.onSession !== "function") {
      throw new TypeError("SessionSync needs options.url and options.onSession");
    }
    this.options = { ...DEFAULTS, ...options };
    const times = [
      "minDelay",
      "maxDelay",
      "stableAfter",
      "connectTimeout",
      "heartbeatInterval",
      "staleAfter",
    ];
    for (const name of times) {
      const value = this.options[name];
      if (typeof value !== "number" || !(value >= 0) || value === Infinity) {
        throw new RangeError(`SessionSync: ${name} must be a number of ms >= 0, got ${value}`);
      }
    }
    const { factor, jitter, sessionId, transport } = this.options;
    if (transport !== "websocket" && transport !== "sse") {
      throw new TypeError(`SessionSync: transport must be "websocket" or "sse", got ${transport}`);
    }
    if (sessionId !== undefined && typeof sessionId !== "string") {
      throw new TypeError(`SessionSync: sessionId must be a string, got ${sessionId}`);
    }
    if (typeof factor !== "number" || !(factor >= 1) || factor === Infinity) {
      throw new RangeError(`SessionSync: factor must be a number >= 1, got ${factor}`);
    }
    if (typeof jitter !== "number" || !(jitter >= 0 && jitter <= 1)) {
      throw new RangeError(`SessionSync: jitter must be a number from 0 to 1, got ${jitter}`);
    }
    /** Until start(), and after close(), "closed". */
    this.state = "closed";
    /** The session's status, as a page shows it: see statusNow(). */
    this.status = "closed";
    /** The client dropped its connection because its state is behind (a gap, a bad patch). */
    this.behind = false;
    /** The wait before the scheduled attempt, in ms; 0 when none is scheduled. */
    this.delay = 0;
    /** The version of the state last applied, or null. */
    this.version = null;
    /** The state last applied. */
    this.session = undefined;
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = true;
    // Per connection: no session_update or session_synced seen yet on this socket.
    this.fresh = true;
    /** Whether a state was applied (with or without a version): a patch can then be judged. */
    this.known = false;
    /** The session followed: options.sessionId, else the one the last snapshot named, or null. */
    this.sessionId = this.options.sessionId === undefined ? null : this.options.sessionId;
    this.openedAt = null; // Date.now() when the socket opened, null until then
    this.lastReceived = 0; // Date.now() of the last frame
    this.watchdog = null;
    this.connectTimer = null; // gives up the current attempt if it has not opened in time
    this.hiddenAt = null;
    this.offlineAt = null; // Date.now() of the last "offline" event, until the next "online"
    this.onOffline = () => {
      this.offlineAt = Date.now();
      this.updateStatus();
    };
    this.onOnline = () => this.cameOnline();
    this.onVisibility = () => this.visibilityChanged();
  }

  /** Open the connection; reconnects on its own until close(). Returns this. */
  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    if (typeof addEventListener === "function") {
      addEventListener("online", this.onOnline);
      addEventListener("offline", this.onOffline);
    }
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      this.offlineAt = Date.now();
    }
    if (typeof document !== "undefined") {
      document.addEventListener("visibilitychange", this.onVisibility);
      this.hiddenAt = document.visibilityState === "hidden" ? Date.now() : null;
    }
    this.connect();
    return this;
  }

  /** Close for good: no more reconnects. */
  close() {
    this.cancelTimer();
    this.abandon("client closed");
    this.halt();
  }

  /** @private Stop: no more reconnects, no more page listeners. start() may begin again. */
  halt() {
    this.stopped = true;
    if (typeof removeEventListener === "function") {
      removeEventListener("online", this.onOnline);
      removeEventListener("offline", this.onOffline);
    }
    if (typeof document !== "undefined") {
      document.removeEventListener("visibilitychange", this.onVisibility);
    }
    this.setState("closed", 0);
  }

  /**
   * Drop the current connection (or the wait before the next attempt) and connect again now,
   * resuming with `since`. Does nothing before start() or after close().
   */
  reconnect() {
    if (this.stopped) return;
    this.cancelTimer();
    this.abandon("reconnecting");
    this.connect();
  }

  /** The URL of the next attempt, with `since` set to the last applied version. */
  currentUrl() {
    const base = typeof location === "undefined" ? undefined : location.href;
    const url = new URL(this.options.url, base);
    const secure = url.protocol === "https:" || url.protocol === "wss:";
    if (this.options.transport === "sse") url.protocol = secure ? "https:" : "http:";
    else url.protocol = secure ? "wss:" : "ws:";
    if (this.version === null) url.searchParams.delete(this.options.sinceParam);
    else url.searchParams.set(this.options.sinceParam, String(this.version));
    return url.toString();
  }

  /** @private */
  connect() {
    this.delay = 0;
    this.setState(this.attempt === 0 && this.version === null ? "connecting" : "reconnecting", 0);
    this.fresh = true;
    this.openedAt = null;
    const socket = this.options.transport === "sse" ? this.openStream() : this.openSocket();
    this.socket = socket;
    const { connectTimeout } = this.options;
    if (connectTimeout > 0) {
      // A black-holed network, or a server that accepts TCP and never answers the handshake,
      // can leave an attempt CONNECTING for minutes, and some engines never fire close at all.
      this.connectTimer = setTimeout(() => {
        this.connectTimer = null;
        this.restart(`not open after ${connectTimeout} ms`);
      }, connectTimeout);
    }
  }

  /** @private A WebSocket for the next attempt. */
  openSocket() {
    const Impl = this.options.WebSocketImpl || WebSocket;
    const socket = new Impl(this.currentUrl(), this.options.protocols);
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (message) => {
      this.received(socket, typeof message.data === "string" ? message.data : null);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.forget();
      if (this.stopped) return;
      if (this.options.stopOnCodes.includes(event.code)) {
        this.halt();
        return;
      }
      this.scheduleReconnect();
    };
    socket.onerror = () => {
      // An attempt that failed before opening is given up here: browsers follow the error with
      // close, but Node.js's built-in WebSocket does not when the connection is refused, and its
      // readyState stays CONNECTING. An open socket's error waits for its close, whose code
      // says whether to reconnect.
      if (this.socket === socket && this.openedAt === null) this.restart("connection failed");
    };
    return socket;
  }

  /** @private An EventSource (Server-Sent Events) for the next attempt. */
  openStream() {
    const Impl = this.options.EventSourceImpl || EventSource;
    const { withCredentials = false, updateType, patchType } = this.options;
    const source = new Impl(this.currentUrl(), { withCredentials });
    source.onopen = () => this.opened(source);
    // The server names session events (`event: session_update`...), and sends the app's own
    // events unnamed ("message"); each event's data is the JSON a WebSocket frame carries.
    const onEvent = (message) => this.received(source, message.data);
    const names = ["message", "session_update", "session_patch", "session_synced"];
    for (const name of new Set([...names, updateType, patchType])) {
      source.addEventListener(name, onEvent);
    }
    source.onerror = () => {
      // The stream failed or ended. EventSource would retry by itself, after a fixed delay, with
      // the last event id it saw, and never after an HTTP error; the client retries itself, as
      // for a WebSocket: a new EventSource after the backoff, with `since` = the version it
      // applied (a new EventSource sends no Last-Event-ID), under the connect timeout.
      if (this.socket === source) {
        this.restart(this.openedAt === null ? "connection failed" : "stream failed");
      }
    };
    return source;
  }

  /** @private The attempt opened. */
  opened(socket) {
    if (this.socket !== socket) return;
    this.clearConnectTimer();
    this.openedAt = this.lastReceived = Date.now();
    if (this.options.heartbeatInterval > 0 && this.options.transport !== "sse") {
      this.watch(this.staleLimit());
    }
    this.setState("live", 0);
  }

  /** @private A frame (or event) arrived: its text, or null for a binary frame. */
  received(socket, text) {
    if (this.socket !== socket) return;
    this.lastReceived = Date.now();
    // The server sends a connection's snapshot first, or nothing when it finds the client
    // current: after the first frame, a client that resynced is no longer behind.
    this.behind = false;
    if (typeof text === "string") this.receive(text);
    else if (this.status !== "live") this.updateStatus();
  }

  /** @private */
  clearConnectTimer() {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    this.connectTimer = null;
  }

  /**
   * @private
   * Let go of the current socket. The backoff resets only here, and only for a connection that
   * stayed open for stableAfter ms: a server that accepts and closes at once (a crash loop, an
   * overloaded backend closing with 1011, 1012 or 1013) keeps backing off.
   */
  forget() {
    if (this.watchdog !== null) clearTimeout(this.watchdog);
    this.watchdog = null;
    this.clearConnectTimer();
    if (this.openedAt !== null && Date.now() - this.openedAt >= this.options.stableAfter) {
      this.attempt = 0;
    }
    this.openedAt = null;
    this.socket = null;
  }

  /** @private Close the current socket from this side, if any; its events are ignored after. */
  abandon(reason) {
    const socket = this.socket;
    if (!socket) return;
    this.forget();
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    try {
      socket.close(1000, reason);
    } catch {
      // Closing a socket that never connected may throw in some engines; it is gone either way.
    }
  }

  /**
   * @private
   * Drop the current socket and reconnect after the backoff delay; `behind` when the state
   * shown is known to be behind the server's (status "syncing" until the resync arrives).
   */
  restart(reason, behind = false) {
    if (this.stopped) return;
    if (behind) this.behind = true;
    this.cancelTimer();
    this.abandon(reason);
    this.scheduleReconnect();
  }

  /** @private */
  cancelTimer() {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  /** @private */
  scheduleReconnect() {
    const { minDelay, maxDelay, factor, jitter } = this.options;
    const ceiling = Math.min(maxDelay, minDelay * Math.pow(factor, this.attempt));
    const delay = Math.round(ceiling * (1 - jitter * Math.random()));
    this.attempt += 1;
    this.delay = delay;
    this.setState("reconnecting", delay);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.stopped) this.connect();
    }, delay);
  }

  /** @private How long a silent open socket may stay silent before it counts as stale, in ms. */
  staleLimit() {
    const { heartbeatInterval, staleAfter, transport } = this.options;
    // An event stream's heartbeats are comments, which EventSource never shows: silence on it
    // proves nothing, so only staleAfter applies there.
    if (transport === "sse") return staleAfter;
    return heartbeatInterval > 0 ? MISSED_HEARTBEATS * heartbeatInterval : staleAfter;
  }

  /** @private Check for silence after delay ms; one timer per socket, re-armed, not per frame. */
  watch(delay) {
    this.watchdog = setTimeout(() => {
      this.watchdog = null;
      const limit = this.staleLimit();
      const silence = Date.now() - this.lastReceived;
      if (silence >= limit) this.restart(`no frame for ${silence} ms`);
      else this.watch(limit - silence);
    }, delay);
  }

  /**
   * @private
   * Back online: reconnect at once when the socket cannot be trusted (not open, nothing
   * received since the network went away, or silent for the stale limit), and the waiting
   * retry at once when there is no socket. A healthy socket is kept: repeated "online" events
   * never tear it down.
   */
  cameOnline() {
    if (this.stopped) return;
    const now = Date.now();
    const offlineSince = this.offlineAt;
    this.offlineAt = null;
    const open = this.socket !== null && this.openedAt !== null;
    const missed = offlineSince !== null && this.lastReceived <= offlineSince;
    const silent = now - this.lastReceived >= this.staleLimit();
    if (!open || missed || silent) this.reconnect();
    else this.updateStatus();
  }

  /**
   * @private
   * Background tabs throttle timers, and a laptop's sleep freezes them: when the page comes back
   * after a long time hidden, check at once instead of waiting for the watchdog.
   */
  visibilityChanged() {
    const now = Date.now();
    if (document.visibilityState === "hidden") {
      this.hiddenAt = now;
      return;
    }
    const hiddenFor = this.hiddenAt === null ? 0 : now - this.hiddenAt;
    this.hiddenAt = null;
    const limit = this.staleLimit();
    if (this.stopped || hiddenFor < limit) return;
    const waiting = this.socket === null;
    const silent = this.openedAt !== null && now - this.lastReceived >= limit;
    if (waiting || silent) this.reconnect();
  }

  /**
   * Apply one frame (text of a JSON object). See docs/guides/frontend.md for the rules.
   * @param {string} text
   */
  receive(text) {
    this.judge(text);
    if (this.status !== "live") this.updateStatus();
  }

  /** @private Apply one frame's text: see receive(). */
  judge(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    if (!event || typeof event !== "object") return;
    switch (event.type) {
      case "heartbeat":
        return; // it only proves the socket alive, which onmessage has noted
      case this.options.updateType:
        this.applyUpdate(event);
        return;
      case this.options.patchType:
        this.applyPatchEvent(event);
        return;
      case "session_synced":
        if (!this.applySynced(event)) return;
        break;
    }
    if (this.options.onEvent) this.options.onEvent(event);
  }

  /**
   * @private
   * Whether a session event is about the session this client follows: options.sessionId when
   * given; else the session of this connection's first snapshot, which a first snapshot
   * (`first`) names. Until one is known, every session is.
   */
  follows(event, first) {
    const id = event.session_id;
    if (this.options.sessionId !== undefined) return id === this.options.sessionId;
    if (first) return true;
    return this.sessionId === null || id === this.sessionId;
  }

  /** @private Take a frame the client applies as naming the session it follows. */
  learnSession(event) {
    if (this.options.sessionId === undefined) {
      this.sessionId = typeof event.session_id === "string" ? event.session_id : null;
    }
  }

  /** @private */
  applyUpdate(event) {
    const version = asVersion(event.version);
    // A version that is not one makes the frame invalid (the server refuses it too); an absent
    // (or null) version is a state without one.
    if (version === null && event.version != null) return;
    // The first full state of a connection, and a snapshot the server marks `reset` (a resync on
    // a live socket), are the database's truth, even if older than what is shown: the session
    // was re-created or restored from a backup, or the version shown came from a bad frame.
    const truth = this.fresh || event.reset === true;
    if (!this.follows(event, this.fresh)) return;
    if (truth) {
      this.version = version;
      if (this.fresh) this.learnSession(event);
    } else if (version !== null) {
      if (this.version !== null && version <= this.version) return; // a duplicate or a late one
      this.version = version;
    }
    // A later state without a version is applied, the version shown kept: the server's cursor
    // sends it, so the client takes it as well.
    this.fresh = false;
    this.known = true;
    this.session = event.session;
    this.options.onSession(event.session, event);
  }

  /** @private */
  applyPatchEvent(event) {
    const base = asVersion(event.base_version);
    const version = asVersion(event.version);
    // Malformed (the server refuses it too): a patch goes forward from a version to a newer one.
    if (base === null || version === null || version <= base) return;
    if (!this.follows(event, false)) return;
    const current = this.version;
    if (current === null) {
      // A state without a version can never be patched; no state at all is a gap.
      if (!this.known) this.restart(`patch gap: base_version ${base}, no state yet`, true);
      return;
    }
    if (base !== current) {
      if (version <= current) return; // already applied or superseded
      // A patch was lost (base ahead), or this one overlaps the client's version: resync from a
      // fresh snapshot, resuming with `since`.
      this.restart(`patch gap: base_version ${base}, have ${current}`, true);
      return;
    }
    let session;
    try {
      session = applyPatch(this.session, event.patch);
    } catch (error) {
      // The state is untouched, but no longer the server's: resync.
      console.warn("session-sync: resyncing after an invalid patch:", error);
      this.restart("invalid patch", true);
      return;
    }
    this.session = session;
    this.version = version;
    this.fresh = false; // this connection's state is established: a later full state must be newer
    this.options.onSession(session, event);
  }

  /**
   * @private
   * The server skipped the snapshot: this client is current at the version it sent. Returns
   * whether the event is for this client (then it goes on to onEvent).
   */
  applySynced(event) {
    const version = asVersion(event.version);
    if (version === null || !this.follows(event, this.fresh)) return false;
    if (this.fresh) this.learnSession(event);
    this.fresh = false;
    if (this.version === null) this.version = version;
    return true;
  }

  /**
   * @private
   * @param {string} state
   * @param {number} delay
   */
  setState(state, delay) {
    const changed = state !== this.state || state === "reconnecting";
    this.state = state;
    if (changed && this.options.onState) {
      this.options.onState(state, { attempt: this.attempt, delay });
    }
    this.updateStatus();
  }

  /**
   * The session's status, as a page shows it, from the connection's state and what the client
   * holds (the table is in docs/guides/frontend.md):
   * "closed" when stopped; "offline" while the browser says so and nothing arrived since;
   * "connecting" until a first state is applied; "live" when the connection is open;
   * "syncing" while the client resyncs a state it knows is behind (a gap, a bad patch);
   * "stale" while it reconnects with a state that may have fallen behind.
   * @returns {"connecting" | "live" | "syncing" | "stale" | "offline" | "closed"}
   */
  statusNow() {
    if (this.state === "closed") return "closed";
    if (this.offlineAt !== null && this.lastReceived <= this.offlineAt) return "offline";
    if (!this.known) return "connecting";
    if (this.behind) return "syncing";
    return this.state === "live" ? "live" : "stale";
  }

  /** @private Report the status to onStatus when it changed. */
  updateStatus() {
    const status = this.statusNow();
    if (status === this.status) return;
    this.status = status;
    if (this.options.onStatus) {
      this.options.onStatus(status, { attempt: this.attempt, delay: this.delay });
    }
  }
}
