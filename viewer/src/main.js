// nasar-zarr viewer: browse a NA-SAR Zarr v3 cube straight from its store (HTTP or S3).
//
// URL parameters: ?store=URL (relative or absolute; default "nasar.zarr", a sibling
// of the page) and ?sample=KEY (default: the first sample). Contract held by the
// tests: when a sample is shown, document.title is "nasar-zarr · <key>" and #status
// reads "ready". window.__nasar exposes what the page computed.

import * as zarr from "zarrita";
import { paint, paintBar } from "./colormap.js";
import {
  DEM_RANGE,
  demRelief,
  RTC_RANGES,
  rescaled,
  rtcNormalized,
  SLOPE_RANGE,
} from "./normalize.js";

const $ = (id) => document.getElementById(id);
const EAGER_STRING_LIMIT = 100000; // above this many samples, string columns load on demand

const state = {
  store: null,
  root: null,
  n: 0,
  arrays: {}, // name -> zarr.Array
  coords: {}, // name -> decoded 1-D values (Array or TypedArray)
  keys: null, // sample keys
  keyIndex: null, // Map key -> index
  labels: {}, // dim -> labels (view, time, pol, component)
  filtered: [], // indices passing the filter
  current: -1,
  lonName: null,
  latName: null,
  qualityName: null,
  crossName: null,
  requests: 0,
};

// Exposed for tests and for the curious (browser console).
window.__nasar = {
  state,
  channels: {}, // name -> Float32Array of what the page computed (rtc/VIEW/TIME/POL, dem, ...)
  sample: null,
  index: -1,
  requests: 0,
  /** A computed channel's float32 bytes (little-endian) as base64: exact, compact. */
  base64(name) {
    const a = this.channels[name];
    const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    let text = "";
    for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
    return btoa(text);
  },
};

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : text === "ready" ? "ready" : "busy";
}

function at(data, i) {
  return typeof data.get === "function" ? data.get(i) : data[i];
}

// ---------- store ----------

function countingFetch(request) {
  state.requests += 1;
  window.__nasar.requests = state.requests;
  return fetch(request);
}

