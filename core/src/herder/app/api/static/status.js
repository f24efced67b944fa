// herder status page: reads the management API with the token kept in session storage and
// renders it with DOM methods only (textContent), so no value from the API is ever parsed as
// HTML: container names and reasons are whatever a client submitted.
"use strict";

const TOKEN_KEY = "herder-management-token";
const REFRESH_MS = 3000;
// How often the log view asks for more of a running container's log.
const LOG_POLL_MS = 1000;
const FINISHED_SHOWN = 50;
// The head of the queue shown, in the order it is served; the rest are counted.
const QUEUE_SHOWN = 200;
// Running containers shown (there are at most as many as instances can hold).
const RUNNING_SHOWN = 1000;
const STATE_ORDER = ["running", "idle", "booting", "unknown", "shutdown"];
let timer = null;
let busy = false;

function $(id) { return document.getElementById(id); }

// el("td", {class: "num"}, "text", otherNode): an element with attributes and children.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  let s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d) return `${d}d${h}h`;
  if (h) return `${h}h${m}m`;
  if (m) return `${m}m${s}s`;
  return `${s}s`;
}

function since(timestamp) {
  return timestamp ? duration((Date.now() - Date.parse(timestamp)) / 1000) : "";
}

function money(value) { return "$" + Number(value).toFixed(3); }

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text || "";
  box.className = kind || "";
  box.hidden = !text;
}

class AuthError extends Error {}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new Error("cannot reach herder: " + err.message);
  }
  let data = null;
  try { data = await resp.json(); } catch (err) { data = null; }
  if (resp.status === 401 || resp.status === 403) {
    throw new AuthError((data && data.error) || resp.statusText);
  }
  if (!resp.ok) {
    const field = data && data.field ? ` (${data.field})` : "";
    throw new Error(`${method} ${path}: ${(data && data.error) || resp.statusText}${field}`);
  }
  return data;
}

function showLogin(reason) {
  clearTimeout(timer);
  $("status").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  if (reason) showMessage(reason);
  $("token").focus();
}

function stateBadge(state) { return el("span", { class: `state state-${state}` }, state); }

function actionButton(label, title, onclick, danger) {
  return el("button", { type: "button", title, class: danger ? "danger" : null,
                        "data-action": label, onclick }, label);
}

async function act(description, method, path, body) {
  try {
    await api(method, path, body);
    showMessage(description, "info");
  } catch (err) {
    if (err instanceof AuthError) return showLogin("The management token was refused: " + err.message);
    showMessage(err.message);
  }
  refresh();
}

function instanceActions(inst) {
  if (!inst.instance) return [];
  const path = `/api/v1/instances/${encodeURIComponent(inst.instance)}`;
  const make = (action, title, danger) => actionButton(action, title, () => {
    if (danger && !window.confirm(`Kill instance ${inst.instance}, whatever runs on it?`)) return;
    act(`${action} requested for instance ${inst.instance}`, "POST", `${path}/${action}`,
        { reason: "from the status page" });
  }, danger);
  return [
    make("hold", "Start nothing new on it and never shut it down"),
    make("drain", "Start nothing new on it and shut it down once idle"),
    make("run", "Return it to normal use"),
    make("kill", "Shut it down now", true),
  ];
}

function cancelButton(ctr) {
  return actionButton("cancel", "Cancel this container", () => {
    if (!window.confirm(`Cancel container ${ctr.uuid}?`)) return;
    act(`cancel requested for container ${ctr.uuid}`, "POST",
        `/api/v1/containers/${encodeURIComponent(ctr.uuid)}/cancel`,
        { reason: "from the status page" });
  }, true);
}

function until(timestamp) {
  return timestamp ? duration((Date.parse(timestamp) - Date.now()) / 1000) : "";
}

