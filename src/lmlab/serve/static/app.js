// The lmlab decoding playground. Plain JavaScript, no build step, nothing fetched from
// elsewhere: every number comes from the JSON routes under api/ (src/lmlab/serve/playground.py),
// which use the library's own decoding code. The numbers a bar shows are also in its data-*
// attributes, so the browser tests read exactly what is drawn.
"use strict";

// The routes sit at /playground/api/ wherever the page itself is served from (/playground/
// by mount_playground, /static/ by lmlab serve's app).
const API = new URL("/playground/api/", location.href);
const $ = (id) => document.getElementById(id);

const state = {
  ids: null, // the path through the tree as token ids; null: the prompt text as typed
  history: [], // earlier values of ids, for Undo
  request: 0, // the latest /next request; older answers are dropped
  promptLength: 0, // tokens of the typed prompt (the rest of the path was appended)
  chat: null, // the conversation's session id
  info: null,
};

// ----------------------------------------------------------------------------- plumbing

async function call(route, body) {
  // With `lmlab serve --api_key`, the key is asked once and kept for this tab.
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("lmlab-api-key");
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
    const response = await fetch(new URL(route, API), init);
    if (response.status !== 401 || attempt > 0) return response;
    const typed = window.prompt("This server needs its API key:");
    if (!typed) return response;
    sessionStorage.setItem("lmlab-api-key", typed);
  }
}

async function post(route, body = undefined) {
  const response = await call(route, body);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.error?.message
      ?? (Array.isArray(data.detail) ? data.detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ")
        : data.detail)
      ?? `HTTP ${response.status}`;
    throw new Error(message);
  }
  return data;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message ?? error) : "";
  box.hidden = !error;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function settings() {
  return {
    temperature: Number($("temperature").value),
    top_k: Number($("top-k").value),
    top_p: Number($("top-p").value),
  };
}

function promptBody() {
  return state.ids ? { ids: state.ids } : { prompt: $("prompt").value };
}

function pct(p) {
  return p >= 0.0995 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(2)}%`;
}

function tokenChip(text, cls = "") {
  return el("span", { class: `tok ${cls}` }, text);
}

// ----------------------------------------------------------------------------- next token

function showSettings() {
  const s = settings();
  $("temperature-value").textContent = s.temperature.toFixed(2) + (s.temperature === 0 ? " (greedy)" : "");
  $("top-k-value").textContent = s.top_k === 0 ? "0 (off)" : String(s.top_k);
  $("top-p-value").textContent = s.top_p.toFixed(2) + (s.top_p >= 1 ? " (off)" : "");
}

let timer = null;
function refreshSoon() {
  showSettings();
  clearTimeout(timer);
  timer = setTimeout(refresh, 60);
}

async function refresh() {
  const id = ++state.request;
  const s = settings();
  const body = { ...promptBody(), ...s, top_n: Number($("top-n").value) };
  $("bars").dataset.ready = "0";
  try {
    const data = await post("next", body);
    if (id !== state.request) return; // a newer request is on its way
    showError(null);
    drawPath(data.prompt_tokens, data.prompt_ids);
    drawBars(data, s);
  } catch (error) {
    if (id === state.request) showError(error);
  }
}

function drawPath(tokens, ids) {
  if (state.ids === null) state.promptLength = ids.length;
  $("path").replaceChildren(
    ...tokens.map((t, i) => tokenChip(t, i >= state.promptLength ? "generated" : "")));
}

function drawBars(data, s) {
  const bars = $("bars");
  bars.replaceChildren();
  const top = Math.max(...data.raw, ...data.processed, 1e-12);
  data.ids.forEach((id, i) => {
    const raw = data.raw[i], processed = data.processed[i], kept = data.kept[i];
    const row = el("button", {
      class: `bar ${kept ? "kept" : "dropped"}`,
      "data-id": id,
      "data-raw": raw,
      "data-processed": processed,
      "data-kept": kept ? "1" : "0",
      title: `token id ${id}: model ${pct(raw)}, sampled from ${pct(processed)}`,
      onclick: () => append(id),
    },
      el("span", { class: "label" }, data.tokens[i]),
      el("span", { class: "track" },
        el("span", { class: "raw", style: `width:${(100 * raw) / top}%` }),
        el("span", { class: "processed", style: `width:${(100 * processed) / top}%` })),
      el("span", { class: "num" }, `${pct(raw)} \u2192 ${pct(processed)}`));
    bars.append(row);
  });
  $("kept-summary").textContent =
    `${data.kept_count} token${data.kept_count === 1 ? "" : "s"} kept, ` +
    `${pct(data.kept_mass)} of the model's probability`;
  bars.dataset.keptCount = data.kept_count;
  bars.dataset.keptMass = data.kept_mass;
  bars.dataset.temperature = s.temperature;
  bars.dataset.topK = s.top_k;
  bars.dataset.topP = s.top_p;
  bars.dataset.ready = "1";
}

