// The page: a form that submits a job, the job's status while it runs, its result in 3D,
// and the list of recent jobs. The URL hash (#job=ID) names the job on show.

import {
  ApiError,
  TERMINAL,
  cancelJob,
  getJob,
  listJobs,
  storedKey,
  storeKey,
  submitJob,
} from "./api.js";
import { Drawing, colourOf, readMaskPng } from "./draw.js";
import { showMasks } from "./masks.js";

const $ = (id) => document.getElementById(id);

const state = {
  image: null, // File
  pngs: [], // [{file, mask: {width, height, on, area} | null, error}]
  json: null, // {file, text, value}
  jobId: null,
  pollTimer: null,
  viewer: null,
  shownResultOf: null,
  submitted: new Map(), // job id -> the image File it was submitted with (masks over it)
};

let drawing;

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function bytes(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function describe(err) {
  return err instanceof ApiError ? `${err.code}: ${err.message}` : String(err.message || err);
}

function needKey(err) {
  if (err instanceof ApiError && err.status === 401) {
    showKeyForm(storedKey() ? "The service refused this API key." : "This service needs an API key.");
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- API key

function showKeyForm(message) {
  const form = $("key-form");
  form.hidden = false;
  $("key-message").textContent = message || "";
  if (message) $("api-key").focus();
}

function initKeyForm() {
  const form = $("key-form");
  $("api-key").value = storedKey();
  if (storedKey()) form.hidden = false;
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    storeKey($("api-key").value.trim());
    $("key-message").textContent = storedKey() ? "Key saved in this browser." : "Key removed.";
    refreshRecent();
    if (state.jobId) openJob(state.jobId);
  });
  $("key-forget").addEventListener("click", () => {
    storeKey("");
    $("api-key").value = "";
    $("key-message").textContent = "Key removed from this browser.";
  });
}

// ---------------------------------------------------------------- the form

function objectsInOrder() {
  // The service numbers objects: mask_input first, then the `mask` files in order. With a
  // JSON file, drawn polygons travel as PNG files after the uploaded ones.
  const drawn = drawing.polygons.map((poly, i) => ({ kind: "drawn", index: i, points: poly.length }));
  const pngs = state.pngs.map((p, i) => ({ kind: "png", index: i, ...p }));
  const prompts = drawing.prompts.map((p, i) => ({ kind: "prompt", index: i, prompt: p }));
  if (prompts.length) return [...prompts, ...drawn, ...pngs, ...(state.json ? [{ kind: "json", ...state.json }] : [])];
  if (state.json) return [{ kind: "json", ...state.json }, ...pngs, ...drawn];
  return [...drawn, ...pngs];
}

function jsonObjectCount(value) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    if (Array.isArray(value.annotations)) return `COCO file, ${value.annotations.length} annotations`;
    if ("counts" in value) return "1 RLE mask";
  }
  return "JSON masks";
}

