// edgefleet dashboard. Plain JS, no dependencies, no build step: everything is served by the hub.
// Site data is untrusted (sites write event summaries): the DOM is built with textContent only.
"use strict";

const TOKEN_KEY = "edgefleet.token";
const STATE_ORDER = { black: 0, red: 1, stale: 2, yellow: 3, unknown: 4, green: 5 };
const LANES = ["green", "yellow", "red", "black", "stale"];
const COLORS = { green: "#1f9d55", yellow: "#d69e2e", red: "#d64545", black: "#111111", stale: "#8a94a6" };
const page = document.body.dataset.page;
let config = { read_requires_token: false, writes_enabled: false, commands_enabled: false };
let refreshTimer = null;
let lastDoc = null;

// ---- helpers -----------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function showError(msg) {
  const el = document.getElementById("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

async function api(path, opts = {}) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
    cache: "no-store",
  });
  let doc = null;
  try { doc = await r.json(); } catch (e) { doc = null; }
  if (!r.ok) {
    const detail = doc && doc.detail ? (typeof doc.detail === "string" ? doc.detail : JSON.stringify(doc.detail)) : r.statusText;
    const err = new Error(`${r.status}: ${detail}`);
    err.status = r.status;
    throw err;
  }
  return doc;
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

// An element showing "N ago" for a timestamp; the ticker keeps it current between updates.
function ago(iso, extra) {
  const el = h("span", { class: "ago", "data-ts": iso || "", title: iso ? fmtTime(iso) : "" });
  el.dataset.extra = extra || "";
  renderAgo(el);
  return el;
}

function renderAgo(el) {
  const ts = el.dataset.ts;
  el.textContent = ts ? `${fmtDuration((Date.now() - Date.parse(ts)) / 1000)} ago${el.dataset.extra}` : "never";
}

function badge(state) { return h("span", { class: `badge ${state}`, text: state }); }

// ---- auth --------------------------------------------------------------------------------------

function renderAuth() {
  const box = document.getElementById("auth");
  box.replaceChildren();
  if (token()) {
    box.append(h("span", { text: "signed in " }),
      h("button", { type: "button", id: "sign-out", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); renderAuth(); reconnect(); } }, "Sign out"));
  } else {
    const input = h("input", { type: "password", id: "token-input", placeholder: "API token", autocomplete: "off" });
    const form = h("form", { id: "sign-in", class: "sign-in" }, input, " ", h("button", { type: "submit" }, "Sign in"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (input.value.trim()) { sessionStorage.setItem(TOKEN_KEY, input.value.trim()); renderAuth(); reconnect(); }
    });
    box.append(form);
  }
  if (page === "site") renderActions();
}

// ---- live updates: server-sent events read with fetch (EventSource cannot send a token) -------

let streamAbort = null;

function setLive(on, text) {
  const el = document.getElementById("live");
  el.className = "live " + (on ? "on" : "off");
  el.textContent = text;
}

function reconnect() {
  if (streamAbort) streamAbort.abort();
  streamAbort = new AbortController();
  stream(streamAbort.signal);
}

async function stream(signal) {
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (token()) headers.Authorization = "Bearer " + token();
      const r = await fetch("/dashboard/api/stream", { headers, signal, cache: "no-store" });
      if (r.status === 401 || r.status === 403) {
        setLive(false, "sign in to read");
        showError("This hub requires a token to read: sign in (top right).");
        return;
      }
      if (!r.ok || !r.body) throw new Error(`stream: ${r.status}`);
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let event = "message"; const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
          }
          if (event === "hello") { delay = 1000; setLive(true, "live"); refresh(); }
          else if (event === "change") onChange(JSON.parse(data.join("\n") || "{}"));
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    setLive(false, "reconnecting…");
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function onChange(change) {
  if (page === "site") {
    const mine = !change.site || change.site === currentSite();
    if (!mine && change.kind !== "bundle" && change.kind !== "resync") return;
  }
  scheduleRefresh();
}

