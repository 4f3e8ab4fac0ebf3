// canaryd's dashboard: the apps list (#/) and one app's canary (#/app/<env>/<app>), polled every
// two seconds from the JSON API, with charts drawn here as SVG (no library, nothing from the
// network but this daemon).
//
// Every string from the API reaches the page as a text node (textContent, createTextNode), never
// as markup. Views are built once and updated in place, and charts have a fixed height, so polling
// does not move the page.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const CHARTS = [
  { feature: "request_rate", format: (v) => fmtNumber(v) },
  { feature: "error_ratio", format: (v) => fmtPercent(v) },
  { feature: "latency_p50_ms", format: (v) => fmtNumber(v) },
  { feature: "latency_p99_ms", format: (v) => fmtNumber(v) },
];

// ---------------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

/** An HTML element with attributes (strings) and children (nodes or strings, as text). */
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An SVG element with attributes. */
function s(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function badge(state, label) {
  return h("span", { class: "badge", "data-state": state || "none" }, label || state || "—");
}

function fmtNumber(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 100) return v.toFixed(1);
  if (a >= 10) return v.toFixed(2);
  if (a >= 1 || a === 0) return v.toFixed(2);
  return v.toPrecision(3);
}

function fmtScore(v) {
  return v === null || v === undefined || !Number.isFinite(v) ? "—" : v.toFixed(1);
}

/** A traffic weight in percent: "10%", "12.5%". */
function fmtWeight(w) {
  return `${Number.isInteger(w) ? w : Number(w).toFixed(1)}%`;
}

function fmtPercent(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  const p = v * 100;
  if (p === 0) return "0%";
  return (Math.abs(p) >= 10 ? p.toFixed(1) : Math.abs(p) >= 1 ? p.toFixed(2) : p.toPrecision(2)) + "%";
}

/** A value of a check's feature: ratios as percentages. */
function fmtValue(feature, v) {
  return /error_ratio|availability|share/.test(feature || "") ? fmtPercent(v) : fmtNumber(v);
}

function fmtEffect(kind, v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  // A new series against none reads as an enormous ratio: say so instead.
  if (kind === "ratio") return v >= 1000 ? "> ×1000" : "×" + fmtNumber(v);
  if (kind === "total_variation") return fmtPercent(v);
  if (kind === "band_half_widths") return fmtNumber(v) + " hw";
  return fmtNumber(v);
}

/** "2026-01-05 00:00:10" (UTC) from an RFC 3339 time. */
function fmtTime(rfc3339) {
  if (!rfc3339) return "—";
  const ms = Date.parse(rfc3339);
  if (!Number.isFinite(ms)) return String(rfc3339);
  return new Date(ms).toISOString().slice(0, 19).replace("T", " ");
}

function fmtClock(ms) {
  return new Date(ms).toISOString().slice(11, 19);
}

function fmtDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

class NotFound extends Error {}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
  if (response.status === 404) throw new NotFound(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

/** The JSON, or null for a 404. */
async function getOptional(path) {
  try {
    return await getJSON(path);
  } catch (e) {
    if (e instanceof NotFound) return null;
    throw e;
  }
}

const q = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// Routing and polling

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  if (parts[0] === "app" && parts.length >= 3) {
    try {
      return { view: "app", env: decodeURIComponent(parts[1]), app: decodeURIComponent(parts.slice(2).join("/")) };
    } catch {
      return { view: "apps" };
    }
  }
  return { view: "apps" };
}

function appHref(env, app) {
  return `#/app/${q(env)}/${q(app)}`;
}

let route = currentRoute();
let routeKey = JSON.stringify(route);
let timer = null;
let running = false;
let appState = null; // what the app view keeps between polls

function setLive(ok, text) {
  const live = $("live");
  live.dataset.ok = String(ok);
  live.textContent = text;
}

async function tick() {
  clearTimeout(timer);
  if (running) return;
  running = true;
  const key = routeKey;
  try {
    if (route.view === "app") await refreshApp(key);
    else await refreshApps(key);
    if (key === routeKey) setLive(true, `live · ${new Date().toTimeString().slice(0, 8)}`);
  } catch (e) {
    if (key === routeKey) setLive(false, `cannot reach canaryd (${e.message}); retrying`);
  } finally {
    running = false;
    // A route change while this poll ran is served at once.
    timer = setTimeout(tick, key === routeKey ? POLL_MS : 0);
  }
}