// The spend budget: spend of the period against its limits; null when the server has none
// (a dispatcher without instances) or the budget could not be read.
function budgetCard(budget) {
  if (!budget) return null;
  const limits = [];
  if (budget.soft_limit !== null) limits.push(`soft limit ${money(budget.soft_limit)}`);
  if (budget.hard_limit !== null) limits.push(`hard limit ${money(budget.hard_limit)}`);
  const state = budget.hard_reached ? "hard" : budget.soft_reached ? "soft" : "under";
  return el("div", { class: `card budget budget-${state}`, id: "budget" },
    el("h3", {}, `Spend this ${budget.period}`),
    el("div", { class: "big", id: "budget-spent" }, money(budget.spent)),
    el("div", { id: "budget-limits" }, limits.length ? limits.join(", ") : "no limit"),
    el("div", { class: "muted" }, `period ends in ${until(budget.period_end)}`),
    budget.message ? el("div", { id: "budget-message", class: "status" }, budget.message) : null,
  );
}

// The cloud's quotas herder reads (drivers with quota_headroom): usage against the limit,
// herder's own share and what waiting containers want; null when none are read.
function quotaCard(quotas) {
  if (!quotas || !quotas.enabled || !quotas.items.length) return null;
  const num = (v) => Number.isInteger(v) ? String(v) : Number(v).toFixed(2);
  return el("div", { class: "card", id: "quotas" }, el("h3", {}, "Cloud quotas"),
    el("table", {},
      el("thead", {}, el("tr", {}, ["Quota", "Used", "Herder", "Wanted"].map(
        h => el("th", {}, h)))),
      el("tbody", {}, quotas.items.map(q => el("tr", { "data-quota": q.name,
                                                      title: q.description },
        el("td", { class: "id" }, q.name),
        el("td", { class: "num used" }, `${num(q.usage + q.pending)} of ${num(q.limit)} ${q.unit}`),
        el("td", { class: "num" }, num(q.herder)),
        el("td", { class: "num" }, num(q.wanted)),
      )))));
}

function renderTotals(summary, budget, quotas) {
  const list = (counts) => el("ul", {}, Object.entries(counts).map(
    ([state, n]) => el("li", {}, stateBadge(state), " ", String(n))));
  $("totals").replaceChildren(
    el("div", { class: "card" }, el("h3", {}, "Cost per hour now"),
       el("div", { class: "big", id: "cost-per-hour" }, money(summary.cost_per_hour))),
    ...[budgetCard(budget), quotaCard(quotas)].filter(Boolean),
    el("div", { class: "card", id: "instance-totals" }, el("h3", {}, "Instances"),
       list(summary.instances)),
    el("div", { class: "card", id: "container-totals" }, el("h3", {}, "Containers"),
       list(summary.containers)),
  );
}

function renderInstances(items) {
  const groups = new Map();
  for (const inst of items) {
    if (!groups.has(inst.worker_state)) groups.set(inst.worker_state, []);
    groups.get(inst.worker_state).push(inst);
  }
  const order = [...STATE_ORDER, ...[...groups.keys()].filter(s => !STATE_ORDER.includes(s))];
  const sections = [];
  for (const state of order) {
    const group = groups.get(state);
    if (!group) continue;
    sections.push(el("h3", {}, `${state} (${group.length})`));
    sections.push(el("table", { "data-group": state },
      el("thead", {}, el("tr", {}, ["Instance", "Type", "Price/h", "State", "In state",
                                    "Idle behaviour", "Reason", "Paid for", "Containers",
                                    "Actions"].map(
        h => el("th", {}, h)))),
      el("tbody", {}, group.map(inst => el("tr", { "data-instance": inst.instance },
        el("td", { class: "id" }, inst.instance || "(creating)"),
        el("td", {}, inst.instance_type),
        el("td", { class: "num" }, money(inst.price)),
        el("td", { class: "worker-state" }, stateBadge(inst.worker_state)),
        el("td", { class: "num" }, duration(inst.time_in_state)),
        el("td", { class: `idle-behavior behavior-${inst.idle_behavior}` }, inst.idle_behavior),
        el("td", { class: "reason" },
           inst.drain_cause ? el("span", { class: `drain-cause cause-${inst.drain_cause}` },
                                 inst.drain_cause) : null,
           inst.drain_cause && inst.reason ? " " : null,
           inst.reason || null),
        el("td", { class: "num paid-until" }, until(inst.paid_until)),
        el("td", { class: "id" }, inst.running_container_uuids.map(u => el("div", {}, u))),
        el("td", {}, instanceActions(inst)),
      )))));
  }
  $("instances").replaceChildren(...(sections.length ? sections :
    [el("p", { class: "muted" }, "No instances.")]));
}

