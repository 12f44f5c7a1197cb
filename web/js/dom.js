// Building the page: elements, messages, the banner, and what a page undoes when it is left.
// Nothing here knows the server's JSON.

export const main = document.getElementById('main');
const banner = document.getElementById('banner');

/** An element: h('a', {href: '#/', class: 'x', onclick: f}, 'text', child, …). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'html') el.innerHTML = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces `el`'s children the way h() adds them (arrays flattened, false/null skipped). */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

export function message(text, kind = 'error') {
  return h('div', { class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
}

export function showBanner(text, kind = 'error') {
  banner.textContent = text;
  banner.className = kind;
  banner.hidden = !text;
}

export function statusBadge(status) {
  return h('span', { class: `status ${status}` }, status);
}

let cleanup = [];

/** Registers `f` to run when the page is left (the next route): closing event streams,
 *  destroying charts. */
export function onLeave(f) { cleanup.push(f); }

/** Runs and forgets what the current page registered with onLeave. */
export function leave() {
  for (const f of cleanup) { try { f(); } catch (_) { /* nothing */ } }
  cleanup = [];
}