function showRoute() {
  route = currentRoute();
  routeKey = JSON.stringify(route);
  $("apps-view").hidden = route.view !== "apps";
  $("app-view").hidden = route.view !== "app";
  const crumb = $("crumb");
  if (route.view === "app") {
    crumb.replaceChildren(h("a", { href: "#/" }, "Apps"), " / ", `${route.app} (${route.env})`);
    document.title = `${route.app} · canaryd`;
    if (!appState || appState.key !== routeKey) resetAppView();
  } else {
    crumb.replaceChildren("Apps");
    document.title = "canaryd";
  }
  tick();
}

// ---------------------------------------------------------------------------------------------
// The apps list

async function refreshApps(key) {
  const data = await getJSON("/api/v1/apps");
  if (key !== routeKey) return;
  const apps = [...data.apps].sort((a, b) => a.env.localeCompare(b.env) || a.app.localeCompare(b.app));
  const rows = apps.map((a) => {
    const canary = a.canary;
    return h(
      "tr",
      { "data-app": a.app, "data-env": a.env },
      h("td", {}, a.env),
      h("td", {}, h("a", { href: appHref(a.env, a.app) }, a.app)),
      h("td", {}, versionChips(a.versions)),
      h(
        "td",
        {},
        canary ? badge(canary.state, canary.state) : h("span", { class: "empty" }, "no canary"),
        canary && canary.stage ? h("small", { class: "stage-note" }, ` stage ${canary.stage.name}`) : null,
      ),
      h("td", { class: "num" }, canary ? fmtScore(canary.score) : "—"),
    );
  });
  $("apps-table").tBodies[0].replaceChildren(...rows);
  $("apps-empty").hidden = rows.length > 0;
}

