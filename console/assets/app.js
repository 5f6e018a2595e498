// Flashgate console: draws the Line, Batch, Device and Audit views from the console's JSON and the
// live snapshot it streams (server-sent events). Everything shown is set as text, never as HTML.
"use strict";

const S = { session: null, snap: null, view: "", arg: "", batch: null, batchTimer: null, busy: false };

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || (v === false && !k.startsWith("data-"))) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true && !k.startsWith("data-") ? "" : String(v));
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const svg = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
const $ = (sel) => document.querySelector(sel);
const isAdmin = () => S.session && S.session.role === "admin";

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(ms).toLocaleString();
}
const pct = (x) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(1) + " %";
const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);

function notice(text, error) {
  const n = $("#notice");
  n.replaceChildren(el("p", { class: error ? "error" : "", text }));
}

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  const t = await r.text();
  if (!r.ok) throw new Error(t || r.statusText);
  return JSON.parse(t);
}

// One admin action: a confirmation naming what will happen, then POST with the admin token.
function act(what, body) {
  const d = $("#confirm");
  $("#confirm-text").textContent = what;
  d.returnValue = "";
  d.onclose = async () => {
    if (d.returnValue !== "ok") { notice("Cancelled: nothing was done."); return; }
    try {
      const r = await fetch("/api/action", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json", "x-console-token": S.session.action_token },
        body: JSON.stringify(body),
      });
      const t = await r.text();
      if (!r.ok) throw new Error(t);
      const j = JSON.parse(t);
      notice("Done: " + j.done + (j.warnings.length ? " (warning: " + j.warnings.join("; ") + ")" : ""));
      if (S.view === "batch" && S.arg) loadBatch(S.arg);
      if (S.view === "audit") drawAudit();
    } catch (e) { notice("Failed: " + e.message, true); }
  };
  d.showModal();
  $("#confirm-cancel").focus();
}

// ---- Line ----
function probeRow(p) {
  const stage = p.stage || (p.present ? "idle" : "gone");
  const label = p.total ? `${stage} ${p.done} of ${p.total}` : stage;
  const bar = el("progress", { max: p.total || 1, value: p.total ? p.done : (p.stage === "done" ? 1 : 0),
    "aria-label": `probe ${p.probe_id}: ${label}` });
  const last = p.finished ? (p.last_ok ? "last: installed" : "last: " + (p.last_message || "failed")) : "";
  return el("li", { "data-probe": p.probe_id, "data-stage": p.stage, "data-done": p.done, "data-total": p.total },
    el("span", { class: "mono", text: p.probe_id, title: `${p.kind} ${p.port}` }),
    el("span", { class: "stage", text: label, title: p.device_id ? "device " + p.device_id : "" }),
    el("span", {}, bar, last ? el("span", { class: "muted", text: last }) : null));
}

function stationCard(s, batches) {
  const open = batches.filter((b) => b.state === "open");
  const kids = [
    el("h3", {}, el("span", { text: s.name }),
      el("span", { class: s.online ? "online" : "offline", text: s.online ? "online" : "offline" })),
    // The broker counts a station online while its heartbeats arrive (one within 15 s).
    el("div", { class: "muted", text: s.online ? `heartbeat within 15 s · via ${s.broker}` : `last seen ${ago(s.last_seen_ms)}` }),
    el("div", {}, "assigned: ", el("strong", { class: "assigned", text: s.assigned_batch || "none" }),
      s.paused ? el("span", { class: "offline", text: " (paused)" }) : null,
      " · running: ", el("strong", { class: "current", text: s.current_batch || "nothing" }),
      " · devices ", el("span", { class: "devices-ok", text: s.devices_ok }), " ok / ",
      el("span", { class: "devices-failed", text: s.devices_failed }), " failed"),
    el("ul", { class: "probes", "aria-label": `probes of ${s.name}` }, s.probes.map(probeRow)),
  ];
  if (isAdmin()) {
    const id = "assign-" + btoa(s.identity).replace(/[^A-Za-z0-9]/g, "");
    const sel = el("select", { id, class: "assign-batch" },
      open.map((b) => el("option", { value: b.id, text: b.id, selected: b.id === s.assigned_batch })));
    kids.push(el("div", { class: "actions" },
      el("label", { for: id, text: "Batch" }), sel,
      el("button", { class: "assign", disabled: !open.length, onclick: () =>
        act(`Assign batch ${sel.value} to ${s.identity}? The station starts installing it on every probe.`,
          { action: "assign", station: s.identity, batch: sel.value }) }, "Assign"),
      el("button", { class: "pause-station danger", onclick: () =>
        act(`Pause ${s.identity}? Devices in flight finish; no new device starts until it is assigned again.`,
          { action: "pause_station", station: s.identity }) }, "Pause")));
  }
  return el("article", { class: "station", "data-station": s.identity, "data-online": s.online, "aria-label": `${s.name} of ${s.site}` }, kids);
}