async function openStore(url) {
  const base = new zarr.FetchStore(url, { fetch: countingFetch });
  const store = await zarr.withConsolidatedMetadata(base, { format: "v3" }).catch((err) => {
    if (err instanceof zarr.NotFoundError || err instanceof zarr.InvalidMetadataError) {
      throw new Error(`no nasar-zarr cube at ${url} (${err.message}); check ?store=`);
    }
    throw err;
  });
  const root = await zarr.open.v3(store, { kind: "group" });
  state.store = store;
  state.root = root;
  const names = store
    .contents()
    .filter((c) => c.kind === "array")
    .map((c) => c.path.replace(/^\//, ""));
  for (const name of names) {
    state.arrays[name] = await zarr.open.v3(root.resolve(name), { kind: "array" });
  }
  if (!state.arrays.sample) throw new Error(`${url}: no 'sample' coordinate; is this a nasar-zarr cube?`);
  state.n = state.arrays.sample.shape[0];
}

function dimsOf(arr) {
  return arr.dimensionNames || arr.attrs?._ARRAY_DIMENSIONS || [];
}

function isSampleCoord(name) {
  const arr = state.arrays[name];
  return arr.shape.length === 1 && arr.shape[0] === state.n && dimsOf(arr)[0] === "sample";
}

async function readAll(name) {
  if (state.coords[name]) return state.coords[name];
  const chunk = await zarr.get(state.arrays[name]);
  state.coords[name] = chunk.data;
  return chunk.data;
}

function findCoord(pred) {
  return Object.keys(state.arrays).find((name) => isSampleCoord(name) && pred(name, state.arrays[name]));
}

async function loadCoordinates() {
  const dims = ["view", "time", "pol", "component"].filter((dim) => state.arrays[dim]);
  const eager = Object.keys(state.arrays).filter(
    (name) => isSampleCoord(name) && (state.arrays[name].dtype !== "string" || name === "sample" || state.n <= EAGER_STRING_LIMIT),
  );
  await Promise.all([...dims, ...eager].map(readAll)); // one small object each, in parallel
  for (const dim of dims) state.labels[dim] = Array.from(state.coords[dim], String);
  state.keys = state.coords.sample;
  state.keyIndex = new Map(Array.from(state.keys, (k, i) => [k, i]));
  const numeric = (a) => !["string", "bool"].includes(a.dtype);
  state.lonName = findCoord((n, a) => numeric(a) && (a.attrs.standard_name === "longitude" || /(^|_)lon(gitude)?$/i.test(n)));
  state.latName = findCoord((n, a) => numeric(a) && (a.attrs.standard_name === "latitude" || /(^|_)lat(itude)?$/i.test(n)));
  state.qualityName = findCoord((n, a) => numeric(a) && /quality/i.test(n));
  state.crossName = findCoord((n) => /cross_pol_avail/i.test(n));
}

// ---------- sample ----------

async function readSample(i) {
  const get = (name, rest) => zarr.get(state.arrays[name], [i, ...Array(rest).fill(null)]);
  const names = { rtc: 5, rtc_present: 3, inc_angle: 3, ifg: 4, coh: 3, dem: 2, slope_deg: 2 };
  const entries = await Promise.all(
    Object.entries(names)
      .filter(([name]) => state.arrays[name])
      .map(async ([name, rest]) => [name, await get(name, rest)]),
  );
  return Object.fromEntries(entries);
}

function plane(chunk, index) {
  // index: the indices of the dims before (y, x) in one sample's C-ordered chunk
  if (chunk.shape.length !== index.length + 2) throw new Error(`bad plane index ${index} for shape ${chunk.shape}`);
  const [h, w] = chunk.shape.slice(-2);
  let offset = 0;
  index.forEach((k, d) => (offset += k * chunk.stride[d]));
  return { values: chunk.data.subarray(offset, offset + h * w), h, w };
}

function finiteRange(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return lo <= hi ? [lo, hi] : [0, 1];
}

function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(2) : String(Number(v.toPrecision(3)));
}

function panel(container, { title, values, h, w, vmin, vmax, cmap, units, missing = false }) {
  const fig = document.createElement("figure");
  fig.className = "panel" + (missing ? " missing" : "");
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  const body = document.createElement("div");
  body.className = "body";
  const img = document.createElement("canvas");
  img.className = "img";
  paint(img, values, w, h, vmin, vmax, cmap);
  const bar = document.createElement("div");
  bar.className = "bar";
  const barImg = document.createElement("canvas");
  paintBar(barImg, cmap);
  const top = document.createElement("span");
  top.textContent = fmt(vmax);
  const bottom = document.createElement("span");
  bottom.textContent = fmt(vmin);
  const unit = document.createElement("span");
  unit.className = "units";
  unit.textContent = units;
  bar.append(top, barImg, bottom);
  body.append(img, bar);
  fig.append(cap, body, unit);
  if (missing) {
    const tag = document.createElement("div");
    tag.className = "tag";
    tag.textContent = "missing";
    fig.append(tag);
  }
  container.append(fig);
}

function render(i, data) {
  const grid = $("panels");
  grid.replaceChildren();
  const channels = {};
  const L = state.labels;
  const views = L.view || ["0", "1"];
  const times = L.time || ["prime", "secondary"];
  const pols = L.pol || ["co", "cross"];
  for (let v = 0; v < views.length; v++) {
    const row = document.createElement("section");
    row.className = "row";
    const head = document.createElement("h3");
    head.textContent = `view ${views[v]}`;
    row.append(head);
    if (data.rtc) {
      for (let t = 0; t < times.length; t++) {
        for (let p = 0; p < pols.length; p++) {
          const { values, h, w } = plane(data.rtc, [v, t, p]);
          const flags = data.rtc_present;
          const present = flags ? Boolean(at(flags.data, v * flags.stride[0] + t * flags.stride[1] + p * flags.stride[2])) : true;
          const norm = rtcNormalized(values, RTC_RANGES[pols[p]] || [0, 1], present);
          channels[`rtc/${views[v]}/${times[t]}/${pols[p]}`] = norm;
          panel(row, { title: `RTC ${times[t]} ${pols[p]}`, values: norm, h, w, vmin: 0, vmax: 1, cmap: "gray", units: "normalized", missing: !present });
        }
      }
    }
    if (data.inc_angle) {
      const { values, h, w } = plane(data.inc_angle, [v]);
      const [lo, hi] = finiteRange(values);
      panel(row, { title: "incidence angle", values, h, w, vmin: lo, vmax: hi, cmap: "viridis", units: "degree" });
    }
    if (data.ifg) {
      const c = plane(data.ifg, [v, 0]);
      const s = plane(data.ifg, [v, 1]);
      const phase = new Float32Array(c.values.length);
      for (let k = 0; k < phase.length; k++) phase[k] = Math.atan2(s.values[k], c.values[k]);
      channels[`phase/${views[v]}`] = phase;
      panel(row, { title: "wrapped phase", values: phase, h: c.h, w: c.w, vmin: -Math.PI, vmax: Math.PI, cmap: "phase", units: "rad" });
    }
    if (data.coh) {
      const { values, h, w } = plane(data.coh, [v]);
      panel(row, { title: "coherence", values, h, w, vmin: 0, vmax: 1, cmap: "magma", units: "1" });
    }
    grid.append(row);
  }
  const row = document.createElement("section");
  row.className = "row";
  const head = document.createElement("h3");
  head.textContent = "terrain";
  row.append(head);
  if (data.dem) {
    const { values, h, w } = plane(data.dem, []);
    const [lo, hi] = finiteRange(values);
    panel(row, { title: "DEM", values, h, w, vmin: lo, vmax: hi, cmap: "terrain", units: "m" });
    channels.dem = rescaled(values, DEM_RANGE);
    channels.dem_relief = demRelief(values);
    panel(row, { title: "DEM relief (p5-p95)", values: channels.dem_relief, h, w, vmin: 0, vmax: 1, cmap: "terrain", units: "normalized" });
  }
  if (data.slope_deg) {
    const { values, h, w } = plane(data.slope_deg, []);
    channels.slope = rescaled(values, SLOPE_RANGE);
    panel(row, { title: "slope", values, h, w, vmin: SLOPE_RANGE[0], vmax: SLOPE_RANGE[1], cmap: "viridis", units: "degree" });
  }
  grid.append(row);
  return channels;
}

function cellText(name, i) {
  const arr = state.arrays[name];
  const data = state.coords[name];
  if (!data) return null;
  const v = at(data, i);
  if (typeof v === "bigint") {
    const m = /^(micro|milli|nano)?seconds since 1970-01-01/.exec(arr.attrs.units || "");
    if (m) {
      if (v === -(2n ** 63n)) return "NaT";
      const ms = { micro: 1e-3, milli: 1, nano: 1e-6, undefined: 1000 }[m[1]];
      return new Date(Number(v) * ms).toISOString().replace(".000Z", "Z");
    }
    return v.toString();
  }
  if (typeof v === "number" && !Number.isInteger(v)) return String(Number(v.toPrecision(8)));
  return String(v);
}

function renderMetadata(i) {
  const table = $("metadata");
  table.replaceChildren();
  const names = Object.keys(state.arrays).filter((n) => isSampleCoord(n)).sort();
  for (const name of names) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = name;
    const td = document.createElement("td");
    const text = cellText(name, i);
    if (text === null) {
      const button = document.createElement("button");
      button.textContent = `load (${state.n.toLocaleString()} strings)`;
      button.onclick = async () => {
        button.disabled = true;
        await readAll(name);
        td.textContent = cellText(name, state.current);
      };
      td.append(button);
    } else {
      td.textContent = text;
    }
    tr.append(th, td);
    table.append(tr);
  }
}

