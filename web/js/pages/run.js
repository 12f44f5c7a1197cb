// One run (#/runs/NAME): snapshot timeline, configuration, reconstruct panel with the solver's
// preview, reconstructions, sweeps, and the form that starts a sweep.

import * as api from '../api.js';
import { drawTimeline } from '../chart.js';
import { fill, h, main, message } from '../dom.js';
import { fmt, fmtBytes, fmtDuration, fmtNimg } from '../format.js';
import * as wire from '../wire.js';
import { sweepTable } from './runs.js';

export async function runPage(name) {
  document.title = `hindsight — ${name}`;
  const enc = encodeURIComponent(name);
  const [detail, snapshots, sweeps, refs] = await Promise.all([
    api.get(`/runs/${enc}`).then(wire.runDetail),
    api.get(`/runs/${enc}/snapshots`).then(wire.snapshotList),
    api.get(`/sweeps?run=${enc}`).then(wire.sweepList),
    api.get('/references').then(wire.referenceList),
  ]);
  const timeline = h('div', { class: 'chart short', id: 'timeline' });
  fill(main,
    h('p', {}, h('a', { href: '#/' }, '← Runs')),
    h('h1', {}, name),
    h('p', { class: 'muted' },
      detail.snapshots
        ? `${detail.snapshots} snapshots, ${fmtBytes(detail.bytes)}, up to ${fmtNimg(detail.lastNimg)}`
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
    sweepTable(sweeps, false),
    sweepForm(name, detail, refs));
  if (snapshots.length) drawTimeline(timeline, snapshots);
  else fill(timeline, h('p', { class: 'muted' }, 'No snapshots yet: train (hindsight train), import (hindsight import) or upload (POST /runs/NAME/snapshots) some.'));
}

function reconstructionTable(list) {
  if (!list.length) return h('p', { class: 'muted' }, 'None yet.');
  return h('div', { class: 'scroll' }, h('table', { id: 'reconstructions' },
    h('thead', {}, h('tr', {}, h('th', { class: 'num' }, 'σ_rel'), h('th', { class: 'num' }, 'γ'),
      h('th', {}, 'Training time'), h('th', {}, 'Type'), h('th', { class: 'num' }, 'Size'),
      h('th', { class: 'hide-narrow' }, 'BLAKE3'), h('th', {}, ''))),
    h('tbody', {}, list.map((r) => h('tr', {},
      h('td', { class: 'num' }, fmt(r.sigmaRel, 4)), h('td', { class: 'num' }, fmt(r.gamma, 3)),
      h('td', {}, fmtNimg(r.nimg)), h('td', {}, r.dtype),
      h('td', { class: 'num' }, r.byteSize ? fmtBytes(r.byteSize) : '–'),
      h('td', { class: 'hide-narrow' }, h('code', {}, (r.digest || '').slice(0, 16))),
      h('td', {}, h('a', { href: r.weightsUrl, download: r.fileName }, 'Download')))))));
}

/** The reconstruct panel: preview the solver's quality report and profiles, then reconstruct. */
function reconstructPanel(run, detail) {
  const enc = encodeURIComponent(run);
  const kind = h('select', { id: 'rec-kind', 'aria-label': 'width as' },
    h('option', { value: 'sigma_rel' }, 'σ_rel'), h('option', { value: 'gamma' }, 'γ'));
  const value = h('input', { id: 'rec-value', type: 'number', step: 'any', value: '0.10', required: true });
  const nimg = h('input', { id: 'rec-nimg', type: 'number', step: '1', min: '1', placeholder: String(detail.lastNimg || '') });
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
      const report = wire.qualityReport(await api.get(`/runs/${enc}/preview?${query()}`));
      fill(out, reportView(report), h('div', { class: 'profile' },
        h('img', { id: 'rec-profile', alt: 'target and reconstructed EMA profile', src: `/runs/${enc}/profiles.svg?${query()}` })));
    } catch (e) {
      fill(out, message(e.message));
    }
  };
  const reconstruct = async (event) => {
    event.preventDefault();
    if (!valid()) return;
    // The request body is ours (ReconstructRequest), not the server's JSON.
    const body = { run, dtype: dtype.value, wait_secs: 30 };
    body[kind.value] = Number(value.value);
    if (nimg.value) body.nimg = Number(nimg.value);
    fill(out, h('p', { class: 'muted' }, 'Reconstructing…'));
    try {
      let answer = await api.send('POST', '/reconstruct', body);
      for (let p = wire.reconstructionPending(answer); p.running; p = wire.reconstructionPending(answer)) {
        await new Promise((res) => setTimeout(res, 1000));
        answer = await api.get(p.statusUrl);
      }
      const r = wire.reconstruction(answer);
      fill(out, message('Reconstructed.', 'ok'), reportView(r.report),
        h('p', {}, h('a', { id: 'rec-download', class: 'button primary', href: r.weightsUrl, download: r.fileName },
          `Download ${r.fileName} (${fmtBytes(r.byteSize || 0)})`)),
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

/** A decoded quality report (a preview's or a reconstruction's). */
function reportView(r) {
  const rows = [
    ['σ_rel', fmt(r.sigmaRel, 4)], ['γ', fmt(r.gamma, 3)], ['training time', fmtNimg(r.nimg)],
    ['profile error', r.relativeError !== undefined ? `${fmt(r.relativeError * 100, 3)} %` : '–'],
    ['noise gain', fmt(r.noiseGain)], ['sum of |weights|', fmt(r.coefficientL1)],
    ['condition number', fmt(r.conditionNumber)],
    ['snapshots weighted', r.inputCount !== null ? `${r.inputCount} of ${r.usedSnapshots ?? '–'} up to this time` : (r.usedSnapshots ?? '–')],
  ];
  return h('div', { class: 'report', id: 'rec-report' },
    h('table', {}, h('tbody', {}, rows.map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', {}, v))))),
    r.warnings.length
      ? h('ul', {}, r.warnings.map((w) => h('li', { class: 'warning' }, w.message || w.code)))
      : h('p', { class: 'muted' }, 'No warnings: the snapshots reach this width.'));
}

function sweepForm(run, detail, references) {
  const out = h('div', { 'aria-live': 'polite' });
  const field = (id, label, input, hint) => [h('label', { for: id }, label), h('span', {}, input, hint ? h('span', { class: 'muted' }, ` ${hint}`) : '')];
  // Defaults for a first look at the curve: 5 widths across EDM2's range, 500 images each
  // (FID at 500 images is biased upwards, but alike for every point, which see the same
  // seeds); the estimate below says what a bigger sweep costs.
  const sigma = h('input', { id: 'sw-sigma', value: '0.05,0.10,...,0.25', size: 28 });
  const nimgs = h('input', { id: 'sw-nimgs', placeholder: String(detail.lastNimg || ''), size: 28 });
  const images = h('input', { id: 'sw-images', type: 'number', min: '2', value: '500' });
  const seeds = h('input', { id: 'sw-seeds', type: 'number', min: '1', value: '1' });
  const steps = h('input', { id: 'sw-steps', type: 'number', min: '2', value: '32' });
  const reference = h('select', { id: 'sw-reference' }, references.map((r) => h('option', { value: r.name }, `${r.name} (${r.count || '?'} images)`)));
  // How long it would take, as the server estimates it from points it has measured; asked
  // again (once the typing pauses) whenever the size of the sweep changes.
  const estimate = h('p', { id: 'sw-estimate', class: 'muted', 'aria-live': 'polite' }, 'Estimating the time…');
  let asked = 0;
  let pause = null;
  const reestimate = () => {
    clearTimeout(pause);
    pause = setTimeout(async () => {
      const q = new URLSearchParams({
        sigma_rels: sigma.value, num_images: images.value, seed_sets: seeds.value, steps: steps.value,
      });
      if (nimgs.value.trim()) q.set('nimgs', nimgs.value);
      const mine = ++asked;
      try {
        const e = wire.sweepEstimate(await api.get(`/runs/${encodeURIComponent(run)}/sweep-estimate?${q}`));
        if (mine !== asked) return;
        fill(estimate, e.seconds === null
          ? `Estimated time: ${e.note}.`
          : [h('strong', {}, `Estimated time ≈ ${fmtDuration(e.seconds)}`),
            ` for ${e.points} point${e.points === 1 ? '' : 's'}, ${e.images} images (${fmtDuration(e.pointSeconds)} per point); ${e.note}.`]);
      } catch (err) {
        if (mine === asked) fill(estimate, `No estimate: ${err.message}`);
      }
    }, 250);
  };
  for (const input of [sigma, nimgs, images, seeds, steps]) input.addEventListener('input', reestimate);
  const fid = h('input', { id: 'sw-fid', type: 'checkbox', checked: true });
  const kid = h('input', { id: 'sw-kid', type: 'checkbox', checked: true });
  const submit = async (event) => {
    event.preventDefault();
    const metrics = [fid.checked && 'fid', kid.checked && 'kid'].filter(Boolean);
    // The request body is ours (SweepRequest), not the server's JSON.
    const body = {
      run, sigma_rels: sigma.value, reference: reference.value, metrics,
      num_images: Number(images.value), seed_sets: Number(seeds.value), sampler: { steps: Number(steps.value) },
    };
    if (nimgs.value.trim()) body.nimgs = nimgs.value.split(',').map((v) => Number(v.trim()));
    try {
      const s = wire.sweep(await api.send('POST', '/sweeps', body));
      location.hash = `#/sweeps/${s.id}`;
    } catch (e) {
      fill(out, message(e.message));
    }
  };
  if (!references.length) {
    return h('section', { class: 'panel' }, h('h2', {}, 'Start a sweep'),
      h('p', {}, 'A sweep needs reference statistics: ', h('code', {}, 'hindsight ref-stats DATASET --name NAME'), '.'));
  }
  reestimate();
  return h('section', { class: 'panel', id: 'sweep-form' }, h('h2', {}, 'Start a sweep'),
    h('form', { class: 'grid', onsubmit: submit },
      field('sw-sigma', 'σ_rel', sigma, 'a list, or EDM2\'s a,b,...,z'),
      field('sw-nimgs', 'Training times', nimgs, 'optional, comma-separated: a 2-D sweep'),
      field('sw-reference', 'Reference', reference),
      h('span', {}, 'Metrics'), h('span', {}, h('label', {}, fid, ' FID'), ' ', h('label', {}, kid, ' KID')),
      field('sw-images', 'Images per seed set', images),
      field('sw-seeds', 'Seed sets', seeds, 'mean ± std over sets'),
      field('sw-steps', 'Sampler steps', steps),
      h('span', {}, 'Time'), estimate,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'sw-start' }, 'Start sweep'))),
    out);
}
