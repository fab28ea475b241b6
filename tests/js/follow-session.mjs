// Follows one session with the shipped client under Node.js's built-in WebSocket, for the
// end-to-end test in tests/test_js_client.py (not a test file itself). Prints one JSON line per
// connection state change ({"state", "attempt", "delay"}) and per applied state ({"version",
// "session"}); SIGTERM closes the client and exits.
//
//   node [--experimental-websocket] follow-session.mjs <url> '<options as JSON>'
import { SessionSync } from "../../asgi_session_sync/static/session-sync.js";

const [url, options = "{}"] = process.argv.slice(2);
const print = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);

const sync = new SessionSync({
  url,
  ...JSON.parse(options),
  onSession: (session) => print({ version: sync.version, session }),
  onState: (state, detail) => print({ state, ...detail }),
}).start();

process.on("SIGTERM", () => {
  sync.close();
  process.exit(0);
});
