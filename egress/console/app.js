// grabflow ops console. Plain JavaScript, no libraries, nothing fetched
// from elsewhere. Reads the API with the ops token kept for this tab:
//   GET /v1/ops/stream (SSE)   a summary every second, ops events as they happen
//   GET /v1/ops/dataflow       the operator graph's channels
//   GET /v1/orders/{id}        the inspector's timeline
//   POST …/redispatch, …/reassign, /v1/orders/{id}/cancel   the ops actions
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "grabflow.ops.token";
const RING = 900; // 15 minutes of 1 s summaries
const STATE_COLORS = {
  created: "#e8e8e8", notified: "#4fb3ff", delivering: "#f5a524", received: "#3ecf8e",
  overtime: "#ef5b5b", compensating: "#ff7eb6", closed: "#5d6b7e",
};
const LOST_COLORS = ["#ef5b5b", "#ff9f6b", "#ffd166", "#c77dff", "#8ecae6", "#adb5bd"];

const app = {
  token: null,
  source: null,
  ring: [],            // [{t, f, lost, states}]
  last: null,          // the last summary
  opsHistory: [],      // the last summaries' operators, with their times
  channels: [],        // [[src addr], [dst addr]]
  events: [],          // ops events seen, newest first
  order: null,         // the inspected order's id
  orderFetched: 0,
};

// ---------- sign-in ----------

function tokenFromFragment() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(m[1]).trim();
}

function showSignin(message) {
  if (app.source) app.source.close();
  app.source = null;
  $("console").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  setStatus("offline", "signed out");
}

async function signIn(token) {
  app.token = token;
  const r = await api("GET", "/v1/ops/metrics").catch((e) => ({ status: 0, body: String(e) }));
  if (r.status !== 200) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin(r.status === 401 || r.status === 403
      ? "That token is not an ops token this server accepts."
      : `The server did not answer (${r.status}).`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  $("console").hidden = false;
  $("signout").hidden = false;
  map.resize();
  loadChannels();
  connect();
}

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token").value.trim();
  if (t) signIn(t);
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  app.token = null;
  showSignin();
});

// ---------- the API ----------

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${app.token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { json = text; }
  return { status: r.status, body: json };
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").querySelector("span").textContent = text;
}

function connect() {
  if (app.source) app.source.close();
  setStatus("connecting", "connecting");
  const es = new EventSource(`/v1/ops/stream?access_token=${encodeURIComponent(app.token)}`);
  app.source = es;
  es.onopen = () => setStatus("live", "live");
  es.onerror = async () => {
    if (es.readyState === EventSource.CLOSED) {
      // Refused (401/403) or the server went away: tell which.
      const r = await api("GET", "/v1/ops/metrics").catch(() => ({ status: 0 }));
      if (r.status === 401 || r.status === 403) return showSignin("The token was refused; sign in again.");
      setStatus("offline", "reconnecting");
      setTimeout(() => app.token && connect(), 2000);
    } else {
      setStatus("connecting", "reconnecting");
    }
  };
  es.addEventListener("summary", (e) => onSummary(JSON.parse(e.data)));
  es.addEventListener("ops_event", (e) => onEvent(JSON.parse(e.data)));
}

// ---------- the summary ----------

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (digits === 0 || Number.isInteger(v)) return String(Math.round(v));
  return String(Math.round(v * 10 ** digits) / 10 ** digits);
}

function shortNum(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return `${fmt(v / 1e6, 1)}M`;
  if (a >= 1e4) return `${fmt(v / 1e3, 0)}k`;
  if (a >= 1e3) return `${fmt(v / 1e3, 1)}k`;
  return fmt(v, a < 10 ? 2 : 1);
}

