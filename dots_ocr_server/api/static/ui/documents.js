// The Documents view: send a PDF (or an image) as a document job, watch its pages finish (the
// job's NDJSON events, read with fetch: EventSource cannot send the API key), open a finished page
// in the page view, download the document's Markdown and JSON, cancel a job.

import { ApiError, deleteJson, getJson, getStream, getText, postForm } from "./api.js";
import { kindOf, notAPageMessage, readAsBase64, sha256Hex } from "./files.js";

const $ = (id) => document.getElementById(id);
const FINISHED = new Set(["done", "failed", "cancelled"]);
const LIST_LIMIT = 20;
// While something runs, the list and the open job are read again this often: the events say when a
// page finishes, not when one starts, nor how the other jobs go.
const REFRESH_MS = 2000;
const RECONNECT_MS = 2000; // an events stream that ended before its "end" (a restart): look again
const QUESTION_TYPE = "prompt_general";
const NOT_FOR_JOBS = new Set(["prompt_grounding_ocr"]); // needs a box on one page: /ocr only

const state = {
  hooks: null, // { showError, clearError, openPage(job, page), promptLabel(name) }
  visible: false,
  jobs: new Map(), // job id -> its latest summary
  order: [], // the ids shown, newest first
  rows: new Map(), // job id -> its <li>
  next: null, // the URL of older jobs
  loadedOlder: false, // "Older jobs" was used: `next` is where that left off
  files: new Map(), // job id -> { name, base64, kind, prompt }: the documents sent from this tab
  picked: null, // the File chosen for a new job
  selected: null, // the open job: { id, detail, result, watch, downloads, pendingPage, loadingResult }
  timer: null,
  ticking: false,
};

const isFinished = (status) => FINISHED.has(status);
/** The job's result can be read: it ended and no page of it still runs (the server's rule). */
const resultReady = (job) => isFinished(job.status) && !(job.pages || []).some((p) => p.status === "running");
const jobPath = (id, rest = "") => `/jobs/${encodeURIComponent(id)}${rest}`;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A 401 opens the key dialog (showError does); other errors of a background refresh too are shown. */
function backgroundError(error) {
  if (error.name !== "AbortError") state.hooks.showError(error);
}

// -- settings -----------------------------------------------------------------------------------

export function initDocuments(hooks) {
  state.hooks = hooks;
  $("job-file").addEventListener("change", (event) => pickFile(event.target.files[0]));
  const zone = $("job-drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    pickFile(event.dataTransfer.files[0]);
  });
  $("job-prompt-type").addEventListener("change", promptTypeChanged);
  $("job-submit").addEventListener("click", submitJob);
  $("jobs-refresh").addEventListener("click", () => refreshList().catch(state.hooks.showError));
  $("jobs-more").addEventListener("click", () => loadOlder().catch(state.hooks.showError));
  $("job-cancel").addEventListener("click", cancelJob);
  $("job-pages").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-open-page]");
    if (button) openPage(Number(button.dataset.openPage));
  });
  $("job-refile-input").addEventListener("change", (event) => refile(event.target.files[0]));
  return { setConfig, show, hide, refresh: () => state.visible && refreshList().catch(backgroundError) };
}

function setConfig(config) {
  const select = $("job-prompt-type");
  const chosen = select.value;
  select.replaceChildren();
  for (const name of config.prompt_types) {
    if (NOT_FOR_JOBS.has(name)) continue;
    const option = element("option", null, state.hooks.promptLabel(name));
    option.value = name;
    select.appendChild(option);
  }
  if (config.prompt_types.includes(chosen)) select.value = chosen;
  $("job-max-tokens").max = String(config.max_new_tokens_limit);
  promptTypeChanged();
}

function promptTypeChanged() {
  $("job-question-field").hidden = $("job-prompt-type").value !== QUESTION_TYPE;
}

