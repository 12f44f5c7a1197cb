// hindsight's web UI: runs, the metric-vs-EMA-length plot of sweeps, reconstruct and download.
// Plain browser JavaScript over the server's JSON API (see /openapi.json); charts by uPlot
// (vendored in /ui/vendor/uplot). Routes are URL fragments: #/, #/runs/NAME, #/sweeps/ID.
'use strict';

const TOKEN_KEY = 'hindsight-token';
const main = document.getElementById('main');
const banner = document.getElementById('banner');

// ---------------------------------------------------------------------------------------
// Small helpers

/** An element: h('a', {href: '#/', class: 'x', onclick: f}, 'text', child, …). */
function h(tag, attrs = {}, ...children) {
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

function fmtBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return u === 0 ? `${n} B` : `${n.toFixed(1)} ${units[u]}`;
}

/** Training images, shortened: 4.2M img. */
function fmtNimg(n) {
  if (n === null || n === undefined) return '–';
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G img`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M img`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k img`;
  return `${n} img`;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits);
}

function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function showBanner(text, kind = 'error') {
  banner.textContent = text;
  banner.className = kind;
  banner.hidden = !text;
}

/** Replaces `el`'s children the way h() adds them (arrays flattened, false/null skipped). */
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

function message(text, kind = 'error') {
  return h('div', { class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
}

// ---------------------------------------------------------------------------------------
// The API, with the bearer token for writes

class ApiError extends Error {
  constructor(status, code, text) {
    super(text);
    this.status = status;
    this.code = code;
  }
}

const api = {
  token() { return sessionStorage.getItem(TOKEN_KEY); },

  async parse(response) {
    const type = response.headers.get('content-type') || '';
    const body = type.includes('json') ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      const e = body && body.error;
      throw new ApiError(response.status, e ? e.code : 'http',
        e ? e.message : `${response.status} ${response.statusText}`);
    }
    return body;
  },

  async get(path) {
    return api.parse(await fetch(path, { headers: { Accept: 'application/json' } }));
  },

  /** A write (POST, DELETE). On 401 it asks for a token once and retries; if the user gives
   *  none, the error says so. */
  async send(method, path, body, asked = false) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const token = api.token();
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && !asked) {
      const given = await askToken(token
        ? 'The server refused this token (401). Paste a valid one:'
        : 'This server needs a token for changes. Paste one made with “hindsight token new”:');
      if (given) return api.send(method, path, body, true);
      throw new ApiError(401, 'unauthorized',
        'Refused: this server needs a bearer token for changes, and none was given (use the Token button).');
    }
    return api.parse(response);
  },
};

/** Opens the token dialog; resolves to the token given, or null. */
function askToken(why) {
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

document.getElementById('token-button').addEventListener('click', () => askToken());

// ---------------------------------------------------------------------------------------
// Routing

let cleanup = [];
function onLeave(f) { cleanup.push(f); }

async function route() {
  for (const f of cleanup) { try { f(); } catch (_) { /* nothing */ } }
  cleanup = [];
  showBanner('');
  fill(main, h('p', { class: 'muted' }, 'Loading…'));
  try {
    let hash;
    try {
      hash = decodeURIComponent(location.hash.replace(/^#/, '')) || '/';
    } catch (_) {
      throw new Error(`${location.hash} is not a valid address in this page.`);
    }
    let m;
    if ((m = hash.match(/^\/runs\/(.+)$/))) await runPage(m[1]);
    else if ((m = hash.match(/^\/sweeps\/(\d{1,15})$/))) await sweepPage(Number(m[1]));
    else if (hash === '/' || hash === '') await runsPage();
    else {
      document.title = 'hindsight — not found';
      fill(main, h('h1', {}, 'Not found'),
        h('p', {}, `Nothing here is called ${hash}. `, h('a', { href: '#/' }, 'All runs'), '.'));
    }
  } catch (e) {
    fill(main, h('h1', {}, 'Something went wrong'), message(e.message));
  }
  main.focus({ preventScroll: true });
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', route);

// ---------------------------------------------------------------------------------------
// Runs

async function runsPage() {
  document.title = 'hindsight — runs';
  const [runs, sweeps, refs] = await Promise.all([
    api.get('/runs'), api.get('/sweeps'), api.get('/references'),
  ]);
  const table = h('table', { id: 'runs' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Run'), h('th', { class: 'num' }, 'Snapshots'), h('th', { class: 'num' }, 'Size'),
      h('th', {}, 'Training time'), h('th', { class: 'hide-narrow' }, 'Last activity'))),
    h('tbody', {}, runs.map((r) => h('tr', {},
      h('td', {}, h('a', { href: `#/runs/${encodeURIComponent(r.name)}` }, r.name)),
      h('td', { class: 'num' }, r.snapshots),
      h('td', { class: 'num' }, fmtBytes(r.bytes)),
      h('td', {}, `${fmtNimg(r.first_nimg)} – ${fmtNimg(r.last_nimg)}`),
      h('td', { class: 'hide-narrow' }, fmtTime(r.last_activity || r.created_at))))));
  fill(main,
    h('h1', {}, 'Runs'),
    runs.length ? h('div', { class: 'scroll' }, table)
      : h('p', {}, 'No runs yet. Train one (', h('code', {}, 'hindsight train'),
        '), import snapshots (', h('code', {}, 'hindsight import'), ') or run ',
        h('code', {}, 'hindsight demo'), '.'),
    h('h2', {}, 'Sweeps'),
    sweepTable(sweeps.sweeps, true),
    h('h2', {}, 'Reference statistics'),
    refs.references.length ? h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Source'), h('th', { class: 'num' }, 'Images'),
        h('th', {}, 'KID'))),
      h('tbody', {}, refs.references.map((r) => h('tr', {},
        h('td', {}, r.name), h('td', {}, r.source), h('td', { class: 'num' }, r.count || '–'),
        h('td', {}, r.has_features ? 'yes' : 'no (imported)'))))))
      : h('p', { class: 'muted' }, 'None yet: ', h('code', {}, 'hindsight ref-stats DATASET --name NAME'), '.'));
}

