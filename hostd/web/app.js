// balloonlab dashboard: snapshots pushed by hostd over server-sent events, kept for the last
// WINDOW_S seconds, drawn on canvases. No libraries: everything ships with hostd (offline).
"use strict";
const WINDOW_S = 300;
const MiB = 1048576;
const SERIES = [  // per-vm series: snapshot field, label, colour, dashed
  ["memsz_bytes", "memsz", "#6c7a89", true],
  ["granted_bytes", "granted", "#88c0d0", false],
  ["alloc_target_bytes", "alloc target", "#a3be8c", true],
  ["balloon_bytes", "balloon", "#ebcb8b", false],
  ["active_bytes", "active", "#b48ead", false],
  ["swap_current_bytes", "swap", "#bf616a", false],
];
const THRESHOLDS = [["high", "#2e7d32"], ["soft", "#b59f00"], ["hard", "#e65100"], ["low", "#c62828"]];
const history = { host: [], vms: new Map() };  // host: [{t, free, high, ...}], vms: id → [{t, ...}]
const charts = new Map();  // vm id → canvas

function fmt(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return Math.abs(bytes) >= 10 * 1024 * MiB ? (bytes / 1024 / MiB).toFixed(1) + " GiB" : Math.round(bytes / MiB) + " MiB";
}

// a timeline sample record (hostd/timeline.py) in the shape `record` keeps
const SAMPLE_NAMES = { memsz_bytes: "memsz", granted_bytes: "granted", alloc_target_bytes: "alloc_target",
  balloon_bytes: "balloon", active_bytes: "active", swap_current_bytes: "swap" };

function recordSample(sample) {
  const t = sample.t_s, host = sample.host;
  history.host.push({ t, free: host.free, high: host.high, soft: host.soft, hard: host.hard, low: host.low });
  for (const [id, values] of Object.entries(sample.vms)) {
    if (!history.vms.has(id)) history.vms.set(id, []);
    const point = { t };
    for (const [field, name] of Object.entries(SAMPLE_NAMES)) point[field] = values[name];
    history.vms.get(id).push(point);
  }
}

function trim(points, now) {
  while (points.length && points[0].t < now - WINDOW_S) points.shift();
}

function record(snapshot) {
  const host = snapshot.host;
  const t = host.uptime_ms / 1000;
  history.host.push({ t, free: host.free_bytes, ...host.thresholds_bytes });
  trim(history.host, t);
  for (const vm of snapshot.vms) {
    if (!vm.alive) continue;
    if (!history.vms.has(vm.vm_id)) history.vms.set(vm.vm_id, []);
    const point = { t };
    for (const [field] of SERIES) point[field] = vm[field];
    history.vms.get(vm.vm_id).push(point);
  }
  for (const points of history.vms.values()) trim(points, t);
}

function draw(canvas, points, lines, now) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  // the time axis grows with the data up to WINDOW_S, so the first minute is not a sliver
  const span = Math.min(WINDOW_S, Math.max(60, points.length ? now - points[0].t : 0));
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const left = 56, right = 8, top = 8, bottom = 20;
  let low = 0, high = 1;
  for (const p of points) for (const [key] of lines) if (p[key] !== null && p[key] !== undefined) {
    low = Math.min(low, p[key]); high = Math.max(high, p[key]);
  }
  high *= 1.05;
  const x = (t) => left + (width - left - right) * (1 - (now - t) / span);
  const y = (v) => top + (height - top - bottom) * (1 - (v - low) / (high - low));
  g.font = "11px system-ui"; g.fillStyle = "#7b8794"; g.strokeStyle = "#2a3440"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = low + (high - low) * i / 4, yy = y(v);
    g.beginPath(); g.moveTo(left, yy); g.lineTo(width - right, yy); g.stroke();
    g.fillText(fmt(v), 2, yy + 4);
  }
  const step = span > 120 ? 60 : 15;
  for (let ago = 0; ago <= span; ago += step) {
    g.fillText(ago === 0 ? "now" : step === 60 ? `-${ago / 60}m` : `-${ago}s`, x(now - ago) - (ago ? 10 : 22), height - 4);
  }
  for (const [key, , colour, dashed] of lines) {
    g.strokeStyle = colour; g.lineWidth = 1.6; g.setLineDash(dashed ? [5, 4] : []);
    g.beginPath();
    let started = false;
    for (const p of points) {
      if (p[key] === null || p[key] === undefined) { started = false; continue; }
      if (started) g.lineTo(x(p.t), y(p[key])); else { g.moveTo(x(p.t), y(p[key])); started = true; }
    }
    g.stroke();
  }
  g.setLineDash([]);
}

