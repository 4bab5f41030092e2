// GET /ui: pick a page, run it with the answer streaming in, look at the layout, read a region,
// and see where the model looked; or (the Documents view, documents.js) send a whole document as
// a job and open its pages here. Plain ES modules, no build step, no third-party code.

import { ApiError, apiKey, getJson, postJson, postStream } from "./api.js";
import { initDocuments } from "./documents.js";
import { kindOf, notAPageMessage, readAsBase64 } from "./files.js";
import { renderMarkdown } from "./markdown.js";
import { PageViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const PROMPT_LABELS = {
  prompt_layout_all_en: "layout + text",
  prompt_layout_only_en: "layout only",
  prompt_ocr: "plain text",
  prompt_web_parsing: "web page layout",
  prompt_scene_spotting: "scene text",
  prompt_image_to_svg: "image to SVG",
  prompt_general: "your own question",
};
const HIDDEN_PROMPT_TYPES = new Set(["prompt_grounding_ocr"]); // run by dragging a rectangle
const QUESTION_TYPE = "prompt_general";
// The types whose job pages hold the answer's own layout cells (model_runner.prompts.LAYOUT_PROMPT_TYPES);
// a page of another type is one text block covering the page, not a cell of the answer.
const LAYOUT_PROMPT_TYPES = new Set(["prompt_layout_all_en", "prompt_layout_only_en", "prompt_web_parsing"]);

const state = {
  config: null,
  file: null, // { name, base64, kind: "pdf" | "image", dpi: a PDF's rendering dpi, null: the server's }
  job: null, // the document job whose page is shown (see showJobPage), or null
  page: 1,
  pageCount: null,
  controller: null, // AbortController of the running request
  run: null, // { body, text, result, cells: whether the layout is the answer's cells }: the page's answer
  downloads: [],
};

const viewer = new PageViewer({
  stage: $("stage"), image: $("page-image"), boxes: $("boxes"), heatmap: $("heatmap"),
  selection: $("selection"), tooltip: $("tooltip"),
});

const documents = initDocuments({
  showError, clearError, promptLabel, openPage: (job, page) => showJobPage(job, page).catch(showError),
});

// -- messages ---------------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
  if (error instanceof ApiError && error.status === 401) askForKey(error.message);
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

// -- API key ----------------------------------------------------------------------------------

function askForKey(message = "") {
  apiKey.clear();
  $("key-message").textContent = message;
  $("key-input").value = "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
}

$("key-dialog").addEventListener("close", () => {
  const value = $("key-input").value.trim();
  if (value) {
    apiKey.set(value);
    clearError();
    if (!state.config) loadConfig().catch(showError); // the first authenticated call, retried with the key
    documents.refresh();
  }
});
$("change-key").addEventListener("click", () => askForKey());

// -- server state -----------------------------------------------------------------------------

/** The server's settings (behind the API key: a 401 here opens the key dialog via showError). */
async function loadConfig() {
  const config = await getJson("/ui/config");
  state.config = config;
  viewer.setColors(config.category_colors, config.fallback_color);
  $("max-tokens").max = String(config.max_new_tokens_limit);
  if (Number($("max-tokens").value) > config.max_new_tokens_limit) {
    $("max-tokens").value = String(config.max_new_tokens_limit);
  }
  const select = $("prompt-type");
  const chosen = select.value;
  select.replaceChildren();
  for (const name of config.prompt_types) {
    if (HIDDEN_PROMPT_TYPES.has(name)) continue;
    const option = document.createElement("option");
    option.value = name;
    option.textContent = promptLabel(name);
    select.appendChild(option);
  }
  if (config.prompt_types.includes(chosen)) select.value = chosen;
  promptTypeChanged();
  documents.setConfig(config);
  if (currentView === "documents") documents.show();
  $("run").disabled = !state.file || Boolean(state.controller);
}

function promptLabel(name) {
  return PROMPT_LABELS[name] ? `${PROMPT_LABELS[name]} (${name})` : name;
}

/** The temperature follows the prompt type's default; the question box is for prompt_general. */
function promptTypeChanged() {
  const type = $("prompt-type").value;
  $("question-field").hidden = type !== QUESTION_TYPE;
  const defaults = state.config && state.config.default_temperatures;
  if (defaults && type in defaults) $("temperature").value = String(defaults[type]);
}
$("prompt-type").addEventListener("change", promptTypeChanged);

async function watchHealth() {
  const label = $("health");
  try {
    const health = await getJson("/health");
    if (health.demo) {
      $("demo-banner").textContent = health.warning || "Demo mode: random weights, meaningless output.";
      $("demo-banner").hidden = false;
    }
    if (health.model_loaded) {
      label.textContent = `model loaded (${health.device}, ${health.dtype})`;
      label.className = "health ok";
      return;
    }
    if (health.load_error) {
      label.textContent = `the model failed to load: ${health.load_error}`;
      label.className = "health bad";
      return;
    }
    label.textContent = "the model is loading…";
  } catch (error) {
    label.textContent = `cannot reach the server (${error.message})`;
    label.className = "health bad";
  }
  setTimeout(watchHealth, 2000);
}

// -- choosing a page --------------------------------------------------------------------------

async function chooseFile(file) {
  if (!file) return;
  clearError();
  const kind = kindOf(file);
  if (!kind) {
    showError(notAPageMessage(file));
    return;
  }
  if (state.controller) {
    showError("A request is running: stop it before choosing another page.");
    return;
  }
  state.file = { name: file.name, base64: await readAsBase64(file), kind, dpi: null };
  state.job = null;
  state.page = 1;
  state.pageCount = null;
  $("file-name").textContent = file.name;
  $("page-picker").hidden = kind !== "pdf";
  await showPage();
}

/** The page fields of every request about the shown page (/ui/render, /ocr, /inspect). */
function pageFields() {
  const body = { image: state.file.base64, image_format: "base64" };
  if (state.file.kind === "pdf") {
    body.page = state.page;
    if (state.file.dpi) body.dpi = state.file.dpi;
  }
  return body;
}

/** Ask the server for the page exactly as it will read it (a PDF page rendered, an image decoded).
 *  Resolves with the page's size, or null when it could not be shown (the error is on the page). */
async function showPage() {
  resetResults();
  $("run").disabled = true;
  setStatus(state.file.kind === "pdf" ? `Rendering page ${state.page}…` : "Loading the image…");
  try {
    const page = await postJson("/ui/render", pageFields());
    state.pageCount = page.page_count;
    $("page-number").value = String(state.page);
    $("page-number").max = String(page.page_count ?? 1);
    $("page-count").textContent = String(page.page_count ?? 1);
    await viewer.show(page.image, page.width, page.height);
    setStatus(`${page.width} × ${page.height} px${state.file.kind === "pdf" ? `, page ${page.page} of ${page.page_count}` : ""}. Ready.`);
    $("run").disabled = false;
    return { width: page.width, height: page.height };
  } catch (error) {
    setStatus("Could not load this page.");
    showError(error);
    return null;
  }
}

async function goToPage(page) {
  if (!state.file || state.file.kind !== "pdf") return;
  if (state.controller) {
    showError("A request is running: stop it before switching pages.");
    return;
  }
  const count = state.pageCount || 1;
  if (!Number.isInteger(page) || page < 1 || page > count) {
    showError(`Page ${page} does not exist: this PDF has ${count} page${count === 1 ? "" : "s"}.`);
    $("page-number").value = String(state.page);
    return;
  }
  clearError();
  if (state.job) {
    await showJobPage(state.job, page);
    return;
  }
  state.page = page;
  await showPage();
}

$("file-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("over"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  chooseFile(event.dataTransfer.files[0]);
});
$("page-prev").addEventListener("click", () => goToPage(state.page - 1));
$("page-next").addEventListener("click", () => goToPage(state.page + 1));
$("page-number").addEventListener("change", (event) => goToPage(Number(event.target.value)));

