// asgi-session-sync browser client: a dependency-free ES module, typed by session-sync.d.ts.
//
// Opens the session's WebSocket and keeps it healthy: reconnects with jittered exponential
// backoff (reset only once a connection has stayed up), notices a silent half-open socket by its
// missing heartbeats, reconnects at once when the network comes back. Passes the last version it
// applied as `since` on reconnect. Takes the first `session_update` of each connection as the
// server's truth, then applies newer `session_update` and chained `session_patch` events
// (RFC 6902 JSON Patch), never rolling back to an older state.
//
//   import { SessionSync } from "/static/session-sync/session-sync.js";
//   const sync = new SessionSync({
//     url: "/ws/sessions/abc",
//     onSession: (session, event) => render(session),
//     onState: (state) => (badge.textContent = state),
//   }).start();
//
// The options, events and the wire rule for versions: docs/guides/frontend.md.

const ISO = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$/i;
// An int version beyond ±(2^53-1) travels as a string of decimal digits; any such string is an
// int version (the wire rule, shared with the server's versions.py).
const DIGITS = /^-?[0-9]+$/;

/**
 * Sort key of a version, or null when it is not one: [0, value] for an int, [1, microseconds
 * since the epoch] for a timestamp. BigInt, so ints beyond 2^53 and microseconds keep every digit.
 * A timestamp without an offset is UTC, as on the server.
 * @param {unknown} version
 * @returns {[0 | 1, bigint] | null}
 */
function versionKey(version) {
  if (typeof version === "number") {
    return Number.isInteger(version) ? [0, BigInt(version)] : null;
  }
  if (typeof version !== "string") return null;
  if (DIGITS.test(version)) return [0, BigInt(version)];
  const match = ISO.exec(version);
  if (!match) return null;
  const [, base, fraction = "", offset = "Z"] = match;
  const milliseconds = Date.parse(base + offset);
  if (Number.isNaN(milliseconds)) return null;
  const microseconds = BigInt((fraction + "000000").slice(0, 6));
  return [1, BigInt(milliseconds) * 1000n + microseconds];
}

/**
 * Compare two versions: 1 if a is newer, -1 if older, 0 if the same, null if they don't compare
 * (an int and a timestamp, or something that is not a version).
 * @param {unknown} a
 * @param {unknown} b
 * @returns {1 | 0 | -1 | null}
 */
export function compareVersions(a, b) {
  const x = versionKey(a);
  const y = versionKey(b);
  if (x === null || y === null || x[0] !== y[0]) return null;
  if (x[1] === y[1]) return 0;
  return x[1] > y[1] ? 1 : -1;
}

/**
 * A version as the `since` query parameter: ints as their exact decimal digits, timestamps as sent.
 * @param {number | string} version
 * @returns {string}
 */
function sinceText(version) {
  // String(2 ** 70) is "1.1805916207174113e+21", which the server cannot read as a version.
  return typeof version === "number" && Number.isInteger(version)
    ? BigInt(version).toString()
    : String(version);
}

const VERSION_FIELDS = ["version", "base_version"];

/** @param {unknown} value */
function isUnsafeInt(value) {
  return typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value);
}

/**
 * Parse one frame. A server that follows the wire rule sends big int versions as digit strings;
 * one that sends them as JSON numbers loses their low digits in JSON.parse. Where the browser
 * gives revivers the source text (Chrome 114+), such versions are read again as exact digit
 * strings; elsewhere they stay rounded numbers. Only top-level version fields are touched, and
 * only frames that have such a number pay for the second parse.
 * @param {string} text
 * @returns {unknown}
 */
function parseFrame(text) {
  const frame = JSON.parse(text);
  if (!frame || typeof frame !== "object" || !VERSION_FIELDS.some((k) => isUnsafeInt(frame[k]))) {
    return frame;
  }
  /** @type {[object, string, string][]} */
  const exact = [];
  const root = JSON.parse(text, function (key, value, context) {
    const source = context === undefined ? undefined : context.source;
    if (VERSION_FIELDS.includes(key) && isUnsafeInt(value) && DIGITS.test(source)) {
      exact.push([this, key, source]);
    }
    return value;
  });
  for (const [holder, key, digits] of exact) if (holder === root) root[key] = digits;
  return root;
}

// ---------------------------------------------------------------------------------------------
// RFC 6902 JSON Patch over RFC 6901 JSON Pointer. Copy-on-write: every operation copies only the
// containers on its path, so the input is never mutated, unchanged parts are shared with the
// result, and a patch that fails part-way leaves nothing behind (atomic by construction).

const INDEX = /^(0|[1-9][0-9]*)$/;
const OPERATIONS = new Set(["add", "remove", "replace", "move", "copy", "test"]);
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

/** Set a member, even one named "__proto__" (plain assignment would change the prototype). */
function setMember(object, key, value) {
  Object.defineProperty(object, key, { value, writable: true, enumerable: true, configurable: true });
}