/** A metric's name for people: FID and KID, or the fallback's when the sweep's reference
 *  statistics come from the pixel projection (no Inception weights on the server). */
function metricLabel(spec, m, short = false) {
  const fallback = ((spec && spec.feature_network) || '').includes('fallback');
  if (!fallback) return m.toUpperCase();
  if (short) return m === 'fid' ? 'FD-pixels' : 'KID-pixels';
  return m === 'fid' ? 'FD (pixel projection, not FID)' : 'KID (pixel projection)';
}

/** Tick labels for training times: one unit (k, M, G) and as many decimals as the step
 *  between ticks needs, so no two ticks read the same. */
function nimgTicks(ticks) {
  const max = Math.max(0, ...ticks.map((t) => Math.abs(t)));
  const [div, unit] = max >= 1e9 ? [1e9, 'G'] : max >= 1e6 ? [1e6, 'M'] : max >= 1e3 ? [1e3, 'k'] : [1, ''];
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) / div : 1;
  const digits = step >= 1 || step === 0 ? 0 : Math.min(6, Math.ceil(-Math.log10(step) - 1e-9));
  return ticks.map((t) => `${(t / div).toFixed(digits)}${unit}`);
}

function statusBadge(status) {
  return h('span', { class: `status ${status}` }, status);
}

function sweepTable(sweeps, withRun) {
  if (!sweeps.length) return h('p', { class: 'muted' }, 'No sweeps yet.');
  return h('div', { class: 'scroll' }, h('table', { class: 'sweeps' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Sweep'), withRun && h('th', {}, 'Run'), h('th', {}, 'Status'),
      h('th', {}, 'σ_rel'), h('th', { class: 'num' }, 'Points'), h('th', { class: 'num' }, 'Images'),
      h('th', {}, 'Best'))),
    h('tbody', {}, sweeps.map((s) => {
      const best = (s.best || [])[0];
      const sig = s.spec.sigma_rels || [];
      return h('tr', {},
        h('td', {}, h('a', { href: `#/sweeps/${s.id}` }, `#${s.id}`)),
        withRun && h('td', {}, h('a', { href: `#/runs/${encodeURIComponent(s.run)}` }, s.run)),
        h('td', {}, statusBadge(s.status)),
        h('td', {}, sig.length ? `${fmt(sig[0])} … ${fmt(sig[sig.length - 1])}` : '–'),
        h('td', { class: 'num' }, `${s.points_done}/${s.points_total}`),
        h('td', { class: 'num' }, `${s.images_done}/${s.images_total}`),
        h('td', {}, best ? `${metricLabel(s.spec, best.metric)} ${fmt(best.value)} at σ_rel ${fmt(best.sigma_rel)}` : '–'));
    }))));
}

// ---------------------------------------------------------------------------------------
// One run: timeline, configuration, reconstruct panel, reconstructions, sweeps