// Many changes in a burst (a fleet reconnecting) become one re-read; a large fleet re-reads less
// often (every site reports every 30 s or so: 1000 sites would otherwise mean a re-read per change).
function scheduleRefresh() {
  if (refreshTimer) return;
  const sites = page === "overview" && lastDoc ? lastDoc.total : 0;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, Math.min(5000, 250 + sites * 5));
}

async function refresh() {
  try {
    if (page === "overview") renderOverview(await api("/dashboard/api/overview"));
    else renderSite(await api(`/dashboard/api/sites/${encodeURIComponent(currentSite())}`));
    showError("");
  } catch (e) {
    if (e.status === 401 || e.status === 403) showError("This hub requires a token to read: sign in (top right).");
    else if (e.status === 404 && page === "site") showError(`Site ${currentSite()} has not reported to this hub (yet).`);
    else showError(`Could not load data: ${e.message}`);
  }
}

// ---- overview ----------------------------------------------------------------------------------

const view = { sort: "display", dir: 1, state: null, q: "" };

function sortValue(s, key) {
  switch (key) {
    case "display": return STATE_ORDER[s.display] ?? 9;
    case "last_seen": return -Date.parse(s.last_seen || 0);
    case "snapshot": return s.snapshot ? (s.snapshot.age_seconds ?? Infinity) : Infinity;
    case "nodes": return s.nodes ? s.nodes_ready / s.nodes : 2;
    case "unhealthy": return -(s.unhealthy || 0);
    default: return (s[key] || "").toString();
  }
}

function snapshotCell(snap) {
  if (!snap) return h("span", { class: "muted", text: "not reported" });
  if (!snap.last_success) return h("span", { class: "overdue", text: "never succeeded" });
  const age = h("span", { class: snap.overdue ? "overdue snap-age" : "snap-age", "data-ts": snap.last_success,
    title: `taken ${fmtTime(snap.last_success)}; allowed age ${fmtDuration(snap.max_age_seconds)}` +
      (snap.schedule ? ` (schedule ${snap.schedule})` : "") });
  age.dataset.extra = snap.overdue ? " (overdue)" : "";
  renderAgo(age);
  return age;
}

function renderOverview(doc) {
  const previous = lastDoc;
  lastDoc = doc;
  const counts = document.getElementById("counts");
  counts.replaceChildren(...["green", "yellow", "red", "black", "stale", "unknown"]
    .filter((s) => s !== "unknown" || doc.counts.unknown)
    .map((s) => h("div", {
      class: `count ${s}${view.state === s ? " active" : ""}`, "data-state": s, role: "button",
      title: `show only ${s} sites (click again for all)`,
      onclick: () => { view.state = view.state === s ? null : s; renderOverview(lastDoc); },
    }, h("span", { class: "n", text: doc.counts[s] }), s[0].toUpperCase() + s.slice(1))));
  const q = view.q.toLowerCase();
  const rows = doc.sites.filter((s) => (!view.state || s.display === view.state) &&
    (!q || [s.site, s.bundle, s.state_reason, s.display].some((v) => (v || "").toLowerCase().includes(q))));
  rows.sort((a, b) => {
    const x = sortValue(a, view.sort); const y = sortValue(b, view.sort);
    return (x < y ? -1 : x > y ? 1 : a.site < b.site ? -1 : 1) * view.dir;
  });
  const before = new Map((previous ? previous.sites : []).map((s) => [s.site, s.display]));
  const tbody = document.querySelector("#sites tbody");
  tbody.replaceChildren(...rows.map((s) => {
    const tr = h("tr", { "data-site": s.site, "data-state": s.display },
      h("td", {}, h("a", { href: `/dashboard/sites/${encodeURIComponent(s.site)}`, text: s.site })),
      h("td", { class: "state" }, badge(s.display), s.stale && s.state ? h("span", { class: "muted", text: ` was ${s.state}` }) : null),
      h("td", {}, s.bundle || h("span", { class: "muted", text: "none" }),
        s.install_state && s.install_state !== "idle" && s.install_state !== "committed" ? h("span", { class: "muted", text: ` (${s.install_state})` }) : null),
      h("td", {}, ago(s.last_seen), s.online === false ? h("span", { class: "muted", text: " · offline" }) : null),
      h("td", {}, snapshotCell(s.snapshot)),
      h("td", {}, s.nodes ? `${s.nodes_ready}/${s.nodes} ready` : "–"),
      h("td", {}, s.components ? (s.unhealthy ? h("span", { class: "overdue", text: `${s.unhealthy} unhealthy` }) : `${s.components} healthy`) : "–"),
      h("td", { class: "muted", text: s.state_reason }));
    if (previous && before.get(s.site) !== s.display) tr.classList.add("flash");
    return tr;
  }));
  document.getElementById("empty").hidden = doc.total > 0;
  document.getElementById("shown").textContent = `${rows.length} of ${doc.total} sites`;
  for (const th of document.querySelectorAll("#sites th[data-sort]")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === view.sort && view.dir === 1);
    th.classList.toggle("sorted-desc", th.dataset.sort === view.sort && view.dir === -1);
  }
}

