// Usage and cost explorer (with CSV export), node earnings, and the audit log with "verify chain".

import { admin, list } from '../api.js';
import { fmt, h, notice, table } from '../ui.js';

const GROUPS = ['model', 'route', 'key', 'node', 'org', 'day'];
const SINCE = [['1', 'Last 24 hours'], ['7', 'Last 7 days'], ['30', 'Last 30 days'], ['', 'All time']];

export async function render(ctx) {
  if (ctx.page === 'earnings') return earnings(ctx);
  if (ctx.page === 'audit') return audit(ctx);
  return usage(ctx);
}

function sinceOf(days) {
  return days ? new Date(Date.now() - Number(days) * 86400000).toISOString() : undefined;
}

function controls(ctx, days, extra) {
  const select = h('select', { name: 'since' }, SINCE.map(([v, text]) => h('option', { value: v }, text)));
  select.value = days;
  const element = h('form', { class: 'inline', 'aria-label': 'Report options' },
    h('label', {}, 'Period', select), extra);
  element.addEventListener('submit', (event) => event.preventDefault());
  element.addEventListener('change', () => {
    const params = { since: select.value };
    for (const box of element.querySelectorAll('input[type=checkbox]:checked')) {
      params.by = params.by ? `${params.by},${box.value}` : box.value;
    }
    const radio = element.querySelector('input[type=radio]:checked');
    if (radio) params.by = radio.value;
    ctx.navigate(ctx.page, params);
  });
  return element;
}

async function usage(ctx) {
  const days = ctx.params.get('since') ?? '7';
  const by = (ctx.params.get('by') || 'model,route').split(',').filter((g) => GROUPS.includes(g));
  const rows = await list('/usage', { org: ctx.org, since: sinceOf(days), by: by.join(',') });
  const boxes = h('fieldset', {}, h('legend', {}, 'Group by'), GROUPS.map((g) =>
    h('label', { class: 'check' }, h('input', { type: 'checkbox', value: g, checked: by.includes(g) }), ' ', g)));
  const columns = [
    ...by.map((g) => ({ title: g, value: (r) => r[g] })),
    { title: 'Requests', value: (r) => fmt.num(r.requests), num: true, csv: (r) => r.requests },
    { title: 'Errors', value: (r) => fmt.num(r.errors), num: true, csv: (r) => r.errors },
    { title: 'Prompt tokens', value: (r) => fmt.num(r.prompt_tokens), num: true, csv: (r) => r.prompt_tokens },
    { title: 'Completion tokens', value: (r) => fmt.num(r.completion_tokens), num: true, csv: (r) => r.completion_tokens },
    { title: 'Cost', value: (r) => fmt.usd(r.cost_usd), num: true, csv: (r) => r.cost_usd ?? '' },
    { title: 'Cache hits', value: (r) => fmt.num(r.cache_hits), num: true, csv: (r) => r.cache_hits },
    { title: 'Latency p50', value: (r) => fmt.ms(r.latency_p50_ms), num: true, csv: (r) => r.latency_p50_ms ?? '' },
    { title: 'p95', value: (r) => fmt.ms(r.latency_p95_ms), num: true, csv: (r) => r.latency_p95_ms ?? '' },
  ];
  const total = rows.reduce((sum, r) => sum + (r.cost_usd || 0), 0);
  return [
    h('h1', {}, 'Usage & cost'),
    controls(ctx, days, boxes),
    h('p', {}, `${fmt.num(rows.reduce((s, r) => s + r.requests, 0))} requests, ${fmt.usd(total)} in this view. `,
      csvLink(`hatchway-usage-${by.join('-')}.csv`, columns.map((c) => c.title),
        rows.map((r) => columns.map((c) => (c.csv ? c.csv(r) : c.value(r)))))),
    table(columns, rows, { empty: 'No usage in this period.' }),
  ];
}

// The CSV is built here from the rows on screen, as a download of a Blob: nothing more is asked of the plane.
function csvLink(name, header, rows) {
  const quote = (v) => {
    const text = v === null || v === undefined ? '' : String(v);
    return /[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  };
  const text = [header, ...rows].map((r) => r.map(quote).join(',')).join('\n') + '\n';
  const link = h('a', { href: URL.createObjectURL(new Blob([text], { type: 'text/csv' })), download: name }, 'Export CSV');
  return link;
}

async function earnings(ctx) {
  const days = ctx.params.get('since') ?? '30';
  const by = ctx.params.get('by') === 'org' ? 'org' : 'node';
  const rows = await list('/earnings', { org: ctx.org, since: sinceOf(days), by });
  const radios = h('fieldset', {}, h('legend', {}, 'Per'), ['node', 'org'].map((g) =>
    h('label', { class: 'check' }, h('input', { type: 'radio', name: 'by', value: g, checked: by === g }), ' ', g)));
  const columns = [
    ...(by === 'node' ? [{ title: 'Node', value: (r) => r.node }, { title: 'Node ID', value: (r) => r.node_id }] : []),
    { title: 'Org', value: (r) => r.org },
    { title: 'Requests', value: (r) => fmt.num(r.requests), num: true, csv: (r) => r.requests },
    { title: 'Prompt tokens', value: (r) => fmt.num(r.prompt_tokens), num: true, csv: (r) => r.prompt_tokens },
    { title: 'Completion tokens', value: (r) => fmt.num(r.completion_tokens), num: true, csv: (r) => r.completion_tokens },
    { title: 'Earned', value: (r) => fmt.usd(r.earned_usd), num: true, csv: (r) => r.earned_usd ?? '' },
  ];
  return [
    h('h1', {}, 'Node earnings'),
    controls(ctx, days, radios),
    h('p', { class: 'muted' }, 'What nodes served, at their own prices. ',
      csvLink(`hatchway-earnings-${by}.csv`, columns.map((c) => c.title),
        rows.map((r) => columns.map((c) => (c.csv ? c.csv(r) : c.value(r)))))),
    table(columns, rows, { empty: 'No node served a request in this period.' }),
  ];
}

async function audit(ctx) {
  const days = ctx.params.get('since') ?? '7';
  const rows = await list('/audit', { since: sinceOf(days) });
  const verdict = h('div', { 'aria-live': 'polite' });
  const verify = h('button', { type: 'button' }, 'Verify chain');
  verify.addEventListener('click', async () => {
    verify.disabled = true;
    try {
      const result = await admin.get('/audit/verify');
      verdict.replaceChildren(result.ok
        ? notice(`Chain intact: ${result.entries} entries, each linked to the one before and matching its hash.`)
        : notice(`Chain broken at entry ${result.first_broken}: ${result.reason}`, 'error'));
    } catch (error) {
      verdict.replaceChildren(notice(error.message, 'error'));
    } finally {
      verify.disabled = false;
    }
  });
  return [
    h('h1', {}, 'Audit log'),
    controls(ctx, days, verify), verdict,
    table([
      { title: '#', value: (e) => e.id, num: true },
      { title: 'When', value: (e) => fmt.date(e.created_at) },
      { title: 'Who', value: (e) => h('code', {}, e.actor) },
      { title: 'What', value: (e) => e.action },
      { title: 'Object', value: (e) => e.target },
      { title: 'Change', value: (e) => change(e) },
    ], rows.slice().reverse(), { empty: 'No entries in this period.' }),
  ];
}

function change(entry) {
  const text = JSON.stringify({ before: entry.before, after: entry.after }, null, 1);
  return h('details', {}, h('summary', {}, 'before / after'), h('pre', {}, text));
}
