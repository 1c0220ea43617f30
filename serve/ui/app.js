// The search page of imagebind-ray (docs/serve.md, "Search page"). No build step, no
// dependency: plain browser JavaScript against this app's own API, by relative URLs so that
// the page works under any route prefix.
"use strict";

const KEY_STORE = "imagebind.apiKey"; // sessionStorage: this tab only, gone when it closes
const INDEX_POLL_MS = 10000;
const THUMB_SIZE = 256;
const CAPTION_CHARS = 600;
const THUMB_KINDS = new Set(["vision", "video", "depth", "thermal"]);

const $ = (id) => document.getElementById(id);
const state = {
  loadedVersion: null, // the index version when the page loaded
  query: null, // {vector} or {id}: what the filter and top-k re-run
  queryLabel: "",
  blobs: [], // object URLs of the shown media, revoked on the next render
  seq: 0, // the latest search; older answers are dropped
};
window.imagebindPage = { lastQueryMs: null, searches: 0 }; // read by tests and the benchmark

class AuthError extends Error {}

function headers(json) {
  const h = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, body) {
  const init = body === undefined
    ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const r = await fetch(path, init);
  if (r.status === 401) throw new AuthError("the API key is missing or wrong");
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not our error shape */ }
    throw new Error(msg);
  }
  return r;
}

function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("results").replaceChildren();
  $("index-info").textContent = "Sign in to see the index.";
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("api-key").focus();
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", Boolean(isError));
}

function fail(e) {
  if (e instanceof AuthError) {
    sessionStorage.removeItem(KEY_STORE);
    showLogin(state.triedKey ? e.message : "");
    return;
  }
  setStatus(e.message, true);
}

// --- the index version ------------------------------------------------------------------------
function describeIndex(info) {
  const kinds = Object.entries(info.modalities || {}).map(([m, n]) => `${m} ${n}`).join(", ");
  const c = info.counts || {};
  const changes = c.added === undefined ? ""
    : ` · this version: +${c.added} added, ${c.changed} changed, ${c.deleted} deleted`;
  return `Index version ${info.version} (${info.name}), published ${info.published_at}: `
    + `${info.count} items (${kinds})${changes}`;
}

async function loadIndex() {
  const info = await (await api("../v1/index")).json();
  if (info.version === null) {
    $("index-info").textContent = "No index version is published yet.";
    return;
  }
  if (state.loadedVersion === null) state.loadedVersion = info.version;
  $("index-info").textContent = describeIndex(info);
  const moved = $("index-moved");
  moved.hidden = info.version === state.loadedVersion;
  moved.textContent = `The index has moved on since this page loaded (version `
    + `${state.loadedVersion} then, ${info.version} now): results come from the new version; `
    + `reload the page to reset.`;
}

async function pollIndex() {
  try {
    if (!$("app").hidden) await loadIndex();
  } catch (e) {
    if (e instanceof AuthError) fail(e);
  }
}

// --- queries ----------------------------------------------------------------------------------
async function embed(input, modality) {
  const r = await api("../v1/embeddings", { input: [input], modality });
  return (await r.json()).data[0].embedding;
}

function topK() {
  const k = parseInt($("topk").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 200) : 12;
}

// `t0`: when the user asked (before embedding the query, if there was one to embed).
async function runSearch(t0 = performance.now()) {
  if (!state.query) return;
  const seq = ++state.seq;
  const body = { ...state.query, top_k: topK() };
  const filter = $("filter").value;
  if (filter) body.filter_modality = filter;
  setStatus(`Searching ${state.queryLabel}…`);
  const hits = (await (await api("../v1/search", body)).json()).data;
  if (seq !== state.seq) return; // a newer search was started meanwhile
  render(hits);
  const ms = performance.now() - t0;
  window.imagebindPage.lastQueryMs = ms;
  window.imagebindPage.searches += 1;
  setStatus(`${hits.length} results for ${state.queryLabel} (${Math.round(ms)} ms)`);
}

async function searchText(text) {
  const t0 = performance.now();
  state.queryLabel = JSON.stringify(text);
  setStatus(`Embedding ${state.queryLabel}…`);
  state.query = { vector: await embed(text, "text") };
  await runSearch(t0);
}

