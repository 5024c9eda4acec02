// The studio page: generate (A1111 gateway routes, "async": true), watch (the task's event stream), browse
// (GET/DELETE /v2/history). Every value from the server is shown with textContent, never parsed as HTML.

import { AuthError, del, get, imageSrc, key, post, streamEvents } from "./api.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);
const HISTORY_PAGE = 5;
const FIELD_INPUTS = {
  prompt: "prompt", negative_prompt: "negative", width: "width", height: "height", steps: "steps",
  cfg_scale: "cfg", sampler_name: "sampler", scheduler: "scheduler", seed: "seed", batch_size: "batch",
  denoising_strength: "denoise", init_images: "init-image", model: "model",
};

const state = {
  models: new Map(),
  limits: null,
  lastSeed: null,
  task: null, // the task being watched
  abort: null,
  initImage: null, // data URL of the uploaded image
  history: { cursors: [null], index: 0 },
};
const painter = new MaskPainter($("mask"));

// Keys ---------------------------------------------------------------------------------------------------------------

function askKey(error) {
  const dialog = $("key-dialog");
  $("key-error").textContent = error && error.sentKey
    ? `The server refused this key: ${error.message}. Check the key and try again.`
    : "";
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key-input").value.trim();
  if (!value) {
    $("key-error").textContent = "Enter a key.";
    return;
  }
  key.set(value);
  $("key-dialog").close();
  start();
});
$("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // nothing works without one
$("key-button").addEventListener("click", () => askKey(null));

// Handles a failed call: a refused key asks for one; anything else is shown (and its field focused).
function fail(error) {
  if (error instanceof AuthError) {
    askKey(error);
    return;
  }
  $("error").textContent = error.message || String(error);
  const input = error.field && $(FIELD_INPUTS[error.field] || "");
  if (input) input.focus();
}

// Catalog ------------------------------------------------------------------------------------------------------------

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.append(o);
}

async function loadCatalog() {
  const [listing, samplers, schedulers] = await Promise.all([
    get("v2/models"),
    get("v2/automatic1111/sdapi/v1/samplers"),
    get("v2/automatic1111/sdapi/v1/schedulers"),
  ]);
  state.limits = listing.limits;
  const model = $("model");
  model.replaceChildren();
  state.models.clear();
  for (const m of listing.models) {
    state.models.set(m.id, m);
    option(model, m.id, `${m.id} (${m.family})`);
  }
  model.value = listing.default_model;
  $("sampler").replaceChildren();
  for (const s of samplers) option($("sampler"), s.name, s.name);
  $("scheduler").replaceChildren();
  for (const s of schedulers) option($("scheduler"), s.name, s.label || s.name);
  $("sampler").value = "Euler";
  $("steps").max = listing.limits.max_steps;
  $("batch").max = listing.limits.max_images_per_request;
  applyModel(true);
}

function currentModel() {
  return state.models.get($("model").value);
}

function applyModel(withDefaults) {
  const m = currentModel();
  if (!m) return;
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.step = input.min = m.size_multiple;
    input.max = id === "width" ? state.limits.max_width : state.limits.max_height;
  }
  $("size-hint").textContent = `Multiples of ${m.size_multiple} (${m.family}), at most ${state.limits.max_width}x${state.limits.max_height}.`;
  if (withDefaults) {
    $("width").value = m.default_width;
    $("height").value = m.default_height;
    $("steps").value = m.default_steps;
    $("cfg").value = m.default_cfg;
    if (m.default_sampler) $("sampler").value = m.default_sampler;
  }
  const txt2img = document.querySelector('input[name=mode][value=txt2img]');
  txt2img.disabled = !m.tasks.includes("txt2img");
  if (txt2img.disabled && txt2img.checked) setMode("img2img");
}

$("model").addEventListener("change", () => applyModel(true));

// Form ---------------------------------------------------------------------------------------------------------------

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function setMode(value) {
  document.querySelector(`input[name=mode][value=${value}]`).checked = true;
  $("img2img").hidden = value !== "img2img";
}

for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", () => setMode(mode()));
for (const radio of document.querySelectorAll("input[name=tool]")) {
  radio.addEventListener("change", () => { painter.tool = radio.value; });
}
$("brush-size").addEventListener("input", (e) => { painter.size = Number(e.target.value); });
$("mask-all").addEventListener("click", () => painter.fill());
$("mask-clear").addEventListener("click", () => painter.clear());
$("mask-invert").addEventListener("click", () => painter.invert());
$("denoise").addEventListener("input", (e) => { $("denoise-value").textContent = e.target.value; });
$("seed-random").addEventListener("click", () => { $("seed").value = -1; });
$("seed-last").addEventListener("click", () => {
  if (state.lastSeed !== null) $("seed").value = state.lastSeed;
});