function show() {
  state.visible = true;
  refreshList().catch(state.hooks.showError);
  if (state.timer === null) state.timer = setInterval(tick, REFRESH_MS);
}

function hide() {
  state.visible = false;
  clearInterval(state.timer);
  state.timer = null;
}

/** Read again what may have changed without an event: the jobs that run, and the open job's pages. */
async function tick() {
  if (!state.visible || state.ticking) return;
  state.ticking = true;
  try {
    if (state.order.some((id) => !isFinished(state.jobs.get(id).status))) await refreshList();
    const selected = state.selected;
    if (selected && selected.detail && !resultReady(selected.detail)) await loadDetail();
  } catch (error) {
    backgroundError(error);
  } finally {
    state.ticking = false;
  }
}

// -- a new job ----------------------------------------------------------------------------------

function setSubmitStatus(text) {
  $("job-submit-status").textContent = text;
}

function pickFile(file) {
  if (!file) return;
  state.hooks.clearError();
  state.picked = null;
  $("job-submit").disabled = true;
  if (!kindOf(file)) {
    $("job-file-name").textContent = "";
    state.hooks.showError(notAPageMessage(file));
    return;
  }
  state.picked = file;
  $("job-file-name").textContent = file.name;
  $("job-submit").disabled = false;
  setSubmitStatus("Ready to start.");
}

/** The upload: the file and the options the person set (left empty: the server's defaults; the
 *  server checks every value, with its own messages). */
function jobForm(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const type = $("job-prompt-type").value;
  form.append("prompt_type", type);
  const fields = [["job-max-tokens", "max_new_tokens"], ["job-dpi", "dpi"], ["job-pages-spec", "pages"]];
  for (const [id, name] of fields) {
    const value = $(id).value.trim();
    if (value && !(name === "pages" && value === "all")) form.append(name, value);
  }
  let prompt = null;
  if (type === QUESTION_TYPE) {
    prompt = $("job-question").value;
    if (!prompt.trim()) throw new Error("Write your question for the model first (prompt_general).");
    form.append("prompt", prompt);
  }
  return { form, prompt };
}

async function submitJob() {
  const file = state.picked;
  if (!file) return;
  state.hooks.clearError();
  let upload;
  try {
    upload = jobForm(file);
  } catch (error) {
    state.hooks.showError(error);
    return;
  }
  $("job-submit").disabled = true;
  setSubmitStatus(`Sending ${file.name}…`);
  try {
    const base64 = await readAsBase64(file); // kept in this tab: the pages are shown from it
    const accepted = await postForm("/jobs", upload.form);
    state.files.set(accepted.job_id, { name: file.name, base64, kind: kindOf(file), prompt: upload.prompt });
    setSubmitStatus(`Job started: ${accepted.pages_total} page${accepted.pages_total === 1 ? "" : "s"} to read.`);
    await refreshList();
    await selectJob(accepted.job_id, { follow: true });
  } catch (error) {
    setSubmitStatus("The server did not take the job.");
    state.hooks.showError(error);
  } finally {
    $("job-submit").disabled = !state.picked;
  }
}

// -- the list -----------------------------------------------------------------------------------

async function refreshList() {
  let body;
  try {
    body = await getJson(`/jobs?limit=${LIST_LIMIT}`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      noJobs();
      return;
    }
    throw error;
  }
  const fresh = body.jobs.map((job) => job.job_id);
  for (const job of body.jobs) state.jobs.set(job.job_id, job);
  // the jobs shown before (older ones, or one a newer job pushed off the first page) stay below
  state.order = fresh.concat(state.order.filter((id) => !fresh.includes(id)));
  if (!state.loadedOlder) state.next = body.next;
  renderList();
}

async function loadOlder() {
  if (!state.next) return;
  const body = await getJson(state.next);
  for (const job of body.jobs) {
    state.jobs.set(job.job_id, job);
    if (!state.order.includes(job.job_id)) state.order.push(job.job_id);
  }
  state.next = body.next;
  state.loadedOlder = true;
  renderList();
}

