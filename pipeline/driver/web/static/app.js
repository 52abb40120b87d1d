// The web page: submit form, job list with live progress (server-sent events read through fetch, so the
// token travels in a header and never in a URL), the job view (3D, masks, transcript, downloads).
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080"];
const state = { token: sessionStorage.getItem("token") || "", jobs: [], selected: null, detail: null, stream: null, demo: false, viewer: null, hidden: new Set() };

function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: headers(opts.headers) });
  if (res.status === 401) { $("token-box").hidden = false; throw new Error("this server needs an API token"); }
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    const d = body && body.detail;
    const msg = d && d.error ? d.error + (d.hint ? `\nhint: ${d.hint}` : "") : (typeof d === "string" ? d : JSON.stringify(d || res.statusText));
    throw new Error(`${res.status}: ${msg}`);
  }
  return res;
}
const fetchBytes = async (url) => (await api(url)).arrayBuffer();
const fmtS = (s) => (s == null ? "" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(1)} s`);

// ------------------------------------------------------------------ health, token

async function refreshHealth() {
  try {
    const h = await (await api("/api/health")).json();
    state.demo = h.demo;
    $("demo-flag").hidden = !h.demo;
    const stages = Object.entries(h.engine.stages || {}).map(([s, v]) => `${s}: ${v.state}`).join(", ");
    const gpus = h.gpus.length ? h.gpus.map((g) => `GPU${g.index} ${g.memory_used_mib}/${g.memory_total_mib} MiB`).join(", ") : "no GPU";
    $("health").textContent = `${stages} · ${gpus} · queue ${h.jobs.queued + h.jobs.running}/${h.limits.max_queue}`;
    if (h.demo && !$("text").value) $("text").value = "red, green, blue, yellow";
  } catch (e) { $("health").textContent = e.message; }
}

$("token-save").addEventListener("click", () => {
  state.token = $("token").value.trim();
  sessionStorage.setItem("token", state.token);
  $("token-box").hidden = true;
  refreshHealth(); refreshJobs();
});

// ------------------------------------------------------------------ submit

const fileInput = $("file"), drop = $("drop");
function setFile(file) {
  const dt = new DataTransfer();
  dt.items.add(file);
  fileInput.files = dt.files;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").textContent = file.name;
}
fileInput.addEventListener("change", () => fileInput.files[0] && setFile(fileInput.files[0]));
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => e.dataTransfer.files[0] && setFile(e.dataTransfer.files[0]));
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => {
    $("text").placeholder = radio.value === "query" ? "a sentence: the two horses on the left" : "noun phrases, comma-separated: red cube, blue ball";
  });
}

$("submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("submit-error").textContent = "";
  if (!fileInput.files[0]) { $("submit-error").textContent = "choose an image first"; return; }
  const form = new FormData();
  form.append("image", fileInput.files[0]);
  const mode = document.querySelector("input[name=mode]:checked").value;
  form.append(mode, $("text").value);
  for (const key of ["threshold", "max_objects", "seed", "frame"]) if ($(key).value !== "") form.append(key, $(key).value);
  const formats = [...document.querySelectorAll("#exports input:checked")].map((c) => c.value);
  if (formats.length) form.append("export", formats.join(","));
  $("submit").disabled = true;
  try {
    const job = await (await api("/api/jobs", { method: "POST", body: form })).json();
    await refreshJobs();
    select(job.id);
  } catch (err) { $("submit-error").textContent = err.message; }
  finally { $("submit").disabled = false; }
});

// ------------------------------------------------------------------ job list

function describe(job) {
  if (job.state === "queued") return job.queue_position ? `queued, ${job.queue_position} ahead` : "queued";
  if (job.state === "running") {
    const p = job.progress;
    return p ? `${p.stage}: ${p.message || ""} ${p.total ? `(${p.done}/${p.total})` : ""}` : `running ${job.stage || ""}`;
  }
  return job.state;
}

function renderJobs() {
  const ul = $("jobs");
  ul.replaceChildren();
  for (const job of state.jobs) {
    const li = document.createElement("li");
    li.dataset.state = job.state;
    li.dataset.id = job.id;
    li.className = job.id === state.selected ? "selected" : "";
    const what = job.mode === "query" ? job.query : job.prompts.join(", ");
    li.innerHTML = `<div><b></b> <span class="muted"></span></div><div class="muted small"></div>`;
    li.querySelector("b").textContent = job.upload?.name || job.id;
    li.querySelector("span").textContent = what;
    li.querySelector(".small").textContent = job.demo ? `${describe(job)} · demo backends, not the real models` : describe(job);
    if (job.state === "running" && job.progress?.total) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * job.progress.done) / job.progress.total}%`;
      li.append(bar);
    }
    li.addEventListener("click", () => select(job.id));
    ul.append(li);
  }
}

async function refreshJobs() {
  try { state.jobs = await (await api("/api/jobs")).json(); renderJobs(); } catch { /* shown by health */ }
}

// ------------------------------------------------------------------ one job

