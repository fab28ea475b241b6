// asgi-session-sync browser client: a dependency-free ES module.
//
// Opens the session's WebSocket, reconnects on its own with jittered exponential backoff, passes
// the last version it applied as `since` on reconnect, applies `session_update` events by version
// (never rolling back to an older state), and tells the page the connection state.
//
//   import { SessionSync } from "/session-sync.js";
//   const sync = new SessionSync({
//     url: "/ws/sessions/abc",
//     onSession: (session, event) => render(session),
//     onState: (state) => (badge.textContent = state),
//   });
//   sync.start();

/**
 * A session version: an integer counter or an ISO-8601 timestamp string.
 * @typedef {number | string} Version
 */

/**
 * An event from the server.
 * @typedef {Object} SessionEvent
 * @property {string} type "session_update", "session_synced" or an app's own type.
 * @property {string} session_id
 * @property {Version} [version]
 * @property {string | null} [owner]
 * @property {unknown} [session] The full state, on "session_update".
 */

/**
 * "connecting": first attempt; "live": open; "reconnecting": waiting or retrying after a drop;
 * "closed": stopped by close().
 * @typedef {"connecting" | "live" | "reconnecting" | "closed"} ConnectionState
 */

/**
 * @typedef {Object} SessionSyncOptions
 * @property {string} url WebSocket URL; a path ("/ws/sessions/abc") is resolved against the page,
 *   with ws: or wss: to match http: or https:.
 * @property {(session: unknown, event: SessionEvent) => void} onSession Called with each state
 *   applied: the snapshot, and every newer session_update.
 * @property {(state: ConnectionState, detail: {attempt: number, delay: number}) => void} [onState]
 * @property {(event: SessionEvent) => void} [onEvent] Called for every other event (and for
 *   "session_synced"), for apps that stream their own event types.
 * @property {string} [sinceParam="since"] Query parameter carrying the last applied version.
 * @property {string} [updateType="session_update"] The full-state event type.
 * @property {number} [minDelay=250] First reconnect delay, in ms.
 * @property {number} [maxDelay=10000] Largest reconnect delay, in ms.
 * @property {number} [factor=2] Growth of the delay per failed attempt.
 * @property {number} [jitter=0.5] Fraction of each delay taken off at random (0..1), so clients
 *   dropped together do not come back together.
 * @property {number[]} [stopOnCodes=[1008, 4401, 4403, 4404]] Close codes after which the client
 *   stops instead of reconnecting: the server refused this user or session for good. (A refusal
 *   before the WebSocket is accepted reaches browsers as 1006, like a network error: accept,
 *   then close with one of these codes, to make it final.)
 * @property {string | string[]} [protocols] WebSocket subprotocols.
 * @property {typeof WebSocket} [WebSocketImpl] For tests; the browser's WebSocket by default.
 */

const ISO = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$/i;

/**
 * Sort key of a version, or null when it is not one. Timestamps keep whole microseconds
 * (Date alone has milliseconds), and a timestamp without an offset is UTC, as on the server.
 * @param {unknown} version
 * @returns {[number, number, number] | null} [kind, value, microseconds]
 */
function versionKey(version) {
  if (typeof version === "number") {
    return Number.isInteger(version) ? [0, version, 0] : null;
  }
  if (typeof version !== "string") return null;
  const match = ISO.exec(version);
  if (!match) return null;
  const [, base, fraction = "", offset = "Z"] = match;
  const seconds = Date.parse(base + offset);
  if (Number.isNaN(seconds)) return null;
  return [1, seconds, Number((fraction + "000000").slice(0, 6))];
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
  for (let i = 1; i < 3; i++) {
    if (x[i] !== y[i]) return x[i] > y[i] ? 1 : -1;
  }
  return 0;
}

/** Keeps one session current over a self-healing WebSocket. */
export class SessionSync {
  /** @param {SessionSyncOptions} options */
  constructor(options) {
    if (!options || !options.url || typeof options.onSession !== "function") {
      throw new TypeError("SessionSync needs options.url and options.onSession");
    }
    this.options = {
      sinceParam: "since",
      updateType: "session_update",
      minDelay: 250,
      maxDelay: 10000,
      factor: 2,
      jitter: 0.5,
      stopOnCodes: [1008, 4401, 4403, 4404],
      ...options,
    };
    /** @type {ConnectionState} Until start(), "closed". */
    this.state = "closed";
    /** @type {Version | null} The version of the state last applied. */
    this.version = null;
    /** @type {unknown} The state last applied. */
    this.session = undefined;
    /** @type {WebSocket | null} */
    this.socket = null;
    this.attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    this.stopped = false;
  }

  /** Open the connection; reconnects on its own until close(). */
  start() {
    this.stopped = false;
    this.connect();
    return this;
  }

  /** Close for good: no more reconnects. */
  close() {
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    if (this.socket) this.socket.close(1000, "client closed");
    this.socket = null;
    this.setState("closed", 0);
  }

  /** The URL of the next attempt, with `since` set to the last applied version. */
  currentUrl() {
    const base = typeof location === "undefined" ? undefined : location.href;
    const url = new URL(this.options.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (this.version === null) url.searchParams.delete(this.options.sinceParam);
    else url.searchParams.set(this.options.sinceParam, String(this.version));
    return url.toString();
  }

  /** @private */
  connect() {
    const Impl = this.options.WebSocketImpl || WebSocket;
    this.setState(this.attempt === 0 && this.version === null ? "connecting" : "reconnecting", 0);
    const socket = new Impl(this.currentUrl(), this.options.protocols);
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.attempt = 0;
      this.setState("live", 0);
    };
    socket.onmessage = (message) => {
      if (this.socket === socket && typeof message.data === "string") this.receive(message.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.stopped) return;
      if (this.options.stopOnCodes.includes(event.code)) {
        this.stopped = true;
        this.setState("closed", 0);
        return;
      }
      this.scheduleReconnect();
    };
    // An error is always followed by close, which reconnects.
    socket.onerror = () => {};
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

  /**
   * Apply one frame: a newer full state replaces the current one; anything older or equal is
   * ignored, so duplicates and late events never roll the page back.
   * @param {string} text
   */
  receive(text) {
    /** @type {SessionEvent} */
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    if (!event || typeof event !== "object") return;
    if (event.type === this.options.updateType) {
      const order = this.version === null ? 1 : compareVersions(event.version, this.version);
      if (order === 0 || order === -1) return;
      this.version = event.version === undefined ? this.version : event.version;
      this.session = event.session;
      this.options.onSession(event.session, event);
      return;
    }
    if (event.type === "session_synced" && this.version === null && event.version !== undefined) {
      this.version = event.version;
    }
    if (this.options.onEvent) this.options.onEvent(event);
  }

  /**
   * @private
   * @param {ConnectionState} state
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
