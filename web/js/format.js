// Numbers, sizes, training times and dates as the page shows them.

export function fmtBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return u === 0 ? `${n} B` : `${n.toFixed(1)} ${units[u]}`;
}

/** Training images, shortened: 4.2M img. */
export function fmtNimg(n) {
  if (n === null || n === undefined) return '–';
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G img`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M img`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k img`;
  return `${n} img`;
}

export function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits);
}

export function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** How far `iso` is from `now` (ms since the epoch), in words: "12 s ago", "in 2 min". */
export function fmtAgo(iso, now = Date.now()) {
  if (!iso) return '–';
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return iso;
  const s = Math.round((t - now) / 1000);
  const a = Math.abs(s);
  const text = a < 90 ? `${a} s` : a < 5400 ? `${Math.round(a / 60)} min` : `${Math.round(a / 3600)} h`;
  return s <= 0 ? `${text} ago` : `in ${text}`;
}

/** Tick labels for training times: one unit (k, M, G) and as many decimals as the step
 *  between ticks needs, so no two ticks read the same. */
export function nimgTicks(ticks) {
  const max = Math.max(0, ...ticks.map((t) => Math.abs(t)));
  const [div, unit] = max >= 1e9 ? [1e9, 'G'] : max >= 1e6 ? [1e6, 'M'] : max >= 1e3 ? [1e3, 'k'] : [1, ''];
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) / div : 1;
  const digits = step >= 1 || step === 0 ? 0 : Math.min(6, Math.ceil(-Math.log10(step) - 1e-9));
  return ticks.map((t) => `${(t / div).toFixed(digits)}${unit}`);
}

/** Decimals that write `v` exactly, up to `max` (0.03 → 2, 0.2 → 1, 5 → 0, 0.025 → 3). */
function decimalsOf(v, max = 8) {
  const a = Math.abs(v);
  for (let d = 0; d < max; d++) {
    const scaled = a * 10 ** d;
    if (Math.abs(scaled - Math.round(scaled)) <= 1e-6 * Math.max(1, scaled)) return d;
  }
  return max;
}

/** Tick labels of a linear axis whose ticks are `step` apart: as many decimals as the step
 *  needs and no more, the same for every tick (200, 205, 210; 0.12, 0.14; 0.025, 0.050). */
export function tickLabels(ticks, step) {
  const d = step > 0 ? decimalsOf(step) : 3;
  return ticks.map((t) => (t === null || t === undefined ? '' : t.toFixed(d)));
}

/** A number with the decimals it needs, at most `max` (0.03, 0.1, 0.125). */
export function fmtShort(v, max = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  return v.toFixed(decimalsOf(v, max));
}

/** Ticks of a logarithmic axis from `lo` to `hi` (both > 0, in the data's units): the
 *  coarsest of the series 1·10ᵏ, 1-3, 1-2-5, 1-2-3-5, 1-1.5-2-3-4-5-7 that puts at least
 *  four ticks in the range; where even the finest puts fewer than two (a narrow range),
 *  evenly spaced 1-2-5 steps. */
export function logTicks(lo, hi) {
  const series = [[1], [1, 3], [1, 2, 5], [1, 2, 3, 5], [1, 1.5, 2, 3, 4, 5, 7]];
  const within = (mantissas) => {
    const out = [];
    for (let k = Math.floor(Math.log10(lo)) - 1; k <= Math.ceil(Math.log10(hi)); k++) {
      for (const m of mantissas) {
        const t = Number((m * 10 ** k).toPrecision(12));
        if (t >= lo && t <= hi) out.push(t);
      }
    }
    return out;
  };
  let ticks = [];
  for (const s of series) {
    ticks = within(s);
    if (ticks.length >= 4) return ticks;
  }
  if (ticks.length >= 2) return ticks;
  const rough = (hi - lo) / 4;
  const p = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= rough) || rough;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12 * hi; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

/** A duration in seconds, rounded as people say it: "40 s", "12 min", "1 h 05 min", "2.5 days". */
export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '–';
  if (s < 90) return `${Math.max(1, Math.round(s))} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 48 * 3600) {
    const m = Math.round(s / 60);
    return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
  }
  return `${(s / 86400).toFixed(1)} days`;
}
