// A typed use of the shipped React hook, as an app that installed the package writes it;
// tests/js/tsconfig.json maps "asgi-session-sync" to asgi_session_sync/static/ and checks this
// file with `npx tsc --noEmit -p tests/js` (in CI). docs/guides/frontend.md shows the part
// between the snippet markers.
// --8<-- [start:component]
import { createRoot } from "react-dom/client";

import { useSessionSync, type SessionStatus } from "asgi-session-sync/react";

interface Interaction {
  id: string;
  prompt: string;
  response: string;
  status: "pending" | "streaming" | "complete" | "cancelled" | "interrupted";
}

interface Chat {
  title: string;
  interactions: Interaction[];
}

const LABELS: Record<SessionStatus, string> = {
  connecting: "Connecting…",
  live: "Live",
  syncing: "Catching up…",
  stale: "Reconnecting…",
  offline: "Offline",
  closed: "Closed",
};

export function ChatView({ sessionId }: { sessionId: string }) {
  const { session, status, version, streaming, reconnect } = useSessionSync<Chat>(
    `/ws/sessions/${sessionId}`,
    {
      heartbeatInterval: 15_000, // the server sends a heartbeat every 15 s
      connectTimeout: 10_000,
      isStreaming: (chat) => chat.interactions.some((i) => i.status === "streaming"),
      onEvent: (event) => console.debug(event.type),
    },
  );
  const badge = <span className={`status status-${status}`}>{LABELS[status]}</span>;
  if (session === undefined) return <p>Loading… {badge}</p>;
  return (
    <article>
      <h2>
        {session.title} {badge}
      </h2>
      {status !== "live" && <button onClick={reconnect}>Reconnect now</button>}
      {streaming && <p className="typing">The assistant is answering…</p>}
      <ol>
        {session.interactions.map((interaction) => (
          <li key={interaction.id}>
            <p>{interaction.prompt}</p>
            <p>{interaction.response}</p>
          </li>
        ))}
      </ol>
      <footer>version {version ?? "none"}</footer>
    </article>
  );
}

const root = document.getElementById("root");
if (root !== null) createRoot(root).render(<ChatView sessionId="abc" />);
// --8<-- [end:component]

// Without a session to follow yet: no connection, status "closed".
export function Maybe({ sessionId }: { sessionId: string | null }) {
  const { status } = useSessionSync<Chat>(sessionId && `/ws/sessions/${sessionId}`);
  return <p>{status}</p>;
}

// @ts-expect-error: "reconnecting" is a connection state (onState), not a status.
export const wrong: SessionStatus = "reconnecting";
// @ts-expect-error: isStreaming takes the session's type.
useSessionSync<Chat>("/ws", { isStreaming: (chat: { other: number }) => chat.other > 0 });