function noJobs() {
  $("jobs-empty").textContent = "This server runs no document jobs (it was started with --no-jobs).";
  $("jobs-empty").hidden = false;
  $("job-submit").disabled = true;
  state.picked = null;
}

function renderList() {
  const list = $("job-list");
  const rows = state.order.map((id) => jobRow(id));
  const current = Array.from(list.children);
  if (current.length !== rows.length || current.some((row, i) => row !== rows[i])) list.replaceChildren(...rows);
  $("jobs-empty").hidden = rows.length > 0;
  $("jobs-more").hidden = !state.next;
}

/** The job's <li> (kept between refreshes, so that its button keeps the focus), filled anew. */
function jobRow(id) {
  let row = state.rows.get(id);
  if (!row) {
    row = element("li");
    row.dataset.job = id;
    const button = element("button", "job-row");
    button.type = "button";
    button.addEventListener("click", () => selectJob(id).catch(state.hooks.showError));
    row.appendChild(button);
    state.rows.set(id, row);
  }
  const job = state.jobs.get(id);
  row.dataset.status = job.status;
  row.classList.toggle("selected", Boolean(state.selected && state.selected.id === id));
  row.firstChild.replaceChildren(
    element("span", "job-name", job.source),
    element("span", `job-status status-${job.status}`, job.status),
    element("span", "job-progress", progressText(job)),
    element("span", "muted", `${job.prompt_type} · ${when(job.created_at)}`),
  );
  return row;
}

function when(iso) {
  const date = iso ? new Date(iso) : null;
  return date && !Number.isNaN(date.getTime()) ? date.toLocaleString() : "";
}

function progressText(job) {
  const parts = [`${job.pages_done} of ${job.pages_total} page${job.pages_total === 1 ? "" : "s"} done`];
  if (job.pages_failed) parts.push(`${job.pages_failed} failed`);
  if (!isFinished(job.status) && typeof job.eta_s === "number") parts.push(`about ${Math.ceil(job.eta_s)} s left`);
  return parts.join(", ");
}

/** A summary (or a detail, or an event's counts) of a job: kept, and its row redrawn. */
function updateSummary(job) {
  const { pages: _pages, ...summary } = job;
  const known = state.jobs.get(job.job_id);
  state.jobs.set(job.job_id, { ...known, ...summary });
  if (state.order.includes(job.job_id)) jobRow(job.job_id);
}

// -- the open job -------------------------------------------------------------------------------

/** Open job `id` below the list; `follow`: read its events at once (a job just sent: its pages
 *  may finish before its status would say that it runs). */
async function selectJob(id, { follow = false } = {}) {
  if (state.selected && state.selected.id === id) {
    await loadDetail();
    return;
  }
  closeSelected();
  const known = state.jobs.get(id);
  state.selected = { id, detail: known ? { ...known, pages: [] } : null, result: null, watch: null,
                     downloads: [], pendingPage: null, loadingResult: false };
  renderList();
  $("job-detail").hidden = false;
  if (state.selected.detail) renderDetail();
  const selected = state.selected;
  if (follow) watch(selected);
  await loadDetail();
  if (!follow && state.selected === selected && !ended(selected)) watch(selected);
}

/** Whether the open job needs no more following: its result can be read. */
const ended = (selected) => Boolean(selected.detail && resultReady(selected.detail));

function closeSelected() {
  const selected = state.selected;
  if (!selected) return;
  if (selected.watch) selected.watch.abort();
  for (const url of selected.downloads) URL.revokeObjectURL(url);
  state.selected = null;
  $("job-refile").hidden = true;
  $("job-pages").replaceChildren();
  for (const link of [$("job-download-md"), $("job-download-json")]) setLink(link, null);
}

