"use strict";
const meta = n => document.querySelector('meta[name="' + n + '"]').content;
const BASE = meta("lapse-base"), CSRF = meta("lapse-csrf"), REFRESH = {{refresh}};
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = {created: "#2f6fdf", ended: "#e8772e", expiry: "#7a5af8"};
document.getElementById("sw-created").style.background = COLORS.created;
document.getElementById("sw-ended").style.background = COLORS.ended;
let cursor = null, nextCursor = null;
// The principal whose sessions are shown (null: every session); ?user= in
// the page's URL opens it filtered. A principal is text a user chose: it
// only ever goes into textContent and value, never into markup.
let user = new URLSearchParams(location.search).get("user") || null;

function el(name, attrs, text) {
  const node = document.createElementNS(SVGNS, name);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  return node;
}
function setText(id, value) { document.getElementById(id).textContent = String(value); }
function duration(s) {
  if (s === null || s === undefined) return "\u2013";
  s = Math.max(0, s);
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function axes(svg, W, H, max) {
  svg.appendChild(el("line", {x1: 30, y1: H - 20, x2: W, y2: H - 20, stroke: "#ccd"}));
  svg.appendChild(el("text", {x: 2, y: 14}, String(max)));
  svg.appendChild(el("text", {x: 2, y: H - 22}, "0"));
}
// Drawn in the SVG's own pixels (its viewBox is its size: text is never
// stretched), with as many axis labels as fit side by side: on a phone,
// fewer labels, none overlapping.
function bars(svg, series, labels) {
  svg.replaceChildren();
  const W = Math.max(120, Math.round(svg.getBoundingClientRect().width) || 600);
  const H = 180;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const n = series[0].values.length;
  const max = Math.max(1, ...series.flatMap(s => s.values));
  axes(svg, W, H, max);
  const slot = (W - 34) / n, bw = Math.max(1, slot / series.length - 1);
  series.forEach((s, j) => s.values.forEach((v, i) => {
    const h = (H - 30) * v / max;
    const r = el("rect", {x: 34 + i * slot + j * (bw + 1), y: H - 20 - h, width: bw,
                          height: h, fill: s.color, "data-value": v});
    r.appendChild(el("title", {}, s.name + ": " + v + " (" + labels[i] + ")"));
    svg.appendChild(r);
  }));
  const texts = labels.map((label, i) => el("text", {x: 34 + i * slot, y: H - 6}, label));
  let widest = 0;
  for (const t of texts) {
    svg.appendChild(t);
    widest = Math.max(widest, t.getComputedTextLength());
    t.remove();
  }
  const step = Math.max(1, Math.ceil((widest + 8) / slot));
  for (let i = 0; i < n; i += step)
    if (34 + i * slot + widest <= W) svg.appendChild(texts[i]);
}
let lastSummary = null;
function charts(s) {
  lastSummary = s;
  const m = s.stats.minutes;
  const mlabels = m.created.map((_, i) => (i - m.created.length + 1) + " min");
  bars(document.getElementById("minutes"),
       [{name: "created", values: m.created, color: COLORS.created},
        {name: "ended", values: m.ended, color: COLORS.ended}], mlabels);
  const e = s.expiries, width = e.horizon / e.buckets.length / 60;
  bars(document.getElementById("expiries"),
       [{name: "ending", values: e.buckets, color: COLORS.expiry}],
       e.buckets.map((_, i) => (i * width) + "\u2013" + ((i + 1) * width) + " min"));
}
window.addEventListener("resize", () => { if (lastSummary) charts(lastSummary); });
async function getJSON(path) {
  const r = await fetch(BASE + path, {credentials: "same-origin", cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function refresh() {
  try {
    const s = await getJSON("api/summary");
    setText("live", s.live);
    setText("store", s.store);
    setText("created", s.stats.created);
    for (const c of ["timeout", "expired", "lifetime", "evicted"])
      setText("ended-" + c, s.stats.ended[c] || 0);
    setText("callback-errors", s.stats.callback_errors);
    setText("hook-failures", s.stats.hook_failures);
    charts(s);
    let page;
    if (user !== null) {
      page = await getJSON("api/sessions?limit=500&user=" + encodeURIComponent(user));
    } else try {
      page = await getJSON("api/sessions?limit=50" +
                           (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    } catch (err) {
      if (!cursor) throw err;
      cursor = null;  // refused (the server restarted, the scan is too old): page one
      page = await getJSON("api/sessions?limit=50");
    }
    nextCursor = page.next;
    const tbody = document.getElementById("rows");
    tbody.replaceChildren();
    for (const row of page.sessions) {
      const tr = document.createElement("tr");
      tr.dataset.id = row.id;
      const cells = [[row.uid, "uid"], [null, "user"], [duration(row.age), "num age"],
                     [duration(row.idle), "num idle"], [duration(row.left), "num left"]];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.className = cls;
        if (text !== null) td.textContent = text;
        else if (row.principal == null) td.textContent = "\u2013";
        else {
          const u = document.createElement("button");
          u.textContent = row.principal; u.title = "show this user's sessions";
          u.addEventListener("click", () => showUser(row.principal));
          td.appendChild(u);
        }
        tr.appendChild(td);
      }
      const td = document.createElement("td"), b = document.createElement("button");
      b.textContent = "End"; b.className = "end";
      b.addEventListener("click", () => end(row.id, b));
      td.appendChild(b); tr.appendChild(td); tbody.appendChild(tr);
    }
    setText("page-info", "(" + page.sessions.length + " shown of " +
            (user === null ? s.live : page.live + " of user \u201c" + user + "\u201d") + ")");
    document.getElementById("next").disabled = !nextCursor;
    document.getElementById("first").disabled = user !== null;
    document.getElementById("all-users").disabled = user === null;
    document.getElementById("end-user").disabled = user === null || page.sessions.length === 0;
    setText("error", "");
    document.body.dataset.loaded = "1";
  } catch (err) { setText("error", String(err)); }
}
async function end(id, button) {
  button.disabled = true;
  const r = await fetch(BASE + "api/expire", {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Lapse-CSRF": CSRF},
    body: JSON.stringify({id: id})});
  if (!r.ok) setText("error", "End failed: HTTP " + r.status);
  await refresh();
}
function showUser(name) {
  user = name || null; cursor = null;
  document.getElementById("user").value = name || "";
  refresh();
}
async function endUser(button) {
  const name = user;
  if (name === null || !confirm("End every session of \u201c" + name + "\u201d?")) return;
  button.disabled = true;
  const r = await fetch(BASE + "api/expire-user", {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Lapse-CSRF": CSRF},
    body: JSON.stringify({user: name})});
  if (!r.ok) setText("error", "End failed: HTTP " + r.status);
  await refresh();
}
document.getElementById("user").value = user || "";
document.getElementById("show-user").addEventListener("click", () =>
  showUser(document.getElementById("user").value.trim()));
document.getElementById("user").addEventListener("keydown", e => {
  if (e.key === "Enter") showUser(e.target.value.trim()); });
document.getElementById("all-users").addEventListener("click", () => showUser(""));
document.getElementById("end-user").addEventListener("click", e => endUser(e.target));
document.getElementById("first").addEventListener("click", () => { cursor = null; refresh(); });
document.getElementById("next").addEventListener("click", () => {
  if (nextCursor) { cursor = nextCursor; refresh(); } });
refresh();
setInterval(refresh, REFRESH);