function initOverview() {
  for (const th of document.querySelectorAll("#sites th[data-sort]")) {
    th.addEventListener("click", () => {
      view.dir = view.sort === th.dataset.sort ? -view.dir : 1;
      view.sort = th.dataset.sort;
      if (lastDoc) renderOverview(lastDoc);
    });
  }
  document.getElementById("filter").addEventListener("input", (ev) => {
    view.q = ev.target.value;
    if (lastDoc) renderOverview(lastDoc);
  });
}

// ---- site page ---------------------------------------------------------------------------------

function currentSite() { return decodeURIComponent(location.pathname.split("/").filter(Boolean).pop()); }

function renderTimeline(tl, site) {
  const W = 1000; const H = 150; const left = 60; const right = 10; const laneH = 22; const top = 8;
  const t0 = Date.parse(tl.start); const t1 = Math.max(Date.parse(tl.end), t0 + 60000);
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (W - left - right);
  const y = (state) => top + LANES.indexOf(state) * laneH;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `state of ${site.site} over time` });
  LANES.forEach((s) => {
    root.append(svg("rect", { x: left, y: y(s), width: W - left - right, height: laneH - 4, fill: "#f3f4f6" }));
    root.append(svg("text", { x: 4, y: y(s) + 13, class: "lane-label" }, s === "stale" ? "no reports" : s));
  });
  const points = [];
  tl.runs.forEach((run, i) => {
    const a = Date.parse(run.at);
    const b = i + 1 < tl.runs.length ? Date.parse(tl.runs[i + 1].at) : t1;
    const rect = svg("rect", { x: x(a), y: y(run.state), width: Math.max(1.5, x(b) - x(a)), height: laneH - 4,
      fill: COLORS[run.state] || "#999", class: `run run-${run.state}` },
      svg("title", {}, `${run.state}: ${fmtTime(run.at)} – ${i + 1 < tl.runs.length ? fmtTime(tl.runs[i + 1].at) : "now"}`));
    root.append(rect);
    const mid = y(run.state) + (laneH - 4) / 2;
    points.push(`${x(a)},${mid}`, `${x(b)},${mid}`);
  });
  if (points.length) root.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: "#1d2330", "stroke-width": 1, "stroke-opacity": 0.5 }));
  const axisY = top + LANES.length * laneH + 4;
  root.append(svg("line", { x1: left, x2: W - right, y1: axisY, y2: axisY, stroke: "#c5cad3" }));
  for (let i = 0; i <= 5; i += 1) {
    const t = t0 + ((t1 - t0) * i) / 5;
    const label = new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: t1 - t0 < 3600e3 ? "2-digit" : undefined, hour12: false });
    root.append(svg("line", { x1: x(t), x2: x(t), y1: axisY, y2: axisY + 4, stroke: "#c5cad3" }));
    root.append(svg("text", { x: x(t), y: axisY + 16, "text-anchor": i === 0 ? "start" : i === 5 ? "end" : "middle", class: "tick" }, i === 5 ? "now" : label));
  }
  if (!tl.runs.length) root.append(svg("text", { x: left + 10, y: top + 40, class: "lane-label" }, "no status history yet"));
  document.getElementById("timeline").replaceChildren(root);
  document.getElementById("timeline-range").textContent = `(${fmtDuration((t1 - t0) / 1000)})`;
}

