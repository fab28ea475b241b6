// TypeScript declarations for session-sync.js, the asgi-session-sync browser client.
// The options, events and the ordering rules: docs/guides/frontend.md.

/**
 * A session version (protocol v3): a whole number from 0 to 2^53 - 1
 * (`Number.MAX_SAFE_INTEGER`), such as a per-session counter or a row version. Strings (even of
 * digits) and timestamps are not versions; see `asVersion`.
 */
export type Version = number;

/** A JSON value, as carried in states and patches. */
export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [key: string]: JsonValue };

/** One of the six RFC 6902 operations. `path` and `from` are RFC 6901 JSON Pointers. */
export type Rfc6902Operation =
  | { op: "add"; path: string; value: unknown }
  | { op: "remove"; path: string }
  | { op: "replace"; path: string; value: unknown }
  | { op: "move"; from: string; path: string }
  | { op: "copy"; from: string; path: string }
  | { op: "test"; path: string; value: unknown };

/**
 * Protocol v3's extension of RFC 6902: adds `value` to the end of the string at `path` (an RFC
 * 6901 JSON Pointer), as a streamed answer grows. `offset` is that string's length before the
 * append in UTF-16 code units (JavaScript's `string.length`: "😀" counts 2), a whole number
 * from 0 to 2^53 - 1. Like a `test`, the operation fails, and so the whole patch, when the value
 * at `path` is not a string of exactly that length.
 */
export interface AppendOperation {
  op: "append";
  path: string;
  offset: number;
  value: string;
}

/** One operation of a `session_patch`: RFC 6902's six, or `append`. */
export type JsonPatchOperation = Rfc6902Operation | AppendOperation;

/** The full state of a session: the snapshot, first on each connection, and later updates. */
export interface SessionUpdate<S = unknown> {
  type: "session_update";
  session_id: string;
  version?: Version;
  owner?: string | null;
  session: S;
  /**
   * True on a snapshot loaded from the database (a resync on a live socket): the client replaces
   * its state and version with it, even when it shows a newer version.
   */
  reset?: boolean;
}

/** A delta: applying `patch` to the state at `base_version` gives the state at `version`. */
export interface SessionPatch {
  type: "session_patch";
  session_id: string;
  base_version: Version;
  version: Version;
  patch: JsonPatchOperation[];
}

/** Sent instead of the snapshot when the client resumed with the current version. */
export interface SessionSynced {
  type: "session_synced";
  session_id: string;
  version: Version;
}

/** Any event from the server: the ones above, or an app's own type. */
export interface SessionEvent {
  type: string;
  session_id?: string;
  version?: Version;
  [key: string]: unknown;
}

/**
 * "connecting": the first attempt; "live": open; "reconnecting": waiting or retrying after a drop;
 * "closed": before start(), after close(), or after a close code in stopOnCodes.
 */
export type ConnectionState = "connecting" | "live" | "reconnecting" | "closed";

/**
 * The session's status, as a page shows it (the React hook reports the same names):
 * "connecting": no state yet, connecting; "live": open, the state current;
 * "syncing": the client found its state behind (a lost or invalid patch) and is resyncing;
 * "stale": reconnecting after a drop, showing a state that may have fallen behind;
 * "offline": the browser is offline and nothing arrives; "closed": stopped.
 */
export type SessionStatus = "connecting" | "live" | "syncing" | "stale" | "offline" | "closed";

export interface StateDetail {
  /** Failed attempts since the last stable connection. */
  attempt: number;
  /** The wait before the next attempt, in ms (0 when none is scheduled). */
  delay: number;
}