async function runPage(name) {
  document.title = `hindsight — ${name}`;
  const enc = encodeURIComponent(name);
  const [detail, snapshots, sweeps, refs] = await Promise.all([
    api.get(`/runs/${enc}`), api.get(`/runs/${enc}/snapshots`),
    api.get(`/sweeps?run=${enc}`), api.get('/references'),
  ]);
  const timeline = h('div', { class: 'chart short', id: 'timeline' });
  fill(main,
    h('p', {}, h('a', { href: '#/' }, '← Runs')),
    h('h1', {}, name),
    h('p', { class: 'muted' },
      detail.snapshots
        ? `${detail.snapshots} snapshots, ${fmtBytes(detail.bytes)}, up to ${fmtNimg(detail.last_nimg)}`
        : 'No snapshots yet',
      detail.run.description ? ` — ${detail.run.description}` : ''),
    h('h2', {}, 'Snapshots (training time × EMA width)'),
    timeline,
    h('details', {}, h('summary', {}, 'Configuration'),
      h('pre', { class: 'json' }, JSON.stringify(detail.run.metadata, null, 2))),
    reconstructPanel(name, detail),
    h('h2', {}, 'Reconstructions'),
    reconstructionTable(detail.reconstructions),
    h('h2', {}, 'Sweeps'),
    sweepTable(sweeps.sweeps, false),
    sweepForm(name, detail, refs.references));
  if (snapshots.length) drawTimeline(timeline, snapshots);
  else fill(timeline, h('p', { class: 'muted' }, 'No snapshots yet: train (hindsight train), import (hindsight import) or upload (POST /runs/NAME/snapshots) some.'));
}

function drawTimeline(el, snapshots) {
  const widths = [...new Set(snapshots.map((s) => s.sigma_rel))].sort((a, b) => a - b);
  const times = [...new Set(snapshots.map((s) => s.nimg))].sort((a, b) => a - b);
  const data = [times];
  for (const w of widths) {
    data.push(times.map((t) => (snapshots.some((s) => s.nimg === t && s.sigma_rel === w) ? w : null)));
  }
  const colours = ['#1f6feb', '#d1242f', '#1a7f37', '#8250df', '#bf8700'];
  const opts = {
    width: el.clientWidth || 800, height: 160,
    scales: { x: { time: false } },
    axes: [
      { label: 'training time (images, nimg)', values: (u, ticks) => nimgTicks(ticks) },
      { label: 'σ_rel', size: 60 },
    ],
    series: [{}].concat(widths.map((w, i) => ({
      label: `σ_rel ${w}`, stroke: colours[i % colours.length], width: 0,
      points: { show: true, size: 8, fill: colours[i % colours.length] },
    }))),
  };
  const plot = new uPlot(opts, data, el);
  resizeWith(el, plot);
}

function resizeWith(el, plot) {
  const observer = new ResizeObserver(() => plot.setSize({ width: el.clientWidth, height: plot.height }));
  observer.observe(el);
  onLeave(() => { observer.disconnect(); plot.destroy(); });
}

function reconstructionTable(list) {
  if (!list.length) return h('p', { class: 'muted' }, 'None yet.');
  return h('div', { class: 'scroll' }, h('table', { id: 'reconstructions' },
    h('thead', {}, h('tr', {}, h('th', { class: 'num' }, 'σ_rel'), h('th', { class: 'num' }, 'γ'),
      h('th', {}, 'Training time'), h('th', {}, 'Type'), h('th', { class: 'num' }, 'Size'),
      h('th', { class: 'hide-narrow' }, 'BLAKE3'), h('th', {}, ''))),
    h('tbody', {}, list.map((r) => h('tr', {},
      h('td', { class: 'num' }, fmt(r.sigma_rel, 4)), h('td', { class: 'num' }, fmt(r.gamma, 3)),
      h('td', {}, fmtNimg(r.nimg)), h('td', {}, r.dtype),
      h('td', { class: 'num' }, r.byte_size ? fmtBytes(r.byte_size) : '–'),
      h('td', { class: 'hide-narrow' }, h('code', {}, (r.digest || '').slice(0, 16))),
      h('td', {}, h('a', { href: r.weights_url, download: r.file_name }, 'Download')))))));
}