// ---------- chooser, filter, map ----------

function applyFilter() {
  const minQ = Number($("min-quality").value);
  const needCross = $("need-cross").checked;
  const q = state.qualityName && state.coords[state.qualityName];
  const cross = state.crossName && state.coords[state.crossName];
  const status = state.coords.status;
  state.filtered = [];
  for (let i = 0; i < state.n; i++) {
    if (q && minQ > 0 && !(at(q, i) >= minQ)) continue;
    if (cross && needCross && !at(cross, i)) continue;
    if ($("written-only").checked && status && at(status, i) !== 1) continue;
    state.filtered.push(i);
  }
  $("match-count").textContent = `${state.filtered.length.toLocaleString()} of ${state.n.toLocaleString()} samples`;
  $("min-quality-value").textContent = minQ.toFixed(2);
  drawMap();
}

function step(delta) {
  const list = state.filtered;
  if (!list.length) return;
  let k = list.findIndex((i) => i >= state.current);
  if (k < 0) k = list.length; // nothing at or after the current one: wrap around
  if (delta > 0) k = list[k] === state.current ? k + 1 : k;
  else k -= 1;
  show(list[(k + list.length) % list.length]);
}

function random() {
  const list = state.filtered;
  if (list.length) show(list[Math.floor(Math.random() * list.length)]);
}

function mapFrame() {
  const lon = state.coords[state.lonName];
  const lat = state.coords[state.latName];
  const canvas = $("map");
  let [x0, x1] = finiteRange(lon);
  let [y0, y1] = finiteRange(lat);
  const pad = Math.max(x1 - x0, y1 - y0, 1) * 0.05;
  x0 -= pad;
  x1 += pad;
  y0 -= pad;
  y1 += pad;
  const sx = (canvas.width - 20) / (x1 - x0);
  const sy = (canvas.height - 20) / (y1 - y0);
  const s = Math.min(sx, sy);
  return {
    lon,
    lat,
    x: (v) => 10 + (v - x0) * s,
    y: (v) => canvas.height - 10 - (v - y0) * s,
    bounds: [x0, x1, y0, y1],
  };
}

