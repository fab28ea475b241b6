// The page both examples serve: one session live over a WebSocket, or over Server-Sent Events
// with ?transport=sse, through the shipped browser client, with the "Try it" panel that names
// the processes to kill.
import { SessionSync } from "/static/session-sync/session-sync.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
/** @type {SessionSync | null} */
let sync = null;
let sessionId = params.get("session");
// How the page follows the session: the same client, options and statuses over either.
const transport = params.get("transport") === "sse" ? "sse" : "websocket";
const TRANSPORT_TEXT = { websocket: "WebSocket", sse: "event stream (Server-Sent Events)" };
let connection = "idle";

// For tests and the curious: every connection state in order, how many session states
// arrived, and how many renders they cost.
window.stateLog = [];
window.sessionEventCount = 0;
window.renderCount = 0;

// What each status reads as on the page.
const STATUS_TEXT = {
  pending: "waiting for a worker",
  streaming: "streaming",
  complete: "complete",
  cancelled: "stopped",
  interrupted: "interrupted",
};

// The timings GET /api/demo gives; these defaults hold until it answers.
const timing = { publishInterval: 0.05, tokenInterval: 0.02, leaseSeconds: 10 };
// A streaming answer with no new text for this long, on a live socket, has stalled: three
// of the longest expected gaps between two deltas, and a second for the network and a
// checkpoint. Its worker may be dead: the answer then ends interrupted at lease expiry.
function stallAfterMs() {
  return 3 * Math.max(timing.publishInterval, timing.tokenInterval) * 1000 + 1000;
}

// ---- The notice line: an error, or a note on what to do now.

// An action that failed because the API did not answer (it is restarting, say) leaves an
// "outage" notice; once the API answers again it is replaced by what to do now, never left
// beside a live connection.
/** @type {{ kind: string, back: string }} */
let notice = { kind: "", back: "" };

function showNotice(text, kind = "error", back = "") {
  const line = $("#error");
  line.textContent = text;
  line.hidden = !text;
  line.dataset.kind = text ? kind : "";
  notice = { kind: text ? kind : "", back };
}

function showError(message) {
  showNotice(message, "error");
}

// The API answers again (the socket is live, or a request succeeded).
function apiIsBack() {
  if (notice.kind === "outage") showNotice(`The API is back. ${notice.back}`, "note");
}

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

class Unreachable extends Error {}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    // The browser's own message ("Failed to fetch") says nothing a user can act on.
    throw new Unreachable("The API did not answer: it may be restarting.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`;
    throw new ApiError(`${method} ${path}: ${detail}`, response.status);
  }
  apiIsBack();
  return data;
}

// Say why `action` failed; for an outage, also what to do once the API is back.
function failed(error, { now, back }) {
  if (error instanceof Unreachable) showNotice(`${error.message} ${now}`, "outage", back);
  else showError(error.message);
}

// ---- Connection state.

// The header's two links: this page's transport marked, the other one the same page over it
// (the token and the session kept).
function showTransport() {
  for (const link of document.querySelectorAll("#transport a")) {
    const url = new URL(location.href);
    url.searchParams.set("transport", link.dataset.transport);
    link.href = url.toString();
    if (link.dataset.transport === transport) link.setAttribute("aria-current", "true");
    else link.removeAttribute("aria-current");
  }
  $("#transport").dataset.transport = transport;
  $("#state").title = `The page's ${TRANSPORT_TEXT[transport]}`;
}

function showState(state) {
  connection = state;
  window.stateLog.push(state);
  $("#state").textContent = state;
  $("#state").dataset.state = state;
  document.body.dataset.state = state;
  // The panel shows at once which API process is down, and which one came back.
  if (state === "reconnecting" || state === "live") refreshDemo();
  if (state === "live") {
    apiIsBack();
    // A new socket: what it missed comes now (the snapshot, then the producer's catch-up),
    // so each answer's stall clock starts again.
    for (const view of views.values()) view.grewAt = performance.now();
  }
  checkStalls();
}

// ---- Rendering: at most once per animation frame, each interaction's element kept.

let latest = null;
let frame = 0;
function onSession(session, event) {
  window.sessionEventCount += 1;
  latest = { session, version: event.version };
  if (!frame) {
    frame = requestAnimationFrame(() => {
      frame = 0;
      render(latest.session, latest.version);
    });
  }
}

// One element per interaction, kept across renders: a streaming answer grows in place (the
// reader's selection survives), and the Stop button is not replaced under the pointer.
/** @type {Map<number, ReturnType<typeof interactionView>>} */
const views = new Map();

function element(tag, testid, className) {
  const node = document.createElement(tag);
  if (testid) node.dataset.testid = testid;
  if (className) node.className = className;
  return node;
}