/** The reconstruct panel: preview the solver's quality report and profiles, then reconstruct. */
function reconstructPanel(run, detail) {
  const enc = encodeURIComponent(run);
  const kind = h('select', { id: 'rec-kind', 'aria-label': 'width as' },
    h('option', { value: 'sigma_rel' }, 'σ_rel'), h('option', { value: 'gamma' }, 'γ'));
  const value = h('input', { id: 'rec-value', type: 'number', step: 'any', value: '0.10', required: true });
  const nimg = h('input', { id: 'rec-nimg', type: 'number', step: '1', min: '1', placeholder: String(detail.last_nimg || '') });
  const dtype = h('select', { id: 'rec-dtype' },
    h('option', { value: 'f16' }, 'f16'), h('option', { value: 'f32' }, 'f32'), h('option', { value: 'bf16' }, 'bf16'));
  const out = h('div', { id: 'rec-out', 'aria-live': 'polite' });
  const query = () => {
    const q = new URLSearchParams();
    q.set(kind.value, value.value);
    if (nimg.value) q.set('nimg', nimg.value);
    return q.toString();
  };
  const valid = () => {
    if (value.value.trim() === '' || !Number.isFinite(Number(value.value))) {
      fill(out, message(`Enter the width as a number (${kind.value === 'gamma' ? 'γ, e.g. 6.94' : 'σ_rel, e.g. 0.10'}).`));
      return false;
    }
    return true;
  };
  const preview = async () => {
    if (!valid()) return;
    fill(out, h('p', { class: 'muted' }, 'Solving…'));
    try {
      const r = await api.get(`/runs/${enc}/preview?${query()}`);
      fill(out, reportView(r), h('div', { class: 'profile' },
        h('img', { id: 'rec-profile', alt: 'target and reconstructed EMA profile', src: `/runs/${enc}/profiles.svg?${query()}` })));
    } catch (e) {
      fill(out, message(e.message));
    }
  };
  const reconstruct = async (event) => {
    event.preventDefault();
    if (!valid()) return;
    const body = { run, dtype: dtype.value, wait_secs: 30 };
    body[kind.value] = Number(value.value);
    if (nimg.value) body.nimg = Number(nimg.value);
    fill(out, h('p', { class: 'muted' }, 'Reconstructing…'));
    try {
      let r = await api.send('POST', '/reconstruct', body);
      while (r.status === 'running') {
        await new Promise((res) => setTimeout(res, 1000));
        r = await api.get(r.status_url);
      }
      fill(out, message('Reconstructed.', 'ok'), reportView(r.report ? r.report : r),
        h('p', {}, h('a', { id: 'rec-download', class: 'button primary', href: r.weights_url, download: r.file_name },
          `Download ${r.file_name} (${fmtBytes(r.byte_size || 0)})`)),
        h('p', { class: 'muted' }, 'BLAKE3 ', h('code', { id: 'rec-digest' }, r.digest || '')));
    } catch (e) {
      fill(out, message(e.message));
    }
  };
  return h('section', { class: 'panel', id: 'reconstruct' },
    h('h2', {}, 'Reconstruct an EMA length'),
    h('form', { class: 'grid', onsubmit: reconstruct },
      h('label', { for: 'rec-value' }, 'Width'), h('span', {}, kind, ' ', value),
      h('label', { for: 'rec-nimg' }, 'At training time'), h('span', {}, nimg, ' ', h('span', { class: 'muted' }, 'images (default: the last snapshot)')),
      h('label', { for: 'rec-dtype' }, 'Output type'), dtype,
      h('div', { class: 'actions' },
        h('button', { type: 'button', id: 'rec-preview', onclick: preview }, 'Preview quality'),
        h('button', { type: 'submit', id: 'rec-go', class: 'primary' }, 'Reconstruct'))),
    out);
}