async function select(id) {
  state.selected = id;
  state.hidden.clear();
  renderJobs();
  if (state.stream) state.stream.abort();
  $("empty").hidden = true;
  $("job").hidden = false;
  await showDetail(true);
  followEvents(id);
}

async function followEvents(id) {
  const ctrl = new AbortController();
  state.stream = ctrl;
  try {
    const res = await api(`/api/jobs/${id}/events`, { signal: ctrl.signal });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  } catch (e) { if (e.name !== "AbortError") $("job-error").textContent = e.message; }
  if (state.selected === id && !ctrl.signal.aborted) await showDetail(false);
}

let detailTimer = null;
function onEvent(ev) {
  if (ev.job !== state.selected) return;
  if (["stage_finished", "succeeded", "failed", "cancelled", "started", "stage_started", "progress"].includes(ev.kind)) {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => showDetail(false), ev.kind === "progress" ? 300 : 0);
  }
  refreshJobs();
}

async function showDetail(fresh) {
  const id = state.selected;
  const job = await (await api(`/api/jobs/${id}`)).json();
  if (state.selected !== id) return;
  const before = state.detail;
  state.detail = job;
  $("job-title").textContent = `${job.upload?.name || job.id} · ${job.mode === "query" ? job.query : job.prompts.join(", ")}`;
  $("job-state").textContent = job.state + (job.stage && job.state === "running" ? ` · ${job.stage}` : "");
  $("job-state").dataset.state = job.state;
  $("job-demo").hidden = !job.demo;
  $("cancel").hidden = !["queued", "running"].includes(job.state);
  const p = job.progress;
  $("progress-bar").style.width = job.state === "succeeded" ? "100%" : p && p.total ? `${(100 * p.done) / p.total}%` : job.state === "running" ? "5%" : "0";
  $("job-message").textContent = job.waiting || (p ? `${p.stage}: ${p.message}` : job.segment_reason || job.notes.join("; "));
  $("job-error").textContent = job.error ? job.error + (job.hint ? `\nhint: ${job.hint}` : "") : "";
  renderObjects(job);
  renderTranscript(job);
  renderDownloads(job);
  renderTimings(job);
  drawOverlay(job);
  const finishedNow = job.state === "succeeded" && (fresh || before?.state !== "succeeded" || before?.id !== job.id);
  if (finishedNow) await load3d(job);
  else if (fresh && job.state !== "succeeded") { state.viewer?.clear(); $("viewer-status").textContent = "the 3D view fills in when the job has finished"; }
}

async function load3d(job) {
  document.body.dataset.viewer = "loading";
  $("viewer-status").textContent = "loading splats and meshes…";
  try {
    if (!state.viewer) state.viewer = new Viewer($("view"));
    await state.viewer.load(job, fetchBytes);
    await state.viewer.settle(10);
    $("viewer-status").textContent = `${job.objects.length} object(s) · frame ${job.scene.frame} · drag to orbit, wheel to zoom`;
    document.body.dataset.viewer = "ready";
  } catch (e) {
    $("viewer-status").textContent = `3D view failed: ${e.message}`;
    document.body.dataset.viewer = "error";
  }
}

function renderObjects(job) {
  const ul = $("objects");
  ul.replaceChildren();
  job.objects.forEach((obj, i) => {
    const li = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = !state.hidden.has(obj.id);
    box.dataset.objectId = obj.id;
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(obj.id); else state.hidden.add(obj.id);
      state.viewer?.setVisible(obj.id, box.checked);
      drawOverlay(job);
    });
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = COLOURS[i % COLOURS.length];
    const text = document.createElement("span");
    text.textContent = `#${obj.id} ${obj.label} · score ${obj.score?.toFixed(2) ?? "?"}` + (obj.decision ? ` · kept: ${obj.decision}` : "");
    li.append(box, sw, text);
    ul.append(li);
  });
}

const imageCache = new Map();
function loadImage(url) {
  if (!imageCache.has(url)) {
    imageCache.set(url, fetchBytes(url).then((b) => createImageBitmap(new Blob([b]))));
  }
  return imageCache.get(url);
}

async function drawOverlay(job) {
  const canvas = $("overlay");
  // The preview is the displayed image (EXIF orientation applied, <= 1600 px); masks are drawn scaled onto it.
  const url = job.preview_url || job.input_url;
  if (!url) { canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); return; }
  const img = await loadImage(url);
  canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const tmp = new OffscreenCanvas(img.width, img.height);
  const t = tmp.getContext("2d");
  for (const [i, obj] of job.objects.entries()) {
    if (!obj.mask_url || state.hidden.has(obj.id)) continue;
    const mask = await loadImage(obj.mask_url);
    t.globalCompositeOperation = "source-over";
    t.clearRect(0, 0, tmp.width, tmp.height);
    const data = (() => { t.drawImage(mask, 0, 0, tmp.width, tmp.height); return t.getImageData(0, 0, tmp.width, tmp.height); })();
    for (let k = 0; k < data.data.length; k += 4) data.data[k + 3] = data.data[k] > 127 ? 140 : 0;
    const [r, g, b] = COLOURS[i % COLOURS.length].match(/\w\w/g).map((h) => parseInt(h, 16));
    for (let k = 0; k < data.data.length; k += 4) { data.data[k] = r; data.data[k + 1] = g; data.data[k + 2] = b; }
    t.putImageData(data, 0, 0);
    ctx.drawImage(tmp, 0, 0);
  }
}