export interface SessionSyncOptions<S = unknown> {
  /**
   * The session's URL: its WebSocket, or its event stream with `transport: "sse"`. A path is
   * resolved against the page, with ws: or wss: (http: or https: for "sse") to match.
   */
  url: string | URL;
  /**
   * "websocket" (the default), or "sse": Server-Sent Events over `EventSource`, with the same
   * options, callbacks and statuses. Over "sse", `heartbeatInterval` is not used (the server's
   * heartbeats are comments, which EventSource never shows), nor are `stopOnCodes` and
   * `protocols`.
   */
  transport?: "websocket" | "sse";
  /**
   * The session to follow: session events with another `session_id` are ignored. Default: the
   * session each connection's first snapshot names.
   */
  sessionId?: string;
  /**
   * Called with each state applied: each connection's first snapshot, resets, newer updates,
   * patches.
   */
  onSession: (session: S, event: SessionUpdate<S> | SessionPatch) => void;
  /** Called when the connection state changes. */
  onState?: (state: ConnectionState, detail: StateDetail) => void;
  /** Called when the session's status changes (the names the React hook reports). */
  onStatus?: (status: SessionStatus, detail: StateDetail) => void;
  /** Called for every other event (including "session_synced"; never for heartbeats). */
  onEvent?: (event: SessionEvent) => void;
  /** Query parameter carrying the last applied version. Default "since". */
  sinceParam?: string;
  /** The full-state event type. Default "session_update". */
  updateType?: string;
  /** The patch event type. Default "session_patch". */
  patchType?: string;
  /** First reconnect delay, in ms. Default 250. */
  minDelay?: number;
  /** Largest reconnect delay, in ms. Default 10000. */
  maxDelay?: number;
  /** Growth of the delay per failed attempt. Default 2. */
  factor?: number;
  /** Fraction of each delay taken off at random, 0..1. Default 0.5. */
  jitter?: number;
  /** A connection must stay open this long, in ms, before the backoff resets. Default 5000. */
  stableAfter?: number;
  /**
   * An attempt that has not opened within this many ms is abandoned and retried with the
   * backoff, as is one that errors before opening. 0: no limit. Default 8000: keep it above the
   * server's load `timeout` (5 s by default), since the server opens once the snapshot is loaded.
   */
  connectTimeout?: number;
  /**
   * The server's heartbeat interval, in ms (0: no heartbeat, the default). The client reconnects
   * when nothing has arrived for 2.5 times this.
   */
  heartbeatInterval?: number;
  /**
   * Without a heartbeat: a page visible again after at least this long hidden, in ms, whose
   * socket has received nothing for as long, reconnects. Default 60000.
   */
  staleAfter?: number;
  /** Close codes after which the client stops. Default [1008, 4401, 4403, 4404]. */
  stopOnCodes?: number[];
  /** WebSocket subprotocols. */
  protocols?: string | string[];
  /** For tests; the global WebSocket by default. */
  WebSocketImpl?: new (url: string, protocols?: string | string[]) => WebSocket;
  /** With `transport: "sse"`: send cookies to another origin's stream. Default false. */
  withCredentials?: boolean;
  /** For tests and polyfills; the global EventSource by default. */
  EventSourceImpl?: new (url: string, init?: EventSourceInit) => EventSource;
}

/** The options that have a default. */
export type DefaultedOption =
  | "transport"
  | "sinceParam"
  | "updateType"
  | "patchType"
  | "minDelay"
  | "maxDelay"
  | "factor"
  | "jitter"
  | "stableAfter"
  | "connectTimeout"
  | "heartbeatInterval"
  | "staleAfter"
  | "stopOnCodes";

/** Keeps one session current over a self-healing WebSocket (or Server-Sent Events stream). */
export class SessionSync<S = unknown> {
  /**
   * @throws {TypeError} Without url or onSession, with a sessionId that is not a string, or a
   *   transport that is neither "websocket" nor "sse".
   * @throws {RangeError} For a time (a delay or a timeout) that is not a number of ms >= 0, a
   *   factor below 1, or a jitter outside 0..1.
   */
  constructor(options: SessionSyncOptions<S>);
  /** The options, with defaults filled in. */
  readonly options: Readonly<
    SessionSyncOptions<S> & Required<Pick<SessionSyncOptions<S>, DefaultedOption>>
  >;
  /** The connection state. */
  readonly state: ConnectionState;
  /** The session's status, as a page shows it. */
  readonly status: SessionStatus;
  /** The version of the state last applied, or null. */
  readonly version: Version | null;
  /** The session followed (options.sessionId, or the one the last snapshot named), or null. */
  readonly sessionId: string | null;
  /** The state last applied (undefined before the first). */
  readonly session: S | undefined;
  /** The current socket (an EventSource with `transport: "sse"`), or null between attempts. */
  readonly socket: WebSocket | EventSource | null;
  /** Open the connection; reconnects on its own until close(). */
  start(): this;
  /** Close for good: no more reconnects. */
  close(): void;
  /** Drop the connection and connect again now, resuming with `since`. No-op when not started. */
  reconnect(): void;
  /** The URL of the next attempt, with `since` set to the last applied version. */
  currentUrl(): string;
  /** Apply one frame's text, as if it had arrived on the socket. */
  receive(text: string): void;
}

/**
 * The version a decoded JSON value stands for, or null when it is not one: a number whose value
 * is a whole number from 0 to 2^53 - 1 (`7`, `7.0` and `7e0` are 7; `-0` is 0). Strings (even
 * of digits), booleans, fractions, negative numbers and numbers beyond 2^53 - 1 are not.
 */
export function asVersion(value: unknown): Version | null;

/**
 * Compare two versions: 1 if a is newer, -1 if older, 0 if the same, null if either is not a
 * version (see `asVersion`).
 */
export function compareVersions(a: unknown, b: unknown): 1 | 0 | -1 | null;

/**
 * Apply a JSON Patch (RFC 6902's operations and `append`): returns the new document, never
 * mutates the input (the result shares unchanged parts with it). Each container on a path the
 * patch touches is copied at most once per patch, however many operations touch it.
 * @throws {Error} When the patch is invalid or an operation fails (an `append` whose target is
 *   not a string of length `offset`, too); nothing is applied then.
 */
export function applyPatch<T>(document: T, operations: readonly JsonPatchOperation[]): T;