function fileModality(file) {
  const t = (file.type || "").split("/")[0];
  return { image: "vision", audio: "audio", video: "video" }[t] || null;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(new Error(`cannot read ${file.name}`));
    fr.readAsDataURL(file);
  });
}

async function searchFile(file) {
  const modality = fileModality(file);
  if (!modality) {
    setStatus(`${file.name}: not an image, audio or video file (${file.type || "unknown type"})`, true);
    return;
  }
  const t0 = performance.now();
  state.queryLabel = `${file.name} (${modality})`;
  setStatus(`Embedding ${state.queryLabel}…`);
  state.query = { vector: await embed(await readDataUrl(file), modality) };
  await runSearch(t0);
}

async function moreLike(id) {
  const t0 = performance.now();
  state.queryLabel = `items like ${JSON.stringify(id)}`;
  state.query = { id };
  await runSearch(t0);
}

// --- results ----------------------------------------------------------------------------------
async function blobUrl(path) {
  const r = await api(path);
  const url = URL.createObjectURL(await r.blob());
  state.blobs.push(url);
  return url;
}

function placeholder(box, why) {
  const img = document.createElement("img");
  img.src = "placeholder.svg";
  img.alt = "no preview";
  img.className = "thumb placeholder";
  img.title = why || "";
  box.replaceChildren(img);
}

async function fillMedia(box, hit) {
  const q = "?id=" + encodeURIComponent(hit.id);
  try {
    if (THUMB_KINDS.has(hit.modality)) {
      const r = await api(`../v1/thumbnail${q}&size=${THUMB_SIZE}`);
      const bad = r.headers.get("x-placeholder");
      if (bad !== null) return placeholder(box, bad);
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = hit.id;
      img.onerror = () => placeholder(box, "the thumbnail did not decode");
      img.src = URL.createObjectURL(await r.blob());
      state.blobs.push(img.src);
      box.replaceChildren(img);
    } else if (hit.modality === "audio") {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "metadata";
      audio.src = await blobUrl("../v1/media" + q);
      box.replaceChildren(audio);
    } else if (hit.modality === "text") {
      const text = await (await api("../v1/media" + q)).text();
      const p = document.createElement("p");
      p.className = "caption";
      p.textContent = text.length > CAPTION_CHARS ? text.slice(0, CAPTION_CHARS) + "…" : text;
      box.replaceChildren(p);
    } else {
      placeholder(box, `no preview for ${hit.modality} items`);
    }
  } catch (e) {
    if (e instanceof AuthError) return fail(e);
    placeholder(box, e.message);
  }
}

function render(hits) {
  for (const u of state.blobs) URL.revokeObjectURL(u);
  state.blobs = [];
  const cards = hits.map((hit) => {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.id = hit.id;
    card.dataset.modality = hit.modality;
    const box = document.createElement("div");
    box.className = "media";
    const meta = document.createElement("div");
    meta.className = "meta";
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = hit.modality;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = hit.score.toFixed(4);
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    const uri = document.createElement("div");
    uri.className = "uri";
    uri.textContent = hit.uri;
    meta.append(kind, score, id, uri);
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "More like this";
    more.addEventListener("click", () => moreLike(hit.id).catch(fail));
    card.append(box, meta, more);
    fillMedia(box, hit);
    return card;
  });
  $("results").replaceChildren(...cards);
}

// --- wiring -----------------------------------------------------------------------------------
async function start() {
  try {
    await loadIndex();
  } catch (e) {
    if (e instanceof AuthError) return fail(e);
    $("index-info").textContent = `The index is not available: ${e.message}`;
  }
  $("login").hidden = true;
  $("app").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value);
    $("api-key").value = "";
    state.triedKey = true;
    start();
  });
  $("query").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("q").value.trim();
    if (text) searchText(text).catch(fail);
  });
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f) searchFile(f).catch(fail);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer.files[0];
    if (f) searchFile(f).catch(fail);
  });
  $("filter").addEventListener("change", () => runSearch().catch(fail));
  $("topk").addEventListener("change", () => runSearch().catch(fail));
  window.addEventListener("beforeunload", () => state.blobs.forEach(URL.revokeObjectURL));
  setInterval(pollIndex, INDEX_POLL_MS);
  start();
});
