// Talking to the server: the API key (kept in this tab's sessionStorage), JSON requests, uploads,
// NDJSON streams, and error messages a person can act on.

const KEY_STORAGE = "dots-ocr.api-key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE) || "",
  set: (value) => sessionStorage.setItem(KEY_STORAGE, value.trim()),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

/** An HTTP error with the server's message and a hint for the person at the page. */
export class ApiError extends Error {
  constructor(status, serverMessage) {
    super(describe(status, serverMessage));
    this.status = status;
    this.serverMessage = serverMessage;
  }
}

function describe(status, message) {
  const said = message ? `: ${message}` : "";
  switch (status) {
    case 400: return `The server refused the request${said}`;
    case 401: return `Unauthorized (401): the API key is missing or wrong. Enter the key the server was started with (--api-key).`;
    case 404: return `Not found (404)${said}`;
    case 409: return `Not now (409)${said}`;
    case 413: return `Too large (413)${said}`;
    case 429: return `The server is busy with another request (429). Wait for it to finish, or stop it, then try again.`;
    case 500:
      if (message === "Model not loaded") {
        return "The model is not loaded (500): it is still loading, or loading failed (see /health).";
      }
      return `Server error (500)${said}`;
    case 507: return `The server's job storage is full (507)${said}`;
    case 0: return `Cannot reach the server${said}`;
    default: return `HTTP ${status}${said}`;
  }
}

function headers(json = true) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorFrom(response) {
  let message = "";
  try {
    message = (await response.json()).error || "";
  } catch {
    message = response.statusText;
  }
  return new ApiError(response.status, message);
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, err.message);
  }
}

async function checked(response) {
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJson(path, signal) {
  return (await checked(await send(path, { headers: headers(false), signal }))).json();
}

/** GET a body as text (a download: the text is what the link will carry). */
export async function getText(path, signal) {
  return (await checked(await send(path, { headers: headers(false), signal }))).text();
}

export async function postJson(path, body, signal) {
  return (await checked(await send(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal }))).json();
}

/** POST a multipart form (FormData: the browser writes its Content-Type with the boundary). */
export async function postForm(path, form, signal) {
  return (await checked(await send(path, { method: "POST", headers: headers(false), body: form, signal }))).json();
}

export async function deleteJson(path, signal) {
  return (await checked(await send(path, { method: "DELETE", headers: headers(false), signal }))).json();
}

/** Call `onLine(object)` for every NDJSON line of `response` as it arrives; the last one. */
async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  let last = null;
  const handle = (text) => {
    if (!text.trim()) return;
    const line = JSON.parse(text);
    onLine(line);
    last = line;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      handle(buffered.slice(0, newline));
      buffered = buffered.slice(newline + 1);
    }
  }
  handle(buffered + decoder.decode());
  return last;
}

/**
 * POST with `stream: true` and call `onLine(object)` for every NDJSON line as it arrives.
 * Returns the last line (`done: true`). A line carrying `error` ends the stream with an Error.
 * Aborting `signal` closes the connection; the server then cancels generation.
 */
export async function postStream(path, body, onLine, signal) {
  const response = await checked(await send(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal }));
  const last = await readLines(response, (line) => {
    if (line.error) throw new Error(`Generation failed on the server: ${line.error}`);
    onLine(line);
  });
  if (!last || !last.done) throw new Error("The stream ended before its last line (connection lost?)");
  return last;
}

/**
 * GET an NDJSON stream (a job's events) with the API key, which EventSource cannot send: calls
 * `onLine(object)` per line as it arrives and returns the last one (null for an empty stream).
 */
export async function getStream(path, onLine, signal) {
  const headersWithAccept = { ...headers(false), Accept: "application/x-ndjson" };
  const response = await checked(await send(path, { headers: headersWithAccept, signal }));
  return readLines(response, onLine);
}