function containerTable(items, columns, empty) {
  if (!items.length) return el("p", { class: "muted" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(([h]) => el("th", {}, h)))),
    el("tbody", {}, items.map(ctr => el("tr", { "data-container": ctr.uuid },
      columns.map(([, cell]) => cell(ctr))))));
}

function outcome(ctr) {
  if (ctr.state === "Complete") return `exit code ${ctr.exit_code}`;
  return "cancelled: " + ((ctr.runtime_status && ctr.runtime_status.error) || "no reason given");
}

function logButton(ctr) {
  return actionButton("log", "Show this container's log (followed while it runs)",
                      () => openLog(ctr.uuid));
}

function renderFinished(items) {
  const latest = [...items].sort((a, b) => Date.parse(b.finished_at) - Date.parse(a.finished_at));
  $("finished").replaceChildren(containerTable(latest, [
    ["Container", c => el("td", { class: "id" }, c.uuid)],
    ["Name", c => el("td", { class: "name" }, c.name)],
    ["State", c => el("td", {}, stateBadge(c.state))],
    ["Outcome", c => el("td", {
      class: "outcome" + ((c.state === "Complete" && c.exit_code === 0) ? "" : " outcome-failed"),
    }, outcome(c))],
    ["Finished", c => el("td", { class: "num" }, since(c.finished_at) + " ago")],
    ["Run time", c => el("td", { class: "num" }, duration(c.run_time))],
    ["Cost", c => el("td", { class: "num cost" }, money(c.cost))],
    ["", c => el("td", {}, logButton(c))],
  ], "Nothing has finished yet."));
}

// The log view: reads the log route from the last offset, appending, until the server says
// the log is final (the container has ended and everything was read).
const logView = { uuid: null, offset: 0, timer: null, generation: 0 };

function openLog(uuid) {
  clearTimeout(logView.timer);
  logView.generation += 1;
  Object.assign(logView, { uuid, offset: 0 });
  $("log-uuid").textContent = uuid;
  $("log-state").textContent = "(following)";
  $("log-text").textContent = "";
  $("log-view").hidden = false;
  pollLog(logView.generation);
}

function closeLog() {
  clearTimeout(logView.timer);
  logView.generation += 1;
  logView.uuid = null;
  $("log-view").hidden = true;
}

async function pollLog(generation) {
  if (generation !== logView.generation) return;
  const path = `/api/v1/containers/${encodeURIComponent(logView.uuid)}/log`;
  try {
    for (;;) {
      const chunk = await api("GET", `${path}?offset=${logView.offset}`);
      if (generation !== logView.generation) return;  // closed or switched meanwhile
      const box = $("log-text");
      const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      if (chunk.data) box.append(document.createTextNode(chunk.data));
      if (atEnd) box.scrollTop = box.scrollHeight;
      const advanced = chunk.next_offset > logView.offset;
      logView.offset = chunk.next_offset;
      if (chunk.final) {
        $("log-state").textContent = "(complete: the container has ended)";
        return;
      }
      if (!advanced) break;
    }
  } catch (err) {
    if (err instanceof AuthError) return showLogin("The management token was refused: " + err.message);
    $("log-state").textContent = "(" + err.message + "; retrying)";
  }
  logView.timer = setTimeout(() => pollLog(generation), LOG_POLL_MS);
}

// Earlier attempts of a container and how each ended: a container that ran twice says why.
function attemptsCell(c) {
  const earlier = (c.attempt_history || []).filter(a => a.ended_at !== null);
  return el("td", { class: "attempts" },
    el("div", { class: "num" }, String(c.attempts)),
    earlier.map(a => el("div", { class: "attempt muted" },
      `#${a.number}${a.instance_id ? " on " + a.instance_id : ""}: ` +
      (a.outcome === "complete" ? `exit code ${a.exit_code}` :
        a.outcome + (a.reason ? ": " + a.reason : "")))));
}

