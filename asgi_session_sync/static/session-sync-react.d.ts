// TypeScript declarations for session-sync-react.js, asgi-session-sync's React hook.
// The hook, the statuses and an example page: docs/guides/frontend.md.
import type {
  ConnectionState,
  SessionEvent,
  SessionPatch,
  SessionStatus,
  SessionSyncOptions,
  SessionUpdate,
  StateDetail,
  Version,
} from "./session-sync.js";

export type { SessionStatus } from "./session-sync.js";

/** The options of useSessionSync: SessionSync's, less `url`, plus `isStreaming`. */
export interface UseSessionSyncOptions<S = unknown>
  extends Omit<SessionSyncOptions<S>, "url" | "onSession" | "onState" | "onStatus"> {
  /**
   * Whether an answer is streaming in this state, for `streaming` (a "stop" button, a cursor).
   * Default: never.
   */
  isStreaming?: (session: S) => boolean;
  /** Called with each state applied, as it is applied (not batched). */
  onSession?: (session: S, event: SessionUpdate<S> | SessionPatch) => void;
  /** Called when the status changes, as it changes (not batched). */
  onStatus?: (status: SessionStatus, detail: StateDetail) => void;
  /** Called when the connection state changes. */
  onState?: (state: ConnectionState, detail: StateDetail) => void;
  /** Called for every other event (including "session_synced"; never for heartbeats). */
  onEvent?: (event: SessionEvent) => void;
}

/** What useSessionSync returns: the latest frame's view of the session. */
export interface SessionSyncView<S = unknown> {
  /** The state last applied; undefined until the first snapshot. */
  session: S | undefined;
  /** Its version, or null. */
  version: Version | null;
  /** The session's status: the names `SessionSync` reports in `onStatus`. */
  status: SessionStatus;
  /** `isStreaming(session)`; false without a session or without `isStreaming`. */
  streaming: boolean;
  /** Drop the connection and connect again now, resuming; a no-op while closed. Stable. */
  reconnect: () => void;
}

/**
 * Keeps the session at `url` current while the component is mounted, and re-renders at most
 * once per animation frame, however many deltas arrived in it. A new `url` (or `transport`)
 * opens a new connection, starting from "connecting"; `null` opens none ("closed"). The other
 * options are read when the connection opens, and the callbacks whenever they are called, so
 * inline functions are fine.
 */
export function useSessionSync<S = unknown>(
  url: string | URL | null,
  options?: UseSessionSyncOptions<S>,
): SessionSyncView<S>;