function onSummary(s) {
  app.last = s;
  const f = s.figures;
  const shown = {
    riders_indexed: fmt(f.riders_indexed, 0),
    orders_open: fmt(f.orders_open, 0),
    pings_per_s: fmt(f.pings_per_s, 1),
    orders_per_s: fmt(f.orders_per_s, 1),
    order_offer_p50_ms: fmt(f.order_offer_p50_1m_ms, 0),
    order_offer_p99_ms: fmt(f.order_offer_p99_1m_ms, 0),
    grabs_won_per_s: fmt(f.grabs_won_per_s, 1),
    lag_ms: fmt(f.lag_ms, 0),
    merchants: fmt(f.merchants, 0),
    riders: fmt(f.riders, 0),
  };
  for (const el of document.querySelectorAll("[data-metric]")) {
    const v = shown[el.dataset.metric];
    if (v !== undefined && el.textContent !== v) el.textContent = v;
  }
  $("clock").textContent = clock(s.at).slice(0, 8);
  app.ring.push({ t: s.at, f, lost: s.grabs_lost_per_s, states: s.orders_by_state });
  while (app.ring.length > RING) app.ring.shift();
  charts.draw();
  map.update(s);
  graph.update(s);
  if (app.order && Date.now() - app.orderFetched > 2000) refreshOrder();
}

// ---------- ops events ----------

function onEvent(ev) {
  app.events.unshift(ev);
  if (app.events.length > 200) app.events.pop();
  const list = $("events");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  const li = document.createElement("li");
  li.dataset.order = ev.order_id;
  li.append(
    span("when", clock(ev.at).slice(0, 8)),
    span("kind", ev.kind.replace("_", " "), { kind: ev.kind }),
    span("ev-order", ev.order_id),
    span("ev-rider", ev.rider_id ? `rider ${ev.rider_id}` : ""),
  );
  li.addEventListener("click", () => inspect(ev.order_id));
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
  list.dataset.count = String(Number(list.dataset.count) + 1);
  if (ev.order_id === app.order) refreshOrder();
}

function span(cls, text, data) {
  const s = document.createElement("span");
  s.className = cls;
  s.textContent = text;
  for (const [k, v] of Object.entries(data || {})) s.dataset[k] = v;
  return s;
}

// ---------- charts ----------

const charts = {
  specs: [
    { id: "chart-pings", series: [{ name: "pings/s", color: "#4fb3ff", get: (p) => p.f.pings_per_s }] },
    { id: "chart-orders", series: [{ name: "orders/s", color: "#3ecf8e", get: (p) => p.f.orders_per_s }] },
    {
      id: "chart-latency", series: [
        { name: "p50", color: "#3ecf8e", get: (p) => p.f.order_offer_p50_ms },
        { name: "p99", color: "#f5a524", get: (p) => p.f.order_offer_p99_ms },
      ],
    },
    { id: "chart-rounds", series: [{ name: "rounds/order", color: "#b68cff", get: (p) => p.f.offer_rounds_per_order }] },
    { id: "chart-grabs", dynamic: "grabs" },
    { id: "chart-states", dynamic: "states" },
    { id: "chart-lag", series: [{ name: "lag ms", color: "#ff7eb6", get: (p) => p.f.lag_ms }] },
  ],

  seriesOf(spec) {
    if (spec.dynamic === "grabs") {
      const reasons = new Set();
      for (const p of app.ring) for (const k of Object.keys(p.lost || {})) reasons.add(k);
      return [{ name: "won", color: "#3ecf8e", get: (p) => p.f.grabs_won_per_s }].concat(
        [...reasons].sort().map((r, i) => ({
          name: `lost: ${r.replace("_", " ")}`, color: LOST_COLORS[i % LOST_COLORS.length],
          get: (p) => (p.lost && p.lost[r]) || 0,
        })));
    }
    if (spec.dynamic === "states") {
      const states = Object.keys(STATE_COLORS).filter((s) => s !== "closed");
      return states
        .filter((s) => app.ring.some((p) => (p.states || {})[s]))
        .map((s) => ({ name: s, color: STATE_COLORS[s], get: (p) => (p.states || {})[s] || 0 }));
    }
    return spec.series;
  },

  draw() {
    const now = app.ring.length ? app.ring[app.ring.length - 1].t : Date.now();
    const from = now - RING * 1000;
    $("chart-span").textContent = `${app.ring.length} s of summaries kept in this tab`;
    for (const spec of this.specs) {
      const canvas = $(spec.id);
      const series = this.seriesOf(spec);
      drawChart(canvas, series, from, now);
      canvas.dataset.samples = String(app.ring.length);
      const last = app.ring[app.ring.length - 1];
      canvas.dataset.last = JSON.stringify(series.map((s) => (last ? s.get(last) : null)));
    }
  },
};

function sizeCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return { ctx, w, h };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawChart(canvas, series, from, to) {
  const { ctx, w, h } = sizeCanvas(canvas);
  ctx.clearRect(0, 0, w, h);
  const left = 40, right = 6, top = 14, bottom = 16;
  const pw = w - left - right, ph = h - top - bottom;
  let max = 0;
  for (const s of series) for (const p of app.ring) {
    const v = s.get(p);
    if (v !== null && v !== undefined && v > max) max = v;
  }
  max = niceMax(max);
  ctx.font = "10px ui-monospace, monospace";
  ctx.strokeStyle = "#263040";
  ctx.fillStyle = "#8592a6";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 2; i++) {
    const y = top + ph - (ph * i) / 2;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + pw, y + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(shortNum((max * i) / 2), left - 4, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const m of [15, 10, 5, 0]) {
    const x = left + pw * (1 - (m * 60000) / (to - from));
    ctx.fillText(m ? `-${m}m` : "now", Math.min(Math.max(x, left + 10), left + pw - 10), top + ph + 3);
  }
  const X = (t) => left + ((t - from) / (to - from)) * pw;
  const Y = (v) => top + ph - (v / max) * ph;
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    for (const p of app.ring) {
      const v = s.get(p);
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(X(p.t), Y(v)); else ctx.moveTo(X(p.t), Y(v));
      pen = true;
    }
    ctx.stroke();
    const last = app.ring.length ? s.get(app.ring[app.ring.length - 1]) : null;
    ctx.fillStyle = s.color;
    ctx.textAlign = "right"; ctx.textBaseline = "top";
    ctx.fillText(`${s.name} ${last === null || last === undefined ? "–" : shortNum(last)}`,
      left + pw, i * 11);
  });
}

// ---------- the map ----------

const TILE_URL = document.querySelector('meta[name="grabflow-map-tiles"]').content;

function merc(lat, lon) {
  const phi = (Math.max(Math.min(lat, 85), -85) * Math.PI) / 180;
  return [(lon + 180) / 360, (1 - Math.log(Math.tan(Math.PI / 4 + phi / 2)) / Math.PI) / 2];
}