// -- running ----------------------------------------------------------------------------------

function numberField(id, name, { integer = false, min = 0 } = {}) {
  const value = Number($(id).value);
  if ($(id).value.trim() === "" || !Number.isFinite(value) || value < min || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be ${integer ? "an integer" : "a number"} ≥ ${min}.`);
  }
  return value;
}

function requestBody(promptType, extra = {}) {
  const body = {
    ...pageFields(), prompt_type: promptType,
    temperature: numberField("temperature", "Temperature"),
    max_new_tokens: numberField("max-tokens", "Max new tokens", { integer: true, min: 1 }),
    stream: true, ...extra,
  };
  if (promptType === QUESTION_TYPE) {
    const question = $("question").value;
    if (!question.trim()) throw new Error("Write your question for the model first (prompt_general).");
    body.prompt = question;
  }
  // layout, markdown and confidence come from the server's postprocessing (not for plain text types)
  if (state.config && state.config.postprocess_prompt_types.includes(promptType)) body.postprocess = true;
  return body;
}

function resetResults() {
  state.run = null;
  setAnswerSpan(null);
  $("answer").replaceChildren(document.createTextNode(""));
  $("markdown").replaceChildren();
  $("json").textContent = "";
  $("grounding").replaceChildren();
  $("inspect-info").textContent = "";
  $("inspect-selection").disabled = true;
  setDownloads(null);
  showDrawing(null);
  viewer.clearLayout();
  viewer.clearHeatmap();
}

function setBusy(controller) {
  state.controller = controller;
  $("run").disabled = Boolean(controller) || !state.file;
  $("stop").disabled = !controller;
}

/** One streamed /ocr request: pieces go to `onPiece`; resolves with the assembled response. */
async function streamOcr(body, onPiece) {
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  const pieces = [];
  try {
    const last = await postStream("/ocr", body, (line) => {
      if (line.response) {
        pieces.push(line.response);
        onPiece(line.response, pieces.length);
      }
    }, controller.signal);
    const { model, created_at: _created, response: _empty, done: _done, ...extra } = last;
    const text = pieces.join("");
    return { result: { model, prompt_type: body.prompt_type, response: text, ...extra }, text,
             seconds: (performance.now() - started) / 1000 };
  } finally {
    setBusy(null);
  }
}

async function run() {
  if (!state.file || state.controller) return;
  clearError();
  let body;
  try {
    body = requestBody($("prompt-type").value);
  } catch (error) {
    showError(error);
    return;
  }
  resetResults();
  const answer = $("answer").firstChild;
  showTab("answer");
  setStatus("Running… (the answer appears as it is decoded)");
  try {
    const { result, text, seconds } = await streamOcr(body, (piece, count) => {
      answer.appendData(piece);
      setStatus(`Running… ${count} pieces`);
    });
    state.run = { body, text, result, cells: true };
    showResult(result);
    setStatus(`Done: ${text.length} characters in ${seconds.toFixed(1)} s.`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Stopped. The server cancelled the generation and is free again.");
      return;
    }
    setStatus("Failed.");
    showError(error);
  }
}

function showResult(result, figures = []) {
  viewer.showLayout(result.layout || []);
  if (Array.isArray(result.spots)) viewer.showSpots(result.spots);
  const markdown = typeof result.markdown === "string" ? result.markdown : result.response;
  renderMarkdown(markdown, $("markdown"), (name) => pictureCrop(name, result.layout || [], figures));
  $("json").textContent = JSON.stringify(result, null, 2);
  setDownloads(result, markdown);
  showDrawing(typeof result.svg === "string" && result.svg ? result.svg : null);
  $("inspect-selection").disabled = false;
}

/** prompt_image_to_svg: the SVG the model wrote, shown as an image. An SVG loaded through <img>
 *  runs no script and loads nothing (the browser's rule for SVG images), so the model's markup
 *  cannot act on the page. */
function showDrawing(svg) {
  const panel = $("drawing");
  panel.replaceChildren();
  document.querySelector("[data-tab=drawing]").hidden = !svg;
  if (!svg) return;
  const url = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
  state.downloads.push(url); // revoked with the downloads
  const image = document.createElement("img");
  image.alt = "the SVG the model wrote";
  image.addEventListener("error", () => {
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = "The browser cannot draw this SVG (see the JSON tab for its text).";
    panel.replaceChildren(note);
  });
  image.src = url;
  panel.appendChild(image);
}

/** `picture_<i>.png` in the markdown is layout cell i, a document's `figures/page-<n>-fig-<k>.png`
 *  is the figure of that name (`figures`: the document's): show that part of the page. */
function pictureCrop(name, layout, figures) {
  const match = name.match(/^picture_(\d+)\.png$/);
  const figure = figures.find((entry) => entry.file === name);
  const cell = figure || (match && layout[Number(match[1])]);
  if (!cell || !Array.isArray(cell.bbox)) return null;
  const [x1, y1, x2, y2] = cell.bbox;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(x2 - x1));
  canvas.height = Math.max(1, Math.round(y2 - y1));
  canvas.getContext("2d").drawImage($("page-image"), x1, y1, x2 - x1, y2 - y1, 0, 0, canvas.width, canvas.height);
  return canvas;
}

function setDownloads(result, markdown = "") {
  for (const url of state.downloads) URL.revokeObjectURL(url);
  state.downloads = [];
  const stem = state.file ? `${state.file.name.replace(/\.[^.]+$/, "")}${state.file.kind === "pdf" ? `_page${state.page}` : ""}` : "page";
  const links = [
    [$("download-json"), result && JSON.stringify(result, null, 2), "application/json", `${stem}.json`],
    [$("download-md"), result && markdown, "text/markdown", `${stem}.md`],
    [$("download-svg"), result && result.svg, "image/svg+xml", `${stem}.svg`],
  ];
  $("download-svg").hidden = !(result && result.svg);
  for (const [link, content, type, filename] of links) {
    if (content === null || content === undefined || !result) {
      link.removeAttribute("href");
      link.classList.add("disabled");
      link.setAttribute("aria-disabled", "true");
      continue;
    }
    const url = URL.createObjectURL(new Blob([content], { type }));
    state.downloads.push(url);
    link.href = url;
    link.download = filename;
    link.classList.remove("disabled");
    link.removeAttribute("aria-disabled");
  }
}

$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());

// -- a page of a document job -----------------------------------------------------------------

/**
 * Page `number` of a finished document job (from documents.js: `job` is { id, source, promptType,
 * prompt, file, result }): the page rendered from the file that was sent, at the job's dpi, with
 * the cells of the job's result over it, its Markdown and its answer. The page view's tools then
 * work on it as on an answer run here (a cell or a selection: /inspect with the job's answer).
 */
async function showJobPage(job, number) {
  if (state.controller) {
    showError("A request is running: stop it before opening another page.");
    return;
  }
  const entry = job.result.pages.find((page) => page.page === number);
  if (!entry || typeof entry.answer !== "string") {
    showError(`Page ${number} has no answer in this job (${entry ? `it ${entry.status}` : "the job did not read it"}).`);
    $("page-number").value = String(state.page);
    return;
  }
  clearError();
  showView("page");
  state.file = job.file;
  state.job = job;
  state.page = number;
  $("file-name").textContent = `${job.file.name}, from the document job ${job.id}`;
  $("page-picker").hidden = job.file.kind !== "pdf";
  $("prompt-type").value = job.promptType; // Run asks again as the job did
  promptTypeChanged();
  if (job.prompt) $("question").value = job.prompt;
  const size = await showPage();
  if (!size) return;
  if (size.width !== entry.width || size.height !== entry.height) {
    showError(`This page renders at ${size.width} × ${size.height} px here, but the job read it at ` +
              `${entry.width} × ${entry.height} px: its boxes may not sit where they belong.`);
  }
  const body = { ...pageFields(), prompt_type: job.promptType };
  if (job.prompt) body.prompt = job.prompt;
  const result = jobPageResult(job, entry);
  state.run = { body, text: entry.answer, result, cells: LAYOUT_PROMPT_TYPES.has(job.promptType) };
  $("answer").replaceChildren(document.createTextNode(entry.answer));
  showTab("answer");
  showResult(result, (job.result.figures || []).filter((figure) => figure.page === number));
  const where = job.file.kind === "pdf" ? `, page ${number} of ${state.pageCount}` : "";
  const boxes = entry.cells.length;
  setStatus(`${size.width} × ${size.height} px${where}, from the job (${entry.status}` +
            `${entry.error ? `: ${entry.error}` : ""}): ${boxes} box${boxes === 1 ? "" : "es"}, ` +
            `${entry.answer.length} characters of answer.`);
}

/** A page of a job's result, shaped as an /ocr answer for the page view's panels and downloads. */
function jobPageResult(job, entry) {
  const { answer, cells, ...rest } = entry;
  const model = job.result.metadata && job.result.metadata.model;
  return { model, prompt_type: job.promptType, job_id: job.id, ...rest, response: answer, layout: cells };
}

// -- grounding: drag a rectangle --------------------------------------------------------------

viewer.onRegion = async (bbox) => {
  if (state.controller) {
    showError("A request is running: wait for it or stop it before reading a region.");
    return;
  }
  clearError();
  let body;
  try {
    body = requestBody("prompt_grounding_ocr", { bbox });
  } catch (error) {
    showError(error);
    return;
  }
  const region = viewer.addRegion(bbox, "");
  const item = document.createElement("li");
  const title = document.createElement("strong");
  title.textContent = `[${bbox.join(", ")}]`;
  const text = document.createElement("div");
  text.className = "grounding-text";
  item.append(title, text);
  $("grounding").appendChild(item);
  showTab("grounding");
  setStatus(`Reading the region [${bbox.join(", ")}]…`);
  try {
    const { text: answer, seconds } = await streamOcr(body, (piece) => { text.textContent += piece; });
    region.dataset.text = answer;
    setStatus(`Region read: ${answer.length} characters in ${seconds.toFixed(1)} s.`);
  } catch (error) {
    region.remove();
    item.remove();
    if (error.name === "AbortError") {
      setStatus("Stopped. The server cancelled the generation and is free again.");
      return;
    }
    setStatus("Failed.");
    showError(error);
  }
};

// -- attention ----------------------------------------------------------------------------------

/** "" -> null (all); "20-27" / "0,5,10" / "1-3,7" -> [numbers]. */
function parseIndexList(text, name) {
  const value = text.trim();
  if (!value || value === "all") return null;
  const out = [];
  for (const part of value.split(",")) {
    const range = part.trim().match(/^(-?\d+)(?:\s*-\s*(\d+))?$/);
    if (!range) throw new Error(`${name}: "${part.trim()}" is not a number or a range like 20-27.`);
    const start = Number(range[1]);
    const end = range[2] === undefined ? start : Number(range[2]);
    if (end < start) throw new Error(`${name}: the range ${part.trim()} runs backwards.`);
    for (let i = start; i <= end; i += 1) out.push(i);
  }
  return out;
}

/** A [start, end) span in UTF-16 units (JS string indices) -> code points (the server's indices). */
export function toCodePoints(text, [start, end]) {
  const count = (s) => Array.from(s).length;
  const first = count(text.slice(0, start));
  return [first, first + count(text.slice(start, end))];
}

// The last selection inside the answer, kept: focusing the layer/head fields clears the page's selection.
let lastAnswerSpan = null;
document.addEventListener("selectionchange", () => {
  const span = selectedAnswerSpan();
  if (span) setAnswerSpan(span);
});

/** Keep `span` as the text to inspect and show it under the button, so the user sees what it will use. */
function setAnswerSpan(span) {
  lastAnswerSpan = span;
  const text = span && $("answer").textContent.slice(span[0], span[1]);
  $("inspect-target").textContent = span
    ? `Selected: "${text.length > 40 ? text.slice(0, 40) + "…" : text}" (characters ${span[0]}–${span[1]})`
    : "No answer text selected.";
}

function selectedAnswerSpan() {
  const selection = window.getSelection();
  const answer = $("answer");
  if (!selection.rangeCount || selection.isCollapsed) return null;
  const range = selection.getRangeAt(0);
  if (!answer.contains(range.startContainer) || !answer.contains(range.endContainer)) return null;
  const before = document.createRange();
  before.setStart(answer, 0);
  before.setEnd(range.startContainer, range.startOffset);
  const start = before.toString().length;
  return [start, start + range.toString().length];
}

/**
 * Where the model looked while writing part of the answer: `target` is `{ cell: i }` (layout cell
 * i: the server finds the characters that wrote it) or `{ char_span: [s, e) }` (code points).
 */
async function inspect(target, label) {
  if (!state.run) return;
  if (state.controller) {
    showError("A request is running: wait for it or stop it first.");
    return;
  }
  clearError();
  let body;
  try {
    const run = state.run.body;
    body = { image: run.image, image_format: "base64", prompt_type: run.prompt_type, text: state.run.text, ...target };
    for (const field of ["page", "dpi", "prompt"]) {
      if (run[field] !== undefined) body[field] = run[field];
    }
    const layers = parseIndexList($("inspect-layers").value, "Layers");
    const heads = parseIndexList($("inspect-heads").value, "Heads");
    if (layers) body.layers = layers;
    if (heads) body.heads = heads;
  } catch (error) {
    showError(error);
    return;
  }
  const controller = new AbortController();
  setBusy(controller);
  setStatus(`Computing attention for ${label}…`);
  try {
    const result = await postJson("/inspect", body, controller.signal);
    viewer.showHeatmap(result.attention);
    describeInspection(result, label);
    setStatus(`Attention for ${label}: ${(100 * result.image_mass).toFixed(1)} % of it on the page.`);
  } catch (error) {
    // /inspect is one forward pass: the server finishes it even when the page stops waiting
    setStatus(error.name === "AbortError" ? "Stopped waiting (the server finishes this one computation)." : "Failed.");
    if (error.name !== "AbortError") showError(error);
  } finally {
    setBusy(null);
  }
}

function describeInspection(result, label) {
  const info = $("inspect-info");
  info.replaceChildren();
  const head = document.createElement("div");
  const layers = result.layers.length > 6 ? `${result.layers.length} layers` : `layers ${result.layers.join(", ")}`;
  head.textContent = `${label}: tokens ${result.span[0]}–${result.span[1] - 1} of ${result.token_count}, ` +
    `${layers}, ${result.heads.length} heads averaged, image-token grid ${result.grid.rows} × ${result.grid.cols} ` +
    `(one cell = ${result.grid.cell_pixels} px of the model input)`;
  const tokens = document.createElement("div");
  for (const token of result.tokens) {
    const chip = document.createElement("span");
    chip.className = "token";
    const p = Math.exp(token.logprob);
    chip.style.backgroundColor = `rgba(34, 102, 204, ${(0.1 + 0.6 * p).toFixed(2)})`;
    chip.title = `p = ${p.toFixed(3)}`;
    chip.textContent = token.token || "·";
    tokens.appendChild(chip);
  }
  info.append(head, tokens);
}

viewer.onCell = (index) => {
  if (!state.run) return;
  viewer.selectCell(index);
  if (!state.run.cells) {
    setStatus(`This box is the whole page: a ${state.run.body.prompt_type} answer is text, not a layout. ` +
              "Select part of the answer instead to see where the model looked.");
    return;
  }
  inspect({ cell: index }, `cell #${index}`);
};

$("inspect-selection").addEventListener("click", () => {
  const span = selectedAnswerSpan() || lastAnswerSpan;
  if (!span || !state.run || span[1] > state.run.text.length) {
    showError("Select some of the answer's text first (in the Answer tab).");
    return;
  }
  inspect({ char_span: toCodePoints(state.run.text, span) }, `"${state.run.text.slice(span[0], Math.min(span[1], span[0] + 40))}"`);
});
$("clear-heatmap").addEventListener("click", () => viewer.clearHeatmap());
$("heat-opacity").addEventListener("input", (event) => { $("heatmap").style.opacity = event.target.value; });

// -- tabs -------------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll("[data-tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== name;
}

for (const tab of document.querySelectorAll("[data-tab]")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}

// -- views: the page, the documents -------------------------------------------------------------

let currentView = "page";

/** Show the page view or the Documents view (remembered in the address: #documents). */
function showView(name) {
  currentView = name;
  for (const tab of document.querySelectorAll("[data-view]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const panel of document.querySelectorAll("[data-view-panel]")) panel.hidden = panel.dataset.viewPanel !== name;
  if (name === "documents" && state.config) documents.show(); // before the config: once it is there
  if (name !== "documents") documents.hide();
  const address = name === "documents" ? "#documents" : location.pathname + location.search;
  if ((name === "documents") !== (location.hash === "#documents")) history.replaceState(null, "", address);
}

for (const tab of document.querySelectorAll("[data-view]")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}

// -- start --------------------------------------------------------------------------------------

/** First load: a server with a key answers 401 until one is given; ask for it without an error. */
function firstLoad() {
  showView(location.hash === "#documents" ? "documents" : "page");
  loadConfig().catch((error) => {
    if (error instanceof ApiError && error.status === 401 && !apiKey.get()) askForKey();
    else showError(error);
  });
}

firstLoad();
watchHealth();