async function loadDetail() {
  const selected = state.selected;
  if (!selected) return;
  const detail = await getJson(jobPath(selected.id));
  if (state.selected === selected) applyDetail(detail);
}

/** The server's word on the job, except that a page (or the job) once seen finished stays
 *  finished: an answer that left before the event we already applied must not undo it. */
function applyDetail(detail) {
  const selected = state.selected;
  const before = selected.detail || { pages: [] };
  const seen = new Map((before.pages || []).map((page) => [page.page, page]));
  const pages = (detail.pages || before.pages || []).map((page) => {
    const had = seen.get(page.page);
    return had && isFinished(had.status) && !isFinished(page.status) ? had : page;
  });
  const status = isFinished(before.status) && !isFinished(detail.status) ? before.status : detail.status;
  selected.detail = { ...before, ...detail, status, pages };
  updateSummary(selected.detail);
  renderDetail();
  if (resultReady(selected.detail) && !selected.result && !selected.loadingResult) loadResult(selected);
}

/** Follow the job's events until its end; a stream cut short is opened again. */
async function watch(selected) {
  const controller = new AbortController();
  selected.watch = controller;
  try {
    const last = await getStream(jobPath(selected.id, "/events"), (event) => onEvent(selected, event),
                                 controller.signal);
    if (last && last.event === "end") return;
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof ApiError && error.status !== 0) {
      state.hooks.showError(error);
      return;
    }
  }
  setTimeout(() => {
    if (state.selected === selected && !controller.signal.aborted && !ended(selected)) watch(selected);
  }, RECONNECT_MS);
}

function onEvent(selected, event) {
  if (state.selected !== selected || !selected.detail) return;
  if (event.event === "page") {
    const { event: _kind, job_id: _id, page, ...fields } = event;
    const pages = selected.detail.pages.map((entry) => entry.page === page
      ? { page, status: fields.status, attempts: fields.attempts, error: fields.error, done_reason: fields.done_reason }
      : entry);
    const counts = { pages_done: event.pages_done, pages_failed: event.pages_failed, eta_s: event.eta_s };
    applyDetail({ ...selected.detail, ...counts, pages });
  } else if (event.event === "end") {
    const { event: _kind, ...summary } = event;
    applyDetail({ ...selected.detail, ...summary });
  }
  loadDetail().catch(backgroundError); // which page runs now: that has no event
}

async function loadResult(selected) {
  selected.loadingResult = true;
  try {
    const path = jobPath(selected.id, "/result");
    const [json, markdown] = await Promise.all([getText(path), getText(`${path}?format=markdown`)]);
    if (state.selected !== selected) return;
    selected.result = JSON.parse(json);
    const stem = fileStem(selected.detail.source);
    setLink($("job-download-json"), json, "application/json", `${stem}.json`, selected);
    setLink($("job-download-md"), markdown, "text/markdown", `${stem}.md`, selected);
    renderDetail();
  } catch (error) {
    if (state.selected === selected) state.hooks.showError(error);
  } finally {
    selected.loadingResult = false;
  }
}

function fileStem(source) {
  const name = String(source || "").split(/[\\/]/).pop().replace(/\.[^.]+$/, "");
  return name || "document";
}

/** A download link carrying `content` (fetched with the key: a plain link could not send it). */
function setLink(link, content, type, filename, selected) {
  if (content === null) {
    link.removeAttribute("href");
    link.removeAttribute("download");
    link.classList.add("disabled");
    link.setAttribute("aria-disabled", "true");
    return;
  }
  const url = URL.createObjectURL(new Blob([content], { type }));
  selected.downloads.push(url);
  link.href = url;
  link.download = filename;
  link.classList.remove("disabled");
  link.removeAttribute("aria-disabled");
}

function summaryText(job) {
  const parts = [job.status, job.prompt_type, progressText(job)];
  if (job.page_count && job.page_count !== job.pages_total) parts.push(`of a ${job.page_count}-page document`);
  if (job.error) parts.push(job.error);
  return parts.join(" · ");
}