const map = {
  canvas: $("map"),
  view: null,        // {cx, cy, scale}: world units (0–1) to pixels
  marks: [],         // drawn marks for hovering: {x, y, r, text, order?}
  tiles: new Map(),
  drag: null,
  fitted: false,

  resize() { this.draw(); },

  update(s) {
    this.summary = s;
    if (!this.fitted && (s.riders.length || s.orders.length || s.merchants.length)) {
      this.fit();
      this.fitted = true;
    }
    this.draw();
  },

  fit() {
    const s = this.summary;
    if (!s) return;
    const pts = [];
    for (const r of s.riders) pts.push(merc(r[1], r[2]));
    for (const m of s.merchants) pts.push(merc(m[1], m[2]));
    for (const o of s.orders) pts.push(merc(o[2], o[3]));
    if (!pts.length) return;
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    const span = Math.max(x1 - x0, y1 - y0, 2e-5);
    this.view = { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, scale: 0.85 * Math.min(w / Math.max(x1 - x0, 2e-5), h / Math.max(y1 - y0, 2e-5), w / span * 4) };
    this.draw();
  },

  toScreen(lat, lon) {
    const [x, y] = merc(lat, lon);
    const v = this.view, w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    return [(x - v.cx) * v.scale + w / 2, (y - v.cy) * v.scale + h / 2];
  },

  drawTiles(ctx, w, h) {
    const v = this.view;
    const z = Math.max(0, Math.min(19, Math.round(Math.log2(v.scale / 256))));
    const n = 2 ** z, size = v.scale / n;
    const wx0 = v.cx - w / 2 / v.scale, wy0 = v.cy - h / 2 / v.scale;
    const tx0 = Math.floor(wx0 * n), ty0 = Math.floor(wy0 * n);
    const tx1 = Math.floor((wx0 + w / v.scale) * n), ty1 = Math.floor((wy0 + h / v.scale) * n);
    ctx.globalAlpha = 0.55;
    let drawn = 0;
    for (let tx = tx0; tx <= tx1; tx++) for (let ty = ty0; ty <= ty1; ty++) {
      if (ty < 0 || ty >= n) continue;
      const x = ((tx + n) % n);
      const url = TILE_URL.replace("{z}", z).replace("{x}", x).replace("{y}", ty);
      let img = this.tiles.get(url);
      if (!img) {
        img = new Image();
        img.onload = () => this.draw();
        img.src = url;
        this.tiles.set(url, img);
        if (this.tiles.size > 400) this.tiles.delete(this.tiles.keys().next().value);
      }
      if (img.complete && img.naturalWidth) {
        ctx.drawImage(img, (tx / n - v.cx) * v.scale + w / 2, (ty / n - v.cy) * v.scale + h / 2, size + 0.5, size + 0.5);
        drawn++;
      }
    }
    ctx.globalAlpha = 1;
    this.canvas.dataset.tiles = String(drawn);
  },

  draw() {
    const { ctx, w, h } = sizeCanvas(this.canvas);
    ctx.fillStyle = "#0b1016";
    ctx.fillRect(0, 0, w, h);
    const s = this.summary;
    this.marks = [];
    if (!s || !this.view) {
      ctx.fillStyle = "#8592a6";
      ctx.font = "12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("waiting for riders, merchants or orders…", w / 2, h / 2);
      return;
    }
    if (TILE_URL) this.drawTiles(ctx, w, h);
    this.drawScale(ctx, w, h);
    // Cells: green where riders outnumber waiting orders, red where orders wait for riders.
    for (const c of s.cells) {
      const balance = c.supply - c.demand;
      const a = Math.min(0.55, 0.12 + 0.08 * Math.abs(balance));
      ctx.fillStyle = balance >= 0 ? `rgba(62,207,142,${c.demand ? a : a * 0.6})` : `rgba(239,91,91,${a})`;
      ctx.strokeStyle = "rgba(133,146,166,0.25)";
      ctx.beginPath();
      c.boundary.forEach(([lat, lon], i) => {
        const [x, y] = this.toScreen(lat, lon);
        if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      });
      ctx.closePath();
      ctx.fill();
      ctx.stroke();
    }
    const sel = app.order;
    // Merchants with waiting orders.
    for (const [id, lat, lon, n] of s.merchants) {
      const [x, y] = this.toScreen(lat, lon);
      ctx.fillStyle = "#b68cff";
      ctx.fillRect(x - 4, y - 4, 8, 8);
      this.marks.push({ x, y, r: 6, text: `merchant ${id} · ${n} waiting` });
    }
    // Riders: available (no order) and busy (carrying).
    let riders = 0;
    const riderAt = new Map();
    for (const [id, lat, lon, load] of s.riders) {
      const [x, y] = this.toScreen(lat, lon);
      riderAt.set(id, [x, y]);
      if (x < -10 || y < -10 || x > w + 10 || y > h + 10) continue;
      ctx.fillStyle = load > 0 ? "#f5a524" : "#3ecf8e";
      ctx.beginPath(); ctx.arc(x, y, 3.2, 0, 2 * Math.PI); ctx.fill();
      riders++;
      this.marks.push({ x, y, r: 5, text: `rider ${id} · ${load > 0 ? `busy, ${load} order${load > 1 ? "s" : ""}` : "available"}` });
    }
    // Orders: rings by state, spread around their merchant or rider.
    let orders = 0, selected = null;
    for (const [id, state, lat, lon] of s.orders) {
      let [x, y] = this.toScreen(lat, lon);
      const k = hash(id);
      x += Math.cos(k) * 7; y += Math.sin(k) * 7;
      ctx.strokeStyle = STATE_COLORS[state] || "#fff";
      ctx.lineWidth = 1.6;
      ctx.beginPath(); ctx.arc(x, y, 3.6, 0, 2 * Math.PI); ctx.stroke();
      orders++;
      this.marks.push({ x, y, r: 6, text: `order ${id} · ${state}`, order: id });
      if (id === sel) selected = [x, y];
    }
    if (sel) this.drawSelection(ctx, selected, riderAt);
    this.canvas.dataset.riders = String(riders);
    this.canvas.dataset.orders = String(orders);
    this.canvas.dataset.merchants = String(s.merchants.length);
    this.canvas.dataset.cells = String(s.cells.length);
    $("map-note").textContent = `${s.riders.length} riders · ${s.orders.length} open orders · ${s.cells.length} cells` +
      (s.truncated ? " · truncated" : "") + (TILE_URL ? "" : " · no tiles");
  },

  drawSelection(ctx, at, riderAt) {
    const o = app.orderView;
    const mark = (p, label, dy) => {
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(p[0], p[1], 10, 0, 2 * Math.PI); ctx.stroke();
      ctx.font = "11px ui-monospace, monospace"; ctx.textAlign = "left";
      const w = ctx.measureText(label).width;
      ctx.fillStyle = "rgba(10,14,20,.8)";
      ctx.fillRect(p[0] + 12, p[1] + dy - 9, w + 6, 13);
      ctx.fillStyle = "#fff";
      ctx.fillText(label, p[0] + 15, p[1] + dy + 1);
    };
    if (at) mark(at, `order ${app.order}`, -8);
    if (o && o.rider_id && riderAt.has(o.rider_id)) mark(riderAt.get(o.rider_id), `rider ${o.rider_id}`, 10);
    if (o && this.summary) {
      const m = this.summary.merchants.find((x) => x[0] === o.merchant_id);
      if (m) mark(this.toScreen(m[1], m[2]), `merchant ${o.merchant_id}`, 24);
    }
  },

  drawScale(ctx, w, h) {
    // Metres per pixel at the view's centre.
    const v = this.view;
    const lat = (Math.atan(Math.sinh(Math.PI * (1 - 2 * v.cy))) * 180) / Math.PI;
    const mpp = (40075016.686 * Math.cos((lat * Math.PI) / 180)) / v.scale;
    let m = niceMax(mpp * 100);
    if (m / mpp > 160) m /= 2;
    const px = m / mpp;
    ctx.strokeStyle = "#8592a6"; ctx.fillStyle = "#8592a6"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(w - 12 - px, h - 12); ctx.lineTo(w - 12, h - 12); ctx.stroke();
    ctx.font = "10px ui-monospace, monospace"; ctx.textAlign = "right";
    ctx.fillText(m >= 1000 ? `${m / 1000} km` : `${m} m`, w - 12, h - 16);
  },

  hover(ev) {
    const r = this.canvas.getBoundingClientRect();
    const x = ev.clientX - r.left, y = ev.clientY - r.top;
    let best = null, bestD = Infinity;
    for (const m of this.marks) {
      const d = Math.hypot(m.x - x, m.y - y);
      if (d <= m.r + 2 && d < bestD) { best = m; bestD = d; }
    }
    const tip = $("tip");
    if (!best) { tip.hidden = true; this.canvas.style.cursor = ""; return null; }
    tip.textContent = best.text;
    tip.style.left = `${x + 12}px`;
    tip.style.top = `${y + 8}px`;
    tip.hidden = false;
    this.canvas.style.cursor = best.order ? "pointer" : "";
    return best;
  },
};

