// The /ui page: the models, and for the one selected its live training curve, versions and
// labels, all read from the /v1 API with the token the user gives (docs/ui.md).
// Plain ES2020 with no framework, no build step and nothing from another origin.
'use strict';

const TOKEN_KEY = 'propserve.token';
const POLL_MS = 1000; // the selected model's new history points
const REFRESH_MS = 3000; // the models list and the selected model's versions
const MAX_POINTS = 2000; // a long run's first load comes in buckets of ceil(head_step / 2000) steps
const PAGES_PER_POLL = 20; // history pages read in one poll, at most: the rest come next time

const W = 720;
const H = 260;
const MARGIN = { left: 56, right: 44, top: 14, bottom: 30 };

const $ = (selector) => document.querySelector(selector);
const chart = $('#curve svg');
// NOTE: taken from the page's own <svg> so that no URL, even a namespace, is written here.
const SVG_NS = chart.namespaceURI;

const state = {
  models: new Map(), // name -> Model, as last listed
  selected: null, // the model shown in detail
  generation: 0, // bumped on each selection: answers about an earlier one are dropped
  points: [], // the history points drawn, in step order
  every: 0, // the curve's bucket size in steps (0: not chosen yet)
  versions: [],
  nextRefresh: 0, // when the models list is due (ms since the epoch)
};

// -- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, path) {
    super(message);
    this.status = status;
    this.code = code;
    this.path = path && path.split('?')[0];
  }
}

async function api(path) {
  const headers = { Accept: 'application/json' };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { headers, cache: 'no-store' });
  } catch (err) {
    throw new ApiError(0, 'network', 'the server cannot be reached', path);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    const message = error.message || response.statusText;
    throw new ApiError(response.status, error.code || 'error', message, path);
  }
  return body;
}

const modelPath = (name) => `/v1/models/${encodeURIComponent(name)}`;

const HINTS = {
  401: 'enter a token above',
  403: "this token lacks the role: reading needs 'predict'",
};

function showStatus(error) {
  const line = $('#status');
  if (!error) {
    line.dataset.state = 'ok';
    line.dataset.status = '';
    line.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    return;
  }
  line.dataset.state = 'error';
  line.dataset.status = String(error.status || 0);
  const where = error.path ? `GET ${error.path}: ` : '';
  const what = error.status ? `${error.status} ${error.code}: ${error.message}` : error.message;
  const hint = HINTS[error.status] ? ` — ${HINTS[error.status]}` : '';
  line.textContent = where + what + hint;
}

// -- the loop: poll while the tab is visible -------------------------------------------------

let timer = 0;
let busy = false;

function schedule(ms) {
  clearTimeout(timer);
  if (!document.hidden) timer = setTimeout(tick, ms);
}

async function tick() {
  if (busy || document.hidden) return;
  busy = true;
  try {
    if (Date.now() >= state.nextRefresh) {
      await refresh();
      state.nextRefresh = Date.now() + REFRESH_MS;
    }
    if (state.selected) await pollHistory();
    showStatus(null);
  } catch (error) {
    showStatus(error);
  } finally {
    busy = false;
    schedule(POLL_MS);
  }
}

async function refresh() {
  const { models } = await api('/v1/models');
  const name = state.selected;
  const before = state.models.get(name);
  state.models = new Map(models.map((m) => [m.name, m]));
  renderModels(models);
  if (!name) return;
  const model = state.models.get(name);
  if (!model) throw new ApiError(404, 'not_found', `no model named ${name}`);
  const drawn = lastStep();
  // Rolled back: the head's history was cut back and grows again from the version's step.
  if ((drawn !== null && model.head_step < drawn) || (before && model.head_step < before.head_step)) {
    resetCurve();
  }
  const generation = state.generation;
  const { versions } = await api(`${modelPath(name)}/versions`);
  if (generation !== state.generation) return;
  state.versions = versions;
  renderLabels(model, versions);
  renderVersions(versions);
  drawCurve();
}

// The first poll of a selection reads the whole run, page by page (next_since), and later
// ones what came since. Buckets (every > 1) are aligned to steps k*every+1 .. (k+1)*every
// and a point stands at its bucket's last step, so a partial last bucket is read again and
// replaced.
async function pollHistory() {
  const { generation, selected: name } = state;
  if (state.points.length > 2 * MAX_POINTS) resetCurve(); // grown live: bucket it again
  const first = state.every === 0;
  if (first) {
    const model = state.models.get(name);
    state.every = Math.max(1, Math.ceil((model ? model.head_step : 0) / MAX_POINTS));
  }
  const every = state.every;
  const last = lastStep();
  let since = null;
  if (last !== null) since = last % every === 0 ? last + 1 : Math.floor((last - 1) / every) * every + 1;
  let changed = first;
  for (let page = 0; page < PAGES_PER_POLL; page++) {
    const query = new URLSearchParams();
    if (since !== null) query.set('since', String(since));
    if (every > 1) query.set('every', String(every));
    const answer = await api(`${modelPath(name)}/history?${query}`);
    if (generation !== state.generation) return;
    if (answer.points.length) {
      const from = answer.points[0].step;
      while (state.points.length && lastStep() >= from) state.points.pop();
      state.points.push(...answer.points);
      changed = true;
    }
    if (answer.next_since == null) break;
    since = answer.next_since;
  }
  if (changed) drawCurve();
}

