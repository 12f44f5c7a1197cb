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