function hash(s) {
  let h = 0;
  for (let i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) | 0;
  return (h % 628) / 100;
}

map.canvas.addEventListener("mousedown", (e) => {
  if (!map.view) return;
  map.drag = { x: e.clientX, y: e.clientY, cx: map.view.cx, cy: map.view.cy, moved: false };
  map.canvas.classList.add("dragging");
});
window.addEventListener("mousemove", (e) => {
  if (map.drag) {
    const dx = e.clientX - map.drag.x, dy = e.clientY - map.drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) map.drag.moved = true;
    map.view.cx = map.drag.cx - dx / map.view.scale;
    map.view.cy = map.drag.cy - dy / map.view.scale;
    map.draw();
  } else if (e.target === map.canvas) {
    map.hover(e);
  }
});
window.addEventListener("mouseup", (e) => {
  if (!map.drag) return;
  const moved = map.drag.moved;
  map.drag = null;
  map.canvas.classList.remove("dragging");
  if (!moved && e.target === map.canvas) {
    const m = map.hover(e);
    if (m && m.order) inspect(m.order);
  }
});
map.canvas.addEventListener("mouseleave", () => { $("tip").hidden = true; });
map.canvas.addEventListener("wheel", (e) => {
  if (!map.view) return;
  e.preventDefault();
  const r = map.canvas.getBoundingClientRect();
  const px = e.clientX - r.left - r.width / 2, py = e.clientY - r.top - r.height / 2;
  const k = Math.exp(-e.deltaY * 0.0015);
  const v = map.view;
  const wx = v.cx + px / v.scale, wy = v.cy + py / v.scale;
  v.scale = Math.min(Math.max(v.scale * k, 256), 2 ** 30);
  v.cx = wx - px / v.scale;
  v.cy = wy - py / v.scale;
  map.draw();
}, { passive: false });
$("fit").addEventListener("click", () => map.fit());
window.addEventListener("resize", () => { map.draw(); charts.draw(); graph.draw(); });

