// Charts: the run's snapshot timeline and a sweep's metric against σ_rel (a uPlot curve with
// error bars and the best point ringed, or a heat map for 2-D sweeps). They draw decoded
// objects (wire.js); values are shown with the metric's scale (KID ×10³). uPlot is the global
// the vendored classic script defines.

import { fill, h, onLeave } from './dom.js';
import { fmt, fmtNimg, fmtShort, logTicks, nimgTicks, tickLabels } from './format.js';
import * as wire from './wire.js';

const COLOURS = ['#1f6feb', '#d1242f', '#1a7f37', '#8250df', '#bf8700', '#0a7b83'];

/** The run's snapshots as dots: training time across, σ_rel up, one series per width. */
export function drawTimeline(el, snapshots) {
  const widths = [...new Set(snapshots.map((s) => s.sigmaRel))].sort((a, b) => a - b);
  const times = [...new Set(snapshots.map((s) => s.nimg))].sort((a, b) => a - b);
  const data = [times];
  for (const w of widths) {
    data.push(times.map((t) => (snapshots.some((s) => s.nimg === t && s.sigmaRel === w) ? w : null)));
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
  const observer = new ResizeObserver(() => plot.setSize({ width: el.clientWidth, height: plot.height }));
  observer.observe(el);
  onLeave(() => { observer.disconnect(); plot.destroy(); });
}

/** Training times of a sweep's points, ascending. */
export function nimgsOf(sweep) {
  return [...new Set(sweep.points.map((p) => p.nimg))].sort((a, b) => a - b);
}

/** A point's score as people read it: "FID 12.345 ± 0.200" (scaled, with its error bar). */
export function metricText(info, v) {
  const bar = wire.shown(info, v.errorBar);
  return `${info.label} ${fmt(wire.shown(info, v.value))}${bar ? ` ± ${fmt(bar)}` : ''}`;
}

/**
 * `metric` against σ_rel in `box`: one series per training time of `sweep` and of each
 * sweep in `overlays` (dashed), error bars as the server sizes them, the server's best point
 * of `sweep` ringed and labelled beneath it (above it when higher is better: the label sits
 * on the side where no other point is), the point `selected()` returns (an idx of `sweep`)
 * marked with a filled ring. With `logX` the σ_rel axis is logarithmic over the data's range
 * (×/÷1.25), ticked at 1-2-3-5 values. `onPick(point)` runs when a point of `sweep` is
 * clicked. Returns `{ destroy, redraw }`: take the chart down, or draw it again (after the
 * selection changed).
 */
export function curve(box, { sweep, overlays, metric, logX, selected, onPick }) {
  const info = wire.metricOf(sweep, metric);
  const sets = [sweep, ...overlays];
  const xs = [...new Set(sets.flatMap((s) => s.points.map((p) => p.sigmaRel)))].sort((a, b) => a - b);
  // The x axis in its own units: log10 σ_rel on a log axis, so that every position, tick and
  // label is computed here rather than by the library's log scale.
  const toX = (v) => (logX ? Math.log10(v) : v);
  const fromX = (v) => (logX ? 10 ** v : v);
  const data = [xs.map(toX)];
  const errs = [];
  const series = [{ label: 'σ_rel', value: (u, v) => (v === null ? '–' : fmtShort(fromX(v))) }];
  const points = [];
  const steps = sweep.spec.steps;
  sets.forEach((s, k) => {
    const scaleBy = wire.metricOf(s, metric) || info;
    for (const n of nimgsOf(s)) {
      const byX = new Map(s.points.filter((p) => p.nimg === n).map((p) => [p.sigmaRel, p]));
      const at = (x) => (byX.has(x) ? wire.pointMetric(byX.get(x), metric) : null);
      data.push(xs.map((x) => { const v = at(x); return v ? wire.shown(scaleBy, v.value) : null; }));
      errs.push(xs.map((x) => { const v = at(x); return v ? wire.shown(scaleBy, v.errorBar) || 0 : 0; }));
      points.push(xs.map((x) => byX.get(x) || null));
      const colour = COLOURS[(series.length - 1) % COLOURS.length];
      // Overlays are comparable (same reference, images and seeds: the page offers no
      // others); a different sampler is what they may differ in, so the legend says it.
      const stepsNote = k > 0 && s.spec.steps !== steps && s.spec.steps !== null ? `, ${s.spec.steps} steps` : '';
      series.push({
        label: k === 0 ? `#${s.id} (this sweep)` : `#${s.id} ${s.run}${stepsNote}`,
        stroke: colour, width: k === 0 ? 2 : 1.5, dash: k === 0 ? undefined : [6, 4],
        spanGaps: true, points: { show: true, size: 7, fill: colour },
        value: (u, v) => (v === null ? '–' : fmt(v)),
      });
    }
  });
  // The best finished point of this sweep, as the server ranks it (by its index: its σ_rel
  // is the point's own).
  const reported = sweep.best.find((b) => b.metric === metric);
  const bestPoint = reported ? sweep.points.find((p) => p.idx === reported.idx) : null;
  let best = bestPoint ? xs.indexOf(bestPoint.sigmaRel) : -1;
  if (best < 0 || !data[1] || data[1][best] === null) best = null;
  const tip = h('div', { class: 'chart-tip', hidden: true });
  const lowBars = () => data.slice(1).flatMap((d, s) => d.map((v, i) => (v === null ? Infinity : v - errs[s][i])));
  const highBars = () => data.slice(1).flatMap((d, s) => d.map((v, i) => (v === null ? -Infinity : v + errs[s][i])));
  // The σ_rel range: the data's, padded (×/÷1.25 on a log axis, 5 % of the span on a linear
  // one, never below 0), not the library's powers of ten.
  const [xLo, xHi] = xs.length ? [xs[0], xs[xs.length - 1]] : [0.01, 0.3];
  const xRange = logX
    ? [xLo / 1.25, xHi * 1.25]
    : xHi > xLo ? [Math.max(0, xLo - 0.05 * (xHi - xLo)), xHi + 0.05 * (xHi - xLo)] : [xLo * 0.9, xLo * 1.1];
  let xLabels = [];
  // The value axis: the server's label for it and which way is better (the canvas draws it;
  // the box keeps it as text too, for people reading the page's source and the browser test).
  const lowerIsBetter = info.lowerIsBetter;
  const yLabel = `${info.axisLabel}${lowerIsBetter ? ' (lower is better)' : ' (higher is better)'}`;
  box.dataset.yLabel = yLabel;
  const yRange = (u, lo, hi) => {
    lo = Math.min(lo, ...lowBars());
    hi = Math.max(hi, ...highBars());
    const span = hi > lo ? hi - lo : Math.abs(hi) * 0.1 || 1;
    // Room for the best point's label on the better side.
    return lowerIsBetter ? [lo - 0.18 * span, hi + 0.06 * span] : [lo - 0.06 * span, hi + 0.18 * span];
  };
  const opts = {
    width: box.clientWidth || 800, height: 340,
    scales: { x: { time: false, range: () => xRange.map(toX) }, y: { range: yRange } },
    axes: [
      logX ? {
        label: 'σ_rel (relative EMA length, log scale)',
        splits: () => logTicks(xRange[0], xRange[1]).map(toX),
        values: (u, ticks) => { xLabels = ticks.map((t) => fmtShort(fromX(t))); return xLabels; },
      } : {
        label: 'σ_rel (relative EMA length)',
        values: (u, ticks, ax, space, step) => { xLabels = tickLabels(ticks, step); return xLabels; },
      },
      { label: yLabel, size: 70, values: (u, ticks, ax, space, step) => tickLabels(ticks, step) },
    ],
    series,
    cursor: { points: { size: 10 } },
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        const dpr = devicePixelRatio;
        ctx.save();
        for (let s = 1; s < u.series.length; s++) {
          if (!u.series[s].show) continue;
          ctx.strokeStyle = u.series[s].stroke();
          ctx.lineWidth = 1.5 * dpr;
          data[s].forEach((v, i) => {
            const e = errs[s - 1][i];
            if (v === null || !e) return;
            const x = u.valToPos(data[0][i], 'x', true);
            const y0 = u.valToPos(v - e, 'y', true);
            const y1 = u.valToPos(v + e, 'y', true);
            const w = 4 * dpr;
            ctx.beginPath();
            ctx.moveTo(x, y0); ctx.lineTo(x, y1);
            ctx.moveTo(x - w, y0); ctx.lineTo(x + w, y0);
            ctx.moveTo(x - w, y1); ctx.lineTo(x + w, y1);
            ctx.stroke();
          });
        }
        // What the chart shows, for people reading the page's source and for the browser
        // test: this sweep's plotted points (σ_rel, the value as shown, and position in CSS
        // pixels within the plotting area), the best one and its label, the selected one,
        // the σ_rel axis' range and tick labels.
        const at = (i) => ({ left: u.valToPos(data[0][i], 'x'), top: u.valToPos(data[1][i], 'y') });
        box.dataset.points = JSON.stringify(data[1].map((v, i) => (v === null ? null : {
          sigma_rel: xs[i], value: v, ...at(i),
        })).filter(Boolean));
        box.dataset.best = best === null ? '' : String(xs[best]);
        box.dataset.xRange = JSON.stringify(xRange);
        box.dataset.xTicks = JSON.stringify(xLabels);
        const pick = selected ? selected() : null;
        const chosen = pick === null || pick === undefined || !points[0] ? -1 : points[0].findIndex((p) => p && p.idx === pick);
        if (chosen >= 0 && data[1][chosen] !== null) {
          const x = u.valToPos(data[0][chosen], 'x', true);
          const y = u.valToPos(data[1][chosen], 'y', true);
          ctx.fillStyle = 'rgba(240, 140, 0, 0.45)';
          ctx.strokeStyle = '#e07000';
          ctx.lineWidth = 2.5 * dpr;
          ctx.beginPath();
          ctx.arc(x, y, 7 * dpr, 0, 2 * Math.PI);
          ctx.fill();
          ctx.stroke();
          box.dataset.selected = JSON.stringify({ sigma_rel: xs[chosen], idx: pick, ...at(chosen) });
        } else {
          box.dataset.selected = '';
        }
        if (best !== null) {
          const x = u.valToPos(data[0][best], 'x', true);
          const y = u.valToPos(data[1][best], 'y', true);
          ctx.strokeStyle = '#111';
          ctx.lineWidth = 2 * dpr;
          ctx.beginPath();
          ctx.arc(x, y, 10 * dpr, 0, 2 * Math.PI);
          ctx.stroke();
          // Centred under the ring and its error bar (over them when higher is better),
          // kept inside the plot.
          const text = `best σ_rel ${fmtShort(xs[best])}`;
          ctx.font = `${12 * dpr}px system-ui, sans-serif`;
          const width = ctx.measureText(text).width;
          const cx = Math.min(Math.max(x, u.bbox.left + width / 2 + 2 * dpr), u.bbox.left + u.bbox.width - width / 2 - 2 * dpr);
          const bar = errs[0][best] || 0;
          const ty = lowerIsBetter
            ? Math.max(y + 13 * dpr, u.valToPos(data[1][best] - bar, 'y', true) + 3 * dpr)
            : Math.min(y - 13 * dpr, u.valToPos(data[1][best] + bar, 'y', true) - 3 * dpr);
          ctx.fillStyle = getComputedStyle(box).color || '#111';
          ctx.textAlign = 'center';
          ctx.textBaseline = lowerIsBetter ? 'top' : 'bottom';
          ctx.fillText(text, cx, ty);
          box.dataset.bestLabel = JSON.stringify({
            text, left: (cx - u.bbox.left) / dpr, top: (ty - u.bbox.top) / dpr, width: width / dpr,
          });
        } else {
          box.dataset.bestLabel = '';
        }
        ctx.restore();
      }],
      setCursor: [(u) => {
        const i = u.cursor.idx;
        const p = i === null || i === undefined ? null : points[0][i];
        if (!p || data[1][i] === null) { tip.hidden = true; return; }
        tip.hidden = false;
        fill(tip,
          h('div', {}, `σ_rel ${fmt(p.sigmaRel, 4)} · ${fmtNimg(p.nimg)}`),
          h('div', {}, metricText(info, wire.pointMetric(p, metric))),
          h('div', {}, `${p.imagesTotal ? `${p.imagesDone} images · ` : ''}${fmt(p.result ? p.result.seconds : null, 1)} s`),
          h('div', { class: 'muted' }, 'click for its images'));
        tip.style.left = `${u.cursor.left + u.over.offsetLeft + 14}px`;
        tip.style.top = `${u.cursor.top + u.over.offsetTop + 10}px`;
      }],
    },
  };
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
    if (p) onPick(p);
  });
  plot.over.addEventListener('mouseleave', () => { tip.hidden = true; });
  const observer = new ResizeObserver(() => plot.setSize({ width: box.clientWidth, height: 340 }));
  observer.observe(box);
  return {
    destroy: () => { observer.disconnect(); plot.destroy(); },
    redraw: () => plot.redraw(false, false),
  };
}