function interactionView(position) {
  const item = element("li", "interaction", "interaction");
  item.dataset.position = String(position);
  const prompt = element("p", "prompt", "prompt");
  const answer = element("div", "", "answer");
  const response = element("p", "response", "response");
  const text = document.createTextNode("");
  response.append(text);
  const meta = element("div", "", "meta");
  const status = element("span", "status", "status");
  const stop = element("button", "stop", "stop");
  stop.type = "button";
  stop.textContent = "Stop";
  stop.hidden = true;
  stop.addEventListener("click", () => stopAnswer(position, stop));
  meta.append(status, stop);
  const stalled = element("p", "stalled", "stalled");
  stalled.hidden = true;
  answer.append(response, meta, stalled);
  item.append(prompt, answer);
  return { item, answer, prompt, text, status, stalled, stop, note: null, shown: null, grewAt: 0 };
}

// Built with textContent and text nodes only: prompts and responses are text, never markup.
function showInteraction(view, interaction) {
  const { prompt, response, status, done, interrupted } = interaction;
  const shown = view.shown;
  if (shown && shown.prompt === prompt && shown.response === response && shown.status === status
      && shown.done === done && shown.interrupted === interrupted) return;
  if (!shown || shown.response !== response || shown.status !== status) {
    view.grewAt = performance.now();
  }
  view.shown = { prompt, response, status, done, interrupted };
  view.item.dataset.done = String(done);
  view.item.dataset.status = status;
  if (!shown || shown.prompt !== prompt) view.prompt.textContent = prompt;
  const text = view.text.data;
  if (response !== text) {
    // An answer grows at its end: append the new words, and keep the reader's selection.
    if (response.startsWith(text)) view.text.appendData(response.slice(text.length));
    else view.text.data = response;
  }
  view.status.textContent = STATUS_TEXT[status] ?? status;
  const stoppable = status === "pending" || status === "streaming";
  view.stop.hidden = !stoppable;
  if (!stoppable) {
    view.stop.disabled = false;
    view.stop.textContent = "Stop";
  }
  // A response whose worker stopped or died: final, with the reason (no note otherwise).
  if (interrupted) {
    if (!view.note) {
      view.note = element("p", "interrupted", "interrupted");
      view.answer.append(view.note);
    }
    view.item.dataset.interrupted = "true";
    view.note.textContent = `Interrupted: ${interrupted}`;
  } else if (view.note) {
    delete view.item.dataset.interrupted;
    view.note.remove();
    view.note = null;
  }
  showStall(view, performance.now());
}

function render(session, version) {
  window.renderCount += 1;
  $("#version").textContent = String(version);
  $("#session-title").textContent = session.title;
  $("#session-id").textContent = session.id;
  $("#empty").hidden = session.interactions.length > 0;
  const list = $("#interactions");
  const positions = new Set();
  session.interactions.forEach((interaction, index) => {
    positions.add(interaction.position);
    let view = views.get(interaction.position);
    if (!view) {
      view = interactionView(interaction.position);
      views.set(interaction.position, view);
    }
    showInteraction(view, interaction);
    if (list.children[index] !== view.item) list.insertBefore(view.item, list.children[index] ?? null);
  });
  for (const [position, view] of views) {
    if (!positions.has(position)) {
      view.item.remove();
      views.delete(position);
    }
  }
}

// ---- Stalls: a streaming answer that gets no new text while the socket is live.

function showStall(view, now) {
  const quiet = now - view.grewAt;
  const stalled = connection === "live" && view.shown?.status === "streaming"
    && quiet > stallAfterMs();
  if (stalled) {
    view.item.dataset.stalled = "true";
    view.status.textContent = "stalled";
    view.stalled.hidden = false;
    view.stalled.textContent = `No new words for ${Math.floor(quiet / 1000)} s: waiting for `
      + `the worker's lease to run out (${timing.leaseSeconds} s after its last checkpoint). `
      + "If the worker died, the answer then ends interrupted.";
  } else if (view.item.dataset.stalled) {
    delete view.item.dataset.stalled;
    view.stalled.hidden = true;
    view.status.textContent = STATUS_TEXT[view.shown?.status] ?? view.shown?.status ?? "";
  }
}

function checkStalls() {
  const now = performance.now();
  for (const view of views.values()) showStall(view, now);
}

setInterval(checkStalls, 250);

// ---- Actions.