$("init-image").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { state.initImage = reader.result; };
  reader.readAsDataURL(file);
  const img = $("init-preview");
  img.onload = () => {
    painter.reset(img.naturalWidth, img.naturalHeight);
    $("canvas-wrap").hidden = false;
    const m = currentModel();
    const fit = (v, max) => Math.max(m.size_multiple, Math.floor(Math.min(v, max) / m.size_multiple) * m.size_multiple);
    $("width").value = fit(img.naturalWidth, state.limits.max_width);
    $("height").value = fit(img.naturalHeight, state.limits.max_height);
  };
  img.src = URL.createObjectURL(file);
});

function numberOf(id) {
  return Number($(id).value);
}

// The request body, or null after saying what is wrong.
function buildBody() {
  const m = currentModel();
  const problems = [];
  for (const id of ["width", "height"]) {
    const v = numberOf(id);
    if (!Number.isInteger(v) || v < m.size_multiple || v % m.size_multiple !== 0 || v > Number($(id).max)) {
      problems.push([id, `${id} must be a multiple of ${m.size_multiple} between ${m.size_multiple} and ${$(id).max} for ${m.id}`]);
    }
  }
  if (!$("prompt").value.trim()) problems.push(["prompt", "Enter a prompt"]);
  if (mode() === "img2img" && !state.initImage) problems.push(["init-image", "Choose an image for image to image"]);
  if (problems.length) {
    $("error").textContent = problems.map((p) => p[1]).join(". ") + ".";
    $(problems[0][0]).focus();
    return null;
  }
  const body = {
    model: m.id,
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: numberOf("width"),
    height: numberOf("height"),
    steps: numberOf("steps"),
    cfg_scale: numberOf("cfg"),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    seed: $("seed").value === "" ? -1 : numberOf("seed"),
    batch_size: numberOf("batch") || 1,
    async: true,
  };
  if (mode() === "img2img") {
    body.init_images = [state.initImage];
    body.denoising_strength = numberOf("denoise");
    const mask = painter.toBase64();
    if (mask) Object.assign(body, { mask, inpainting_fill: 1, mask_blur: 4 });
  }
  return body;
}

// Generate and watch -------------------------------------------------------------------------------------------------

function busy(on) {
  $("generate-button").disabled = on;
  $("cancel-button").disabled = !on;
}

function say(text) {
  $("status").textContent = text;
}

$("gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("error").textContent = "";
  const body = buildBody();
  if (!body) return;
  const route = mode() === "img2img" ? "img2img" : "txt2img";
  busy(true);
  $("progress").value = 0;
  $("preview").hidden = true;
  $("results").replaceChildren();
  say("Submitting…");
  try {
    const accepted = await post(`v2/automatic1111/sdapi/v1/${route}`, body);
    state.task = accepted.task_address;
    await watch(accepted.task_address);
  } catch (error) {
    if (error.name !== "AbortError") {
      say("Not generated.");
      fail(error);
    }
  } finally {
    busy(false);
    state.task = null;
    loadHistory();
  }
});

async function watch(address) {
  state.abort = new AbortController();
  let final = null;
  await streamEvents(address, (name, data) => {
    if (name === "queued") {
      say(data.position ? `Queued (position ${data.position}).` : "Queued.");
    } else if (name === "progress") {
      $("progress").value = data.percent || 0;
      const eta = data.eta_s ? `, about ${Math.ceil(data.eta_s)} s left` : "";
      say(data.steps ? `Step ${data.step} of ${data.steps} (${Math.round(data.percent)} %)${eta}.` : `${Math.round(data.percent)} %.`);
      if (data.preview) {
        $("preview").src = `data:image/png;base64,${data.preview}`;
        $("preview").hidden = false;
      }
    } else {
      final = { name, data };
    }
  }, state.abort.signal);
  if (!final) throw new Error("The event stream ended without a result.");
  $("preview").hidden = true;
  if (final.name === "completed") {
    $("progress").value = 100;
    const seeds = final.data.seeds || [];
    if (seeds.length) {
      state.lastSeed = seeds[0];
      $("seed-last").disabled = false;
    }
    await showResults(address);
    say(`Done: ${seeds.length} image(s), seed ${seeds.join(", ")}.`);
  } else {
    say(final.name === "cancelled" ? "Cancelled." : "Failed.");
    const err = final.data.error;
    if (final.name === "failed") $("error").textContent = (err && err.message) || "The generation failed.";
  }
}

$("cancel-button").addEventListener("click", async () => {
  if (!state.task) return;
  say("Cancelling…");
  try {
    await post(`v2/tasks/${encodeURIComponent(state.task)}/cancel`);
  } catch (error) {
    fail(error);
  }
});

function figure(image, index, address) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = `Result ${index + 1}, seed ${image.seed}, ${image.width}x${image.height}`;
  imageSrc(image.url).then((src) => { img.src = src; }, fail);
  const link = document.createElement("a");
  link.href = image.url;
  link.download = `easel-${address.slice(0, 8)}-${index + 1}.png`;
  link.textContent = `Download ${index + 1}`;
  const caption = document.createElement("figcaption");
  caption.append(link);
  fig.append(img, caption);
  return fig;
}