/** A deep copy of a JSON value, so the result never shares objects with the operations. */
function clone(value) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(clone);
  const copy = {};
  for (const key of Object.keys(value)) setMember(copy, key, clone(value[key]));
  return copy;
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
 * A copy of document with change applied to the container holding the last token. The
 * containers on the way are copied; a missing one is an error.
 * @param {(parent: unknown, token: string) => unknown} change Returns the parent's new copy.
 */
function edit(document, tokens, change, depth = 0) {
  const token = tokens[depth];
  if (depth === tokens.length - 1) return change(document, token);
  if (Array.isArray(document)) {
    const index = arrayIndex(document, token, false);
    const copy = document.slice();
    copy[index] = edit(document[index], tokens, change, depth + 1);
    return copy;
  }
  if (isObject(document) && hasOwn(document, token)) {
    const copy = { ...document };
    setMember(copy, token, edit(document[token], tokens, change, depth + 1));
    return copy;
  }
  throw new Error(`no value at "/${tokens.slice(0, depth + 1).join("/")}"`);
}

function add(document, tokens, value) {
  if (tokens.length === 0) return value;
  return edit(document, tokens, (parent, token) => {
    if (Array.isArray(parent)) {
      const copy = parent.slice();
      copy.splice(arrayIndex(parent, token, true), 0, value);
      return copy;
    }
    if (!isObject(parent)) throw new Error(`the parent of "${token}" is not an object or array`);
    const copy = { ...parent };
    setMember(copy, token, value);
    return copy;
  });
}

function remove(document, tokens) {
  if (tokens.length === 0) throw new Error("cannot remove the whole document");
  return edit(document, tokens, (parent, token) => {
    if (Array.isArray(parent)) {
      const copy = parent.slice();
      copy.splice(arrayIndex(parent, token, false), 1);
      return copy;
    }
    if (!isObject(parent) || !hasOwn(parent, token)) throw new Error(`no member "${token}"`);
    const copy = { ...parent };
    delete copy[token];
    return copy;
  });
}

function replace(document, tokens, value) {
  if (tokens.length === 0) return value;
  return edit(document, tokens, (parent, token) => {
    if (Array.isArray(parent)) {
      const copy = parent.slice();
      copy[arrayIndex(parent, token, false)] = value;
      return copy;
    }
    if (!isObject(parent) || !hasOwn(parent, token)) throw new Error(`no member "${token}"`);
    const copy = { ...parent };
    setMember(copy, token, value);
    return copy;
  });
}

/** @param {Record<string, unknown>} operation */
function valueOf(operation) {
  if (!hasOwn(operation, "value") || operation.value === undefined) {
    throw new Error(`"${operation.op}" needs a "value"`);
  }
  return clone(operation.value);
}

/** Apply one operation (RFC 6902 §4) to document; returns the new document. */
function applyOperation(document, operation) {
  if (!isObject(operation)) throw new Error("an operation must be an object");
  const { op } = operation;
  if (typeof op !== "string" || !OPERATIONS.has(op)) {
    throw new Error(`"op" must be one of ${[...OPERATIONS].join(", ")}`);
  }
  if (!hasOwn(operation, "path")) throw new Error(`"${op}" needs a "path"`);
  const path = parsePointer(operation.path, "path");
  switch (op) {
    case "add":
      return add(document, path, valueOf(operation));
    case "remove":
      return remove(document, path);
    case "replace":
      return replace(document, path, valueOf(operation));
    case "test":
      if (!deepEqual(valueAt(document, path), valueOf(operation))) {
        throw new Error(`test failed: the value at "${operation.path}" differs`);
      }
      return document;
    default: {
      // move and copy
      if (!hasOwn(operation, "from")) throw new Error(`"${op}" needs a "from"`);
      const from = parsePointer(operation.from, "from");
      const value = valueAt(document, from);
      if (op === "copy") return add(document, path, clone(value));
      if (from.every((token, i) => token === path[i])) {
        if (from.length === path.length) return document; // moved onto itself
        throw new Error(`cannot move "${operation.from}" into its own child`);
      }
      return add(remove(document, from), path, value);
    }
  }
}

/**
 * Apply an RFC 6902 JSON Patch. Returns the new document; never mutates document or operations
 * (the result shares unchanged parts with document, so treat both as immutable).
 * @template T
 * @param {T} document
 * @param {readonly object[]} operations
 * @returns {T}
 * @throws {Error} When the patch is invalid or an operation fails (RFC 6902 §5): nothing is
 *   applied then.
 */
export function applyPatch(document, operations) {
  if (!Array.isArray(operations)) throw new Error("a JSON Patch must be an array of operations");
  let result = document;
  operations.forEach((operation, i) => {
    try {
      result = applyOperation(result, operation);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`JSON Patch operation ${i} failed: ${message}`);
    }
  });
  return result;
}

// ---------------------------------------------------------------------------------------------

