// A typed use of the browser client, checked by `tsc --noEmit -p tests/js` (never run): the
// declarations in session-sync.d.ts must accept real usage and reject misuse.
import {
  SessionSync,
  applyPatch,
  asVersion,
  compareVersions,
  type AppendOperation,
  type ConnectionState,
  type JsonPatchOperation,
  type SessionEvent,
  type SessionPatch,
  type SessionUpdate,
  type Version,
} from "../../asgi_session_sync/static/session-sync.js";

interface Chat {
  title: string;
  interactions: { prompt: string; response: string }[];
}

function render(chat: Chat): string {
  return `${chat.title}: ${chat.interactions.length}`;
}

const sync = new SessionSync<Chat>({
  url: "/ws/sessions/abc",
  sessionId: "abc",
  onSession: (session, event) => {
    render(session);
    if (event.type === "session_patch") {
      const patch: SessionPatch = event;
      const base: Version = patch.base_version;
      void base;
    } else {
      const update: SessionUpdate<Chat> = event;
      void update.session.title;
      const replaced: boolean = update.reset === true; // a resync from the database
      void replaced;
    }
  },
  onState: (state: ConnectionState, { attempt, delay }) => {
    void [state, attempt.toFixed(), delay.toFixed()];
  },
  onEvent: (event: SessionEvent) => {
    if (event.type === "token" && compareVersions(event.version, sync.version) === 1) {
      void event["text"];
    }
  },
  minDelay: 250,
  maxDelay: 10_000,
  stableAfter: 5_000,
  heartbeatInterval: 15_000,
  staleAfter: 60_000,
  stopOnCodes: [4403],
  protocols: ["v1"],
}).start();

sync.reconnect();
const url: string = sync.currentUrl();
const current: Chat | undefined = sync.session;
const version: Version | null = sync.version;
const state: ConnectionState = sync.state;
const followed: string | null = sync.sessionId;
void [url, current, version, state, followed];
sync.close();

const operations: JsonPatchOperation[] = [
  { op: "add", path: "/interactions/-", value: { prompt: "hi", response: "" } },
  { op: "replace", path: "/interactions/0/response", value: "hello" },
  { op: "test", path: "/title", value: "t" },
  { op: "move", from: "/a", path: "/b" },
  { op: "copy", from: "/b", path: "/c" },
  { op: "remove", path: "/c" },
  { op: "append", path: "/interactions/0/response", offset: 5, value: " world" },
];
const streamed: AppendOperation = { op: "append", path: "/t", offset: 0, value: "a😀" };
void streamed;
const chat: Chat = applyPatch<Chat>({ title: "t", interactions: [] }, operations);
const order: 1 | 0 | -1 | null = compareVersions(8, 7);
const parsed: Version | null = asVersion(JSON.parse("7.0"));
const next: number = (parsed ?? 0) + 1; // a version is a number
void [chat, order, next];

// Misuse the declarations must reject.
// @ts-expect-error onSession is required
new SessionSync({ url: "/ws" });
// @ts-expect-error the session is a Chat, not a number
new SessionSync<Chat>({ url: "/ws", onSession: (session: number) => void session });
// @ts-expect-error "rename" is not an RFC 6902 operation
applyPatch({}, [{ op: "rename", path: "/a" }]);
// @ts-expect-error move needs "from"
applyPatch({}, [{ op: "move", path: "/a" }]);
// @ts-expect-error append needs an offset
applyPatch({}, [{ op: "append", path: "/a", value: "b" }]);
// @ts-expect-error an append's value is a string
applyPatch({}, [{ op: "append", path: "/a", offset: 0, value: 1 }]);
// @ts-expect-error version is read-only
sync.version = 3;
// @ts-expect-error a version is a number, never a string (protocol v3)
const stringVersion: Version = "7";
// @ts-expect-error sessionId is a string
new SessionSync({ url: "/ws", onSession: () => {}, sessionId: 7 });
// @ts-expect-error reset is a boolean
const badReset: SessionUpdate = { type: "session_update", session_id: "a", session: 1, reset: 1 };
void [stringVersion, badReset];
// Defaults are filled in; callbacks the caller left out may be absent.
const delay: number = sync.options.minDelay;
// @ts-expect-error onEvent is optional, even on the filled-in options
sync.options.onEvent(sync as unknown as SessionEvent);
void delay;
