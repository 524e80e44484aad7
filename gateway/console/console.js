// The ops console: dead letters and their audit log, over the gateway's admin API
// (/api/v1/admin/dead-letters). No framework and no build step. Everything that comes
// from data is put on the page as text (textContent, attribute values), never as HTML.
"use strict";

const API = "/api/v1";
const DEAD_LETTERS = `${API}/admin/dead-letters`;
// sessionStorage: the sign-in survives a reload of this tab and ends with it.
const SESSION_KEY = "commerce.console.session";
const PAGE = 50;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------
// Session

let session = null; // {access_token, refresh_token, user: {id, email, roles}}

function loadSession() {
  try {
    session = JSON.parse(sessionStorage.getItem(SESSION_KEY));
  } catch {
    session = null;
  }
}

function saveSession(value) {
  session = value;
  if (value) {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(value));
  } else {
    sessionStorage.removeItem(SESSION_KEY);
  }
}

// ---------------------------------------------------------------------------
// API calls

/** An error answer of the API, with its problem+json body when there is one. */
class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

let busy = 0;
function setBusy(delta) {
  busy += delta;
  // Lets a person (and the browser test) see that an answer is awaited.
  document.documentElement.dataset.busy = busy > 0 ? "true" : "false";
}

async function send(method, path, body, token) {
  const headers = { accept: "application/json, application/problem+json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = { detail: text.slice(0, 500) };
    }
  }
  if (!response.ok) {
    const problem = json || {};
    const retry = response.headers.get("retry-after");
    if (retry) problem.retry_after = retry;
    throw new ApiError(response.status, problem);
  }
  return json;
}

let refreshing = null;

/** New tokens from the refresh token; one refresh at a time however many calls need it. */
function refreshTokens() {
  if (!refreshing) {
    refreshing = send("POST", `${API}/auth/refresh`, { refresh_token: session.refresh_token })
      .then((pair) => {
        saveSession({ ...session, ...pair, user: pair.user || session.user });
      })
      .finally(() => {
        refreshing = null;
      });
  }
  return refreshing;
}