function renderMasks() {
  const list = $("mask-list");
  list.replaceChildren();
  let colourIndex = 0;
  const overlays = [];
  const polygonColours = [];
  for (const item of objectsInOrder()) {
    let label;
    let remove;
    let warning = null;
    let colour = null;
    if (item.kind === "json") {
      label = `${item.file.name}: ${jsonObjectCount(item.value)}`;
      remove = () => {
        state.json = null;
        renderMasks();
      };
    } else if (item.kind === "png") {
      colour = colourOf(colourIndex++);
      label = `${item.file.name} (PNG)`;
      if (item.error) warning = item.error;
      else if (
        item.mask &&
        drawing.width &&
        (item.mask.width !== drawing.width || item.mask.height !== drawing.height)
      ) {
        warning = `${item.mask.width}×${item.mask.height}, but the image is ${drawing.width}×${drawing.height}`;
      } else if (item.mask && item.mask.area === 0) warning = "empty mask";
      overlays.push({ mask: item.mask, colour });
      remove = () => {
        state.pngs.splice(item.index, 1);
        renderMasks();
      };
    } else if (item.kind === "prompt") {
      colour = colourOf(colourIndex++);
      const p = item.prompt;
      const on = (p.points || []).filter((q) => q[2]).length;
      const off = (p.points || []).length - on;
      const parts = [p.box ? "box" : null, on ? `${on} on` : null, off ? `${off} off` : null];
      label = `Prompt ${item.index + 1}: ${parts.filter(Boolean).join(", ")}`;
      remove = () => drawing.removePrompt(item.index);
    } else {
      colour = colourOf(colourIndex++);
      polygonColours[item.index] = colour;
      label = `Drawn polygon ${item.index + 1} (${item.points} points)`;
      remove = () => drawing.remove(item.index);
    }
    list.append(
      el(
        "li",
        {},
        el("span", { class: "swatch", style: colour ? `background:${colour}` : null, "aria-hidden": "true" }),
        el("span", { class: "mask-name" }, label),
        warning ? el("span", { class: "warn" }, ` ⚠ ${warning}`) : null,
        el("button", { type: "button", class: "quiet small", "aria-label": `Remove ${label}`, onclick: remove }, "Remove"),
      ),
    );
  }
  $("mask-empty").hidden = list.children.length > 0;
  drawing.setOverlays(overlays);
  drawing.setPolygonColours(polygonColours);
}

async function addMaskFiles(files) {
  const error = $("form-error");
  error.textContent = "";
  for (const file of files) {
    if (file.type === "application/json" || file.name.toLowerCase().endsWith(".json")) {
      const text = await file.text();
      try {
        state.json = { file, text, value: JSON.parse(text) };
      } catch (err) {
        error.textContent = `${file.name} is not valid JSON: ${err.message}`;
      }
    } else {
      const entry = { file, mask: null, error: null };
      try {
        entry.mask = await readMaskPng(file);
      } catch {
        entry.error = "not a readable PNG";
      }
      state.pngs.push(entry);
    }
  }
  renderMasks();
}

async function chooseImage(file) {
  state.image = file;
  $("form-error").textContent = "";
  if (!file) {
    $("draw").hidden = true;
    return;
  }
  try {
    await drawing.setImage(file);
    $("draw").hidden = false;
  } catch {
    $("draw").hidden = true;
    $("form-error").textContent = `${file.name} cannot be shown by this browser; it can still be submitted.`;
  }
  renderMasks();
}

function cocoFileName(value) {
  // The service picks the COCO image by file_name when the file holds several images.
  if (!value || !Array.isArray(value.images) || value.images.length < 2 || !state.image) return null;
  const base = (s) => String(s || "").split(/[\\/]/).pop();
  return value.images.some((im) => base(im.file_name) === state.image.name) ? state.image.name : null;
}

async function buildForm() {
  if (!state.image) throw Object.assign(new Error("choose an image first"), { focus: "image" });
  if (!objectsInOrder().length) {
    throw Object.assign(new Error("add at least one mask (files, or a polygon drawn on the image) or a prompt (a box or points)"), {
      focus: "masks",
    });
  }
  const optionsText = $("options").value.trim();
  if (optionsText) {
    let options;
    try {
      options = JSON.parse(optionsText);
    } catch (err) {
      throw Object.assign(new Error(`options are not valid JSON: ${err.message}`), { focus: "options" });
    }
    if (!options || typeof options !== "object" || Array.isArray(options)) {
      throw Object.assign(new Error('options must be a JSON object, e.g. {"seed": 1}'), { focus: "options" });
    }
  }
  const form = new FormData();
  form.append("image", state.image, state.image.name);
  if (drawing.prompts.length) {
    if (state.json || state.pngs.length || drawing.polygons.length) {
      throw Object.assign(new Error("send prompts (boxes, points) or masks, not both: remove one kind"), {
        focus: "masks",
      });
    }
    form.append("prompts", JSON.stringify(drawing.promptsJson()));
    if (optionsText) form.append("options", optionsText);
    return form;
  }
  if (state.json) {
    form.append("mask_input", state.json.text);
    const fileName = cocoFileName(state.json.value);
    if (fileName) form.append("file_name", fileName);
  } else if (drawing.polygons.length) {
    form.append("mask_input", JSON.stringify(drawing.flatPolygons()));
    form.append("mask_format", "polygon");
  }
  for (const { file } of state.pngs) form.append("mask", file, file.name);
  if (state.json) {
    for (let i = 0; i < drawing.polygons.length; i++) {
      form.append("mask", await drawing.polygonPng(i), `drawn-${i + 1}.png`);
    }
  }
  if (optionsText) form.append("options", optionsText);
  return form;
}