async function append(token) {
  try {
    const body = { ...promptBody(), ...settings(), seed: Number($("seed").value) };
    if (token !== undefined) body.token = token;
    const data = await post("step", body);
    state.history.push(state.ids ?? data.ids.slice(0, -1));
    state.ids = data.ids;
    if (token === undefined) $("seed").value = Number($("seed").value) + 1; // a fresh draw next time
    refresh();
  } catch (error) {
    showError(error);
  }
}

function greedy() {
  const first = $("bars").querySelector(".bar");
  if (first) append(Number(first.dataset.id));
}

function undo() {
  if (!state.history.length) return;
  state.ids = state.history.pop();
  if (!state.history.length) state.ids = null;
  refresh();
}

function resetPath() {
  state.ids = null;
  state.history = [];
  refresh();
}

// ----------------------------------------------------------------------------- tree

async function growTree() {
  const body = {
    ...promptBody(), ...settings(),
    seed: Number($("seed").value),
    samples: Number($("tree-samples").value),
    depth: Number($("tree-depth").value),
  };
  try {
    const data = await post("tree", body);
    showError(null);
    const root = el("ul", { class: "tree" });
    const top = el("li", {}, el("span", { class: "node root" },
      data.prompt_tokens.join("").slice(-40) || "(prompt)"));
    top.append(branch(data.root.children));
    root.append(top);
    $("tree").replaceChildren(root);
  } catch (error) {
    showError(error);
  }
}

function branch(children) {
  const list = el("ul");
  for (const child of children) {
    const node = el("span", {
      class: "node",
      "data-id": child.id,
      "data-count": child.count,
      "data-raw": child.raw,
      "data-processed": child.processed,
      title: `token id ${child.id}`,
    },
      tokenChip(child.text),
      el("span", { class: "count" }, `\u00d7${child.count}`),
      el("span", { class: "num" }, `${pct(child.raw)} / ${pct(child.processed)}`));
    const item = el("li", {}, node);
    if (child.children.length) item.append(branch(child.children));
    list.append(item);
  }
  return list;
}

// ----------------------------------------------------------------------------- beams

async function runBeams() {
  const body = {
    ...promptBody(), ...settings(),
    num_beams: Number($("beams-n").value),
    steps: Number($("beams-steps").value),
    length_penalty: Number($("beams-lp").value),
  };
  try {
    const data = await post("beams", body);
    showError(null);
    const out = el("div");
    for (const step of data.steps) {
      const block = el("div", { class: "beam-step", "data-step": step.step },
        el("h3", {}, `after ${step.step} token${step.step === 1 ? "" : "s"}` +
          (step.closed ? " (search over)" : "")));
      const table = el("table");
      table.append(el("tr", {}, el("th", {}, "running beam"), el("th", {}, "sum log p")));
      for (const beam of step.beams) {
        table.append(el("tr", { class: "beam", "data-score": beam.score },
          el("td", {}, ...beam.tokens.map((t) => tokenChip(t))),
          el("td", { class: "num" }, beam.score.toFixed(3))));
      }
      if (step.finished.length) {
        table.append(el("tr", {}, el("th", {}, "finished"), el("th", {}, "score")));
        for (const hyp of step.finished) {
          table.append(el("tr", { class: "finished", "data-score": hyp.score },
            el("td", {}, ...hyp.tokens.map((t) => tokenChip(t))),
            el("td", { class: "num" }, hyp.score.toFixed(3))));
        }
      }
      block.append(table);
      out.append(block);
    }
    out.append(el("p", { class: "best", "data-ids": data.best.ids.join(",") },
      "best: ", ...data.best.tokens.map((t) => tokenChip(t, "generated"))));
    $("beams").replaceChildren(out);
  } catch (error) {
    showError(error);
  }
}