// ---------- the dataflow graph ----------

async function loadChannels() {
  const r = await api("GET", "/v1/ops/dataflow").catch(() => null);
  if (r && r.status === 200 && Array.isArray(r.body.channels)) {
    app.channels = r.body.channels;
    graph.draw();
  }
  if (!app.channels.length && app.token) setTimeout(loadChannels, 3000);
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

const graph = {
  rates: new Map(),

  update(s) {
    // Rates over the last 5 summaries: timely's logging arrives in
    // batches, so a one-second difference comes in bursts.
    const hist = (app.opsHistory = app.opsHistory || []);
    hist.push({ at: s.at, ops: s.operators });
    while (hist.length > 6) hist.shift();
    const prev = hist.length > 1 ? hist[0] : null;
    this.rates = new Map();
    if (prev) {
      const dt = (s.at - prev.at) / 1000;
      const before = new Map(prev.ops.map((o) => [o.addr.join("."), o]));
      for (const o of s.operators) {
        const b = before.get(o.addr.join("."));
        if (!b || dt <= 0) continue;
        this.rates.set(o.addr.join("."), {
          in: (o.records_in - b.records_in) / dt,
          out: (o.records_out - b.records_out) / dt,
          busy: (o.busy_us - b.busy_us) / (dt * 1e6),
        });
      }
    }
    this.ops = s.operators;
    this.lag = s.figures.lag_ms;
    this.draw();
  },

  draw() {
    const svg = $("graph");
    const ops = (this.ops || []).filter((o) => o.addr.length > 1);
    svg.replaceChildren();
    svg.dataset.operators = String(ops.length);
    $("graph-note").textContent = ops.length
      ? `${ops.length} operators · per second over the last 5 s, summed over workers · frontier lag ${fmt(this.lag, 0)} ms`
      : "waiting for the dataflow's figures…";
    if (!ops.length) return;
    const key = (a) => a.join(".");
    const nodes = new Map(ops.map((o) => [key(o.addr), o]));
    const edges = app.channels
      .map(([a, b]) => [key(a), key(b)])
      .filter(([a, b]) => nodes.has(a) && nodes.has(b) && a !== b);
    // Layers: the longest path from a source.
    const layer = new Map([...nodes.keys()].map((k) => [k, 0]));
    for (let i = 0; i < nodes.size; i++) {
      let changed = false;
      for (const [a, b] of edges) {
        if (layer.get(b) < layer.get(a) + 1) { layer.set(b, layer.get(a) + 1); changed = true; }
      }
      if (!changed) break;
    }
    const columns = [];
    for (const [k, l] of layer) (columns[l] = columns[l] || []).push(k);
    const W = 138, H = 66, GX = 22, GY = 14;
    const rows = Math.max(...columns.map((c) => (c ? c.length : 0)));
    const width = columns.length * (W + GX) - GX + 20, height = rows * (H + GY) - GY + 20;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMin meet");
    svg.style.height = `${Math.ceil(height * Math.min(1.2, svg.clientWidth / width))}px`;
    const pos = new Map();
    columns.forEach((col, ci) => (col || []).forEach((k, ri) => {
      const off = ((rows - col.length) * (H + GY)) / 2;
      pos.set(k, [10 + ci * (W + GX), 10 + off + ri * (H + GY)]);
    }));
    for (const [a, b] of edges) {
      const [ax, ay] = pos.get(a), [bx, by] = pos.get(b);
      const x1 = ax + W, y1 = ay + H / 2, x2 = bx, y2 = by + H / 2, mx = (x1 + x2) / 2;
      const hot = (this.rates.get(a) || {}).out > 0;
      el("path", { class: hot ? "edge hot" : "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }, svg);
    }
    for (const [k, o] of nodes) {
      const [x, y] = pos.get(k);
      const r = this.rates.get(k) || { in: 0, out: 0, busy: 0 };
      const held = Object.values(o.state || {}).reduce((a, b) => a + b, 0);
      const stateful = Object.keys(o.state || {}).length > 0;
      const g = el("g", {
        class: `node${stateful ? " stateful" : ""}${r.busy > 0.05 ? " busy" : ""}`,
        transform: `translate(${x},${y})`, "data-name": o.name,
      }, svg);
      el("rect", { width: W, height: H, rx: 6 }, g);
      const t = (cls, yy, text) => { const e = el("text", { class: cls, x: 8, y: yy }, g); e.textContent = text; };
      t("name", 16, `${o.name} [${o.addr.slice(1).join(".")}]`);
      t("", 31, `in ${shortNum(r.in)} out ${shortNum(r.out)} /s`);
      t("dim", 45, `busy ${fmt(r.busy * 100, 1)}% · ${shortNum(o.busy_us / 1e6)} s`);
      t("dim", 59, stateful ? `state ${shortNum(held)}` : "stateless");
      const title = el("title", {}, g);
      title.textContent = `${o.name} ${JSON.stringify(o.addr)}\nrecords in ${o.records_in}, out ${o.records_out}\n` +
        `scheduled ${o.schedules} times, busy ${o.busy_us} µs\n` +
        (stateful ? Object.entries(o.state).map(([p, n]) => `${p}: ${n}`).join("\n") : "no state");
    }
  },
};

// ---------- the order inspector ----------

$("find").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("order-id").value.trim();
  if (id) inspect(id);
});

async function inspect(id) {
  app.order = id;
  app.orderView = null;
  $("order-id").value = id;
  $("action-result").textContent = "";
  delete $("action-result").dataset.ok;
  await refreshOrder();
  map.draw();
}

async function refreshOrder() {
  const id = app.order;
  if (!id) return;
  app.orderFetched = Date.now();
  const [r, t] = await Promise.all([
    api("GET", `/v1/orders/${encodeURIComponent(id)}`).catch(() => ({ status: 0 })),
    api("GET", `/v1/ops/orders/${encodeURIComponent(id)}/trail`).catch(() => ({ status: 0 })),
  ]);
  if (id !== app.order) return;
  if (r.status !== 200) {
    $("order").hidden = true;
    $("order-error").textContent = r.status === 404 ? `No order ${id}.` : `Could not read ${id} (${r.status}).`;
    return;
  }
  $("order-error").textContent = "";
  renderOrder(r.body, t.status === 200 ? t.body : null);
}

function renderOrder(o, trail) {
  app.orderView = o;
  const box = $("order");
  box.hidden = false;
  box.dataset.orderId = o.order_id;
  box.dataset.state = o.state;
  $("order-name").textContent = o.order_id;
  $("order-state").textContent = o.state;
  $("order-state").dataset.state = o.state;
  $("order-merchant").textContent = o.merchant_id;
  $("order-rider").textContent = o.rider_id || "none";
  const list = $("timeline");
  const t0 = o.history.length ? o.history[0].at : 0;
  const when = (at) => span("when", `${clock(at)} +${fmtDuration(at - t0)}`);
  const rounds = (trail && trail.rounds) || [];
  // Transitions, with each offer round's riders under its "offered", and
  // the grab race's attempts before the transition they led to.
  const entries = o.history.map((h) => {
    const li = document.createElement("li");
    li.dataset.kind = "transition";
    li.dataset.state = h.state;
    li.dataset.reason = h.reason;
    li.append(when(h.at), span("what", h.state), span("why", h.reason.replaceAll("_", " ")));
    if (h.reason === "offered") {
      const round = rounds.find((r) => r.at === h.at);
      if (round) {
        const shown = round.offers.slice(0, 8).map((x) => `${x.rider_id} ${x.distance_m} m`).join(", ");
        const more = round.offers.length > 8 ? ` and ${round.offers.length - 8} more` : "";
        const d = document.createElement("div");
        d.className = "detail";
        d.dataset.riders = String(round.offers.length);
        d.textContent = `round ${round.round} to ${round.offers.length} rider${round.offers.length > 1 ? "s" : ""}: ${shown}${more}` +
          ` · expires ${clock(round.expires_at).slice(0, 8)}`;
        li.append(d);
      }
    }
    return { at: h.at, rank: 1, li };
  });
  for (const g of (trail && trail.grabs) || []) {
    const li = document.createElement("li");
    li.dataset.kind = "grab";
    li.dataset.result = g.result;
    li.dataset.rider = g.rider_id;
    li.append(when(g.at), span(g.result === "won" ? "what" : "why", `grab by ${g.rider_id}`),
      span(g.result === "won" ? "won" : "lost", g.result === "won" ? "won" : `lost: ${(g.reason || "").replaceAll("_", " ")}`));
    entries.push({ at: g.at, rank: 0, li });
  }
  entries.sort((a, b) => a.at - b.at || a.rank - b.rank);
  const items = entries.map((e) => e.li);
  if (trail && !trail.recorded) {
    const li = document.createElement("li");
    li.dataset.kind = "note";
    li.className = "note";
    li.textContent = "offer rounds and grab races are kept only while a console is open";
    items.push(li);
  }
  list.replaceChildren(...items);
  list.dataset.count = String(entries.length);
  const open = !["closed", "received", "compensating"].includes(o.state);
  for (const b of document.querySelectorAll(".actions button")) b.disabled = !open;
  $("act-cancel").disabled = !["created", "notified"].includes(o.state);
}

function clock(ms) {
  const d = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

function fmtDuration(ms) {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${fmt(ms / 1000, 1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

for (const b of document.querySelectorAll(".actions button")) {
  b.addEventListener("click", () => act(b.dataset.action));
}

async function act(action) {
  const id = app.order;
  if (!id) return;
  const out = $("action-result");
  const path = {
    redispatch: `/v1/ops/orders/${encodeURIComponent(id)}/redispatch`,
    reassign: `/v1/ops/orders/${encodeURIComponent(id)}/reassign`,
    cancel: `/v1/orders/${encodeURIComponent(id)}/cancel`,
  }[action];
  const body = action === "reassign" ? { rider_id: $("reassign-rider").value.trim() }
    : action === "cancel" ? { reason: "cancelled from the ops console" } : {};
  out.dataset.ok = "";
  out.textContent = `${action}…`;
  const r = await api("POST", path, body).catch((e) => ({ status: 0, body: String(e) }));
  const ok = r.status >= 200 && r.status < 300;
  out.dataset.ok = String(ok);
  out.dataset.status = String(r.status);
  out.textContent = ok
    ? `${action}: accepted (${r.status}), offset ${r.body.offset}`
    : `${action}: ${r.status} ${r.body && r.body.error ? `${r.body.error.code}: ${r.body.error.message}` : JSON.stringify(r.body)}`;
  if (!ok) return;
  // Follow the order until the action shows in its history (or 5 s pass).
  const before = app.orderView ? app.orderView.history.length : 0;
  const until = Date.now() + 5000;
  while (Date.now() < until && id === app.order) {
    await new Promise((res) => setTimeout(res, 150));
    await refreshOrder();
    if (app.orderView && app.orderView.history.length > before) break;
  }
}

// ---------- start ----------

(function start() {
  const t = tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
  $("events").replaceChildren(Object.assign(document.createElement("li"), { className: "empty", textContent: "none yet" }));
  if (t) signIn(t); else showSignin();
})();