async function onSubmit(event) {
  event.preventDefault();
  const error = $("form-error");
  const button = document.querySelector("[data-testid=submit]");
  error.textContent = "";
  let form;
  try {
    form = await buildForm();
  } catch (err) {
    error.textContent = err.message;
    if (err.focus) $(err.focus).focus();
    return;
  }
  button.disabled = true;
  button.textContent = "Submitting…";
  try {
    const job = await submitJob(form);
    state.submitted.set(job.id, state.image);
    await openJob(job.id, { focus: true });
    refreshRecent();
  } catch (err) {
    if (!needKey(err)) error.textContent = describe(err);
  } finally {
    button.disabled = false;
    button.textContent = "Submit job";
  }
}

function initForm() {
  const canvas = $("draw-canvas");
  drawing = new Drawing(canvas, renderMasks);
  $("image").addEventListener("change", (e) => chooseImage(e.target.files[0] || null));
  $("masks").addEventListener("change", async (e) => {
    await addMaskFiles([...e.target.files]);
    e.target.value = ""; // the same file can be added again
  });
  $("poly-close").addEventListener("click", () => drawing.close());
  $("poly-undo").addEventListener("click", () => drawing.undo());
  $("poly-clear").addEventListener("click", () => drawing.clear());
  for (const input of document.querySelectorAll("input[name=tool]")) {
    input.addEventListener("change", () => drawing.setTool(input.value));
  }
  $("prompt-next").addEventListener("click", () => drawing.nextObject());
  $("job-form").addEventListener("submit", onSubmit);
  renderMasks();
}

// ---------------------------------------------------------------- one job

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

async function openJob(id, { focus = false } = {}) {
  stopPolling();
  if (state.jobId !== id) {
    state.shownResultOf = null;
    state.viewer?.clear();
    $("viewer-controls").hidden = true;
    $("downloads").hidden = true;
    $("job-masks").hidden = true;
    $("viewer-note").hidden = false;
    $("viewer-note").textContent = "The 3D result shows here when the job has succeeded.";
  }
  state.jobId = id;
  if (location.hash !== `#job=${id}`) history.replaceState(null, "", `#job=${id}`);
  markCurrent();
  if (focus) $("job").focus();
  await poll(id);
}

async function poll(id, delay = 1000) {
  let job;
  try {
    job = await getJob(id);
  } catch (err) {
    if (id !== state.jobId) return;
    if (needKey(err)) return renderStatusError(id, describe(err));
    renderStatusError(id, describe(err));
    if (err.status === 0 || err.status >= 500) state.pollTimer = setTimeout(() => poll(id), 3000);
    return;
  }
  if (id !== state.jobId) return;
  renderStatus(job);
  if (TERMINAL.has(job.status)) {
    updateRecent(job);
    if (job.status === "succeeded") {
      renderDownloads(job.result); // freshly signed links on every look
      renderJobMasks(job);
      if (state.shownResultOf !== id) await showResult(job);
    }
  } else {
    state.pollTimer = setTimeout(() => poll(id, Math.min(delay * 1.25, 2000)), delay);
  }
}