function legend(lines) {
  const div = document.createElement("div");
  div.className = "legend";
  for (const [, label, colour] of lines) {
    const span = document.createElement("span");
    span.innerHTML = `<i style="background:${colour}"></i>`;
    span.append(label);
    div.append(span);
  }
  return div;
}

function vmPanel(id) {
  const section = document.createElement("section");
  section.className = "panel";
  section.dataset.vm = id;
  const title = document.createElement("h2");
  title.textContent = id;
  const detail = document.createElement("span");
  detail.className = "hint";
  title.append(" ", detail);
  const canvas = document.createElement("canvas");
  section.append(title, canvas, legend(SERIES));
  document.getElementById("vms").append(section);
  charts.set(id, { canvas, detail });
  return charts.get(id);
}

function render(snapshot) {
  const host = snapshot.host;
  const now = host.uptime_ms / 1000;
  const header = document.getElementById("host");
  header.innerHTML = "";
  const state = document.createElement("span");
  state.className = `state ${host.state}`;
  state.textContent = host.state;
  header.append(state, ` memory ${fmt(host.host_memory_bytes)} · free ${fmt(host.free_bytes)} · τ ${host.idle_tax_ratio}` +
    ` · sample ${host.sample_period_ms / 1000}s · balance ${host.balance_period_ms / 1000}s · ${host.vms_alive} vms`);
  const hostLines = [["free", "free", "#d8dee9", false], ...THRESHOLDS.map(([k, c]) => [k, k, c, true])];
  draw(document.getElementById("host-chart"), history.host, hostLines, now);
  for (const vm of snapshot.vms) {
    const chart = charts.get(vm.vm_id) || vmPanel(vm.vm_id);
    const touches = vm.workload && vm.workload.touches_per_s;
    chart.detail.textContent = `${vm.alive ? vm.agent_state : "lost"} · balloon ${fmt(vm.balloon_bytes)} of ` +
      `${fmt(vm.balloon_target_bytes)} · ${Math.round(100 * vm.active_ratio)} % active` +
      (touches !== undefined && touches !== null ? ` · ${Math.round(touches).toLocaleString()} touches/s` : "");
    draw(chart.canvas, history.vms.get(vm.vm_id) || [], SERIES, now);
  }
  const ready = [...history.vms.entries()].filter(([, points]) => points.length >= 2).map(([id]) => id).sort();
  document.body.dataset.vmsWithData = ready.join(",");
  document.body.dataset.ready = String(ready.length > 0 && ready.length === snapshot.vms.filter((v) => v.alive).length);
}

function addEvents(events) {
  const list = document.getElementById("events");
  for (const event of events) {
    const item = document.createElement("li");
    const what = document.createElement("b");
    what.textContent = `${(event.t_ms / 1000).toFixed(1)}s ${event.event}${event.vm ? " " + event.vm : ""}`;
    const rest = Object.entries(event).filter(([k]) => !["t_ms", "event", "vm", "ts", "session"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    item.append(what, " ", rest);
    list.prepend(item);
  }
  while (list.children.length > 200) list.lastChild.remove();
}

document.getElementById("window").textContent = WINDOW_S / 60;
const source = new EventSource("/events");
source.onmessage = (message) => {
  const update = JSON.parse(message.data);
  if (update.events) addEvents(update.events);
  if (update.history) {  // on (re)connect: the last minutes, so the charts start full
    history.host.length = 0;
    history.vms.clear();
    update.history.forEach(recordSample);
  }
  if (update.snapshot) {
    const last = history.host.length ? history.host[history.host.length - 1].t : -1;
    if (update.snapshot.host.uptime_ms / 1000 > last) record(update.snapshot);
    render(update.snapshot);
  }
};
source.onerror = () => { document.getElementById("host").textContent = "reconnecting to hostd…"; };
window.addEventListener("resize", () => { /* redrawn on the next update, within a second */ });