function renderDetail() {
  const job = state.selected.detail;
  $("job-title").textContent = job.source;
  $("job-summary").textContent = summaryText(job);
  $("job-detail").dataset.status = job.status;
  $("job-progress").max = Math.max(1, job.pages_total);
  $("job-progress").value = job.pages_done + job.pages_failed;
  $("job-cancel").hidden = isFinished(job.status);
  $("job-pages").replaceChildren(...(job.pages || []).map((page) => pageRow(page)));
}

/** A page's answer in the result (a page that failed may have one too), or null. */
function resultPage(number) {
  const result = state.selected.result;
  const entry = result && result.pages.find((page) => page.page === number);
  return entry && typeof entry.answer === "string" ? entry : null;
}

function pageRow(page) {
  const row = element("li", "job-page");
  row.dataset.page = String(page.page);
  row.dataset.status = page.status;
  row.append(element("strong", null, `Page ${page.page}`), element("span", `job-status status-${page.status}`, page.status));
  const notes = [];
  if (page.error) notes.push(page.error);
  else if (page.done_reason && page.done_reason !== "stop") notes.push(`ended: ${page.done_reason}`);
  if (page.attempts > 1) notes.push(`${page.attempts} attempts`);
  if (notes.length) row.appendChild(element("span", "job-page-note", notes.join(" · ")));
  const open = element("button", "secondary", "Open");
  open.type = "button";
  open.dataset.openPage = String(page.page);
  const ready = isFinished(page.status) && resultPage(page.page) !== null;
  open.disabled = !ready;
  open.title = ready ? "Show this page, its boxes and its text in the page view"
    : isFinished(page.status) && state.selected.result ? "This page has no answer to show"
      : "A page opens once the job has ended (the server gives its result then)";
  row.appendChild(open);
  return row;
}

async function cancelJob() {
  const selected = state.selected;
  if (!selected) return;
  state.hooks.clearError();
  $("job-cancel").disabled = true;
  try {
    const detail = await deleteJson(jobPath(selected.id));
    if (state.selected === selected) applyDetail(detail);
  } catch (error) {
    state.hooks.showError(error);
  } finally {
    $("job-cancel").disabled = false;
  }
}

// -- opening a page in the page view ------------------------------------------------------------

function openPage(number) {
  const selected = state.selected;
  if (!selected || !resultPage(number)) return;
  const file = state.files.get(selected.id);
  if (!file) {
    selected.pendingPage = number;
    $("job-refile").hidden = false;
    $("job-refile-input").focus();
    return;
  }
  const { result, detail } = selected;
  state.hooks.openPage({
    id: selected.id, source: detail.source, promptType: detail.prompt_type, prompt: file.prompt, result,
    file: { name: file.name, base64: file.base64, kind: file.kind,
            dpi: file.kind === "pdf" ? result.metadata.dpi ?? null : null },
  }, number);
}

/** The job's document picked again (after a reload): it must be the same file, by its SHA-256. */
async function refile(file) {
  const selected = state.selected;
  if (!file || !selected) return;
  state.hooks.clearError();
  const kind = kindOf(file);
  if (!kind) {
    state.hooks.showError(notAPageMessage(file));
    return;
  }
  try {
    const digest = await sha256Hex(file);
    if (digest && selected.detail.sha256 && digest !== selected.detail.sha256) {
      state.hooks.showError(`"${file.name}" is not this job's document (its SHA-256 differs): pick the file that was sent.`);
      return;
    }
    state.files.set(selected.id, { name: file.name, base64: await readAsBase64(file), kind, prompt: null });
  } catch (error) {
    state.hooks.showError(error);
    return;
  }
  $("job-refile").hidden = true;
  $("job-refile-input").value = "";
  if (selected.pendingPage !== null && state.selected === selected) openPage(selected.pendingPage);
}