function renderStatusError(id, message) {
  const box = $("job-status");
  box.dataset.status = "error";
  box.replaceChildren(
    el("p", {}, el("code", { class: "job-id" }, id)),
    el("p", { class: "error" }, message),
  );
}

function renderStatus(job) {
  const box = $("job-status");
  box.dataset.status = job.status;
  const { objects_done: done, objects_total: total } = job.progress || {};
  const rows = [
    ["Stage", job.stage || job.status],
    [
      "Objects",
      el(
        "span",
        { class: "progress" },
        el("progress", { max: total || 1, value: done || 0, "aria-label": "objects done" }),
        ` ${done ?? 0} of ${total ?? "?"}`,
      ),
    ],
  ];
  if (job.queue_position != null) {
    const ahead = job.queue_position; // 0: next to run
    rows.push(["Queue", ahead ? `${ahead} job(s) ahead in ${job.queue}` : `next in ${job.queue}`]);
  }
  rows.push(["Submitted", when(job.created_at)]);
  if (job.finished_at) rows.push(["Finished", when(job.finished_at)]);
  if (job.result?.time != null) rows.push(["Took", `${job.result.time.toFixed(2)} s`]);
  const children = [
    el(
      "p",
      { class: "status-line" },
      el("span", { class: "badge", dataset: { status: job.status } }, job.status),
      " ",
      el("code", { class: "job-id" }, job.id),
    ),
    el("dl", { class: "facts" }, rows.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
  ];
  if (job.error) {
    children.push(el("p", { class: "error" }, `${job.error.code}: ${job.error.message}`));
  }
  if (!TERMINAL.has(job.status)) {
    children.push(
      el(
        "button",
        {
          type: "button",
          class: "quiet",
          disabled: job.cancel_requested,
          onclick: async (e) => {
            e.target.disabled = true;
            try {
              await cancelJob(job.id);
            } catch (err) {
              if (!needKey(err)) renderStatusError(job.id, describe(err));
            }
            openJob(job.id);
          },
        },
        job.cancel_requested ? "Cancel requested" : "Cancel job",
      ),
    );
  }
  box.replaceChildren(...children);
}

async function showResult(job) {
  const result = job.result;
  state.shownResultOf = job.id;
  const note = $("viewer-note");
  if (!state.viewer) {
    try {
      const { Viewer } = await import("./viewer.js");
      state.viewer = new Viewer($("viewer"));
      initViewerControls();
    } catch (err) {
      note.hidden = false;
      note.textContent = `This browser cannot show the 3D view (${err.message}); the files can still be downloaded.`;
      $("viewer").dataset.state = "error";
      return;
    }
  }
  note.hidden = false;
  note.textContent = "Loading the 3D result…";
  try {
    const shown = await state.viewer.load(result);
    if (!shown) return; // another job was opened meanwhile
    note.hidden = true;
    renderToggles(result.objects.length);
    state.viewer.setMode(document.querySelector("input[name=mode]:checked").value);
    $("viewer-controls").hidden = false;
  } catch (err) {
    note.hidden = false;
    note.textContent = `The 3D view failed: ${err.message}. Reopen the job to retry (download links expire).`;
    $("viewer").dataset.state = "error";
  }
}

/** The job's masks (its objects' RLE) over the photo it was submitted with, if this page
 * still has it, and as downloads. */
async function renderJobMasks(job) {
  const shown = await showMasks(
    $("mask-canvas"),
    $("mask-downloads"),
    job.objects || [],
    state.submitted.get(job.id) || null,
    job.id,
  );
  if (job.id === state.jobId) $("job-masks").hidden = shown === 0;
}

function initViewerControls() {
  for (const input of document.querySelectorAll("input[name=mode]")) {
    input.addEventListener("change", () => state.viewer.setMode(input.value));
  }
  $("reset-view").addEventListener("click", () => state.viewer.resetView());
}

function renderToggles(count) {
  const box = $("object-toggles");
  box.replaceChildren(
    ...Array.from({ length: count }, (_, i) =>
      el(
        "label",
        { class: "toggle" },
        el("input", {
          type: "checkbox",
          checked: true,
          dataset: { testid: `object-toggle-${i}` },
          onchange: (e) => state.viewer.setObjectVisible(i, e.target.checked),
        }),
        el("span", { class: "swatch", style: `background:${colourOf(i)}`, "aria-hidden": "true" }),
        ` Object ${i}`,
      ),
    ),
  );
}

const FILE_LABELS = [
  ["mesh_glb", "mesh (GLB)"],
  ["gaussian_ply", "splats (PLY)"],
  ["gaussian_spz", "splats (SPZ)"],
  ["splats_glb", "mesh + splats (GLB)"],
  ["mesh_usdz", "USDZ"],
];

/** Every file the job made, scene first, in the formats it was asked for. */
function renderDownloads(result) {
  const links = (files) =>
    FILE_LABELS.filter(([key]) => files?.[key]).flatMap(([key, label], n) => [
      ...(n ? [" · "] : []),
      el("a", { href: files[key].url, download: true, rel: "noopener" }, label),
      el("span", { class: "hint" }, ` ${bytes(files[key].bytes)}`),
    ]);
  const items = [];
  const scene = links(result.scene);
  if (scene.length) items.push(el("li", {}, "Scene: ", ...scene));
  items.push(
    el(
      "li",
      {},
      el("a", { href: result.manifest.url, download: true, rel: "noopener" }, "Manifest (manifest.json)"),
      el("span", { class: "hint" }, ` ${bytes(result.manifest.bytes)}`),
    ),
  );
  result.objects.forEach((obj, i) => {
    items.push(el("li", {}, `Object ${obj.index ?? i}: `, ...links(obj)));
  });
  $("download-list").replaceChildren(...items);
  const expires = result.manifest.expires_at;
  $("download-expiry").textContent = expires
    ? `Links expire at ${when(expires)}; reopen the job for fresh ones.`
    : "";
  $("downloads").hidden = false;
}

// ---------------------------------------------------------------- recent jobs

const recentJobs = new Map();

function renderRecent() {
  const list = $("recent-list");
  list.replaceChildren(
    ...[...recentJobs.values()].map((job) =>
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            class: "recent-item",
            dataset: { jobId: job.id },
            "aria-current": job.id === state.jobId ? "true" : null,
            onclick: () => openJob(job.id, { focus: true }),
          },
          el("span", { class: "badge", dataset: { status: job.status } }, job.status),
          el("code", { class: "job-id" }, job.id),
          el(
            "span",
            { class: "hint" },
            `${when(job.created_at)} · ${job.progress?.objects_total ?? "?"} object(s)`,
          ),
        ),
      ),
    ),
  );
  $("recent-message").textContent = recentJobs.size ? "" : "No jobs yet.";
}

function markCurrent() {
  for (const button of document.querySelectorAll(".recent-item")) {
    if (button.dataset.jobId === state.jobId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

function updateRecent(job) {
  if (recentJobs.has(job.id)) {
    recentJobs.set(job.id, job);
    renderRecent();
  }
}

async function refreshRecent() {
  try {
    const page = await listJobs(20);
    recentJobs.clear();
    for (const job of page.jobs) recentJobs.set(job.id, job);
    renderRecent();
  } catch (err) {
    needKey(err);
    $("recent-message").textContent = `Could not list jobs: ${describe(err)}`;
  }
}

// ---------------------------------------------------------------- start

function jobFromHash() {
  const match = /^#job=([\w-]+)$/.exec(location.hash);
  return match ? match[1] : null;
}

initKeyForm();
initForm();
$("recent-refresh").addEventListener("click", refreshRecent);
window.addEventListener("hashchange", () => {
  const id = jobFromHash();
  if (id && id !== state.jobId) openJob(id);
});
refreshRecent();
const initial = jobFromHash();
if (initial) openJob(initial);