function drawLine() {
  const v = $("#view");
  const snap = S.snap;
  if (!snap) { v.replaceChildren(el("p", { text: "Waiting for the first answer of the broker…" })); return; }
  // Keep the focus (a select or button) across redraws: redraw only when nothing in a station has it.
  const focused = document.activeElement;
  if (focused && v.contains(focused) && focused.tagName === "SELECT") return;
  const sites = new Map();
  for (const s of snap.stations) { if (!sites.has(s.site)) sites.set(s.site, []); sites.get(s.site).push(s); }
  const kids = [el("h2", { text: "Line" })];
  if (!snap.stations.length) kids.push(el("p", { text: "No station is known to the broker yet." }));
  for (const [site, list] of [...sites.entries()].sort()) {
    kids.push(el("section", { class: "site", "aria-label": `site ${site}` },
      el("h2", { text: `Site ${site || "(none)"}` }),
      el("div", { class: "stations" }, list.map((s) => stationCard(s, snap.batches)))));
  }
  const focusKey = focused && focused.closest && focused.closest("[data-station]") ?
    [focused.closest("[data-station]").getAttribute("data-station"), focused.className] : null;
  v.replaceChildren(...kids);
  if (focusKey) {
    const card = [...v.querySelectorAll("[data-station]")].find((c) => c.getAttribute("data-station") === focusKey[0]);
    const again = card && card.querySelector("." + focusKey[1].split(" ")[0]);
    if (again) again.focus();
  }
}

// ---- Batch ----
const SEGMENTS = [["installed", "installed"], ["failed", "failed"], ["refused", "refused"], ["in_flight", "in flight"], ["remaining", "remaining"]];

function bar(counts, small) {
  const total = SEGMENTS.reduce((a, [k]) => a + (counts[k] || 0), 0) || 1;
  const words = SEGMENTS.map(([k, w]) => `${counts[k] || 0} ${w}`).join(", ");
  return el("div", { class: "bar" + (small ? " small" : ""), role: "img", "aria-label": words, title: words },
    SEGMENTS.filter(([k]) => counts[k]).map(([k]) => el("span", { class: "seg-" + k, style: `width:${(100 * counts[k] / total).toFixed(2)}%` })));
}

function groupCounts(g) {
  return { installed: g.installed, failed: sum(g.failed), refused: sum(g.refused), in_flight: 0, remaining: 0 };
}

function chart(points, bucketMs) {
  const W = 640, H = 160, P = 24;
  const s = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": points.length ? `devices per minute, ${points.length} intervals of ${bucketMs / 1000} s, latest ${points[points.length - 1].per_minute}` : "no devices finished since the console started" });
  const max = Math.max(1, ...points.map((p) => p.per_minute));
  const w = (W - 2 * P) / Math.max(points.length, 30);
  points.forEach((p, i) => {
    const h = (H - 2 * P) * p.per_minute / max;
    s.append(svg("rect", { x: P + i * w, y: H - P - h, width: Math.max(1, w - 1), height: h }));
  });
  const t = svg("text", { x: 4, y: 14 }); t.textContent = `${max.toFixed(0)} devices/min`; s.append(t);
  const b = svg("text", { x: 4, y: H - 6 }); b.textContent = points.length ? `since ${new Date(points[0].at_ms).toLocaleTimeString()}, ${bucketMs / 1000} s per bar` : "no device finished since the console started"; s.append(b);
  return s;
}

function reasonsTable(caption, map) {
  const rows = Object.entries(map || {});
  if (!rows.length) return el("p", { text: `${caption}: none.` });
  return el("table", {}, el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, el("th", { text: "reason" }), el("th", { class: "num", text: "devices" }))),
    el("tbody", {}, rows.map(([k, n]) => el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: n })))));
}