function renderLayers(layers, nodes) {
  const names = ["0 · infrastructure core", "1 · platform services", "2 · GitOps & automation", "3 · dashboards & security", "4 · developer portal"];
  document.getElementById("layers").replaceChildren(...layers.map((l) => h("div", { class: "layer", "data-layer": l.layer },
    h("h3", {}, h("span", { text: `Layer ${names[l.layer] || l.layer}` }), h("span", { class: "muted", text: `${l.healthy}/${l.components.length}` })),
    l.components.length ? l.components.map((c) => h("div", {
      class: `comp${c.healthy ? "" : " unhealthy"}${c.degraded ? " degraded" : ""}`, "data-component": c.name,
      title: c.reason || (c.healthy ? "healthy" : "unhealthy"),
    }, h("span", {}, h("span", { class: "dot" }), c.name, c.degraded ? h("span", { class: "muted", text: " (scaled down)" }) : null),
    h("span", { class: "tier", text: `tier ${c.tier}` }))) : h("div", { class: "muted", text: "no components" }))));
  document.getElementById("nodes").replaceChildren(...nodes.map((n) => h("span", { class: `node${n.ready ? "" : " down"}`,
    text: `${n.name}${n.control_plane ? " (server)" : ""}: ${n.ready ? "ready" : "NOT ready"}` })));
}