// ----------------------------------------------------------------------------- chat

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const message = input.value;
  if (!message.trim()) return;
  const log = $("chat-log");
  log.append(el("div", { class: "msg user" }, message));
  input.value = "";
  $("chat-send").disabled = true;
  try {
    const system = $("chat-system").value;
    const data = await post("chat", {
      message, ...settings(),
      session: state.chat,
      system: system || null,
      max_tokens: Number($("chat-max").value),
      seed: Number($("seed").value),
    });
    showError(null);
    state.chat = data.session;
    log.append(el("div", { class: "msg assistant", "data-finish": data.finish_reason }, data.reply));
  } catch (error) {
    showError(error);
  } finally {
    $("chat-send").disabled = false;
  }
}

async function resetChat() {
  if (state.chat) await post("chat/reset", { session: state.chat }).catch(() => {});
  state.chat = null;
  $("chat-log").replaceChildren();
}

// ----------------------------------------------------------------------------- attention

async function showAttention() {
  const head = $("att-head").value;
  const body = { ...promptBody(), layer: Number($("att-layer").value), head: head === "" ? null : Number(head) };
  try {
    const data = await post("attention", body);
    showError(null);
    const chips = $("att-tokens");
    chips.replaceChildren();
    data.prompt_tokens.forEach((t, i) => {
      const chip = tokenChip(t, "att");
      chip.dataset.index = i;
      chip.addEventListener("click", () => focusToken(data, i));
      chips.append(chip);
    });
    drawMap(data.matrix);
    focusToken(data, data.prompt_tokens.length - 1);
  } catch (error) {
    showError(error);
  }
}

function focusToken(data, query) {
  const row = data.matrix[query];
  for (const chip of $("att-tokens").children) {
    const i = Number(chip.dataset.index);
    const w = row[i];
    chip.dataset.weight = w;
    chip.classList.toggle("query", i === query);
    chip.style.background = `rgba(214, 96, 33, ${Math.min(1, w).toFixed(3)})`;
    chip.title = `attention ${pct(w)}`;
  }
}

function drawMap(matrix) {
  const canvas = $("att-map");
  const ctx = canvas.getContext("2d");
  const n = matrix.length, cell = canvas.width / n;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const w = matrix[i][j];
      ctx.fillStyle = `rgba(214, 96, 33, ${Math.min(1, w)})`;
      ctx.fillRect(j * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
}

// ----------------------------------------------------------------------------- start

function tabs() {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => {
      for (const other of document.querySelectorAll("#tabs button")) {
        other.setAttribute("aria-selected", other === button ? "true" : "false");
        $(`tab-${other.dataset.tab}`).hidden = other !== button;
      }
    });
  }
}

async function start() {
  tabs();
  for (const id of ["temperature", "top-k", "top-p", "top-n"]) $(id).addEventListener("input", refreshSoon);
  $("prompt").addEventListener("input", () => { state.ids = null; state.history = []; refreshSoon(); });
  $("sample").addEventListener("click", () => append());
  $("greedy").addEventListener("click", greedy);
  $("undo").addEventListener("click", undo);
  $("reset").addEventListener("click", resetPath);
  $("tree-run").addEventListener("click", growTree);
  $("beams-run").addEventListener("click", runBeams);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-reset").addEventListener("click", resetChat);
  $("att-run").addEventListener("click", showAttention);
  try {
    const info = await post("info");
    state.info = info;
    $("model-info").textContent =
      `${info.model}: ${info.vocab_size} tokens` + (info.context ? `, context ${info.context}` : "");
    for (const [tab, ok] of [["chat", info.chat], ["attention", info.attention]]) {
      if (!ok) document.querySelector(`#tabs [data-tab=${tab}]`).disabled = true;
    }
    if (info.attention) {
      for (let l = 0; l < info.n_layers; l++) $("att-layer").append(el("option", { value: l }, String(l)));
      $("att-head").append(el("option", { value: "" }, "mean of heads"));
      for (let h = 0; h < info.n_heads; h++) $("att-head").append(el("option", { value: h }, String(h)));
    }
  } catch (error) {
    showError(error);
  }
  showSettings();
  refresh();
}

start();