function groupTable(caption, groups, key) {
  return el("table", {}, el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, ["", "attempts", "installed", "failed", "refused", "first-pass yield", ""].map((h, i) => el("th", { class: i && i < 6 ? "num" : "", text: h })))),
    el("tbody", {}, groups.map((g) => el("tr", { "data-group": g[key] },
      el("td", { class: "mono", text: g[key] || "(none)" }), el("td", { class: "num", text: g.attempts }),
      el("td", { class: "num", text: g.installed }), el("td", { class: "num", text: sum(g.failed) }),
      el("td", { class: "num", text: sum(g.refused) }), el("td", { class: "num", text: pct(g.first_pass_yield) }),
      el("td", { style: "width:12em" }, bar(groupCounts(g), true))))));
}

function liveBatch(id) { return S.snap && S.snap.batches.find((b) => b.id === id); }

function batchCounts(id) {
  const b = liveBatch(id) || (S.batch && S.batch.batch);
  if (!b) return null;
  const refused = S.batch && S.batch.batch.id === id ? sum(S.batch.report.total.refused) : 0;
  return { issued: b.issued, installed: b.installed, failed: b.failed, refused, in_flight: b.in_flight, remaining: b.remaining, quota: b.quota, state: b.state };
}

function drawBatchHead(id) {
  const c = batchCounts(id);
  const head = $("#batch-head");
  if (!head || !c) return;
  head.replaceChildren(bar(c),
    el("dl", { class: "counts" }, ["issued", "installed", "failed", "refused", "in_flight", "remaining", "quota"].map((k) =>
      el("div", {}, el("dt", {}, k === "issued" || k === "quota" ? null : el("span", { class: "swatch seg-" + k }), k.replace("_", " ")),
        el("dd", { id: "count-" + k, text: c[k] })))),
    el("p", {}, "state: ", el("strong", { id: "batch-state", text: c.state })));
}

function drawBatchList() {
  const v = $("#view");
  const bs = S.snap ? S.snap.batches : [];
  v.replaceChildren(el("h2", { text: "Batches" }), bs.length ? el("table", {},
    el("thead", {}, el("tr", {}, ["batch", "state", "quota", "issued", "installed", "failed", "remaining"].map((h) => el("th", { text: h })))),
    el("tbody", {}, bs.map((b) => el("tr", {}, el("td", {}, el("a", { href: "#/batch/" + encodeURIComponent(b.id), text: b.id })),
      el("td", { text: b.state }), ...["quota", "issued", "installed", "failed", "remaining"].map((k) => el("td", { class: "num", text: b[k] }))))))
    : el("p", { text: "No batch yet." }));
}

async function loadBatch(id) {
  if (S.busy) return;
  S.busy = true;
  try {
    S.batch = await getJson("/api/batch/" + encodeURIComponent(id));
    if (S.view === "batch" && S.arg === id) drawBatch(id);
  } catch (e) {
    if (S.view === "batch" && S.arg === id) $("#view").replaceChildren(el("h2", { text: "Batch " + id }), el("p", { class: "error", text: e.message }));
  } finally { S.busy = false; }
}