function renderSite(doc) {
  lastDoc = doc;
  const s = doc.site;
  document.title = `edgefleet · ${s.site}`;
  document.getElementById("crumb").textContent = s.site;
  document.getElementById("site-name").textContent = s.site;
  const st = document.getElementById("site-state");
  st.className = `badge ${s.display}`; st.textContent = s.display;
  const fact = (k, v) => h("div", {}, h("dt", { text: k }), h("dd", {}, v));
  document.getElementById("site-facts").replaceChildren(
    fact("reason", s.state_reason || "–"),
    fact("bundle", s.bundle ? (s.install_state && s.install_state !== "idle" ? `${s.bundle} (${s.install_state})` : s.bundle)
      : `none${s.install_state && s.install_state !== "idle" ? ` (${s.install_state})` : ""}`),
    fact("last seen", ago(s.last_seen)),
    fact("agent", s.agent_version || "–"),
    fact("link", s.online === false ? "offline" : s.online ? "online" : "–"),
    fact("etcd snapshot", snapshotCell(s.snapshot)));
  renderTimeline(doc.timeline, s);
  renderLayers(doc.layers, doc.nodes);
  const none = (cols, text) => [h("tr", { class: "empty" }, h("td", { colspan: cols, class: "muted", text }))];
  // A controller repeating itself (the same event every second) is one line with a count.
  const events = [];
  for (const e of doc.events) {
    const last = events[events.length - 1];
    if (last && last.type === e.type && last.summary === e.summary && last.severity === e.severity) last.count += 1;
    else events.push({ ...e, count: 1 });
  }
  document.querySelector("#events tbody").replaceChildren(...(events.length ? [] : none(4, "no events yet")), ...events.map((e) => h("tr", { "data-type": e.type },
    h("td", {}, ago(e.ts)), h("td", { class: `sev-${e.severity}`, text: e.severity }), h("td", { text: e.type }),
    h("td", {}, e.summary, e.count > 1 ? h("span", { class: "muted", text: ` (×${e.count}, latest shown)` }) : null))));
  const snap = s.snapshot;
  document.getElementById("snapshot-summary").textContent = snap
    ? `schedule ${snap.schedule || "?"}, allowed age ${fmtDuration(snap.max_age_seconds)}, failures in a row: ${snap.failures}`
    : "This site does not report etcd snapshots.";
  document.querySelector("#snapshots tbody").replaceChildren(...(doc.snapshots.length ? [] : none(5, "no snapshot reported yet")), ...doc.snapshots.map((x) => h("tr", {},
    h("td", {}, ago(x.taken_at)), h("td", { class: x.ok ? "state-done" : "state-failed", text: x.ok ? "ok" : `failed: ${x.detail}` }),
    h("td", { text: fmtBytes(x.size_bytes) }), h("td", { text: x.revision ?? "–" }), h("td", { class: "muted", text: x.source }))));
  document.querySelector("#commands tbody").replaceChildren(...(doc.commands.length ? [] : none(5, "no commands sent yet")), ...doc.commands.map((c) => h("tr", { "data-cmd": c.cmd_id, "data-name": c.name, "data-state": c.state },
    h("td", { text: c.seq }), h("td", { text: c.name }), h("td", { class: `state-${c.state} cmd-state`, text: c.state }),
    h("td", {}, ago(c.issued)),
    h("td", {}, c.replies.length ? c.replies.map((r) => h("div", { class: "reply" }, h("span", { class: `st state-${r.status}`, text: r.status }), ": ", r.detail))
      : h("span", { class: "muted", text: c.detail || "no reply yet" })))));
  const select = document.getElementById("bundle-select");
  const chosen = select.value;
  select.replaceChildren(...(doc.bundles.length ? doc.bundles.map((b) => h("option", { value: b.sha256, text: `${b.name}-${b.version} (release ${b.release ?? "?"})` }))
    : [h("option", { value: "", text: "no bundle uploaded to this hub" })]));
  if (chosen) select.value = chosen;
  renderActions();
}

function renderActions() {
  const box = document.getElementById("actions");
  box.hidden = !token();
  const cmds = config.commands_enabled && config.writes_enabled;
  document.getElementById("snapshot-now").disabled = !cmds;
  document.getElementById("install-bundle").disabled = !cmds || !document.getElementById("bundle-select").value;
  if (!cmds) document.getElementById("action-result").textContent = "commands are not configured on this hub";
}

async function sendCommand(name, args) {
  const out = document.getElementById("action-result");
  out.textContent = `sending ${name}…`;
  try {
    const c = await api(`/api/v1/sites/${encodeURIComponent(currentSite())}/commands`, { method: "POST", body: { name, args } });
    out.textContent = `${name} #${c.seq}: ${c.state}`;
    scheduleRefresh();
  } catch (e) {
    out.textContent = e.status === 401 || e.status === 403 ? `refused: this token may not send commands (${e.message})` : `failed: ${e.message}`;
  }
}

function initSite() {
  document.getElementById("snapshot-now").addEventListener("click", () => sendCommand("snapshot-now", {}));
  document.getElementById("install-bundle").addEventListener("click", () => {
    const sel = document.getElementById("bundle-select");
    const label = sel.options[sel.selectedIndex] ? sel.options[sel.selectedIndex].text : "";
    if (sel.value && window.confirm(`Install ${label} on ${currentSite()}?`)) sendCommand("install-bundle", { bundle: sel.value });
  });
}

// ---- start -------------------------------------------------------------------------------------

setInterval(() => { for (const el of document.querySelectorAll("[data-ts]")) if (el.dataset.ts) renderAgo(el); }, 1000);

(async () => {
  try { config = await api("/dashboard/api/config"); } catch (e) { /* defaults */ }
  if (page === "overview") initOverview(); else initSite();
  renderAuth();
  reconnect();
})();