/** An authenticated call. An expired access token is refreshed once; a refused one ends the session. */
async function api(method, path, body) {
  if (!session) throw new ApiError(401, { title: "Unauthorized", detail: "Sign in first." });
  setBusy(1);
  try {
    try {
      return await send(method, path, body, session.access_token);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      try {
        await refreshTokens();
      } catch {
        endSession("Your session has ended. Sign in again.");
        throw error;
      }
      return await send(method, path, body, session.access_token);
    }
  } finally {
    setBusy(-1);
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(key, value);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

// ---------------------------------------------------------------------------
// Building the page (text only)

/** An element with attributes, dataset entries and text or element children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** Local time, to the second; the exact UTC time is the element's tooltip. */
function time(iso) {
  if (!iso) return el("span", { class: "muted", text: "—" });
  const d = new Date(iso);
  const text =
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return el("time", { datetime: iso, title: iso, text: `${text} (${ago(d)})` });
}

function ago(date) {
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  if (seconds < 60) return "just now";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.round(hours / 24)} days ago`;
}

/** The operator as a person reads it: the signed-in admin by email, others by user id. */
function who(operator) {
  if (session && operator === session.user.id) return `${session.user.email} (you)`;
  return operator;
}

function link(href, text) {
  return el("a", { href, text });
}

function groupHref(key) {
  return `#/group/${encodeURIComponent(key)}`;
}

function messageHref(id) {
  return `#/message/${encodeURIComponent(id)}`;
}

/** The last part of an id, enough to tell rows apart. */
function short(id) {
  const uuid = id.includes(":") ? id.slice(id.indexOf(":") + 1) : id;
  return uuid.length > 13 ? `…${uuid.slice(-12)}` : uuid;
}

function facts(dl, pairs) {
  dl.replaceChildren();
  for (const [term, value] of pairs) {
    dl.append(el("dt", { text: term }), el("dd", {}, value ?? el("span", { class: "muted", text: "—" })));
  }
}

function show(node, visible) {
  node.hidden = !visible;
}

// ---------------------------------------------------------------------------
// Messages to the user

function notify(text) {
  const box = $("notice");
  box.textContent = text;
  show(box, Boolean(text));
}

/** An error shown readably: the problem's title, detail, field errors and request id. */
function report(error) {
  const box = $("problem");
  box.replaceChildren();
  if (!error) {
    show(box, false);
    return;
  }
  if (error instanceof ApiError) {
    const p = error.problem;
    const status = error.status ? ` (${error.status})` : "";
    box.append(el("strong", { text: `${p.title || "Error"}${status}` }));
    if (p.detail) box.append(el("p", { text: p.detail }));
    if (Array.isArray(p.errors) && p.errors.length) {
      box.append(el("ul", {}, ...p.errors.map((e) => el("li", { text: `${e.field}: ${e.message}` }))));
    }
    if (p.retry_after) box.append(el("p", { text: `Try again in ${p.retry_after} s.` }));
    if (p.request_id) box.append(el("p", { class: "muted", text: `request id ${p.request_id}` }));
  } else {
    box.append(
      el("strong", { text: "The gateway could not be reached" }),
      el("p", { text: String(error.message || error) }),
    );
  }
  show(box, true);
}

/** Services whose part of a list is missing: the rest is still shown. */
function unavailable(node, list) {
  const missing = (list || []).map((u) => `${u.service} (${u.error})`);
  node.textContent = missing.length ? `Not shown, these services did not answer: ${missing.join("; ")}` : "";
  show(node, missing.length > 0);
}

// ---------------------------------------------------------------------------
// Confirmation

/** Resolves true when the user confirms in the dialog. */
function confirmAction(title, text, action) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").removeEventListener("click", ok);
      $("confirm-cancel").removeEventListener("click", cancel);
      dialog.removeEventListener("cancel", cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = () => done(false);
    $("confirm-ok").addEventListener("click", ok);
    $("confirm-cancel").addEventListener("click", cancel);
    dialog.addEventListener("cancel", cancel);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// ---------------------------------------------------------------------------
// Filters

function filters() {
  const form = $("filters");
  const value = (name) => form.elements[name].value.trim();
  // datetime-local is the browser's local time; the API wants RFC 3339.
  const instant = (name) => (value(name) ? new Date(value(name)).toISOString() : "");
  return {
    service: value("service"),
    event_type: value("event_type"),
    since: instant("since"),
    until: instant("until"),
    q: value("q"),
    status: value("status"),
  };
}

// ---------------------------------------------------------------------------
// Groups

const groupsState = { cursor: null };

async function loadGroups(more = false) {
  const params = { ...filters(), limit: PAGE, cursor: more ? groupsState.cursor : "" };
  const page = await api("GET", DEAD_LETTERS + query(params));
  const body = $("groups-table").tBodies[0];
  if (!more) body.replaceChildren();
  for (const g of page.items) body.append(groupRow(g));
  groupsState.cursor = page.next_cursor;
  show($("groups-more"), Boolean(page.next_cursor));
  show($("groups-empty"), body.rows.length === 0);
  show($("groups-table"), body.rows.length > 0);
  unavailable($("groups-unavailable"), page.unavailable);
}

function groupRow(g) {
  const row = el(
    "tr",
    { class: "clickable", data: { key: g.key } },
    el("td", { text: g.service }),
    el("td", { text: g.handler }),
    el("td", {}, el("span", { class: `kind kind-${g.error_kind}`, text: g.error_kind })),
    el("td", { class: "error" }, link(groupHref(g.key), g.error_message)),
    el("td", { class: "num", text: g.count }),
    el("td", {}, time(g.first_seen)),
    el("td", {}, time(g.last_seen)),
    el("td", { text: g.event_types.join(", ") }),
  );
  row.addEventListener("click", (event) => {
    if (event.target.closest("a")) return;
    location.hash = groupHref(g.key);
  });
  return row;
}

// ---------------------------------------------------------------------------
// One group and its messages

const groupState = { key: null, group: null, cursor: null, selected: new Set() };

async function loadGroup(key, more = false) {
  if (groupState.key !== key) {
    groupState.key = key;
    groupState.group = null;
    groupState.selected.clear();
  }
  const panel = $("group-panel");
  panel.dataset.state = "loading";
  const f = filters();
  const params = { ...f, group: key, limit: PAGE, cursor: more ? groupState.cursor : "" };
  const [groups, page] = await Promise.all([
    // The group as a whole (status only), so its count is what a group replay sends.
    more ? null : api("GET", DEAD_LETTERS + query({ group: key, status: f.status })),
    api("GET", `${DEAD_LETTERS}/messages${query(params)}`),
  ]);
  if (groups) {
    groupState.group = groups.items.find((g) => g.key === key) || null;
    renderGroupFacts(key, groupState.group);
  }
  const body = $("messages-table").tBodies[0];
  if (!more) body.replaceChildren();
  for (const m of page.items) body.append(messageRow(m));
  groupState.cursor = page.next_cursor;
  // Selections of rows no longer listed are dropped.
  const listed = new Set([...body.rows].map((r) => r.dataset.id));
  for (const id of [...groupState.selected]) if (!listed.has(id)) groupState.selected.delete(id);
  show($("messages-more"), Boolean(page.next_cursor));
  show($("messages-empty"), body.rows.length === 0);
  show($("messages-table"), body.rows.length > 0);
  show($("group-actions"), body.rows.length > 0);
  unavailable($("messages-unavailable"), page.unavailable);
  panel.dataset.count = String(body.rows.length);
  panel.dataset.state = "ready";
  selectionChanged();
}

function renderGroupFacts(key, g) {
  $("group-title").textContent = g ? `${g.service} · ${g.handler}` : `Group ${key}`;
  if (!g) {
    facts($("group-facts"), [
      ["Group", key],
      ["Members", "none match the filters (a replayed or discarded group leaves the open list)"],
    ]);
    show($("replay-group"), false);
    return;
  }
  facts($("group-facts"), [
    ["Group", g.key],
    ["Error kind", g.error_kind],
    ["Error", el("span", { class: "error", text: g.error_message })],
    ["Count", String(g.count)],
    ["First seen", time(g.first_seen)],
    ["Last seen", time(g.last_seen)],
    ["Event types", g.event_types.join(", ")],
  ]);
  // Only open members are replayed; the button says so by being there.
  show($("replay-group"), filters().status === "open");
}

function messageRow(m) {
  const box = el("input", { type: "checkbox", "aria-label": `Select ${m.id}` });
  box.checked = groupState.selected.has(m.id);
  box.disabled = m.status !== "open";
  box.addEventListener("change", () => {
    if (box.checked) groupState.selected.add(m.id);
    else groupState.selected.delete(m.id);
    selectionChanged();
  });
  return el(
    "tr",
    { data: { id: m.id } },
    el("td", {}, box),
    el("td", { class: "mono" }, link(messageHref(m.id), short(m.id))),
    el("td", { text: m.event_type || "—" }),
    el("td", { class: "mono", text: m.correlation_id || "—" }),
    el("td", { class: "num", text: m.attempts }),
    el("td", {}, time(m.first_failed_at)),
    el("td", {}, time(m.last_failed_at)),
    el("td", {}, el("span", { class: `status status-${m.status}`, text: m.status })),
    el("td", { class: "num", text: m.replay_count }),
  );
}

function selectionChanged() {
  const n = groupState.selected.size;
  $("replay-selected").disabled = n === 0;
  $("discard-selected").disabled = n === 0;
  $("replay-selected").textContent = n ? `Replay ${n} selected` : "Replay selected";
  $("discard-selected").textContent = n ? `Discard ${n} selected` : "Discard selected";
  const boxes = [...$("messages-table").tBodies[0].querySelectorAll("input:not(:disabled)")];
  $("select-all").checked = boxes.length > 0 && boxes.every((b) => b.checked);
}

// ---------------------------------------------------------------------------
// One message

const messageState = { detail: null };

async function loadMessage(id) {
  const panel = $("message-panel");
  panel.dataset.state = "loading";
  const d = await api("GET", `${DEAD_LETTERS}/${encodeURIComponent(id)}`);
  messageState.detail = d;
  $("message-title").textContent = `${d.event_type || "message"} ${d.message_id}`;
  facts($("message-facts"), [
    ["Dead letter", d.id],
    ["Status", el("span", { class: `status status-${d.status}`, text: d.status })],
    ["Service · handler", `${d.service} · ${d.handler}`],
    ["Group", link(groupHref(d.group), d.group)],
    ["Event type", d.event_type],
    ["Message id", d.message_id],
    ["Correlation id", d.correlation_id],
    ["Error kind", d.error_kind],
    ["Attempts", String(d.attempts)],
    ["First failed", time(d.first_failed_at)],
    ["Last failed", time(d.last_failed_at)],
    ["Dead-lettered", `${d.dead_lettered_count} time(s)`],
    ["Replays", String(d.replay_count) + (d.replay_pending ? " (one waiting to be sent)" : "")],
    ["Published to", `${d.original_exchange} · ${d.original_routing_key}`],
    ["Received", time(d.received_at)],
    ["Replayed", d.replayed_at ? el("span", {}, time(d.replayed_at), ` by ${who(d.replayed_by)}`) : null],
    ["Discarded", d.discarded_at ? el("span", {}, time(d.discarded_at), ` by ${who(d.discarded_by)}`) : null],
  ]);
  $("message-error").textContent = d.error_chain || d.error_message;
  const headers = $("message-headers").tBodies[0];
  headers.replaceChildren();
  for (const name of Object.keys(d.headers || {}).sort()) {
    const value = d.headers[name];
    const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
    headers.append(el("tr", {}, el("td", { class: "mono", text: name }), el("td", { class: "mono pre", text })));
  }
  $("message-body").textContent = d.body;
  const open = d.status === "open";
  $("replay-one").disabled = !open;
  $("discard-one").disabled = !open;
  panel.dataset.state = "ready";
}

// ---------------------------------------------------------------------------
// Replay and discard

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

async function replay(body, what) {
  const answer = await api("POST", `${DEAD_LETTERS}/replay`, body);
  let text = `Replay queued for ${plural(answer.replayed, "message", "messages")} (${what}). They are sent at the configured rate.`;
  if (answer.skipped.length) text += ` ${plural(answer.skipped.length, "was", "were")} no longer open and skipped.`;
  if (answer.unavailable.length) {
    text += ` Not replayed, no answer from: ${answer.unavailable.map((u) => u.service).join(", ")}.`;
  }
  notify(text);
}

/** Discards one at a time (the API's unit); stops at the first refusal. */
async function discard(ids) {
  let done = 0;
  try {
    for (const id of ids) {
      await api("DELETE", `${DEAD_LETTERS}/${encodeURIComponent(id)}`);
      done += 1;
    }
  } finally {
    notify(`Discarded ${plural(done, "message", "messages")}. They are kept as discarded for the retention period.`);
  }
}

function replayGroupAsked() {
  const g = groupState.group;
  if (!g) return;
  run(async () => {
    const ok = await confirmAction(
      "Replay the whole group?",
      `The ${plural(g.count, "open message", "open messages")} of ${g.key} (${g.service} · ${g.handler}) ` +
        "as they are now will be sent back to that handler, paced. Replay only after the cause is fixed: " +
        "otherwise they fail again.",
      `Replay ${g.count}`,
    );
    if (!ok) return;
    await replay({ group: g.key }, "whole group");
    groupState.selected.clear();
    await loadGroup(g.key);
  });
}

function replaySelectedAsked() {
  const ids = [...groupState.selected];
  run(async () => {
    const ok = await confirmAction(
      "Replay the selected messages?",
      `${plural(ids.length, "message", "messages")} will be sent back to their handler. Replay only after the cause is fixed.`,
      `Replay ${ids.length}`,
    );
    if (!ok) return;
    await replay({ ids }, "selection");
    groupState.selected.clear();
    await loadGroup(groupState.key);
  });
}

function discardSelectedAsked() {
  const ids = [...groupState.selected];
  run(async () => {
    const ok = await confirmAction(
      "Discard the selected messages?",
      `${plural(ids.length, "message", "messages")} will never be handled. Discard only what must not be applied.`,
      `Discard ${ids.length}`,
    );
    if (!ok) return;
    try {
      await discard(ids);
    } finally {
      groupState.selected.clear();
      await loadGroup(groupState.key);
    }
  });
}

function replayOneAsked() {
  const d = messageState.detail;
  run(async () => {
    const ok = await confirmAction(
      "Replay this message?",
      `${d.id} will be sent back to ${d.service} · ${d.handler}.`,
      "Replay",
    );
    if (!ok) return;
    await replay({ ids: [d.id] }, "one message");
    await loadMessage(d.id);
  });
}

function discardOneAsked() {
  const d = messageState.detail;
  run(async () => {
    const ok = await confirmAction(
      "Discard this message?",
      `${d.id} will never be handled. It stays visible as discarded for the retention period.`,
      "Discard",
    );
    if (!ok) return;
    await discard([d.id]);
    await loadMessage(d.id);
  });
}

// ---------------------------------------------------------------------------
// Audit log

const auditState = { cursor: null };

async function loadAudit(more = false) {
  const page = await api("GET", `${DEAD_LETTERS}/audit${query({ limit: PAGE, cursor: more ? auditState.cursor : "" })}`);
  const body = $("audit-table").tBodies[0];
  if (!more) body.replaceChildren();
  for (const a of page.items) {
    body.append(
      el(
        "tr",
        { data: { id: a.id } },
        el("td", {}, time(a.at)),
        el("td", { class: "operator", title: a.operator, text: who(a.operator) }),
        el("td", { text: a.action }),
        el("td", { text: a.service }),
        el("td", { class: "mono" }, a.group ? link(groupHref(a.group), a.group) : "selection"),
        el("td", { class: "num", text: a.requested.length }),
        el("td", { class: "num", text: a.affected.length }),
        el("td", { text: a.result }),
      ),
    );
  }
  auditState.cursor = page.next_cursor;
  show($("audit-more"), Boolean(page.next_cursor));
  show($("audit-empty"), body.rows.length === 0);
  show($("audit-table"), body.rows.length > 0);
  unavailable($("audit-unavailable"), page.unavailable);
}

// ---------------------------------------------------------------------------
// Views and routing (#/groups, #/group/<key>, #/message/<id>, #/audit)

/** Runs an action, showing any error it ends with. */
function run(action) {
  report(null);
  return Promise.resolve()
    .then(action)
    .catch((error) => {
      report(error);
    });
}

function route() {
  const [, view = "groups", arg] = location.hash.match(/^#\/([a-z]+)(?:\/(.*))?$/) || [];
  return { view, arg: arg === undefined ? undefined : decodeURIComponent(arg) };
}

function render() {
  if (!session) return;
  const { view, arg } = route();
  const onAudit = view === "audit";
  show($("view-groups"), !onAudit);
  show($("view-audit"), onAudit);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === (onAudit ? "audit" : "groups"));
  }
  show($("groups-panel"), view === "groups");
  show($("group-panel"), view === "group");
  show($("message-panel"), view === "message");
  if (onAudit) return run(() => loadAudit());
  if (view === "group" && arg) return run(() => loadGroup(arg));
  if (view === "message" && arg) return run(() => loadMessage(arg));
  return run(() => loadGroups());
}

function enterConsole() {
  show($("sign-in"), false);
  show($("console"), true);
  show($("who"), true);
  $("who-email").textContent = session.user.email;
  render();
}

function endSession(message) {
  saveSession(null);
  show($("console"), false);
  show($("who"), false);
  show($("sign-in"), true);
  notify(message || "");
  $("sign-in-form").elements.email.focus();
}

async function signIn(event) {
  event.preventDefault();
  const form = event.target;
  const email = form.elements.email.value.trim();
  const password = form.elements.password.value;
  report(null);
  notify("");
  setBusy(1);
  try {
    const login = await send("POST", `${API}/auth/login`, { email, password });
    if (!login.user.roles.includes("admin")) {
      // Not kept: end the sign-in the server just made.
      send("POST", `${API}/auth/logout`, { refresh_token: login.refresh_token }).catch(() => {});
      report(
        // Status 0: the console's own refusal, not an answer of the API.
        new ApiError(0, {
          title: "Not an administrator",
          detail: `${login.user.email} signed in, but the console is for administrators only.`,
        }),
      );
      return;
    }
    form.elements.password.value = "";
    saveSession({ access_token: login.access_token, refresh_token: login.refresh_token, user: login.user });
    enterConsole();
  } catch (error) {
    report(error);
  } finally {
    setBusy(-1);
  }
}

function signOut() {
  if (session) {
    send("POST", `${API}/auth/logout`, { refresh_token: session.refresh_token }).catch(() => {});
  }
  report(null);
  endSession("Signed out.");
}

function wire() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      location.hash = `#/${tab.dataset.view}`;
    });
  }
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    // In a group the filters narrow its messages; anywhere else they lead to the groups.
    if (route().view === "group" || location.hash === "#/groups") render();
    else location.hash = "#/groups";
  });
  $("filters-clear").addEventListener("click", () => {
    $("filters").reset();
    render();
  });
  $("groups-refresh").addEventListener("click", () => run(() => loadGroups()));
  $("groups-more").addEventListener("click", () => run(() => loadGroups(true)));
  $("group-back").addEventListener("click", () => {
    location.hash = "#/groups";
  });
  $("group-refresh").addEventListener("click", () => run(() => loadGroup(groupState.key)));
  $("messages-more").addEventListener("click", () => run(() => loadGroup(groupState.key, true)));
  $("select-all").addEventListener("change", (event) => {
    for (const row of $("messages-table").tBodies[0].rows) {
      const box = row.querySelector("input");
      if (box.disabled) continue;
      box.checked = event.target.checked;
      if (box.checked) groupState.selected.add(row.dataset.id);
      else groupState.selected.delete(row.dataset.id);
    }
    selectionChanged();
  });
  $("replay-group").addEventListener("click", replayGroupAsked);
  $("replay-selected").addEventListener("click", replaySelectedAsked);
  $("discard-selected").addEventListener("click", discardSelectedAsked);
  $("message-back").addEventListener("click", () => {
    const d = messageState.detail;
    location.hash = d ? groupHref(d.group) : "#/groups";
  });
  $("message-refresh").addEventListener("click", () => run(() => loadMessage(messageState.detail.id)));
  $("replay-one").addEventListener("click", replayOneAsked);
  $("discard-one").addEventListener("click", discardOneAsked);
  $("audit-refresh").addEventListener("click", () => run(() => loadAudit()));
  $("audit-more").addEventListener("click", () => run(() => loadAudit(true)));
  window.addEventListener("hashchange", () => {
    notify(""); // a result belongs to the view it was shown on
    render();
  });
}

function start() {
  setBusy(0);
  wire();
  loadSession();
  if (session && session.user && session.access_token) {
    enterConsole();
  } else {
    endSession();
  }
}

start();