const DEFAULTS = {
  sinceParam: "since",
  updateType: "session_update",
  patchType: "session_patch",
  minDelay: 250,
  maxDelay: 10000,
  factor: 2,
  jitter: 0.5,
  stableAfter: 5000,
  heartbeatInterval: 0,
  staleAfter: 60000,
  stopOnCodes: [1008, 4401, 4403, 4404],
};

// A heartbeat silence is 2.5 intervals: one lost or late heartbeat is not a dead socket.
const MISSED_HEARTBEATS = 2.5;

/** Keeps one session current over a self-healing WebSocket. */
export class SessionSync {
  /** @param {object} options See SessionSyncOptions in session-sync.d.ts. */
  constructor(options) {
    if (!options || !options.url || typeof options.onSession !== "function") {
      throw new TypeError("SessionSync needs options.url and options.onSession");
    }
    this.options = { ...DEFAULTS, ...options };
    for (const name of ["minDelay", "maxDelay", "stableAfter", "heartbeatInterval", "staleAfter"]) {
      const value = this.options[name];
      if (typeof value !== "number" || !(value >= 0) || value === Infinity) {
        throw new RangeError(`SessionSync: ${name} must be a number of ms >= 0, got ${value}`);
      }
    }
    const { factor, jitter } = this.options;
    if (typeof factor !== "number" || !(factor >= 1) || factor === Infinity) {
      throw new RangeError(`SessionSync: factor must be a number >= 1, got ${factor}`);
    }
    if (typeof jitter !== "number" || !(jitter >= 0 && jitter <= 1)) {
      throw new RangeError(`SessionSync: jitter must be a number from 0 to 1, got ${jitter}`);
    }
    /** Until start(), and after close(), "closed". */
    this.state = "closed";
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
    this.openedAt = null; // Date.now() when the socket opened, null until then
    this.lastReceived = 0; // Date.now() of the last frame
    this.watchdog = null;
    this.hiddenAt = null;
    this.offlineAt = null; // Date.now() of the last "offline" event, until the next "online"
    this.onOffline = () => {
      this.offlineAt = Date.now();
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
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (this.version === null) url.searchParams.delete(this.options.sinceParam);
    else url.searchParams.set(this.options.sinceParam, sinceText(this.version));
    return url.toString();
  }

  /** @private */
  connect() {
    const Impl = this.options.WebSocketImpl || WebSocket;
    this.setState(this.attempt === 0 && this.version === null ? "connecting" : "reconnecting", 0);
    const socket = new Impl(this.currentUrl(), this.options.protocols);
    this.socket = socket;
    this.fresh = true;
    this.openedAt = null;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.openedAt = this.lastReceived = Date.now();
      if (this.options.heartbeatInterval > 0) this.watch(this.staleLimit());
      this.setState("live", 0);
    };
    socket.onmessage = (message) => {
      if (this.socket !== socket) return;
      this.lastReceived = Date.now();
      if (typeof message.data === "string") this.receive(message.data);
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
    // An error is always followed by close, which reconnects.
    socket.onerror = () => {};
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

  /** @private Drop the current socket and reconnect after the backoff delay. */
  restart(reason) {
    if (this.stopped) return;
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
    this.setState("reconnecting", delay);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.stopped) this.connect();
    }, delay);
  }

  /** @private How long a silent open socket may stay silent before it counts as stale, in ms. */
  staleLimit() {
    const { heartbeatInterval, staleAfter } = this.options;
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
    let event;
    try {
      event = parseFrame(text);
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
        // The server skipped the snapshot: this client is current at the version it sent.
        this.fresh = false;
        if (this.version === null && event.version !== undefined) this.version = event.version;
        break;
    }
    if (this.options.onEvent) this.options.onEvent(event);
  }

  /** @private */
  applyUpdate(event) {
    if (this.fresh) {
      // The first full state of a connection is the server's truth, even if older than what
      // is shown: the session was re-created or restored from a backup.
      this.fresh = false;
      this.version = event.version === undefined ? null : event.version;
    } else {
      const order = this.version === null ? 1 : compareVersions(event.version, this.version);
      if (order === 0 || order === -1) return;
      if (event.version !== undefined) this.version = event.version;
    }
    this.session = event.session;
    this.options.onSession(event.session, event);
  }

  /** @private */
  applyPatchEvent(event) {
    // Without a version there is no base to chain from; the next full state brings one.
    if (this.version === null || compareVersions(event.version, this.version) !== 1) return;
    if (compareVersions(event.base_version, this.version) !== 0) {
      // A patch was lost (base ahead) or does not chain: resync with a fresh snapshot.
      this.restart(`patch gap: base_version ${event.base_version}, have ${this.version}`);
      return;
    }
    let session;
    try {
      session = applyPatch(this.session, event.patch);
    } catch (error) {
      // The state is untouched, but no longer the server's: resync.
      console.warn("session-sync: resyncing after an invalid patch:", error);
      this.restart("invalid patch");
      return;
    }
    this.session = session;
    this.version = event.version;
    this.fresh = false; // this connection's state is established: a later full state must be newer
    this.options.onSession(session, event);
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
  }
}
