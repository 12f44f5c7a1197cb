// One sweep (#/sweeps/ID): each metric against σ_rel (or a heat map), the points, their image
// grids, overlays of other sweeps; for an external sweep the workers evaluating it now, how to
// start one, and the attempts that failed. Live through the sweep's server-sent events.

import * as api from '../api.js';
import { curve, heatMap, nimgsOf } from '../chart.js';
import { fill, h, main, onLeave, showBanner, statusBadge } from '../dom.js';
import { fmt, fmtAgo, fmtNimg, fmtTime } from '../format.js';
import * as wire from '../wire.js';

const getSweep = async (id) => wire.sweep(await api.get(`/sweeps/${id}`));

export async function sweepPage(id) {
  document.title = `hindsight — sweep ${id}`;
  let sweep = await getSweep(id);
  // Overlays: only sweeps whose values are comparable with this one's (the server's
  // comparison key: the same reference statistics, feature network, images per seed set and
  // seed sets); the others are counted, not offered.
  const listed = wire.sweepList(await api.get('/sweeps')).filter((s) => s.id !== id);
  const others = listed.filter((s) => s.comparisonKey === sweep.comparisonKey);
  const incomparable = listed.length - others.length;
  const overlays = new Map();
  let logX = false;
  // The point whose images are shown, marked on the charts (kept across redraws).
  let selectedIdx = null;
  const head = h('div');
  const charts = h('div', { id: 'charts' });
  const samples = h('div', { class: 'samples', id: 'samples', 'aria-live': 'polite' },
    h('p', { class: 'muted' }, sweep.imagesTotal
      ? 'Click a point (or a row below) to see its images.'
      : 'This sweep measures no images through the server (user metrics only): no image grids.'));
  const table = h('div', { class: 'scroll', id: 'points' });
  const evaluators = h('div', { id: 'evaluators' });
  const failures = h('div', { id: 'attempts' });
  const logBox = h('input', { type: 'checkbox', id: 'log-x', onchange: () => { logX = logBox.checked; draw(); } });
  const overlayList = h('div', { class: 'controls', id: 'overlays' }, others.length ? 'Overlay:' : '',
    others.map((o) => {
      const box = h('input', {
        type: 'checkbox', onchange: async () => {
          if (box.checked) overlays.set(o.id, await getSweep(o.id));
          else overlays.delete(o.id);
          draw();
        },
      });
      return h('label', {}, box, ` #${o.id} ${o.run}`);
    }),
    incomparable > 0 && h('span', { class: 'muted', id: 'overlays-hidden', title: `this sweep: ${sweep.comparisonKey}` },
      `${incomparable} other sweep${incomparable === 1 ? '' : 's'} with other reference statistics, image counts or seed sets ${incomparable === 1 ? 'is' : 'are'} not comparable, so not offered`));

  const showSamples = (p) => {
    selectedIdx = p.idx;
    for (const c of charted) c.redraw();
    if (!p.gridUrl) {
      fill(samples, h('p', { class: 'muted' }, `Point ${p.idx} has no images yet.`));
      return;
    }
    const v = sweep.metrics.map((info) => {
      const x = wire.pointMetric(p, info.metric);
      return x ? `${info.label} ${fmt(wire.shown(info, x.value))}` : '';
    }).filter(Boolean).join(', ');
    const features = p.result && p.result.features;
    fill(samples,
      h('h2', {}, `Samples: σ_rel ${fmt(p.sigmaRel, 4)} at ${fmtNimg(p.nimg)}`),
      h('img', { src: p.gridUrl, alt: `first sampled images of point ${p.idx}`, id: 'grid-image' }),
      h('p', { class: 'muted' }, v),
      features && features !== 'server'
        ? h('p', { class: 'muted' }, `Inception features computed by ${features === 'client' ? 'the evaluator' : 'the evaluator and the server'} (audited).`)
        : '');
  };

  const renderHead = () => {
    // A sweep with only user metrics samples no images through the server: its progress is
    // its points'.
    const pct = sweep.imagesTotal ? (100 * sweep.imagesDone / sweep.imagesTotal)
      : sweep.pointsTotal ? (100 * sweep.pointsDone / sweep.pointsTotal) : 0;
    const spec = sweep.spec;
    const perPoint = spec.numImages > 0
      ? `${spec.numImages} images × ${spec.seedSets} seed set(s) per point`
      : `${spec.seedSets} seed set(s) per point`;
    fill(head,
      h('p', {}, h('a', { href: `#/runs/${encodeURIComponent(sweep.run)}` }, `← ${sweep.run}`)),
      h('h1', {}, `Sweep #${sweep.id} `, statusBadge(sweep.status)),
      h('p', { class: 'muted' },
        `${sweep.pointsDone}/${sweep.pointsTotal} points`,
        sweep.imagesTotal ? `, ${sweep.imagesDone}/${sweep.imagesTotal} images` : '',
        `; ${perPoint}`,
        spec.steps !== null ? `, ${spec.steps} sampler steps` : '',
        spec.referenceName !== null ? `, reference “${spec.referenceName}”` : ''),
      h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(pct) },
        h('div', { style: `width: ${pct}%` })),
      h('p', { id: 'evaluator' }, 'Evaluated by ',
        spec.external
          ? [h('strong', {}, 'external'), ' evaluators (your own workers, over the lease protocol)']
          : [h('strong', {}, 'builtin'), ' workers (the server samples the run\'s network)']),
      spec.externalSampler !== null && Object.keys(spec.externalSampler).length > 0 && h('details', {}, h('summary', {}, 'Sampler settings (handed to every evaluator)'),
        h('pre', { class: 'json', id: 'sampler' }, JSON.stringify(spec.externalSampler, null, 2))),
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
    const images = sweep.imagesTotal > 0;
    const holder = (p) => sweep.workers.find((w) => w.idx === p.idx);
    fill(table, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', { class: 'num' }, 'σ_rel'),
        h('th', {}, 'Training time'), h('th', {}, 'Status'),
        sweep.metrics.map((info) => h('th', { class: 'num' }, info.label)),
        images && h('th', { class: 'num' }, 'Images'), h('th', { class: 'num hide-narrow' }, 'Seconds'), h('th', {}, ''))),
      h('tbody', {}, sweep.points.map((p) => h('tr', {},
        h('td', { class: 'num' }, p.idx), h('td', { class: 'num' }, fmt(p.sigmaRel, 4)),
        h('td', {}, fmtNimg(p.nimg)), h('td', {}, statusBadge(p.status),
          p.status === 'running' && holder(p) ? h('span', { class: 'muted' }, ` ${holder(p).worker}`) : '',
          p.error ? h('div', { class: 'muted' }, p.error) : ''),
        sweep.metrics.map((info) => {
          const v = wire.pointMetric(p, info.metric);
          const bar = v && wire.shown(info, v.errorBar);
          return h('td', { class: 'num' }, v ? `${fmt(wire.shown(info, v.value))}${bar ? ` ± ${fmt(bar)}` : ''}` : '–');
        }),
        images && h('td', { class: 'num' }, `${p.imagesDone}/${p.imagesTotal}`),
        h('td', { class: 'num hide-narrow' }, fmt(p.result ? p.result.seconds : null, 1)),
        h('td', {}, p.gridUrl ? h('button', { class: 'link', onclick: () => showSamples(p) }, 'Images') : ''))))));
  };

  // The leases held now; for an external sweep nobody works, how to start an evaluator.
  const renderEvaluators = () => {
    if (!sweep.spec.external && !sweep.workers.length) { fill(evaluators); return; }
    const now = Date.now();
    const hint = sweep.running && !sweep.workers.length && h('div', { class: 'panel', id: 'worker-hint' },
      h('p', {}, 'No evaluator is working on this sweep yet. Its points are evaluated by your own ',
        'model on your own machines: run an evaluator there with the Python client (',
        h('code', {}, 'pip install "./clients/python[torch]"'), ' from the repository), which ',
        'claims points, samples and measures them, and sends the results back:'),
      h('pre', {}, h('code', {}, [
        'from hindsight_client import Client',
        `client = Client("${location.origin}", token="…")  # a write token`,
        '# load: builds your model from the reconstructed weights; generate: samples images',
        '# with it (for FID/KID); metrics: measures your own metrics',
        `client.evaluate(sweep=${sweep.id}, load=load, generate=generate, metrics=metrics, device="cuda")`,
      ].join('\n'))),
      h('p', { class: 'muted' }, 'Any number of evaluators can share the sweep; the protocol is in docs/EVALUATORS.md.'));
    fill(evaluators,
      h('h2', {}, 'Workers'),
      sweep.workers.length ? h('div', { class: 'scroll' }, h('table', { id: 'workers' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Worker'), h('th', { class: 'num' }, 'Point'), h('th', { class: 'num' }, 'σ_rel'),
          h('th', {}, 'Training time'), h('th', { class: 'hide-narrow' }, 'Claimed'), h('th', {}, 'Last heartbeat'),
          h('th', {}, 'Lease expires'))),
        h('tbody', {}, sweep.workers.map((w) => h('tr', {},
          h('td', {}, w.worker), h('td', { class: 'num' }, `#${w.idx}`), h('td', { class: 'num' }, fmt(w.sigmaRel, 4)),
          h('td', {}, fmtNimg(w.nimg)),
          h('td', { class: 'hide-narrow', title: fmtTime(w.claimedAt) }, fmtAgo(w.claimedAt, now)),
          h('td', { title: fmtTime(w.heartbeatAt) }, fmtAgo(w.heartbeatAt, now)),
          h('td', { title: fmtTime(w.expiresAt) },
            w.expired ? [statusBadge('expired'), ` ${fmtAgo(w.expiresAt, now)}`] : fmtAgo(w.expiresAt, now)))))))
        : hint || h('p', { class: 'muted' }, 'No evaluator holds a point now.'));
  };

  // Attempts at points that did not finish (an evaluator's failure, or its lease ran out).
  const renderFailures = () => {
    if (!sweep.failures.length) {
      fill(failures, sweep.spec.external ? [h('h2', {}, 'Failed attempts'), h('p', { class: 'muted' }, 'None.')] : []);
      return;
    }
    fill(failures, h('h2', {}, 'Failed attempts'), h('div', { class: 'scroll' }, h('table', { id: 'failures' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Worker'), h('th', { class: 'num' }, 'Point'), h('th', { class: 'num' }, 'σ_rel'),
        h('th', {}, 'Training time'), h('th', {}, 'Outcome'), h('th', {}, 'Message'),
        h('th', { class: 'hide-narrow' }, 'Claimed'), h('th', { class: 'hide-narrow' }, 'Ended'))),
      h('tbody', {}, sweep.failures.map((f) => h('tr', {},
        h('td', {}, f.worker), h('td', { class: 'num' }, `#${f.idx}`), h('td', { class: 'num' }, fmt(f.sigmaRel, 4)),
        h('td', {}, fmtNimg(f.nimg)), h('td', {}, statusBadge(f.outcome)),
        h('td', { class: 'message-text' }, f.message
          || { expired: 'the lease ran out (no heartbeat)', released: 'given back by the worker' }[f.outcome] || '–'),
        h('td', { class: 'hide-narrow' }, fmtTime(f.claimedAt)), h('td', { class: 'hide-narrow' }, fmtTime(f.endedAt))))))));
  };

  // The charts drawn now ({destroy, redraw} each).
  const charted = [];
  onLeave(() => charted.forEach((c) => c.destroy()));
  const selected = () => selectedIdx;
  const draw = () => {
    charts.replaceChildren();
    for (const c of charted.splice(0)) c.destroy();
    for (const info of sweep.metrics) {
      const box = h('div', { class: 'chart', id: `chart-${info.metric}` });
      charts.append(h('h2', {}, `${info.label} vs EMA length`), box);
      const metric = info.metric;
      if (nimgsOf(sweep).length > 1) charted.push(heatMap(box, { sweep, metric, selected, onPick: showSamples }));
      else {
        charted.push(curve(box, {
          sweep, overlays: [...overlays.values()], metric, logX, selected, onPick: showSamples,
        }));
      }
    }
  };

  const refresh = () => { renderHead(); renderEvaluators(); renderTable(); renderFailures(); draw(); };

  fill(main, head, evaluators,
    h('div', { class: 'controls' }, h('label', {}, logBox, ' log σ_rel axis'), overlayList),
    h('div', { class: 'row' }, h('div', { class: 'grow' }, charts), h('div', { class: 'panel', style: 'flex: 0 1 440px' }, samples)),
    h('h2', {}, 'Points'), table, failures);
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
    // Evaluators come, heartbeat and go between points' events: an external sweep is also
    // read again every few seconds while it runs (its workers table, the leases' times).
    if (sweep.spec.external) {
      const poll = setInterval(() => { if (sweep.running) reload(); else clearInterval(poll); }, 5000);
      onLeave(() => clearInterval(poll));
    }
  }
}
