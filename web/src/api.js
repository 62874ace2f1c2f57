// The service's REST API, as the page uses it. Paths are relative to the page, so the page
// also works behind a reverse proxy that mounts the service under a prefix.

const KEY_STORAGE = "sam3d-jobs.api-key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // private mode: the key lasts for this page only
  }
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, "network", `the service did not answer (${err.message})`);
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: a proxy's error page, for example
  }
  if (!response.ok) {
    const err = data && data.error ? data.error : {};
    throw new ApiError(
      response.status,
      err.code || `http_${response.status}`,
      err.message || text.slice(0, 200) || response.statusText,
    );
  }
  return data;
}

export const submitJob = (form) => call("POST", "v1/jobs", form);
export const getJob = (id) => call("GET", `v1/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id) => call("POST", `v1/jobs/${encodeURIComponent(id)}/cancel`);
export const listJobs = (limit = 20) => call("GET", `v1/jobs?limit=${limit}`);

export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