/** A 2-D sweep's `metric` as a grid: training time up, σ_rel across, viridis colours from the
 *  best value (dark when lower is better) to the worst; the server's best cell outlined, the
 *  cell of the point `selected()` returns marked. Returns `{ destroy, redraw }` as `curve`. */
export function heatMap(box, { sweep, metric, selected, onPick }) {
  const info = wire.metricOf(sweep, metric);
  const sig = [...new Set(sweep.points.map((p) => p.sigmaRel))].sort((a, b) => a - b);
  const times = nimgsOf(sweep);
  const shownOf = (p) => {
    const v = wire.pointMetric(p, metric);
    return v ? wire.shown(info, v.value) : null;
  };
  const values = sweep.points.map(shownOf).filter((v) => v !== null);
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
  const reported = sweep.best.find((b) => b.metric === metric);
  const best = reported ? sweep.points.find((p) => p.idx === reported.idx) || null : null;
  const grid = h('div', { class: 'heatmap', role: 'grid', style: `grid-template-columns: auto repeat(${sig.length}, minmax(3.2rem, 1fr))` });
  grid.append(h('div', { class: 'label' }, 'nimg \\ σ_rel'), sig.map((s) => h('div', { class: 'label' }, fmt(s, 3))));
  for (const t of [...times].reverse()) {
    grid.append(h('div', { class: 'label' }, fmtNimg(t)));
    for (const s of sig) {
      const p = sweep.points.find((q) => q.nimg === t && q.sigmaRel === s);
      const v = p ? shownOf(p) : null;
      if (v === null) { grid.append(h('div', { class: 'cell empty' }, p ? p.status : '')); continue; }
      // Dark is the better end.
      const t01 = hi > lo ? (info.lowerIsBetter ? v - lo : hi - v) / (hi - lo) : 0;
      grid.append(h('button', {
        class: `cell${p === best ? ' best' : ''}`, 'data-idx': p.idx, style: `background: ${ramp(t01)}; color: ${t01 > 0.6 ? '#111' : '#fff'}`,
        title: `σ_rel ${fmt(s, 4)}, ${fmtNimg(t)}: ${metricText(info, wire.pointMetric(p, metric))}`,
        onclick: () => onPick(p),
      }, fmt(v, 2)));
    }
  }
  box.append(grid, h('p', { class: 'muted' }, `Dark is better. The best cell is outlined: σ_rel ${best ? fmt(best.sigmaRel, 4) : '–'}, ${best ? fmtNimg(best.nimg) : ''}.`));
  const redraw = () => {
    const pick = selected ? selected() : null;
    for (const cell of grid.querySelectorAll('.cell[data-idx]')) {
      cell.classList.toggle('selected', pick !== null && pick !== undefined && cell.dataset.idx === String(pick));
    }
  };
  redraw();
  return { destroy: () => {}, redraw };
}