function versionChips(versions) {
  const order = { stable: 0, canary: 1 };
  const sorted = [...versions].sort(
    (a, b) => (order[a.role] ?? 2) - (order[b.role] ?? 2) || b.requests - a.requests,
  );
  return h(
    "div",
    { class: "versions" },
    sorted.map((v) =>
      h(
        "span",
        { class: `chip ${v.role || ""}`, "data-version": v.version, "data-role": v.role || "" },
        h("span", { class: "mono" }, v.version),
        v.role ? h("span", { class: "role" }, v.role) : null,
        h("span", { class: "share" }, fmtPercent(v.traffic_share)),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// One app

function resetAppView() {
  appState = { key: routeKey, events: [], lastEventId: null, models: null, timeline: null, canary: null };
  $("app-title").textContent = route.app;
  setBadge(null);
  $("app-score").textContent = "";
  $("app-versions").replaceChildren();
  $("app-note").hidden = true;
  $("action-note").hidden = true;
  renderActions(null);
  for (const id of ["gates-table", "mix-table", "calls-table", "checks-table", "events-table"]) {
    $(id).tBodies[0].replaceChildren();
  }
  $("stages").replaceChildren();
  $("checks-summary").textContent = "";
  $("mix-window").textContent = "";
  $("events-empty").hidden = true;
  drawCharts();
}

function setBadge(canary) {
  const b = $("app-badge");
  b.dataset.state = canary ? canary.state : "none";
  b.textContent = canary ? canary.state : "no canary";
}

async function refreshApp(key) {
  const { env, app } = route;
  const base = `/api/v1/apps/${q(app)}`;
  const [apps, canary, timeline, deliveries] = await Promise.all([
    getJSON(`/api/v1/apps?env=${q(env)}`),
    getOptional(`${base}/canary?env=${q(env)}`),
    getOptional(`${base}/timeline?env=${q(env)}`),
    fetchDeliveries(),
    fetchNewEvents(key),
    appState.models ? null : getJSON("/api/v1/models").then((m) => key === routeKey && (appState.models = m.models)),
  ]);
  if (key !== routeKey) return;
  const entry = apps.apps.find((a) => a.app === app && a.env === env) || null;
  appState.canary = canary;
  appState.timeline = timeline;

  $("app-versions").replaceChildren(entry ? versionChips(entry.versions) : "");
  setBadge(canary);
  renderActions(canary);
  $("app-score").textContent = canary && canary.score !== null ? `score ${fmtScore(canary.score)} / 100` : "";
  const note = $("app-note");
  if (!entry) {
    note.textContent = `canaryd has not seen ${app} in env ${env}.`;
  } else if (!canary) {
    note.textContent = "No canary analysis: no version besides the stable one has had traffic, and no rollout is declared.";
  } else {
    note.textContent = `${canary.canary_version} judged against ${canary.stable_version} with model ${canary.model}` +
      `${canary.mode === "shadow" ? " (shadow mode: events are dry runs)" : ""}` +
      `${canary.declared ? ", roles declared" : ", roles inferred from traffic"}; ` +
      `evaluated up to ${fmtTime(canary.evaluated_at)} UTC event time.`;
  }
  note.hidden = false;
  $("legend-stable").textContent = `stable ${canary ? canary.stable_version : ""}`;
  $("legend-canary").textContent = `canary ${canary ? canary.canary_version : ""}`;

  renderStages(canary);
  renderTraffic(canary, deliveries);
  renderGates(canary);
  drawCharts();
  renderMix(timeline);
  renderCalls(timeline);
  renderChecks(canary);
  renderEvents(deliveries);
}

/** Appends the app's events since the last poll (all of them on the first). */
async function fetchNewEvents(key) {
  const { env, app } = route;
  for (let page = 0; page < 20; page++) {
    const since = appState.lastEventId ? `&since=${q(appState.lastEventId)}` : "";
    let data;
    try {
      data = await getJSON(`/api/v1/events?app=${q(app)}&env=${q(env)}&limit=1000${since}`);
    } catch (e) {
      // The last event seen has left the history (the oldest go past max_events), so its id no
      // longer marks a place in it: read the history again from its start.
      if (since && /HTTP 400/.test(e.message)) {
        appState.lastEventId = null;
        appState.events = [];
        continue;
      }
      throw e;
    }
    if (key !== routeKey) return;
    appState.events.push(...data.events);
    if (data.last_id) appState.lastEventId = data.last_id;
    if (data.events.length < 1000) break;
  }
  // The page shows the newest 200.
  if (appState.events.length > 200) appState.events.splice(0, appState.events.length - 200);
}

/** event id -> [delivery, with its subscription], over every subscription. */
async function fetchDeliveries() {
  const subs = await getJSON("/api/v1/subscriptions");
  const byEvent = new Map();
  const lists = await Promise.all(
    subs.subscriptions.map((sub) =>
      getOptional(`/api/v1/subscriptions/${q(sub.id)}/deliveries`).then((d) => [sub, d ? d.deliveries : []]),
    ),
  );
  for (const [sub, list] of lists) {
    for (const d of list) {
      if (!byEvent.has(d.event_id)) byEvent.set(d.event_id, []);
      byEvent.get(d.event_id).push({ ...d, subscription: sub });
    }
  }
  return { count: subs.subscriptions.length, byEvent };
}

function renderStages(canary) {
  const list = $("stages");
  const model = canary && appState.models ? appState.models.find((m) => m.name === canary.model) : null;
  if (!canary || !model) {
    list.replaceChildren(h("li", { class: "empty" }, canary ? "loading the model…" : "no analysis"));
    return;
  }
  const current = canary.stage ? canary.stage.index : model.stages.length;
  const passedAt = new Map();
  for (const e of appState.events) {
    if (e.type === "canaryd.canary.stage_passed" && e.data.stage) passedAt.set(e.data.stage.index, e.data.detected_at);
  }
  const observed = (Date.parse(canary.evaluated_at) - Date.parse(canary.stage_started_at)) / 1000;
  const items = model.stages.map((stage, i) => {
    let status = "upcoming";
    // The rollout's own percentages, where its declaration gave them, over the model's.
    const planned = canary.traffic && canary.traffic.percentages.length === model.stages.length
      ? canary.traffic.percentages[i]
      : stage.weight;
    let detail = `weight ${fmtWeight(planned)} · observe ${fmtDuration(stage.observe_s)}`;
    if (canary.state === "promoted" || i < current) {
      status = "passed";
      if (passedAt.has(i)) detail = `passed ${fmtTime(passedAt.get(i)).slice(11)}`;
    } else if (i === current) {
      if (canary.state === "failing" || canary.state === "rolled_back") {
        status = "failed";
        detail = canary.state === "rolled_back" ? "rolled back" : `failed at ${fmtTime(canary.failed_at).slice(11)}`;
      } else {
        status = "current";
        detail = `observed ${fmtDuration(observed)} of ${fmtDuration(stage.observe_s)}`;
      }
    }
    return h(
      "li",
      { class: "stage", "data-status": status, "data-index": i },
      h("span", { class: "name" }, stage.name),
      h("span", { class: "detail" }, detail),
    );
  });
  const end = canary.state === "promoted" ? "promoted" : "promote";
  items.push(
    h("li", { class: "stage", "data-status": canary.state === "promoted" ? "passed" : "upcoming" },
      h("span", { class: "name" }, end), h("span", { class: "detail" }, "all traffic")),
  );
  list.replaceChildren(...items);
}

/** The traffic plan, and where the latest route (the newest event carrying one) was applied. */
function renderTraffic(canary, deliveries) {
  const box = $("traffic-plan");
  const plan = canary && canary.traffic;
  if (!plan || (!plan.sticky && !plan.headers.length && !plan.users.length)) {
    box.hidden = true;
    return;
  }
  const parts = [];
  if (plan.sticky) {
    const [kind, name] = Object.entries(plan.sticky)[0];
    parts.push(`sticky by ${kind} ${name}`);
  }
  for (const rule of plan.headers) parts.push(`${rule.name}: ${rule.value} → canary`);
  if (plan.users.length) {
    const shown = plan.users.slice(0, 3).join(", ");
    parts.push(`${plan.users.length} allow-listed user${plan.users.length === 1 ? "" : "s"} (${shown}${plan.users.length > 3 ? ", …" : ""})`);
  }
  const routed = [...appState.events].reverse().find((e) => e.data && e.data.traffic);
  let applied = "no route emitted yet";
  if (routed) {
    const sent = deliveries.byEvent.get(routed.id) || [];
    const where = sent.length
      ? sent.map((d) => `${d.subscription.url} ${d.state}${d.last_error ? ` (${d.last_error})` : ""}`).join("; ")
      : "no subscription took it";
    applied = `${fmtWeight(routed.data.traffic.percent)} split, ${routed.data.traffic.users.length} users, ` +
      `${routed.data.traffic.headers.length} header rules (${routed.type.replace(/^canaryd\./, "")}): ${where}`;
  }
  box.replaceChildren(
    h("span", { class: "plan" }, `Traffic plan: ${parts.join(" · ")}`),
    h("br"),
    h("small", { class: "applied" }, `Route applied: ${applied}`),
  );
  box.hidden = false;
}

function renderGates(canary) {
  const gates = canary ? canary.gates : [];
  const rows = gates.map((g) => {
    const limit = [g.min !== null ? `≥ ${fmtValue(g.metric, g.min)}` : null, g.max !== null ? `≤ ${fmtValue(g.metric, g.max)}` : null]
      .filter(Boolean)
      .join(", ");
    const bounds = g.lower !== null && g.upper !== null ? `${fmtValue(g.metric, g.lower)} – ${fmtValue(g.metric, g.upper)}` : "—";
    return h(
      "tr",
      { class: g.outcome === "fail" ? "row-fail" : g.outcome === "shared" ? "row-marginal" : "" },
      h("td", {}, g.metric),
      h("td", { class: "num" }, fmtValue(g.metric, g.value)),
      h("td", { class: "num" }, bounds),
      h("td", {}, limit || "—"),
      h("td", {}, badge(g.outcome)),
      h("td", { class: "reason" }, g.message),
    );
  });
  $("gates-table").tBodies[0].replaceChildren(...rows);
  $("gates-table").hidden = rows.length === 0;
}

function renderMix(timeline) {
  const ops = timeline ? timeline.operations : [];
  $("mix-window").textContent = timeline ? `share of requests over the last ${fmtDuration(timeline.window_s)}` : "";
  const max = Math.max(0.0001, ...ops.map((o) => Math.max(o.stable_share, o.canary_share)));
  const bar = (cls, share) => {
    const fill = h("span", { class: "fill" });
    fill.style.width = `${Math.round((share / max) * 90)}px`;
    return h("div", { class: `bar ${cls}` }, fill, h("span", { class: "value" }, fmtPercent(share)));
  };
  const rows = ops.map((o) =>
    h(
      "tr",
      {},
      h("td", { class: "mono" }, o.operation),
      h("td", {}, bar("stable", o.stable_share)),
      h("td", {}, bar("canary", o.canary_share)),
    ),
  );
  $("mix-table").tBodies[0].replaceChildren(...rows);
}

function renderCalls(timeline) {
  const calls = timeline ? timeline.calls : [];
  const rows = calls.map((c) =>
    h(
      "tr",
      { "data-status": c.status },
      h("td", { class: "mono" }, c.downstream),
      h("td", { class: "num" }, c.stable_per_request === null ? "—" : fmtNumber(c.stable_per_request)),
      h("td", { class: "num" }, c.canary_per_request === null ? "—" : fmtNumber(c.canary_per_request)),
      h("td", {}, c.status === "both" ? "" : badge(c.status)),
    ),
  );
  $("calls-table").tBodies[0].replaceChildren(...rows);
}

function renderChecks(canary) {
  const checks = canary ? canary.checks : [];
  const counts = {};
  for (const c of checks) counts[c.outcome] = (counts[c.outcome] || 0) + 1;
  $("checks-summary").textContent = checks.length
    ? Object.entries(counts).map(([k, n]) => `${n} ${k.replace("_", " ")}`).join(" · ")
    : "";
  const rows = checks.map((c) =>
    h(
      "tr",
      { class: c.outcome === "fail" ? "row-fail" : c.outcome === "marginal" ? "row-marginal" : "", "data-outcome": c.outcome, "data-feature": c.feature },
      h("td", {}, badge(c.outcome, c.outcome.replace("_", " "))),
      h("td", { class: "mono" }, c.feature, c.critical ? "" : h("small", {}, " (advisory)")),
      h("td", {}, c.test, h("br"), h("small", {}, `${fmtDuration(c.window_s)} window`)),
      h("td", { class: "num" }, fmtValue(c.feature, c.canary_value), h("br"), h("small", {}, `n=${c.canary_samples}`)),
      h("td", { class: "num" }, fmtValue(c.feature, c.baseline_value), h("br"), h("small", {}, `n=${c.baseline_samples}`)),
      h("td", { class: "num" }, fmtNumber(c.statistic)),
      h("td", { class: "num" }, fmtNumber(c.threshold)),
      h("td", { class: "num" }, fmtEffect(c.effect_kind, c.effect), h("br"), h("small", {}, `min ${fmtEffect(c.effect_kind, c.min_effect)}`)),
      h("td", { class: "reason" }, c.message),
    ),
  );
  $("checks-table").tBodies[0].replaceChildren(...rows);
}

function renderEvents(deliveries) {
  const events = [...appState.events].reverse();
  const rows = events.map((e) => {
    const data = e.data || {};
    const reasons = data.reasons || [];
    const reason = reasons.length
      ? reasons[0].message + (reasons.length > 1 ? ` (+${reasons.length - 1} more)` : "")
      : "";
    const sent = deliveries.byEvent.get(e.id) || [];
    const cell = sent.length
      ? sent.map((d) => {
          const detail = d.state === "delivered"
            ? `${d.attempts} attempt${d.attempts === 1 ? "" : "s"}`
            : `${d.attempts} attempts${d.last_status ? `, last ${d.last_status}` : d.last_error ? `, ${d.last_error}` : ""}`;
          return h("div", { title: d.subscription.url }, badge(d.state), " ", h("small", {}, detail));
        })
      : h("small", { class: "empty" }, deliveries.count ? "not subscribed" : "no subscriptions");
    return h(
      "tr",
      { "data-type": e.type, "data-id": e.id },
      h("td", {}, fmtTime(e.time)),
      h("td", { class: "mono" }, e.type.replace(/^canaryd\./, "")),
      h("td", {}, data.stage ? data.stage.name : "—"),
      h("td", {}, data.state ? badge(data.state) : "—"),
      h("td", {}, fmtTime(data.detected_at)),
      h("td", { class: "reason" }, reason, data.dry_run ? h("small", {}, " (dry run)") : ""),
      h("td", {}, cell),
    );
  });
  $("events-table").tBodies[0].replaceChildren(...rows);
  $("events-empty").hidden = rows.length > 0;
}

// ---------------------------------------------------------------------------------------------
// Charts: hand-drawn SVG line charts with the learned band behind

function drawCharts() {
  const timeline = appState ? appState.timeline : null;
  const canary = appState ? appState.canary : null;
  for (const chart of CHARTS) {
    const svg = $(`chart-${chart.feature}`);
    const band = timeline ? timeline.baseline.find((b) => b.feature === chart.feature) : null;
    const pick = (series) =>
      (series || [])
        .map((p) => [Date.parse(p.start) + (p.seconds * 1000) / 2, p[chart.feature], p])
        .filter(([x, y]) => Number.isFinite(x) && y !== null && Number.isFinite(y));
    lineChart(svg, {
      series: timeline
        ? [
            { name: `stable ${timeline.stable_version}`, cls: "stable", points: pick(timeline.stable) },
            { name: `canary ${timeline.canary_version}`, cls: "canary", points: pick(timeline.canary) },
          ]
        : [],
      band,
      marker: canary && canary.failed_at ? { x: Date.parse(canary.failed_at), label: "failed" } : null,
      format: chart.format,
    });
  }
}

/** Round steps for an axis: 1, 2, 5 times a power of ten. */
function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

const TIME_STEPS_S = [10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400];

function lineChart(svg, { series, band, marker, format }) {
  const width = Math.max(200, Math.round(svg.clientWidth || 600));
  const height = Math.max(100, Math.round(svg.clientHeight || 180));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const m = { left: 52, right: 10, top: 10, bottom: 22 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const nodes = [];
  const all = series.flatMap((x) => x.points);
  svg.dataset.points = String(all.length);
  if (all.length === 0) {
    nodes.push(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "waiting" }, "waiting for data"));
    svg.replaceChildren(...nodes);
    return;
  }

  // Domains: time over every point (a single point gets a minute around it); values from 0 up,
  // and the band only as far as twice the data, so a young, wide band does not flatten the lines.
  let x0 = Math.min(...all.map((p) => p[0]));
  let x1 = Math.max(...all.map((p) => p[0]));
  if (x1 - x0 < 60_000) {
    x0 -= 30_000;
    x1 += 30_000;
  }
  const dataMax = Math.max(...all.map((p) => p[1]));
  let yMax = dataMax;
  if (band) yMax = Math.max(yMax, Math.min(band.hi, (dataMax || band.hi) * 2));
  if (!(yMax > 0)) yMax = 1;
  const yStep = niceStep(yMax * 1.05, 4);
  yMax = Math.ceil((yMax * 1.05) / yStep) * yStep;
  const X = (t) => m.left + ((t - x0) / (x1 - x0)) * plotW;
  const Y = (v) => m.top + plotH - (Math.max(0, Math.min(v, yMax)) / yMax) * plotH;

  // Grid and value axis.
  for (let v = 0; v <= yMax + yStep / 2; v += yStep) {
    const y = Y(v).toFixed(1);
    nodes.push(s("line", { x1: m.left, x2: width - m.right, y1: y, y2: y, class: "grid" }));
    nodes.push(s("text", { x: m.left - 6, y: Number(y) + 4, "text-anchor": "end", class: "axis" }, format(v)));
  }
  // Time axis: as many round ticks as fit.
  const fit = Math.max(2, Math.floor(plotW / 80));
  const stepS = TIME_STEPS_S.find((st) => ((x1 - x0) / 1000) / st <= fit) || TIME_STEPS_S[TIME_STEPS_S.length - 1];
  for (let t = Math.ceil(x0 / (stepS * 1000)) * stepS * 1000; t <= x1; t += stepS * 1000) {
    const x = X(t).toFixed(1);
    nodes.push(s("line", { x1: x, x2: x, y1: m.top, y2: m.top + plotH, class: "grid" }));
    nodes.push(s("text", { x, y: height - 6, "text-anchor": "middle", class: "axis" }, fmtClock(t)));
  }

  // The learned band behind the lines.
  if (band) {
    const top = Y(band.hi);
    const bottom = Y(Math.max(0, band.lo));
    const rect = s("rect", { x: m.left, y: top.toFixed(1), width: plotW, height: Math.max(0, bottom - top).toFixed(1), class: "band" });
    rect.append(s("title", {}, `learned band ${format(Math.max(0, band.lo))} – ${format(band.hi)} (mean ${format(band.mean)}, ${band.samples} windows)`));
    nodes.push(rect);
    const ym = Y(band.mean).toFixed(1);
    nodes.push(s("line", { x1: m.left, x2: width - m.right, y1: ym, y2: ym, class: "band-mean" }));
  }

  if (marker && marker.x >= x0 && marker.x <= x1) {
    const x = X(marker.x).toFixed(1);
    nodes.push(s("line", { x1: x, x2: x, y1: m.top, y2: m.top + plotH, class: "marker" }));
    nodes.push(s("text", { x: Number(x) + 4, y: m.top + 10, class: "marker-label" }, marker.label));
  }

  for (const line of series) {
    if (line.points.length === 0) continue;
    const d = line.points.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
    nodes.push(s("path", { d, class: `line ${line.cls}`, "data-series": line.cls }));
    for (const [x, y, p] of line.points) {
      const dot = s("circle", { cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: 2.2, class: `pt ${line.cls}` });
      dot.append(s("title", {}, `${line.name} · ${fmtClock(Date.parse(p.start))} · ${format(y)} (${p.requests} requests)`));
      nodes.push(dot);
    }
  }
  svg.replaceChildren(...nodes);
}

// ---------------------------------------------------------------------------------------------
// Operator actions: promote, pause, resume, abort, each confirmed, with the admin token

const TOKEN_KEY = "canaryd-api-token";

/** The buttons that make sense for the analysis now; none once it is over. */
function renderActions(canary) {
  const bar = $("app-actions");
  const live = canary && canary.state !== "promoted" && canary.state !== "rolled_back";
  bar.hidden = !live;
  bar.dataset.paused = live && canary.paused ? "true" : "false";
  if (!live) return;
  for (const button of bar.querySelectorAll("button")) {
    const op = button.dataset.operation;
    button.hidden =
      (op === "pause" && canary.paused) || (op === "resume" && !canary.paused) || (op === "abort" && !!canary.failed_at);
  }
}

function confirmation(operation, c) {
  switch (operation) {
    case "promote":
      return `Promote ${c.canary_version} now? It gets all the traffic (weight 100), whatever its stage.`;
    case "pause":
      return `Pause the analysis of ${c.canary_version}? It goes on judging, but passes no stage and fails nothing until resumed.`;
    case "resume":
      return `Resume the analysis of ${c.canary_version}?`;
    default:
      return `Abort ${c.canary_version} now? Its weight goes to 0.`;
  }
}

function postAction(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return fetch(path, { method: "POST", headers: token ? { authorization: `Bearer ${token}` } : {} });
}

async function operate(operation) {
  const c = appState.canary;
  if (!c || !window.confirm(confirmation(operation, c))) return;
  const path = `/api/v1/apps/${q(route.app)}/canary/${operation}?env=${q(route.env)}`;
  const note = $("action-note");
  try {
    let response = await postAction(path);
    if (response.status === 401) {
      const token = window.prompt("This needs canaryd's api_token (kept for this tab only):");
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      response = await postAction(path);
    }
    if (response.ok) {
      note.textContent = `${operation}: done.`;
    } else {
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
      note.textContent = `${operation} refused (HTTP ${response.status}): ${body.detail || ""}`;
    }
  } catch (e) {
    note.textContent = `${operation} failed: ${e.message}`;
  }
  note.hidden = false;
  tick();
}

$("app-actions").addEventListener("click", (e) => {
  const button = e.target.closest("button[data-operation]");
  if (button) operate(button.dataset.operation);
});

// ---------------------------------------------------------------------------------------------

window.addEventListener("hashchange", showRoute);
// Charts are drawn to their measured width: redraw when it changes (one frame later, once).
let resizeFrame = 0;
new ResizeObserver(() => {
  cancelAnimationFrame(resizeFrame);
  resizeFrame = requestAnimationFrame(drawCharts);
}).observe($("charts"));
showRoute();