function lastStep() {
  return state.points.length ? state.points[state.points.length - 1].step : null;
}

function resetCurve() {
  state.points = [];
  state.every = 0;
}

// -- selection -------------------------------------------------------------------------------

function selectFromHash() {
  const match = /^#model=(.+)$/.exec(location.hash);
  const name = match ? decodeURIComponent(match[1]) : null;
  if (name === state.selected) return;
  state.selected = name;
  state.generation += 1;
  state.versions = [];
  resetCurve();
  $('#detail').hidden = !name;
  $('#detail-title').textContent = name || '';
  $('#labels').replaceChildren();
  $('#versions tbody').replaceChildren();
  drawCurve();
  for (const row of document.querySelectorAll('#models tbody tr')) {
    row.classList.toggle('selected', row.dataset.model === name);
  }
  state.nextRefresh = 0;
  schedule(0);
}

// -- tables ----------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return '—';
  return String(Number(Number(value).toPrecision(4)));
}

function layersText(spec) {
  const layers = spec.layers.map((l) => (l.activation ? `${l.units} ${l.activation}` : `${l.units}`));
  return [String(spec.input_dim), ...layers].join(' → ');
}

function optimizerText(optimizer) {
  if (!optimizer || typeof optimizer === 'string') return optimizer || 'sgd';
  return optimizer.lr === undefined ? optimizer.name : `${optimizer.name} lr=${fmt(optimizer.lr)}`;
}

function labelsText(labels) {
  return Object.entries(labels)
    .map(([label, version]) => `${label} → v${version}`)
    .join(', ');
}

function renderModels(models) {
  const rows = models.map((m) => {
    const link = el('a', { href: `#model=${encodeURIComponent(m.name)}` }, m.name);
    const row = el(
      'tr',
      { 'data-model': m.name },
      el('td', { class: 'name' }, link),
      el('td', { class: 'layers' }, layersText(m.spec)),
      el('td', { class: 'loss' }, m.spec.loss),
      el('td', { class: 'optimizer' }, `${optimizerText(m.spec.optimizer)}, ${m.spec.dtype || 'float32'}`),
      el('td', { class: 'params num' }, m.parameter_count.toLocaleString('en')),
      el('td', { class: 'head-step num' }, String(m.head_step)),
      el('td', { class: 'last-loss num' }, fmt(m.last_loss)),
      el('td', { class: 'latest num' }, m.latest_version === null ? '—' : `v${m.latest_version}`),
      el('td', { class: 'labels' }, labelsText(m.labels)),
    );
    row.classList.toggle('selected', m.name === state.selected);
    row.addEventListener('click', () => {
      location.hash = `model=${encodeURIComponent(m.name)}`;
    });
    return row;
  });
  $('#models tbody').replaceChildren(...rows);
  $('#no-models').hidden = models.length > 0;
}

function renderLabels(model, versions) {
  const steps = new Map(versions.map((v) => [v.version, v.step]));
  const items = Object.entries(model.labels)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([label, version]) => {
      const step = steps.has(version) ? ` (step ${steps.get(version)})` : '';
      const name = el('span', { class: 'label' }, label);
      return el('li', { 'data-label': label, 'data-version': version }, name, ` → version ${version}${step}`);
    });
  let unsaved = model.unsaved_steps ? `, ${model.unsaved_steps} unsaved` : '';
  if (!unsaved && model.latest_version !== null) unsaved = ', saved';
  items.push(el('li', { class: 'head' }, `head → step ${model.head_step}${unsaved}`));
  $('#labels').replaceChildren(...items);
}

function renderVersions(versions) {
  const rows = [...versions].reverse().map((v) => {
    const metrics = Object.entries(v.metrics)
      .map(([key, value]) => `${key.replace(/_/g, ' ')} ${fmt(value)}`)
      .join(', ');
    return el(
      'tr',
      { 'data-version': v.version },
      el('td', { class: 'version num' }, `v${v.version}`),
      el('td', { class: 'step num' }, String(v.step)),
      el('td', { class: 'saved' }, new Date(v.created_at * 1000).toLocaleString()),
      el('td', { class: 'parent num' }, v.parent === null ? '—' : `v${v.parent}`),
      el('td', { class: 'metrics' }, metrics),
      el('td', { class: 'labels' }, ...v.labels.map((l) => el('span', { class: 'label' }, l))),
    );
  });
  $('#versions tbody').replaceChildren(...rows);
}

// -- the curve -------------------------------------------------------------------------------

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

// Round numbers from lo to hi, about `count` intervals, each at least `least` wide.
function niceTicks(lo, hi, count, least = 0) {
  if (!(hi - lo > 1e-12)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    [lo, hi] = [lo - pad, hi + pad];
  }
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(least, [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw));
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v < hi + step; v += step) {
    ticks.push(Number(v.toPrecision(12)));
    if (v >= hi) break;
  }
  return ticks;
}

