// Overview: requests, errors, latency and TTFT percentiles, cost, per model / route / key / node over a period
// (GET /admin/v1/console/stats, from the usage store), with the plane's live counters.

import { admin } from '../api.js';
import { barChart, lineChart } from '../charts.js';
import { field, fmt, h, table } from '../ui.js';

const PERIODS = [['1h', 'Last hour'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days'], ['30d', 'Last 30 days']];
const GROUPS = [['model', 'Model'], ['route', 'Route'], ['key', 'API key'], ['node', 'Node']];

export async function render(ctx) {
  const period = ctx.params.get('period') || '24h';
  const by = ctx.params.get('by') || 'model';
  const stats = await admin.get('/console/stats', { period, by, org: ctx.org });
  const controls = h('form', { class: 'inline', 'aria-label': 'Period and grouping' },
    field('Period', 'period', { type: 'select', options: PERIODS, value: period }),
    field('Group by', 'by', { type: 'select', options: GROUPS, value: by }));
  controls.addEventListener('change', () => {
    ctx.navigate('overview', { period: controls.elements.period.value, by: controls.elements.by.value });
  });
  controls.addEventListener('submit', (event) => event.preventDefault());
  const t = stats.totals;
  const live = stats.live;
  const errorRate = t.requests ? ((100 * t.errors) / t.requests).toFixed(1) + '%' : '—';
  const cards = h('div', { class: 'cards', 'data-testid': 'totals' },
    card('Requests', fmt.num(t.requests)),
    card('Errors', `${fmt.num(t.errors)} (${errorRate})`),
    card('Cost', fmt.usd(t.cost_usd)),
    card('Tokens', fmt.num(t.prompt_tokens + t.completion_tokens)),
    card('Latency p50 / p95', `${fmt.ms(t.latency_p50_ms)} / ${fmt.ms(t.latency_p95_ms)}`),
    card('TTFT p50 / p95', `${fmt.ms(t.ttft_p50_ms)} / ${fmt.ms(t.ttft_p95_ms)}`));
  const nodes = Object.entries(live.nodes || {}).map(([s, n]) => `${n} ${s}`).join(', ') || 'none';
  const liveCards = h('div', { class: 'cards', 'data-testid': 'live' },
    live.in_flight !== undefined ? card('In flight now', fmt.num(live.in_flight)) : null,
    live.api_requests !== undefined ? card('API requests since start', fmt.num(live.api_requests)) : null,
    card('Nodes', nodes),
    card('Node slots busy', `${live.slots_busy} / ${live.slots_total}`));
  const labels = stats.series.map((p) => new Date(p.t));
  const pick = (name) => stats.series.map((p) => p[name]);
  const charts = h('div', { class: 'charts' },
    lineChart('Requests and errors', labels, [
      { name: 'requests', values: pick('requests') }, { name: 'errors', values: pick('errors') }], fmt.num),
    lineChart('Latency', labels, [
      { name: 'p50', values: pick('latency_p50_ms') }, { name: 'p95', values: pick('latency_p95_ms') },
      { name: 'p99', values: pick('latency_p99_ms') }], fmt.ms),
    lineChart('Time to first token', labels, [
      { name: 'p50', values: pick('ttft_p50_ms') }, { name: 'p95', values: pick('ttft_p95_ms') }], fmt.ms),
    lineChart('Cost', labels, [{ name: 'USD', values: pick('cost_usd').map((v) => v ?? 0) }], fmt.usd),
    barChart(`Requests by ${by}`, stats.groups.map((g) => ({ name: g.name, value: g.requests })), fmt.num),
    barChart(`Cost by ${by}`, stats.groups.map((g) => ({ name: g.name, value: g.cost_usd || 0 })), fmt.usd));
  const groups = table([
    { title: by, value: (g) => g.name },
    { title: 'Requests', value: (g) => fmt.num(g.requests), num: true },
    { title: 'Errors', value: (g) => fmt.num(g.errors), num: true },
    { title: 'Tokens', value: (g) => fmt.num(g.prompt_tokens + g.completion_tokens), num: true },
    { title: 'Cost', value: (g) => fmt.usd(g.cost_usd), num: true },
    { title: 'Latency p50', value: (g) => fmt.ms(g.latency_p50_ms), num: true },
    { title: 'p95', value: (g) => fmt.ms(g.latency_p95_ms), num: true },
    { title: 'TTFT p50', value: (g) => fmt.ms(g.ttft_p50_ms), num: true },
    { title: 'p95', value: (g) => fmt.ms(g.ttft_p95_ms), num: true },
  ], stats.groups, { empty: 'No requests in this period.' });
  const refresh = h('button', { type: 'button' }, 'Refresh');
  refresh.addEventListener('click', () => ctx.refresh());
  return [
    h('h1', {}, 'Overview'),
    h('div', { class: 'panel' }, controls, h('p', { class: 'muted' },
      `From ${fmt.date(stats.since)} to ${fmt.date(stats.until)}, in steps of ${Math.round(stats.bucket_s / 60)} min. `,
      'Percentiles are read from histograms (within 12%).'), refresh),
    cards, h('h2', {}, 'Live'), liveCards, charts, h('h2', {}, `By ${by}`), groups,
  ];
}

function card(label, value) {
  return h('div', { class: 'card' }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value));
}

