// asgi-session-sync's React hook: useSessionSync, typed by session-sync-react.d.ts.
//
// The package's optional entry point `asgi-session-sync/react` (React 18 or later is its peer
// dependency; the core client needs none), and the same file the Python package serves beside
// session-sync.js. Without a bundler, map "react" in an import map (docs/guides/frontend.md).
//
//   import { useSessionSync } from "asgi-session-sync/react";
//   const { session, status, version, streaming, reconnect } = useSessionSync("/ws/sessions/abc", {
//     isStreaming: (chat) => chat.interactions.some((i) => i.status === "streaming"),
//   });
import { useCallback, useEffect, useMemo, useRef, useState } from "react";

import { SessionSync } from "./session-sync.js";

// One render per animation frame: a burst of deltas (tokens arriving faster than the screen
// refreshes) costs one render. Without requestAnimationFrame (a worker, server-side rendering),
// a timer of one 60 Hz frame stands in.
const FRAME_MS = 16;
const requestFrame = (callback) =>
  typeof requestAnimationFrame === "function"
    ? requestAnimationFrame(callback)
    : setTimeout(callback, FRAME_MS);
const cancelFrame = (handle) =>
  typeof cancelAnimationFrame === "function" ? cancelAnimationFrame(handle) : clearTimeout(handle);

/** What the hook shows before a client exists (the first render, on the server) or without one. */
function idleView(status) {
  return { session: undefined, version: null, status, streaming: false };
}

/** The view of what the client holds now. */
function viewOf(client, isStreaming) {
  const { session } = client;
  return {
    session,
    version: client.version,
    status: client.status,
    streaming: session !== undefined && isStreaming !== undefined && Boolean(isStreaming(session)),
  };
}

const sameView = (a, b) =>
  a.session === b.session &&
  a.version === b.version &&
  a.status === b.status &&
  a.streaming === b.streaming;

/**
 * Keeps a session current in a component: a SessionSync while the component is mounted, its
 * state shown at most once per animation frame. See session-sync-react.d.ts.
 * @param {string | URL | null} url
 * @param {object} [options]
 */
export function useSessionSync(url, options = {}) {
  const key = url === null || url === undefined ? null : String(url);
  const latest = useRef(options);
  latest.current = options;
  const transport = options.transport;
  const [view, setView] = useState(() => idleView(key === null ? "closed" : "connecting"));
  const client = useRef(null);

  useEffect(() => {
    if (key === null) {
      setView((shown) => (shown.status === "closed" ? shown : idleView("closed")));
      return undefined;
    }
    let frame = null;
    const show = () => {
      frame = null;
      const next = viewOf(sync, latest.current.isStreaming);
      // The same view keeps the same object, so React skips the render.
      setView((shown) => (sameView(shown, next) ? shown : next));
    };
    const schedule = () => {
      if (frame === null) frame = requestFrame(show);
    };
    // The callbacks read the latest options, so an inline callback never reopens the connection.
    const connection = { ...latest.current };
    delete connection.isStreaming;
    const sync = new SessionSync({
      ...connection,
      url: key,
      onSession: (session, event) => {
        schedule();
        latest.current.onSession?.(session, event);
      },
      onStatus: (status, detail) => {
        schedule();
        latest.current.onStatus?.(status, detail);
      },
      onState: (state, detail) => latest.current.onState?.(state, detail),
      onEvent: (event) => latest.current.onEvent?.(event),
    });
    client.current = sync;
    sync.start();
    show(); // a new URL starts from nothing: show "connecting" at once, not last URL's state
    return () => {
      if (frame !== null) cancelFrame(frame);
      sync.close();
      if (client.current === sync) client.current = null;
    };
  }, [key, transport]);

  const reconnect = useCallback(() => client.current?.reconnect(), []);
  return useMemo(() => ({ ...view, reconnect }), [view, reconnect]);
}