const scale = (d0, d1, r0, r1) => (v) => r0 + ((v - d0) / (d1 - d0 || 1)) * (r1 - r0);
const polyline = (points, x, y, value) =>
  points.map((p) => `${x(p.step).toFixed(1)},${y(value(p)).toFixed(1)}`).join(' ');

function nearest(points, step) {
  let lo = 0;
  let hi = points.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid].step < step) lo = mid + 1;
    else hi = mid;
  }
  const before = points[Math.max(lo - 1, 0)];
  return Math.abs(before.step - step) < Math.abs(points[lo].step - step) ? before : points[lo];
}

function drawCurve() {
  const points = state.points.filter((p) => Number.isFinite(p.loss));
  const accuracy = points.filter((p) => Number.isFinite(p.accuracy));
  chart.dataset.points = String(points.length);
  chart.dataset.every = String(state.every || 1);
  chart.dataset.lastStep = points.length ? String(points[points.length - 1].step) : '';
  $('#curve-note').textContent = state.every > 1 ? `(means over ${state.every} steps)` : '';
  if (!points.length) {
    chart.replaceChildren(svg('text', { class: 'empty', x: W / 2, y: H / 2, 'text-anchor': 'middle' },
      state.selected ? 'No training steps yet' : ''));
    return;
  }
  const [left, right, top, bottom] = [MARGIN.left, W - MARGIN.right, MARGIN.top, H - MARGIN.bottom];
  const [firstStep, endStep] = [points[0].step, points[points.length - 1].step];
  const stepTicks = niceTicks(Math.max(0, firstStep - 1), endStep, 6, 1);
  let [lowest, highest] = [Infinity, -Infinity]; // NOTE: a loop, as Math.min(...) may overflow the stack
  for (const p of points) [lowest, highest] = [Math.min(lowest, p.loss), Math.max(highest, p.loss)];
  const lossTicks = niceTicks(lowest, highest, 5);
  const x = scale(stepTicks[0], stepTicks[stepTicks.length - 1], left, right);
  const y = scale(lossTicks[0], lossTicks[lossTicks.length - 1], bottom, top);
  const yAccuracy = scale(0, 1, bottom, top);
  const parts = [];
  for (const t of stepTicks) {
    parts.push(svg('line', { class: 'grid', x1: x(t), x2: x(t), y1: top, y2: bottom }),
      svg('text', { class: 'tick', x: x(t), y: bottom + 16, 'text-anchor': 'middle' }, String(t)));
  }
  for (const t of lossTicks) {
    parts.push(svg('line', { class: 'grid', x1: left, x2: right, y1: y(t), y2: y(t) }),
      svg('text', { class: 'tick loss', x: left - 6, y: y(t) + 4, 'text-anchor': 'end' }, fmt(t)));
  }
  parts.push(svg('line', { class: 'axis', x1: left, x2: right, y1: bottom, y2: bottom }),
    svg('line', { class: 'axis', x1: left, x2: left, y1: top, y2: bottom }),
    svg('polyline', { class: 'series loss', points: polyline(points, x, y, (p) => p.loss) }));
  if (accuracy.length) {
    for (const t of [0, 0.5, 1]) {
      parts.push(svg('text', { class: 'tick accuracy', x: right + 6, y: yAccuracy(t) + 4 }, String(t)));
    }
    parts.push(svg('line', { class: 'axis', x1: right, x2: right, y1: top, y2: bottom }),
      svg('polyline', {
        class: 'series accuracy',
        points: polyline(accuracy, x, yAccuracy, (p) => p.accuracy),
      }));
  }
  for (const v of state.versions) {
    if (v.step > endStep || v.step < stepTicks[0]) continue; // not on the curve (yet)
    const at = { cx: x(v.step), cy: y(nearest(points, v.step).loss) };
    const names = v.labels.length ? ` (${v.labels.join(', ')})` : '';
    parts.push(
      svg('circle', { class: 'version', r: 4.5, 'data-version': v.version, ...at },
        svg('title', {}, `version ${v.version} at step ${v.step}${names}`)),
      svg('text', { class: 'version-name', x: at.cx, y: at.cy - 9, 'text-anchor': 'middle' },
        `v${v.version}`),
    );
  }
  chart.replaceChildren(...parts);
}

// -- start -----------------------------------------------------------------------------------

function useToken() {
  const token = $('#token').value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  state.nextRefresh = 0;
  schedule(0);
}

$('#token').value = sessionStorage.getItem(TOKEN_KEY) || '';
$('#token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  useToken();
});
$('#token').addEventListener('change', useToken);
$('#token-clear').addEventListener('click', () => {
  $('#token').value = '';
  useToken();
});
document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    clearTimeout(timer);
  } else {
    state.nextRefresh = 0;
    schedule(0);
  }
});
window.addEventListener('hashchange', selectFromHash);
selectFromHash();
schedule(0);
