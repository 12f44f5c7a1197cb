// hindsight's web UI: runs, the metric-vs-EMA-length plot of sweeps, reconstruct and download.
// Plain browser JavaScript modules over the server's JSON API (see /openapi.json; its fields
// are read in wire.js only); charts by uPlot (vendored in /ui/vendor/uplot, a classic script
// that defines `uPlot`). Routes are URL fragments: #/, #/runs/NAME, #/sweeps/ID.

import { askToken } from './api.js';
import { fill, h, leave, main, message, showBanner } from './dom.js';
import { runPage } from './pages/run.js';
import { runsPage } from './pages/runs.js';
import { sweepPage } from './pages/sweep.js';

async function route() {
  leave();
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

/** Starts the page: the token button, routing on every change of the fragment. */
export function start() {
  document.getElementById('token-button').addEventListener('click', () => askToken());
  window.addEventListener('hashchange', route);
  // Module scripts run once the document is parsed, so the first route can go at once.
  route();
}
