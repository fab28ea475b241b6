// useSessionSync: a React hook around SessionSync. Copy it into your app (it is not shipped);
// tests/js/tsconfig.json type-checks this file against session-sync.d.ts and @types/react.
import { useEffect, useRef, useState } from "react";

import {
  SessionSync,
  type ConnectionState,
  type SessionSyncOptions,
  type Version,
} from "./session-sync.js";

type HookOptions<S> = Omit<SessionSyncOptions<S>, "url" | "onSession" | "onState">;

export interface SessionSyncView<S> {
  /** The state last applied; undefined until the first snapshot. */
  session: S | undefined;
  /** Its version, or null. */
  version: Version | null;
  /** The connection state. */
  state: ConnectionState;
  /** Drop the connection and connect again now. */
  reconnect: () => void;
}

/**
 * Keeps `session` current for the session at `url` while the component is mounted. A new `url`
 * opens a new connection; `options` are read when the connection opens (keep `onEvent` stable,
 * or read what it needs from a ref).
 */
export function useSessionSync<S>(url: string, options: HookOptions<S> = {}): SessionSyncView<S> {
  const [view, setView] = useState<Omit<SessionSyncView<S>, "reconnect">>({
    session: undefined,
    version: null,
    state: "connecting",
  });
  const sync = useRef<SessionSync<S> | null>(null);
  const latestOptions = useRef(options);
  latestOptions.current = options;

  useEffect(() => {
    const client = new SessionSync<S>({
      ...latestOptions.current,
      url,
      // Each applied state is a new object that shares its unchanged parts with the previous
      // one, so memoised children of unchanged parts skip re-rendering.
      onSession: (session, event) =>
        setView((view) => ({ ...view, session, version: event.version ?? null })),
      onState: (state) => setView((view) => ({ ...view, state })),
    }).start();
    sync.current = client;
    return () => {
      client.close();
      sync.current = null;
    };
  }, [url]);

  return { ...view, reconnect: () => sync.current?.reconnect() };
}

// Use:
interface Chat {
  title: string;
  interactions: { id: string; prompt: string; response: string }[];
}

export function ChatView({ sessionId }: { sessionId: string }) {
  const { session, state, reconnect } = useSessionSync<Chat>(`/ws/sessions/${sessionId}`, {
    heartbeatInterval: 15_000, // the server sends a heartbeat every 15 s
  });
  if (session === undefined) return <p>Loading… ({state})</p>;
  return (
    <article>
      <h2>{session.title}</h2>
      {state !== "live" && <button onClick={reconnect}>Reconnect now ({state})</button>}
      <ol>
        {session.interactions.map((interaction) => (
          <li key={interaction.id}>
            <p>{interaction.prompt}</p>
            <p>{interaction.response}</p>
          </li>
        ))}
      </ol>
    </article>
  );
}
