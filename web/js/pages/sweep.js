// One sweep (#/sweeps/ID): the metric against σ_rel (or a heat map), the points, their image
// grids, overlays of other sweeps; live through the sweep's server-sent events.

import * as api from '../api.js';
import { curve, heatMap, nimgsOf } from '../chart.js';
import { fill, h, main, onLeave, showBanner, statusBadge } from '../dom.js';
import { fmt, fmtNimg } from '../format.js';
import * as wire from '../wire.js';

const getSweep = async (id) => wire.sweep(await api.get(`/sweeps/${id}`));

export async function sweepPage(id) {
  document.title = `hindsight — sweep ${id}`;
  let sweep = await getSweep(id);
  const others = wire.sweepList(await api.get('/sweeps')).filter((s) => s.id !== id);
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
          if (box.checked) overlays.set(o.id, await getSweep(o.id));
          else overlays.delete(o.id);
          draw();
        },
      });
      return h('label', {}, box, ` #${o.id} ${o.run}`);
    }));

  const showSamples = (p) => {
    if (!p.gridUrl) {
      fill(samples, h('p', { class: 'muted' }, `Point ${p.idx} has no images yet.`));
      return;
    }
    const v = sweep.metrics.map((info) => {
      const x = wire.pointMetric(p, info.metric);
      return x ? `${info.label} ${fmt(wire.shown(info, x.value))}` : '';
    }).filter(Boolean).join(', ');
    fill(samples,
      h('h2', {}, `Samples: σ_rel ${fmt(p.sigmaRel, 4)} at ${fmtNimg(p.nimg)}`),
      h('img', { src: p.gridUrl, alt: `first sampled images of point ${p.idx}`, id: 'grid-image' }),
      h('p', { class: 'muted' }, v));
  };

  const renderHead = () => {
    const pct = sweep.imagesTotal ? (100 * sweep.imagesDone / sweep.imagesTotal) : 0;
    const spec = sweep.spec;
    fill(head,
      h('p', {}, h('a', { href: `#/runs/${encodeURIComponent(sweep.run)}` }, `← ${sweep.run}`)),
      h('h1', {}, `Sweep #${sweep.id} `, statusBadge(sweep.status)),
      h('p', { class: 'muted' },
        `${sweep.pointsDone}/${sweep.pointsTotal} points, ${sweep.imagesDone}/${sweep.imagesTotal} images; `,
        `${spec.numImages} images × ${spec.seedSets} seed set(s) per point, `,
        `${spec.steps} sampler steps, reference “${spec.referenceName}”`),
      h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(pct) },
        h('div', { style: `width: ${pct}%` })),
      spec.warnings.map((w) => h('p', { class: 'warning' }, `⚠ ${w}`)),
      sweep.running && h('p', {}, h('button', {
        class: 'danger', id: 'cancel', onclick: async () => {
          try { sweep = wire.sweep(await api.send('DELETE', `/sweeps/${sweep.id}`)); refresh(); } catch (e) { showBanner(e.message); }
        },
      }, 'Cancel sweep')),
      sweep.best.map((b) => {
        const info = wire.metricOf(sweep, b.metric);
        const bar = wire.shown(info, b.errorBar);
        return h('p', { class: 'best' },
          h('strong', {}, `Best ${info.label}: ${fmt(wire.shown(info, b.value))}`),
          bar ? ` ± ${fmt(bar)}` : '',
          ` at σ_rel ${fmt(b.sigmaRel, 4)}, ${fmtNimg(b.nimg)}`);
      }));
  };

  const renderTable = () => {
    fill(table, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', { class: 'num' }, 'σ_rel'),
        h('th', {}, 'Training time'), h('th', {}, 'Status'),
        sweep.metrics.map((info) => h('th', { class: 'num' }, info.label)),
        h('th', { class: 'num' }, 'Images'), h('th', { class: 'num hide-narrow' }, 'Seconds'), h('th', {}, ''))),
      h('tbody', {}, sweep.points.map((p) => h('tr', {},
        h('td', { class: 'num' }, p.idx), h('td', { class: 'num' }, fmt(p.sigmaRel, 4)),
        h('td', {}, fmtNimg(p.nimg)), h('td', {}, statusBadge(p.status), p.error ? h('div', { class: 'muted' }, p.error) : ''),
        sweep.metrics.map((info) => {
          const v = wire.pointMetric(p, info.metric);
          const bar = v && wire.shown(info, v.errorBar);
          return h('td', { class: 'num' }, v ? `${fmt(wire.shown(info, v.value))}${bar ? ` ± ${fmt(bar)}` : ''}` : '–');
        }),
        h('td', { class: 'num' }, `${p.imagesDone}/${p.imagesTotal}`),
        h('td', { class: 'num hide-narrow' }, fmt(p.result ? p.result.seconds : null, 1)),
        h('td', {}, p.gridUrl ? h('button', { class: 'link', onclick: () => showSamples(p) }, 'Images') : ''))))));
  };

  const chartCleanup = [];
  onLeave(() => chartCleanup.forEach((f) => f()));
  const draw = () => {
    charts.replaceChildren();
    for (const f of chartCleanup.splice(0)) f();
    for (const info of sweep.metrics) {
      const box = h('div', { class: 'chart', id: `chart-${info.metric}` });
      charts.append(h('h2', {}, `${info.label} vs EMA length`), box);
      const metric = info.metric;
      if (nimgsOf(sweep).length > 1) heatMap(box, { sweep, metric, onPick: showSamples });
      else {
        chartCleanup.push(curve(box, {
          sweep, overlays: [...overlays.values()], metric, logX, onPick: showSamples,
        }));
      }
    }
  };

  const refresh = () => { renderHead(); renderTable(); draw(); };

  fill(main, head,
    h('div', { class: 'controls' }, h('label', {}, logBox, ' log σ_rel axis'), overlayList),
    h('div', { class: 'row' }, h('div', { class: 'grow' }, charts), h('div', { class: 'panel', style: 'flex: 0 1 440px' }, samples)),
    h('h2', {}, 'Points'), table);
  refresh();
  // The best point's images first (else the first point that has some).
  const bestIdx = sweep.best.map((b) => b.idx);
  const first = sweep.points.find((p) => p.gridUrl && bestIdx.includes(p.idx))
    || sweep.points.find((p) => p.gridUrl);
  if (first) showSamples(first);

  if (sweep.running) {
    // The events' payloads (SweepEvent) are not read: each one says "something moved", and
    // the page reloads the whole sweep through its decoder.
    const events = new EventSource(`/sweeps/${id}/events`);
    let pending = null;
    const reload = () => {
      if (pending) return;
      pending = setTimeout(async () => {
        pending = null;
        try { sweep = await getSweep(id); refresh(); } catch (_) { /* next event retries */ }
      }, 300);
    };
    events.addEventListener('progress', reload);
    events.addEventListener('point', reload);
    events.addEventListener('end', () => { events.close(); reload(); });
    events.addEventListener('shutdown', () => showBanner('The server is restarting; reload the page to follow the sweep.', 'info'));
    onLeave(() => events.close());
  }
}