/** The solver's quality report (a preview or a reconstruction's). */
function reportView(r) {
  const rows = [
    ['σ_rel', fmt(r.sigma_rel, 4)], ['γ', fmt(r.gamma, 3)], ['training time', fmtNimg(r.nimg)],
    ['profile error', r.relative_error !== undefined ? `${fmt(r.relative_error * 100, 3)} %` : '–'],
    ['noise gain', fmt(r.noise_gain)], ['sum of |weights|', fmt(r.coefficient_l1)],
    ['condition number', fmt(r.condition_number)],
    ['snapshots weighted', r.inputs ? `${r.inputs.length} of ${r.used_snapshots ?? '–'} up to this time` : (r.used_snapshots ?? '–')],
  ];
  const warnings = r.warnings || [];
  return h('div', { class: 'report', id: 'rec-report' },
    h('table', {}, h('tbody', {}, rows.map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', {}, v))))),
    warnings.length
      ? h('ul', {}, warnings.map((w) => h('li', { class: 'warning' }, typeof w === 'string' ? w : (w.message || w.code))))
      : h('p', { class: 'muted' }, 'No warnings: the snapshots reach this width.'));
}

function sweepForm(run, detail, references) {
  const out = h('div', { 'aria-live': 'polite' });
  const field = (id, label, input, hint) => [h('label', { for: id }, label), h('span', {}, input, hint ? h('span', { class: 'muted' }, ` ${hint}`) : '')];
  const sigma = h('input', { id: 'sw-sigma', value: '0.03,0.05,...,0.25', size: 28 });
  const nimgs = h('input', { id: 'sw-nimgs', placeholder: String(detail.last_nimg || ''), size: 28 });
  const images = h('input', { id: 'sw-images', type: 'number', min: '2', value: '1000' });
  const seeds = h('input', { id: 'sw-seeds', type: 'number', min: '1', value: '1' });
  const steps = h('input', { id: 'sw-steps', type: 'number', min: '2', value: '32' });
  const reference = h('select', { id: 'sw-reference' }, references.map((r) => h('option', { value: r.name }, `${r.name} (${r.count || '?'} images)`)));
  const fid = h('input', { id: 'sw-fid', type: 'checkbox', checked: true });
  const kid = h('input', { id: 'sw-kid', type: 'checkbox', checked: true });
  const submit = async (event) => {
    event.preventDefault();
    const metrics = [fid.checked && 'fid', kid.checked && 'kid'].filter(Boolean);
    const body = {
      run, sigma_rels: sigma.value, reference: reference.value, metrics,
      num_images: Number(images.value), seed_sets: Number(seeds.value), sampler: { steps: Number(steps.value) },
    };
    if (nimgs.value.trim()) body.nimgs = nimgs.value.split(',').map((v) => Number(v.trim()));
    try {
      const s = await api.send('POST', '/sweeps', body);
      location.hash = `#/sweeps/${s.id}`;
    } catch (e) {
      fill(out, message(e.message));
    }
  };
  if (!references.length) {
    return h('section', { class: 'panel' }, h('h2', {}, 'Start a sweep'),
      h('p', {}, 'A sweep needs reference statistics: ', h('code', {}, 'hindsight ref-stats DATASET --name NAME'), '.'));
  }
  return h('section', { class: 'panel', id: 'sweep-form' }, h('h2', {}, 'Start a sweep'),
    h('form', { class: 'grid', onsubmit: submit },
      field('sw-sigma', 'σ_rel', sigma, 'a list, or EDM2\'s a,b,...,z'),
      field('sw-nimgs', 'Training times', nimgs, 'optional, comma-separated: a 2-D sweep'),
      field('sw-reference', 'Reference', reference),
      h('span', {}, 'Metrics'), h('span', {}, h('label', {}, fid, ' FID'), ' ', h('label', {}, kid, ' KID')),
      field('sw-images', 'Images per seed set', images),
      field('sw-seeds', 'Seed sets', seeds, 'mean ± std over sets'),
      field('sw-steps', 'Sampler steps', steps),
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'sw-start' }, 'Start sweep'))),
    out);
}

// ---------------------------------------------------------------------------------------
// One sweep: the curve (or heat map), live

const COLOURS = ['#1f6feb', '#d1242f', '#1a7f37', '#8250df', '#bf8700', '#0a7b83'];

function pointValue(p, metric) {
  const m = p.result && p.result[metric];
  if (!m) return null;
  let err = m.std;
  if ((err === null || err === undefined) && m.std_errors && m.std_errors.length === 1) err = m.std_errors[0];
  return { mean: m.mean, err: err || 0 };
}

function pointSeconds(p) {
  const t = p.result && p.result.timings;
  return t ? t.reconstruct_s + t.batches_s + t.metrics_s : null;
}