async function showResults(address) {
  const item = await get(`v2/history/${encodeURIComponent(address)}`);
  $("results").replaceChildren(...item.images.map((image, i) => figure(image, i, address)));
}

// History ------------------------------------------------------------------------------------------------------------

function describe(item) {
  const p = item.parameters || {};
  const rows = [
    ["Status", item.status],
    ["Model", p.model || item.model],
    ["Prompt", p.prompt || ""],
    ["Size", p.width && p.height ? `${p.width}x${p.height}` : ""],
    ["Steps / CFG", p.steps ? `${p.steps} / ${p.cfg_scale}` : ""],
    ["Sampler", [p.sampler_name, p.scheduler].filter(Boolean).join(", ")],
    ["Seed", (item.seeds || []).join(", ")],
    ["Route", item.route],
    ["Created", new Date(item.created_at).toLocaleString()],
  ];
  if (item.error) rows.push(["Error", item.error.message || item.error.code]);
  const dl = document.createElement("dl");
  for (const [name, value] of rows) {
    if (value === "" || value === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    if (name === "Status") dd.className = `status-${item.status}`;
    dl.append(dt, dd);
  }
  return dl;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function historyEntry(item) {
  const li = document.createElement("li");
  li.dataset.task = item.task_address;
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  for (const [i, image] of item.images.entries()) {
    const img = document.createElement("img");
    img.alt = `Image ${i + 1} of ${item.route} job, seed ${image.seed}`;
    img.loading = "lazy";
    imageSrc(image.url).then((src) => { img.src = src; }, () => {});
    thumbs.append(img);
  }
  const side = document.createElement("div");
  const actions = document.createElement("div");
  actions.className = "row";
  const prompt = (item.parameters && item.parameters.prompt) || item.route;
  if (item.dialect === "a1111" && (item.route === "txt2img" || item.route === "img2img")) {
    actions.append(button("Re-run", `Re-run "${prompt}"`, () => rerun(item)));
  }
  for (const [i, image] of item.images.entries()) {
    const a = document.createElement("a");
    a.href = image.url;
    a.download = `easel-${item.task_address.slice(0, 8)}-${i + 1}.png`;
    a.textContent = item.images.length > 1 ? `Download ${i + 1}` : "Download";
    actions.append(a);
  }
  actions.append(button("Delete", `Delete "${prompt}"`, () => remove(item)));
  side.append(describe(item), actions);
  li.append(thumbs, side);
  return li;
}

async function loadHistory() {
  const h = state.history;
  const cursor = h.cursors[h.index];
  try {
    const page = await get(`v2/history?limit=${HISTORY_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    $("history-list").replaceChildren(...page.items.map(historyEntry));
    h.cursors.length = h.index + 1;
    if (page.next_cursor) h.cursors.push(page.next_cursor);
    $("history-older").disabled = !page.next_cursor;
    $("history-newer").disabled = h.index === 0;
    const first = h.index * HISTORY_PAGE + 1;
    $("history-count").textContent = page.total
      ? `${first}–${first + page.items.length - 1} of ${page.total}`
      : "No generations yet.";
  } catch (error) {
    fail(error);
  }
}

$("history-refresh").addEventListener("click", () => loadHistory());
$("history-older").addEventListener("click", () => { state.history.index += 1; loadHistory(); });
$("history-newer").addEventListener("click", () => { state.history.index = Math.max(0, state.history.index - 1); loadHistory(); });

async function remove(item) {
  try {
    await del(`v2/history/${encodeURIComponent(item.task_address)}`);
    await loadHistory();
    $("history-count").textContent = `Deleted. ${$("history-count").textContent}`;
    $("history-refresh").focus(); // its button is gone: keep the keyboard user in the history
  } catch (error) {
    fail(error);
  }
}

function rerun(item) {
  const p = item.parameters || {};
  if (p.model && state.models.has(p.model)) {
    $("model").value = p.model;
    applyModel(false);
  }
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", p.prompt);
  set("negative", p.negative_prompt);
  set("width", p.width);
  set("height", p.height);
  set("steps", p.steps);
  set("cfg", p.cfg_scale);
  set("sampler", p.sampler_name);
  set("scheduler", p.scheduler);
  set("batch", p.batch_size);
  set("seed", (item.seeds && item.seeds[0]) ?? p.seed); // the same picture again
  setMode(item.route === "img2img" ? "img2img" : "txt2img");
  if (item.route === "img2img") {
    set("denoise", p.denoising_strength);
    $("denoise-value").textContent = $("denoise").value;
    if (!state.initImage) {
      say("Choose the image again to re-run this image to image job (images sent are not kept).");
      $("init-image").focus();
      return;
    }
  }
  $("generate").scrollIntoView();
  $("gen-form").requestSubmit();
}

// Start --------------------------------------------------------------------------------------------------------------

async function start() {
  $("key-button").hidden = !key.get();
  try {
    await loadCatalog();
    say("Ready.");
    await loadHistory();
  } catch (error) {
    fail(error);
  }
}

start();