// A count of what a table leaves out ("and 4,312 more in line"), or nothing.
function moreLine(id, count, text) {
  if (count <= 0) return null;
  return el("p", { class: "muted more", id }, text(count.toLocaleString("en")));
}

// line: the head of the queue in the order it is served (the API's order=queue), with the
// number in line; running: a page of the running ones; counts: containers by state.
function renderContainers(line, running, counts) {
  const waiting = line.items;
  const position = new Map(waiting.map((c, i) => [c.uuid, i + 1]));
  const common = [
    ["Container", c => el("td", { class: "id" }, c.uuid)],
    ["Name", c => el("td", { class: "name" }, c.name)],
    ["State", c => el("td", {}, stateBadge(c.state))],
  ];
  const inLine = line.total === null || line.total === undefined ? waiting.length : line.total;
  // Queued containers on hold (priority 0) wait out of line: counted, not listed.
  const onHold = (counts.Queued || 0) + (counts.Locked || 0) - inLine;
  $("queue").replaceChildren(containerTable(waiting, [
    ["#", c => el("td", { class: "num position" }, position.get(c.uuid))],
    ...common,
    ["Priority", c => el("td", { class: "num" }, c.priority)],
    ["Waiting", c => el("td", { class: "num" }, since(c.created_at))],
    ["Scheduling status", c => el("td", { class: "status" }, c.scheduling_status)],
    ["Attempts", attemptsCell],
    ["", c => el("td", {}, cancelButton(c))],
  ], "Nothing is waiting."),
  ...[moreLine("queue-more", inLine - waiting.length, n => `and ${n} more in line`),
      moreLine("queue-held", onHold,
               n => `${n} on hold (priority 0), not listed: give one a priority to queue it`),
     ].filter(Boolean));
  $("running").replaceChildren(containerTable(running.items, [
    ...common,
    ["Instance", c => el("td", { class: "id" }, c.instance_id || "")],
    ["Type", c => el("td", {}, c.instance_type || "")],
    ["Run time", c => el("td", { class: "num" }, duration(c.run_time))],
    ["Attempts", attemptsCell],
    ["Cost so far", c => el("td", { class: "num cost" }, money(c.cost))],
    ["", c => el("td", {}, logButton(c), cancelButton(c))],
  ], "Nothing is running."),
  ...[moreLine("running-more", (counts.Running || 0) - running.items.length,
               n => `and ${n} more running`)].filter(Boolean));
}

async function refresh() {
  clearTimeout(timer);
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  if (busy) return;
  busy = true;
  try {
    const line = `order=queue&limit=${QUEUE_SHOWN}`;
    const running = `state=Running&limit=${RUNNING_SHOWN}`;
    const ended = `state=Complete&state=Cancelled&limit=${FINISHED_SHOWN}`;
    const optional = (path) => api("GET", path).catch((err) => {
      if (err instanceof AuthError) throw err;
      return null;  // not on this server (a dispatcher without instances): left out
    });
    const [summary, instances, waiting, runningPage, finished, budget, quotas] =
      await Promise.all([
      api("GET", "/api/v1/summary"),
      api("GET", "/api/v1/instances"),
      api("GET", `/api/v1/containers?${line}`),
      api("GET", `/api/v1/containers?${running}`),
      api("GET", `/api/v1/containers?${ended}`),
      optional("/api/v1/budget"),
      optional("/api/v1/quotas"),
    ]);
    renderTotals(summary, budget, quotas);
    renderInstances(instances.items);
    renderContainers(waiting, runningPage, summary.containers);
    renderFinished(finished.items);
    $("login").hidden = true;
    $("status").hidden = false;
    $("logout").hidden = false;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if ($("message").className !== "info") showMessage("");
  } catch (err) {
    if (err instanceof AuthError) {
      sessionStorage.removeItem(TOKEN_KEY);
      busy = false;
      return showLogin("The management token was refused: " + err.message);
    }
    showMessage(err.message);
  } finally {
    busy = false;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    showMessage("");
    refresh();
  });
  $("log-close").addEventListener("click", closeLog);
  $("logout").addEventListener("click", () => {
    closeLog();
    sessionStorage.removeItem(TOKEN_KEY);
    showMessage("");
    showLogin();
  });
  refresh();
});
