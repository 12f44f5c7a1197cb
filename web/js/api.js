// The HTTP API: reads, and writes with the bearer token (asked for once on a 401). Answers
// come back as the server's JSON; pages hand them to the decoders of wire.js.

import { showBanner } from './dom.js';
import * as wire from './wire.js';

const TOKEN_KEY = 'hindsight-token';

/** A refused request: the HTTP status and the server's error code and message. */
export class ApiError extends Error {
  constructor(status, code, text) {
    super(text);
    this.status = status;
    this.code = code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

/** The response's JSON body; throws ApiError for an error answer. */
async function parse(response) {
  const type = response.headers.get('content-type') || '';
  const body = type.includes('json') ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const e = wire.errorBody(body);
    throw new ApiError(response.status, e ? e.code : 'http',
      e ? e.message : `${response.status} ${response.statusText}`);
  }
  return body;
}

/** A read: the JSON of GET `path`. */
export async function get(path) {
  return parse(await fetch(path, { headers: { Accept: 'application/json' } }));
}

/** A write (POST, DELETE). On 401 it asks for a token once and retries; if the user gives
 *  none, the error says so. */
export async function send(method, path, body, asked = false) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const given = token();
  if (given) headers.Authorization = `Bearer ${given}`;
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && !asked) {
    const fresh = await askToken(given
      ? 'The server refused this token (401). Paste a valid one:'
      : 'This server needs a token for changes. Paste one made with “hindsight token new”:');
    if (fresh) return send(method, path, body, true);
    throw new ApiError(401, 'unauthorized',
      'Refused: this server needs a bearer token for changes, and none was given (use the Token button).');
  }
  return parse(response);
}

/** Opens the token dialog; resolves to the token given, or null. */
export function askToken(why) {
  const dialog = document.getElementById('token-dialog');
  const input = document.getElementById('token-input');
  document.getElementById('token-why').textContent = why ||
    'A token for changes (reconstruct, sweeps, uploads), kept in this tab only and sent in the Authorization header.';
  input.value = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      if (dialog.returnValue === 'save' && input.value.trim()) {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        showBanner('');
        resolve(input.value.trim());
      } else {
        if (dialog.returnValue === 'forget') sessionStorage.removeItem(TOKEN_KEY);
        resolve(null);
      }
    }, { once: true });
    dialog.showModal();
    input.focus();
  });
}