function drawMap() {
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.lonName || !state.latName) {
    ctx.fillText("no longitude/latitude coordinates", 10, 20);
    return;
  }
  const { lon, lat, x, y, bounds } = mapFrame();
  const pass = new Uint8Array(state.n);
  for (const i of state.filtered) pass[i] = 1;
  for (let i = 0; i < state.n; i++) {
    ctx.fillStyle = pass[i] ? "#3b82f6" : "#c7ccd4";
    ctx.fillRect(x(at(lon, i)) - 1.5, y(at(lat, i)) - 1.5, 3, 3);
  }
  if (state.current >= 0) {
    const cx = x(at(lon, state.current));
    const cy = y(at(lat, state.current));
    ctx.strokeStyle = "#dc2626";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(cx, cy, 6, 0, 2 * Math.PI);
    ctx.stroke();
  }
  ctx.fillStyle = "#555";
  ctx.fillText(`lon ${fmt(bounds[0])}…${fmt(bounds[1])}, lat ${fmt(bounds[2])}…${fmt(bounds[3])}`, 8, 12);
}

function pickOnMap(event) {
  if (!state.lonName || !state.latName) return;
  const rect = event.target.getBoundingClientRect();
  const px = ((event.clientX - rect.left) * event.target.width) / rect.width;
  const py = ((event.clientY - rect.top) * event.target.height) / rect.height;
  const { lon, lat, x, y } = mapFrame();
  let best = -1;
  let bestD = Infinity;
  for (const i of state.filtered) {
    const d = (x(at(lon, i)) - px) ** 2 + (y(at(lat, i)) - py) ** 2;
    if (d < bestD) {
      bestD = d;
      best = i;
    }
  }
  if (best >= 0) show(best);
}

function suggest() {
  const text = $("key").value.trim();
  const list = $("keys");
  list.replaceChildren();
  if (!text) return;
  let count = 0;
  for (const key of state.keys) {
    if (key.includes(text)) {
      const option = document.createElement("option");
      option.value = key;
      list.append(option);
      if (++count >= 50) break;
    }
  }
}

// ---------- show ----------

let pending = Promise.resolve();

function show(i) {
  pending = pending.then(() => showNow(i)).catch((err) => fail(err));
  return pending;
}

async function showNow(i) {
  if (!(i >= 0 && i < state.n)) throw new Error(`sample index ${i} is outside 0..${state.n - 1}`);
  setStatus("loading sample…");
  const key = String(state.keys[i]);
  const before = state.requests;
  const data = await readSample(i);
  state.current = i;
  const channels = render(i, data);
  renderMetadata(i);
  drawMap();
  $("index").value = String(i);
  $("key").value = key;
  $("sample-info").textContent = `#${i} of ${state.n.toLocaleString()} · ${state.requests - before} HTTP requests`;
  const params = new URLSearchParams(location.search);
  params.set("sample", key);
  history.replaceState(null, "", `${location.pathname}?${params}`);
  Object.assign(window.__nasar, { channels, sample: key, index: i });
  document.title = `nasar-zarr · ${key}`;
  setStatus("ready");
}

function fail(err) {
  console.error(err);
  setStatus(`error: ${err.message || err}`, true);
}

async function main() {
  const params = new URLSearchParams(location.search);
  const storeParam = params.get("store") || "nasar.zarr";
  const url = new URL(storeParam, location.href).href;
  $("store").textContent = url;
  $("store").href = url;
  setStatus("opening store…");
  await openStore(url);
  await loadCoordinates();
  const prov = state.root.attrs.nasar_zarr;
  if (prov) {
    const info = typeof prov === "string" ? JSON.parse(prov) : prov;
    const layout = info.layout || {};
    $("provenance").textContent = `nasar-zarr ${info.version} · ${info.n_samples ?? state.n} samples · shard ${layout.shard} / inner chunk ${layout.inner_chunk} · ${info.codec_detail || layout.codec}`;
  }
  $("index").max = String(state.n - 1);
  if (!state.qualityName) $("min-quality").disabled = true;
  if (!state.crossName) $("need-cross").disabled = true;
  $("index").onchange = () => {
    const i = Number($("index").value);
    if (i !== state.current) show(i);
  };
  $("key").oninput = suggest;
  $("key").onchange = () => {
    const i = state.keyIndex.get($("key").value.trim());
    if (i === undefined) setStatus(`error: no sample with key ${JSON.stringify($("key").value)}`, true);
    else if (i !== state.current) show(i);
  };
  $("prev").onclick = () => step(-1);
  $("next").onclick = () => step(1);
  $("random").onclick = random;
  for (const id of ["min-quality", "need-cross", "written-only"]) $(id).oninput = applyFilter;
  $("map").onclick = pickOnMap;
  applyFilter();
  const wanted = params.get("sample");
  let start = 0;
  if (wanted !== null) {
    start = state.keyIndex.get(wanted);
    if (start === undefined) throw new Error(`no sample with key ${JSON.stringify(wanted)} in ${url}`);
  }
  await show(start);
}

main().catch(fail);
