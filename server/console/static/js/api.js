// The admin API and /v1, called with the session cookie (sent by the browser, HttpOnly) and the CSRF token
// (held in memory only: never in storage, never in a URL).

let csrfToken = null;
let playgroundOrg = null;

export function setCsrf(token) {
  csrfToken = token || null;
}

// A plane admin (no org of their own) names the org their playground requests run in.
export function setPlaygroundOrg(org) {
  playgroundOrg = org || null;
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : null;
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.code = error ? error.code : null;
    this.param = error ? error.param : null;
  }
}

function headersFor(method, body, extra) {
  const headers = { Accept: 'application/json', ...extra };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && method !== 'HEAD' && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  return headers;
}

export async function request(method, path, body, extra = {}) {
  const response = await fetch(path, {
    method,
    headers: headersFor(method, body, extra),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    cache: 'no-store',
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const admin = {
  get: (path, query) => request('GET', '/admin/v1' + path + queryString(query)),
  post: (path, body, query) => request('POST', '/admin/v1' + path + queryString(query), body ?? {}),
  put: (path, body) => request('PUT', '/admin/v1' + path, body),
  patch: (path, body, query) => request('PATCH', '/admin/v1' + path + queryString(query), body),
  delete: (path, query) => request('DELETE', '/admin/v1' + path + queryString(query)),
};

export function queryString(query) {
  if (!query) return '';
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== '') params.set(name, value);
  }
  const text = params.toString();
  return text ? '?' + text : '';
}

export async function list(path, query) {
  return (await admin.get(path, query)).data;
}

// POST /v1/... as the signed-in account (its console key, server.accounts): returns the raw Response, so the
// playground can read the x-hatchway-* headers and the stream.
export function v1(path, body, signal) {
  const extra = {};
  if (playgroundOrg) extra['X-Hatchway-Org'] = playgroundOrg;
  return fetch('/v1' + path, {
    method: body === undefined ? 'GET' : 'POST',
    headers: headersFor(body === undefined ? 'GET' : 'POST', body, extra),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    cache: 'no-store',
    signal,
  });
}

export async function v1Error(response) {
  const data = await response.json().catch(() => null);
  return new ApiError(response.status, data);
}
