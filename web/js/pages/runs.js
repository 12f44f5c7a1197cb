// The runs page (#/): every run, every sweep, the reference statistics. Also the sweep table
// the run page shows.

import * as api from '../api.js';
import { fill, h, main, statusBadge } from '../dom.js';
import { fmt, fmtBytes, fmtNimg, fmtTime } from '../format.js';
import * as wire from '../wire.js';

export async function runsPage() {
  document.title = 'hindsight — runs';
  const [runs, sweeps, refs] = await Promise.all([
    api.get('/runs').then(wire.runList),
    api.get('/sweeps').then(wire.sweepList),
    api.get('/references').then(wire.referenceList),
  ]);
  const table = h('table', { id: 'runs' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Run'), h('th', { class: 'num' }, 'Snapshots'), h('th', { class: 'num' }, 'Size'),
      h('th', {}, 'Training time'), h('th', { class: 'hide-narrow' }, 'Last activity'))),
    h('tbody', {}, runs.map((r) => h('tr', {},
      h('td', {}, h('a', { href: `#/runs/${encodeURIComponent(r.name)}` }, r.name)),
      h('td', { class: 'num' }, r.snapshots),
      h('td', { class: 'num' }, fmtBytes(r.bytes)),
      h('td', {}, `${fmtNimg(r.firstNimg)} – ${fmtNimg(r.lastNimg)}`),
      h('td', { class: 'hide-narrow' }, fmtTime(r.lastActivity))))));
  fill(main,
    h('h1', {}, 'Runs'),
    runs.length ? h('div', { class: 'scroll' }, table)
      : h('p', {}, 'No runs yet. Train one (', h('code', {}, 'hindsight train'),
        '), import snapshots (', h('code', {}, 'hindsight import'), ') or run ',
        h('code', {}, 'hindsight demo'), '.'),
    h('h2', {}, 'Sweeps'),
    sweepTable(sweeps, true),
    h('h2', {}, 'Reference statistics'),
    refs.length ? h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Source'), h('th', { class: 'num' }, 'Images'),
        h('th', {}, 'KID'))),
      h('tbody', {}, refs.map((r) => h('tr', {},
        h('td', {}, r.name), h('td', {}, r.source), h('td', { class: 'num' }, r.count || '–'),
        h('td', {}, r.hasFeatures ? 'yes' : 'no (imported)'))))))
      : h('p', { class: 'muted' }, 'None yet: ', h('code', {}, 'hindsight ref-stats DATASET --name NAME'), '.'));
}

/** Decoded sweeps as a table; `withRun` adds the run's column. */
export function sweepTable(sweeps, withRun) {
  if (!sweeps.length) return h('p', { class: 'muted' }, 'No sweeps yet.');
  return h('div', { class: 'scroll' }, h('table', { class: 'sweeps' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Sweep'), withRun && h('th', {}, 'Run'), h('th', {}, 'Status'),
      h('th', {}, 'σ_rel'), h('th', { class: 'num' }, 'Points'), h('th', { class: 'num' }, 'Images'),
      h('th', {}, 'Best'))),
    h('tbody', {}, sweeps.map((s) => {
      const best = s.best[0];
      const info = best && wire.metricOf(s, best.metric);
      const sig = s.spec.sigmaRels || [];
      return h('tr', {},
        h('td', {}, h('a', { href: `#/sweeps/${s.id}` }, `#${s.id}`)),
        withRun && h('td', {}, h('a', { href: `#/runs/${encodeURIComponent(s.run)}` }, s.run)),
        h('td', {}, statusBadge(s.status), s.spec.external ? h('span', { class: 'muted' }, ' · external') : ''),
        h('td', {}, sig.length ? `${fmt(sig[0])} … ${fmt(sig[sig.length - 1])}` : '–'),
        h('td', { class: 'num' }, `${s.pointsDone}/${s.pointsTotal}`),
        h('td', { class: 'num' }, `${s.imagesDone}/${s.imagesTotal}`),
        h('td', {}, best && info
          ? `${info.label} ${fmt(wire.shown(info, best.value))} at σ_rel ${fmt(best.sigmaRel)}` : '–'));
    }))));
}