function drawBatch(id) {
  const v = $("#view");
  const d = S.batch && S.batch.batch.id === id ? S.batch : null;
  const enc = encodeURIComponent(id);
  const kids = [el("h2", { text: "Batch " + id }), el("div", { id: "batch-head" })];
  if (isAdmin()) {
    kids.push(el("div", { class: "actions" },
      el("button", { class: "open-batch", onclick: () => act(`Open batch ${id}? Stations assigned to it may obtain licences again.`, { action: "open_batch", batch: id }) }, "Open"),
      el("button", { class: "pause-batch", onclick: () => act(`Pause batch ${id}? No licence is issued for it until it is opened again.`, { action: "pause_batch", batch: id }) }, "Pause"),
      el("button", { class: "close-batch danger", onclick: () => act(`Close batch ${id}? A closed batch stays closed: no licence will ever be issued for it again.`, { action: "close_batch", batch: id }) }, "Close")));
  }
  kids.push(el("p", {}, "Export: ",
    el("a", { href: `/export/batch/${enc}/report.json`, text: "batch report (JSON)" }), " · ",
    el("a", { href: `/export/batch/${enc}/devices.csv`, text: "devices (CSV)" }), " · ",
    el("a", { href: `/export/batch/${enc}/devices.jsonl`, text: "devices (JSON lines)" })));
  if (d) {
    const r = d.report;
    kids.push(el("p", {}, "first-pass yield: ", el("strong", { id: "first-pass-yield", text: pct(r.total.first_pass_yield) }),
      ` (${r.total.first_pass} of ${r.total.first_attempts} devices installed at their first attempt)`));
    kids.push(el("h3", { text: "Devices per minute" }), chart(d.rate, d.rate_bucket_ms));
    kids.push(el("h3", { text: "Failures and refusals" }), reasonsTable("failed by status", r.total.failed), reasonsTable("refused by reason", r.total.refused));
    kids.push(el("h3", { text: "Per site and station" }), groupTable("sites", r.sites, "site"), groupTable("stations", r.stations, "station"));
    const stages = Object.entries(r.total.stages || {});
    if (stages.length) kids.push(el("table", {}, el("caption", { text: "stage times" }),
      el("thead", {}, el("tr", {}, ["stage", "count", "mean ms", "p95 ms"].map((h) => el("th", { text: h })))),
      el("tbody", {}, stages.map(([k, s]) => el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: s.count }),
        el("td", { class: "num", text: (s.mean_us / 1000).toFixed(1) }), el("td", { class: "num", text: (s.p95_us / 1000).toFixed(1) }))))));
  } else kids.push(el("p", { text: "Loading the batch report…" }));
  v.replaceChildren(...kids);
  drawBatchHead(id);
}

// ---- Device ----
function drawDeviceForm(q) {
  const input = el("textarea", { id: "device-q", name: "q", rows: 2, required: true, spellcheck: "false", text: q || "" });
  const form = el("form", { class: "search", role: "search", onsubmit: (e) => {
    e.preventDefault(); location.hash = "#/device/" + encodeURIComponent(input.value.trim()); } },
    el("label", { for: "device-q" }, "Device id, or a chip certificate in hex", input), el("button", { class: "primary", type: "submit" }, "Search"));
  return form;
}

function kv(obj) {
  return el("table", {}, el("tbody", {}, Object.entries(obj).map(([k, v]) =>
    el("tr", {}, el("th", { text: k }), el("td", { class: "mono", text: typeof v === "object" && v !== null ? JSON.stringify(v) : String(v) })))));
}

async function drawDevice(q) {
  const v = $("#view");
  v.replaceChildren(el("h2", { text: "Device" }), drawDeviceForm(q));
  if (!q) return;
  const out = el("div", { id: "device-result", "aria-live": "polite" }, el("p", { text: "Searching…" }));
  v.append(out);
  try {
    const d = await getJson("/api/device?q=" + encodeURIComponent(q));
    const kids = [el("h3", {}, "Device ", el("code", { text: d.device_id }))];
    if (!d.records.length) kids.push(el("p", { text: "No batch knows this device." }));
    for (const r of d.records) {
      kids.push(el("section", { class: "record" },
        el("h4", {}, `Batch ${r.batch_id}: `, el("span", { class: "verdict-" + r.verdict, text: r.verdict })),
        kv({ product_id: r.product_id, certificate: r.certificate || "(none)", attempts_total: r.attempts_total }),
        r.licence ? el("div", {}, el("h5", { text: "Licence" }), kv(r.licence)) : el("p", { text: "No licence issued." }),
        el("h5", { text: "Attempts" }),
        r.attempts.length ? el("table", {}, el("thead", {}, el("tr", {}, ["#", "station", "probe", "status", "message", "flash CRC", "reported", "stage times (ms)"].map((h) => el("th", { text: h })))),
          el("tbody", {}, r.attempts.map((a) => el("tr", {}, el("td", { text: a.attempt }), el("td", { class: "mono", text: a.station }),
            el("td", { text: a.probe_id }), el("td", { text: `${a.status_code} ${a.status}` }), el("td", { text: a.message }),
            el("td", { class: "mono", text: a.flash_crc === null ? "" : a.flash_crc.toString(16).padStart(8, "0") }),
            el("td", { text: new Date(a.reported_at_ms).toLocaleString() }),
            el("td", { text: Object.entries(a.timings_us).map(([k, us]) => `${k} ${(us / 1000).toFixed(1)}`).join(", ") })))))
          : el("p", { text: "No attempt reported." }),
        r.refusals.length ? el("div", {}, el("h5", { text: "Refusals" }), r.refusals.map(kv)) : null));
    }
    out.replaceChildren(...kids);
  } catch (e) { out.replaceChildren(el("p", { class: "error", text: e.message })); }
}