function renderTranscript(job) {
  const div = $("transcript");
  div.replaceChildren();
  const t = job.transcript;
  if (!t) {
    div.textContent = job.mode === "prompt"
      ? `prompt mode: the phrases ${job.prompts.map((p) => `"${p}"`).join(", ")} went straight to the segmenter (no VLM).` + (job.segment_reason ? ` ${job.segment_reason}` : "")
      : "no transcript yet";
    return;
  }
  for (const r of t.rounds) {
    const el = document.createElement("div");
    el.className = "round";
    const d = r.decision || {};
    el.textContent = `round ${r.round}: phrases ${r.phrases.join(", ")} → ${r.candidates.length} candidate(s)` +
      (d.decision ? ` · VLM: ${d.decision}${d.reason ? ` (${d.reason})` : ""}` : "") +
      (d.keep ? ` · kept ${d.keep.map((k) => `#${k.id}: ${k.reason}`).join("; ")}` : "");
    if (r.overlay_url) loadImage(r.overlay_url).then((bmp) => { const c = document.createElement("canvas"); c.width = bmp.width; c.height = bmp.height; c.getContext("2d").drawImage(bmp, 0, 0); c.style.maxWidth = "220px"; el.append(c); });
    div.append(el);
  }
  if (t.outcome) {
    const el = document.createElement("div");
    el.textContent = t.outcome.reason ? `outcome: ${t.outcome.reason}` : `outcome: kept ${t.outcome.kept?.length ?? 0} object(s)`;
    div.append(el);
  }
}

async function download(url, name) {
  const blob = new Blob([await fetchBytes(url)]);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function renderDownloads(job) {
  const ul = $("downloads");
  ul.replaceChildren();
  $("download-zip").disabled = !["succeeded", "failed", "cancelled", "interrupted"].includes(job.state);
  const items = [];
  if (job.scene.scene_glb_url) items.push(["scene.glb (meshes)", job.scene.scene_glb_url, "scene.glb"]);
  if (job.scene.scene_ply_url) items.push(["scene.ply (Gaussians)", job.scene.scene_ply_url, "scene.ply"]);
  for (const ex of job.exports || []) {
    for (const [name, url] of Object.entries(ex.scene_files)) if (!name.endsWith(".mtl") && !name.endsWith(".png")) items.push([`${name} (${ex.format})`, url, name]);
    if (ex.objects || Object.keys(ex.scene_files).length) items.push([`${ex.format}: scene + ${ex.objects} object(s), zip`, ex.zip_url, `${job.id}-${ex.format}.zip`]);
    for (const err of ex.errors) items.push([`${ex.format} failed: ${err}`, null, null]);
  }
  for (const obj of job.objects) for (const [name, url] of Object.entries(obj.files || {})) items.push([`#${obj.id} ${obj.label}: ${name}`, url, `${obj.id}-${name}`]);
  for (const [label, url, name] of items) {
    const li = document.createElement("li");
    if (url === null) { li.textContent = label; li.className = "error"; ul.append(li); continue; }
    const a = document.createElement("a");
    a.href = "#"; a.textContent = label; a.dataset.name = name;
    a.addEventListener("click", (e) => { e.preventDefault(); download(url, name); });
    li.append(a); ul.append(li);
  }
}

function renderTimings(job) {
  const table = $("timings");
  table.replaceChildren();
  for (const [stage, s] of Object.entries(job.stages)) {
    const tr = table.insertRow();
    tr.insertCell().textContent = stage;
    tr.insertCell().textContent = s.status;
    tr.insertCell().textContent = fmtS(s.duration_s);
    tr.insertCell().textContent = s.timings?.load_s != null ? `model load ${fmtS(s.timings.load_s)}` : "";
  }
}

$("download-zip").addEventListener("click", () => state.selected && download(`/api/jobs/${state.selected}/zip`, `${state.selected}.zip`));
$("cancel").addEventListener("click", async () => {
  try { await api(`/api/jobs/${state.selected}`, { method: "DELETE" }); } catch (e) { $("job-error").textContent = e.message; }
  refreshJobs(); showDetail(false);
});
for (const mode of ["splats", "mesh", "both"]) {
  $(`mode-${mode}`).addEventListener("click", () => {
    for (const m of ["splats", "mesh", "both"]) $(`mode-${m}`).classList.toggle("on", m === mode);
    state.viewer?.setMode(mode);
  });
}
$("reset-view").addEventListener("click", () => state.viewer?.resetView());

refreshHealth();
refreshJobs();
setInterval(() => { refreshHealth(); if (state.jobs.some((j) => ["queued", "running"].includes(j.state))) refreshJobs(); }, 3000);
