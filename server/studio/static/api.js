// Calls to Easel's public APIs: relative URLs (the page may sit behind a path prefix), the API key as a Bearer
// header (never in a URL), and the task event stream read with fetch(): EventSource cannot send headers.

const KEY_STORE = "easel.studio.key";

export class AuthError extends Error {
  constructor(message, sentKey) {
    super(message);
    this.sentKey = sentKey;
  }
}

export class ApiError extends Error {
  constructor(message, status, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY_STORE) || "",
  set: (value) => sessionStorage.setItem(KEY_STORE, value.trim()),
  clear: () => sessionStorage.removeItem(KEY_STORE),
};

function headers(extra = {}) {
  const h = { ...extra };
  const k = key.get();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

// The message of any dialect's error body: gateway/OpenAI {"error": {"message"}}, A1111 {"detail"|"error"}.
function messageOf(body, status) {
  const err = body && body.error;
  if (err && typeof err === "object" && err.message) return { message: err.message, field: err.field || err.param };
  if (body && typeof body.detail === "string") return { message: body.detail };
  if (body && Array.isArray(body.detail) && body.detail.length) {
    const d = body.detail[0];
    return { message: `${(d.loc || []).slice(-1)[0]}: ${d.msg}`, field: (d.loc || []).slice(-1)[0] };
  }
  if (body && typeof body.error === "string") return { message: body.errors || body.error };
  return { message: `HTTP ${status}` };
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const { message, field } = messageOf(body, response.status);
  if (response.status === 401) return new AuthError(message, Boolean(key.get()));
  return new ApiError(message, response.status, field);
}

export async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const del = (path) => call("DELETE", path);

// An image URL usable in <img>: signed result URLs load as they are; unsigned ones (result_urls_require_auth) are
// fetched with the key and shown from a blob.
export async function imageSrc(url) {
  if (url.startsWith("data:") || /[?&]sig=/.test(url)) return url;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

// Read GET /v2/tasks/{address}/events; onEvent(name, data) for each event until the stream ends or `signal` aborts.
export async function streamEvents(address, onEvent, signal) {
  const response = await fetch(`v2/tasks/${encodeURIComponent(address)}/events`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