// ---- Audit ----
async function drawAudit() {
  const v = $("#view");
  v.replaceChildren(el("h2", { text: "Audit" }), el("p", { text: "Verifying the audit chain…" }));
  try {
    const a = await getJson("/api/audit");
    const ver = a.verify;
    const kids = [el("h2", { text: "Audit" }),
      el("p", {}, "chain: ", el("strong", { id: "audit-ok", class: ver.ok ? "online" : "offline", text: ver.ok ? "verified" : "BROKEN" }),
        ver.ok ? ` (${ver.records} records)` : ` at record ${ver.broken_seq}: ${ver.fault}`),
      kv({ "head seq": ver.head_seq, "head hash": ver.head_hash, "ledger id": ver.ledger_id, genesis: ver.genesis, "answered by": a.broker }),
      el("h3", { text: "Audit-signing keys" }),
      el("table", {}, el("thead", {}, el("tr", {}, ["HSM member", "healthy", "audit key fingerprint"].map((h) => el("th", { text: h })))),
        el("tbody", {}, a.members.map((m) => el("tr", {}, el("td", { text: m.name }), el("td", { text: m.healthy ? "yes" : "no: " + m.last_error }),
          el("td", { class: "mono", text: m.audit_key_fingerprint || "(none)" }))))),
      el("h3", { text: "Latest signed checkpoint" }),
      a.checkpoint ? kv(a.checkpoint) : el("p", { text: "None signed from this console yet (the broker signs its own periodically; `flashgate admin audit export` includes one)." }),
      el("div", { class: "actions" }, el("button", { onclick: drawAudit }, "Verify again"),
        isAdmin() ? el("button", { class: "checkpoint", onclick: () => act("Sign a checkpoint of the audit head now with the broker's HSM audit key? It is stored in the ledger and written to the checkpoint sinks.", { action: "checkpoint" }) }, "Sign a checkpoint now") : null)];
    v.replaceChildren(...kids);
  } catch (e) { v.replaceChildren(el("h2", { text: "Audit" }), el("p", { class: "error", text: e.message })); }
}

// ---- Routing and the live stream ----
function route() {
  const parts = (location.hash || "#/line").slice(2).split("/");
  S.view = parts[0] || "line";
  S.arg = decodeURIComponent(parts.slice(1).join("/"));
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === S.view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  clearInterval(S.batchTimer);
  if (S.view === "batch" && S.arg) {
    drawBatch(S.arg); loadBatch(S.arg);
    S.batchTimer = setInterval(() => loadBatch(S.arg), 3000);
  } else if (S.view === "batch") drawBatchList();
  else if (S.view === "device") drawDevice(S.arg);
  else if (S.view === "audit") drawAudit();
  else drawLine();
  document.title = `Flashgate console: ${S.view}${S.arg ? " " + S.arg : ""}`;
}

function onSnapshot(snap) {
  S.snap = snap;
  const link = $("#link");
  if (snap.error) { link.textContent = "broker: " + snap.error; link.className = "badge down"; }
  else { link.textContent = "live"; link.className = "badge live"; }
  $("#footer").textContent = `broker ${S.session.broker} as ${S.session.admin} · polled every ${S.session.poll_interval_ms} ms, last poll took ${snap.poll_ms} ms at ${new Date(snap.at_ms).toLocaleTimeString()}`;
  if (S.view === "line") drawLine();
  else if (S.view === "batch" && S.arg) drawBatchHead(S.arg);
  else if (S.view === "batch") drawBatchList();
}

function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  es.onerror = () => { const l = $("#link"); l.textContent = "console unreachable, retrying"; l.className = "badge down"; };
}

async function main() {
  // The token was in the URL once; the cookie keeps it, so the address bar need not show it.
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname + location.hash);
  try { S.session = await getJson("/api/session"); }
  catch (e) { $("#view").replaceChildren(el("p", { class: "error", text: e.message })); return; }
  $("#role").textContent = S.session.role === "admin" ? "admin: " + S.session.admin : "wallboard (read-only)";
  window.addEventListener("hashchange", route);
  route();
  connect();
}
main();