// Stop an answer for every tab: only this stops it, never closing or reloading a page.
async function stopAnswer(position, button) {
  button.disabled = true;
  button.textContent = "Stopping…";
  try {
    await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/interactions/${position}/stop`);
    showNotice("");
  } catch (error) {
    button.disabled = false;
    button.textContent = "Stop";
    // 409: it ended meanwhile, which the socket shows anyway.
    if (error instanceof ApiError && error.status === 409) return;
    failed(error, {
      now: "The answer was not stopped.",
      back: "Press Stop again if the answer is still streaming.",
    });
  }
}

function watch(id) {
  if (sync) sync.close();
  sessionId = id;
  $("#session").hidden = false;
  $("#session-id").textContent = id;
  $("#session-title").textContent = "";
  $("#interactions").replaceChildren();
  $("#empty").hidden = true;
  views.clear();
  cancelAnimationFrame(frame);
  frame = 0;
  $("#version").textContent = "–";
  // Reloading, or opening this URL in another tab, comes back to the session.
  const url = new URL(location.href);
  url.searchParams.set("session", id);
  history.replaceState(null, "", url);
  showTransport();
  // EventSource cannot send an Authorization header, nor can a WebSocket: both routes take
  // the token from the query string.
  const path = transport === "sse" ? "sse" : "ws";
  sync = new SessionSync({
    url: `/${path}/sessions/${encodeURIComponent(id)}?token=${encodeURIComponent(token)}`,
    transport,
    minDelay: 200,
    maxDelay: 1000,
    // The API sends a heartbeat after 15 s of quiet: a socket silent for 37.5 s is dead (a
    // laptop that slept, a network that changed) and is replaced. On an event stream the
    // heartbeats are comments, which EventSource never shows, so the client ignores this.
    heartbeatInterval: 15_000,
    onSession,
    onState: showState,
  }).start();
  window.sessionSync = sync;
}

// A 4xx answer is final (no such session, not this user's, a bad token or id), except a
// timeout (408) or a rate limit (429): a socket would be refused the same way, forever.
function isFinal(status) {
  return status >= 400 && status < 500 && status !== 408 && status !== 429;
}

// Only the owner gets a socket: ask the API first, rather than retry a refused socket forever.
async function openSession(id) {
  try {
    await api("GET", `/api/sessions/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof ApiError && isFinal(error.status)) {
      showError(
        error.status === 404 ? `No session ${id} for ${token}.` : `Cannot open ${id}: ${error.message}`,
      );
      return;
    }
    // Anything else (the API is restarting): the socket retries until it is back.
  }
  watch(id);
}

$("#new-session").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const title = $("#title").value.trim() || "New session";
    const session = await api("POST", "/api/sessions", { title });
    showNotice("");
    watch(session.id);
  } catch (error) {
    failed(error, { now: "No session was created.", back: "Press New session again." });
  }
});

$("#new-prompt").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#prompt");
  const prompt = input.value.trim();
  if (!prompt || !sessionId) return;
  try {
    await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/prompts`, { prompt });
    input.value = "";
    showNotice("");
  } catch (error) {
    failed(error, {
      now: "Your prompt was not sent; it is still in the box.",
      back: "Your prompt was not sent: press Send to send it.",
    });
  }
});

// ---- The "Try it" panel: which process to kill, and what each kill shows.

let demoTimer = 0;
let apiPid = null;

async function refreshDemo() {
  clearTimeout(demoTimer);
  // While the page is in view: each look asks the workers for a roll call.
  demoTimer = setTimeout(refreshDemo, document.hidden ? 15_000 : 3_000);
  let demo;
  try {
    demo = await api("GET", "/api/demo");
  } catch {
    if (apiPid !== null) $("#api-pid").textContent = `${apiPid}`;
    $("#kill-api").dataset.down = "true";
    return;
  }
  apiPid = demo.api_pid;
  timing.publishInterval = demo.publish_interval;
  timing.tokenInterval = demo.token_interval;
  timing.leaseSeconds = demo.lease_seconds;
  delete $("#kill-api").dataset.down;
  $("#api-pid").textContent = String(demo.api_pid);
  const pids = demo.workers.map((worker) => worker.pid);
  $("#worker-pids").textContent = pids.length ? pids.join(" ") : "…";
  $("#kill-worker").dataset.down = String(!pids.length);
  $("#no-worker").hidden = pids.length > 0;
  $("#start-worker").textContent = `python -m ${demo.module} worker`;
  $("#demo-tokens").textContent = String(demo.response_tokens);
  $("#demo-rate").textContent = demo.token_interval > 0
    ? String(Math.round(1 / demo.token_interval)) : "as many as it can";
  $("#demo-lease").textContent = String(demo.lease_seconds);
  window.demo = demo;
}

// ---- Start.

$("#user").textContent = token || "nobody";
showTransport();
if (!token) {
  showError("Open this page with a token naming you, such as ?token=alice.");
  for (const control of document.querySelectorAll("input, button")) control.disabled = true;
} else {
  refreshDemo();
  if (sessionId) openSession(sessionId);
}