async function sweepPage(id) {
  document.title = `hindsight — sweep ${id}`;
  let sweep = await api.get(`/sweeps/${id}`);
  const others = (await api.get('/sweeps')).sweeps.filter((s) => s.id !== id);
  const overlays = new Map();
  let logX = false;
  const head = h('div');
  const charts = h('div', { id: 'charts' });
  const samples = h('div', { class: 'samples', id: 'samples', 'aria-live': 'polite' },
    h('p', { class: 'muted' }, 'Click a point (or a row below) to see its images.'));
  const table = h('div', { class: 'scroll', id: 'points' });
  const logBox = h('input', { type: 'checkbox', id: 'log-x', onchange: () => { logX = logBox.checked; draw(); } });
  const overlayList = h('div', { class: 'controls' }, others.length ? 'Overlay:' : '',
    others.map((o) => {
      const box = h('input', {
        type: 'checkbox', onchange: async () => {
          if (box.checked) overlays.set(o.id, await api.get(`/sweeps/${o.id}`));
          else overlays.delete(o.id);
          draw();
        },
      });
      return h('label', {}, box, ` #${o.id} ${o.run}`);
    }));

  const showSamples = (p) => {
    if (!p.grid_url) {
      fill(samples, h('p', { class: 'muted' }, `Point ${p.idx} has no images yet.`));
      return;
    }
    const v = (sweep.spec.metrics || []).map((m) => {
      const x = pointValue(p, m);
      return x ? `${metricLabel(sweep.spec, m)} ${fmt(x.mean)}` : '';
    }).filter(Boolean).join(', ');
    fill(samples,
      h('h2', {}, `Samples: σ_rel ${fmt(p.sigma_rel, 4)} at ${fmtNimg(p.nimg)}`),
      h('img', { src: p.grid_url, alt: `first sampled images of point ${p.idx}`, id: 'grid-image' }),
      h('p', { class: 'muted' }, v));
  };

  const renderHead = () => {
    const pct = sweep.images_total ? (100 * sweep.images_done / sweep.images_total) : 0;
    const running = sweep.status === 'running' || sweep.status === 'queued';
    fill(head,
      h('p', {}, h('a', { href: `#/runs/${encodeURIComponent(sweep.run)}` }, `← ${sweep.run}`)),
      h('h1', {}, `Sweep #${sweep.id} `, statusBadge(sweep.status)),
      h('p', { class: 'muted' },
        `${sweep.points_done}/${sweep.points_total} points, ${sweep.images_done}/${sweep.images_total} images; `,
        `${sweep.spec.num_images} images × ${sweep.spec.seed_sets} seed set(s) per point, `,
        `${sweep.spec.sampler.steps} sampler steps, reference “${sweep.spec.reference_name}”`),
      h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(pct) },
        h('div', { style: `width: ${pct}%` })),
      (sweep.spec.warnings || []).map((w) => h('p', { class: 'warning' }, `⚠ ${w}`)),
      running && h('p', {}, h('button', {
        class: 'danger', id: 'cancel', onclick: async () => {
          try { sweep = await api.send('DELETE', `/sweeps/${sweep.id}`); refresh(); } catch (e) { showBanner(e.message); }
        },
      }, 'Cancel sweep')),
      sweep.best.map((b) => h('p', { class: 'best' },
        h('strong', {}, `Best ${metricLabel(sweep.spec, b.metric)}: ${fmt(b.value)}`),
        b.std !== null && b.std !== undefined ? ` ± ${fmt(b.std)}` : '',
        ` at σ_rel ${fmt(b.sigma_rel, 4)}, ${fmtNimg(b.nimg)}`)));
  };

  const renderTable = () => {
    const metrics = sweep.spec.metrics || [];
    fill(table, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', { class: 'num' }, 'σ_rel'),
        h('th', {}, 'Training time'), h('th', {}, 'Status'),
        metrics.map((m) => h('th', { class: 'num' }, metricLabel(sweep.spec, m))),
        h('th', { class: 'num' }, 'Images'), h('th', { class: 'num hide-narrow' }, 'Seconds'), h('th', {}, ''))),
      h('tbody', {}, sweep.points.map((p) => h('tr', {},
        h('td', { class: 'num' }, p.idx), h('td', { class: 'num' }, fmt(p.sigma_rel, 4)),
        h('td', {}, fmtNimg(p.nimg)), h('td', {}, statusBadge(p.status), p.error ? h('div', { class: 'muted' }, p.error) : ''),
        metrics.map((m) => {
          const v = pointValue(p, m);
          return h('td', { class: 'num' }, v ? `${fmt(v.mean)}${v.err ? ` ± ${fmt(v.err)}` : ''}` : '–');
        }),
        h('td', { class: 'num' }, `${p.images_done}/${p.images_total}`),
        h('td', { class: 'num hide-narrow' }, fmt(pointSeconds(p), 1)),
        h('td', {}, p.grid_url ? h('button', { class: 'link', onclick: () => showSamples(p) }, 'Images') : ''))))));
  };

  const nimgsOf = (s) => [...new Set(s.points.map((p) => p.nimg))].sort((a, b) => a - b);

  const draw = () => {
    charts.replaceChildren();
    for (const f of chartCleanup.splice(0)) f();
    const metrics = sweep.spec.metrics || ['fid'];
    for (const metric of metrics) {
      const box = h('div', { class: 'chart', id: `chart-${metric}` });
      charts.append(h('h2', {}, `${metricLabel(sweep.spec, metric)} vs EMA length`), box);
      if (nimgsOf(sweep).length > 1) heatMap(box, metric);
      else curve(box, metric);
    }
  };
  const chartCleanup = [];
  onLeave(() => chartCleanup.forEach((f) => f()));

  const curve = (box, metric) => {
    const sets = [sweep, ...overlays.values()];
    const xs = [...new Set(sets.flatMap((s) => s.points.map((p) => p.sigma_rel)))].sort((a, b) => a - b);
    const data = [xs];
    const errs = [];
    const series = [{ label: 'σ_rel' }];
    const points = [];
    sets.forEach((s, k) => {
      for (const n of nimgsOf(s)) {
        const byX = new Map(s.points.filter((p) => p.nimg === n).map((p) => [p.sigma_rel, p]));
        data.push(xs.map((x) => { const v = byX.has(x) && pointValue(byX.get(x), metric); return v ? v.mean : null; }));
        errs.push(xs.map((x) => { const v = byX.has(x) && pointValue(byX.get(x), metric); return v ? v.err : 0; }));
        points.push(xs.map((x) => byX.get(x) || null));
        const colour = COLOURS[(series.length - 1) % COLOURS.length];
        series.push({
          label: k === 0 ? `#${s.id} (this sweep)` : `#${s.id} ${s.run}`,
          stroke: colour, width: k === 0 ? 2 : 1.5, dash: k === 0 ? undefined : [6, 4],
          spanGaps: true, points: { show: true, size: 7, fill: colour },
          value: (u, v) => (v === null ? '–' : fmt(v)),
        });
      }
    });
    // The best finished point of this sweep.
    let best = null;
    data[1].forEach((v, i) => { if (v !== null && (best === null || v < data[1][best])) best = i; });
    const tip = h('div', { class: 'chart-tip', hidden: true });
    const opts = {
      width: box.clientWidth || 800, height: 340,
      scales: { x: { time: false, distr: logX ? 3 : 1 }, y: { range: (u, lo, hi) => [Math.min(lo, ...lowBars()), Math.max(hi, ...highBars())] } },
      axes: [
        { label: 'σ_rel (relative EMA length)', values: (u, ticks) => ticks.map((t) => fmt(t, 3)) },
        { label: `${metricLabel(sweep.spec, metric, true)} (lower is better)`, size: 70, values: (u, ticks) => ticks.map((t) => fmt(t, 3)) },
      ],
      series,
      cursor: { points: { size: 10 } },
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          ctx.save();
          for (let s = 1; s < u.series.length; s++) {
            if (!u.series[s].show) continue;
            ctx.strokeStyle = u.series[s].stroke();
            ctx.lineWidth = 1.5 * devicePixelRatio;
            data[s].forEach((v, i) => {
              const e = errs[s - 1][i];
              if (v === null || !e) return;
              const x = u.valToPos(xs[i], 'x', true);
              const y0 = u.valToPos(v - e, 'y', true);
              const y1 = u.valToPos(v + e, 'y', true);
              const w = 4 * devicePixelRatio;
              ctx.beginPath();
              ctx.moveTo(x, y0); ctx.lineTo(x, y1);
              ctx.moveTo(x - w, y0); ctx.lineTo(x + w, y0);
              ctx.moveTo(x - w, y1); ctx.lineTo(x + w, y1);
              ctx.stroke();
            });
          }
          // What the chart shows, for people reading the page's source and for the browser
          // test: this sweep's plotted points (σ_rel and position in CSS pixels within the
          // plotting area) and the best one.
          box.dataset.points = JSON.stringify(data[1].map((v, i) => (v === null ? null : {
            sigma_rel: xs[i], value: v, left: u.valToPos(xs[i], 'x'), top: u.valToPos(v, 'y'),
          })).filter(Boolean));
          box.dataset.best = best === null ? '' : String(xs[best]);
          if (best !== null) {
            const x = u.valToPos(xs[best], 'x', true);
            const y = u.valToPos(data[1][best], 'y', true);
            ctx.strokeStyle = '#111';
            ctx.lineWidth = 2 * devicePixelRatio;
            ctx.beginPath();
            ctx.arc(x, y, 9 * devicePixelRatio, 0, 2 * Math.PI);
            ctx.stroke();
            ctx.fillStyle = '#111';
            ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
            // Beside the ring, on whichever side has room.
            const right = x < u.bbox.left + u.bbox.width * 0.7;
            ctx.textAlign = right ? 'left' : 'right';
            ctx.textBaseline = 'bottom';
            ctx.fillText(`best σ_rel ${fmt(xs[best], 3)}`, x + (right ? 12 : -12) * devicePixelRatio, y - 8 * devicePixelRatio);
          }
          ctx.restore();
        }],
        setCursor: [(u) => {
          const i = u.cursor.idx;
          const s = 1;
          const p = i === null || i === undefined ? null : points[s - 1][i];
          if (!p || data[s][i] === null) { tip.hidden = true; return; }
          const v = pointValue(p, metric);
          tip.hidden = false;
          fill(tip,
            h('div', {}, `σ_rel ${fmt(p.sigma_rel, 4)} · ${fmtNimg(p.nimg)}`),
            h('div', {}, `${metricLabel(sweep.spec, metric)} ${fmt(v.mean)}${v.err ? ` ± ${fmt(v.err)}` : ''}`),
            h('div', {}, `${p.images_done} images · ${fmt(pointSeconds(p), 1)} s`),
            h('div', { class: 'muted' }, 'click for its images'));
          tip.style.left = `${u.cursor.left + u.over.offsetLeft + 14}px`;
          tip.style.top = `${u.cursor.top + u.over.offsetTop + 10}px`;
        }],
      },
    };
    const lowBars = () => data.slice(1).flatMap((d, s) => d.map((v, i) => (v === null ? Infinity : v - errs[s][i])));
    const highBars = () => data.slice(1).flatMap((d, s) => d.map((v, i) => (v === null ? -Infinity : v + errs[s][i])));
    const plot = new uPlot(opts, data, box);
    box.append(tip);
    // A click (press and release without dragging; a drag zooms) opens the nearest point's
    // images. uPlot swallows `click` after any sub-pixel move, so this watches the press.
    let pressed = null;
    plot.over.addEventListener('mousedown', (e) => { pressed = [e.clientX, e.clientY]; });
    plot.over.addEventListener('mouseup', (e) => {
      const moved = pressed ? Math.hypot(e.clientX - pressed[0], e.clientY - pressed[1]) : Infinity;
      pressed = null;
      const i = plot.cursor.idx;
      const p = moved > 4 || i === null || i === undefined ? null : points[0][i];
      if (p) showSamples(p);
    });
    plot.over.addEventListener('mouseleave', () => { tip.hidden = true; });
    const observer = new ResizeObserver(() => plot.setSize({ width: box.clientWidth, height: 340 }));
    observer.observe(box);
    chartCleanup.push(() => { observer.disconnect(); plot.destroy(); });
  };

  const heatMap = (box, metric) => {
    const sig = [...new Set(sweep.points.map((p) => p.sigma_rel))].sort((a, b) => a - b);
    const times = nimgsOf(sweep);
    const values = sweep.points.map((p) => pointValue(p, metric)).filter(Boolean).map((v) => v.mean);
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const ramp = (t) => {
      const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
      const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
      const i = Math.min(Math.floor(x), stops.length - 2);
      const f = x - i;
      const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
      return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
    };
    let best = null;
    for (const p of sweep.points) {
      const v = pointValue(p, metric);
      if (v && (best === null || v.mean < pointValue(best, metric).mean)) best = p;
    }
    const grid = h('div', { class: 'heatmap', role: 'grid', style: `grid-template-columns: auto repeat(${sig.length}, minmax(3.2rem, 1fr))` });
    grid.append(h('div', { class: 'label' }, 'nimg \\ σ_rel'), sig.map((s) => h('div', { class: 'label' }, fmt(s, 3))));
    for (const t of [...times].reverse()) {
      grid.append(h('div', { class: 'label' }, fmtNimg(t)));
      for (const s of sig) {
        const p = sweep.points.find((q) => q.nimg === t && q.sigma_rel === s);
        const v = p && pointValue(p, metric);
        if (!v) { grid.append(h('div', { class: 'cell empty' }, p ? p.status : '')); continue; }
        const t01 = hi > lo ? (v.mean - lo) / (hi - lo) : 0;
        grid.append(h('button', {
          class: `cell${p === best ? ' best' : ''}`, style: `background: ${ramp(t01)}; color: ${t01 > 0.6 ? '#111' : '#fff'}`,
          title: `σ_rel ${fmt(s, 4)}, ${fmtNimg(t)}: ${metricLabel(sweep.spec, metric)} ${fmt(v.mean)}${v.err ? ` ± ${fmt(v.err)}` : ''}`,
          onclick: () => showSamples(p),
        }, fmt(v.mean, 2)));
      }
    }
    box.append(grid, h('p', { class: 'muted' }, `Dark is better. The best cell is outlined: σ_rel ${best ? fmt(best.sigma_rel, 4) : '–'}, ${best ? fmtNimg(best.nimg) : ''}.`));
  };

  const refresh = () => { renderHead(); renderTable(); draw(); };

  fill(main, head,
    h('div', { class: 'controls' }, h('label', {}, logBox, ' log σ_rel axis'), overlayList),
    h('div', { class: 'row' }, h('div', { class: 'grow' }, charts), h('div', { class: 'panel', style: 'flex: 0 1 440px' }, samples)),
    h('h2', {}, 'Points'), table);
  refresh();
  // The best point's images first (else the first point that has some).
  const bestIdx = (sweep.best || []).map((b) => b.idx);
  const first = sweep.points.find((p) => p.grid_url && bestIdx.includes(p.idx))
    || sweep.points.find((p) => p.grid_url);
  if (first) showSamples(first);

  if (sweep.status === 'running' || sweep.status === 'queued') {
    const events = new EventSource(`/sweeps/${id}/events`);
    let pending = null;
    const reload = () => {
      if (pending) return;
      pending = setTimeout(async () => {
        pending = null;
        try { sweep = await api.get(`/sweeps/${id}`); refresh(); } catch (_) { /* next event retries */ }
      }, 300);
    };
    events.addEventListener('progress', reload);
    events.addEventListener('point', reload);
    events.addEventListener('end', () => { events.close(); reload(); });
    events.addEventListener('shutdown', () => showBanner('The server is restarting; reload the page to follow the sweep.', 'info'));
    onLeave(() => events.close());
  }
}
