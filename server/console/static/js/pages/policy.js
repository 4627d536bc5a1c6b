// Limits and quotas (with what is left of them now), cache policy (with what the cache holds), prices (every
// version, the one in force first).

import { admin, list } from '../api.js';
import { action, field, fmt, form, h, notice, numberOrNull, table } from '../ui.js';
import { describeLimits } from './keys.js';

export async function render(ctx) {
  if (ctx.page === 'cache') return cache(ctx);
  if (ctx.page === 'prices') return prices(ctx);
  return limits(ctx);
}

async function limits(ctx) {
  const info = await admin.get('/console/info');
  const key = ctx.params.get('key');
  const rows = await list('/limits', key ? { key } : { org: ctx.org });
  const out = [
    h('h1', {}, key ? `Limits of key ${key}` : 'Limits & quotas'),
    table([
      { title: 'Applies to', value: (l) => (l.key_id ? `key ${l.key_id}` : `org ${l.org}`) },
      ...info.limit_fields.map((name) => ({ title: name.replaceAll('_', ' '), value: (l) => fmt.num(l[name]), num: true })),
      { title: 'Left now', value: (l) => describeLimits(l) },
      { title: '', value: (l) => action('Remove', async () => {
        await admin.delete('/limits', l.key_id ? { key: l.key_id } : { org: l.org_id });
        ctx.refresh();
      }, { danger: true, confirmText: 'Remove these limits?' }) },
    ], rows, { empty: 'No limits set: requests are unlimited.' }),
    h('h2', {}, key ? 'Set this key\'s limits' : 'Set the org\'s limits'),
  ];
  const subject = key ? { key } : ctx.org ? { org: ctx.org } : null;
  if (!subject) {
    out.push(notice('Pick an org above (or open a key\'s limits from the API keys page).', 'error'));
    return out;
  }
  const current = rows.find((l) => (key ? l.key_id === key : !l.key_id)) || {};
  out.push(form(info.limit_fields.map((name) => field(name.replaceAll('_', ' '), name, {
    type: 'number', min: 0, step: 'any', value: current[name] ?? '', placeholder: 'unlimited' })),
  async (v) => {
    const body = { ...subject };
    for (const name of info.limit_fields) body[name] = numberOrNull(v[name]);
    await admin.put('/limits', body);
    ctx.refresh();
  }, { submit: 'Save limits', label: 'Set limits' }));
  return out;
}

async function cache(ctx) {
  const [policies, info] = await Promise.all([list('/cache', { org: ctx.org }), admin.get('/console/info')]);
  const out = [
    h('h1', {}, 'Cache policy'),
    table([
      { title: 'Org', value: (p) => p.org },
      { title: 'Mode', value: (p) => p.mode },
      { title: 'TTL', value: (p) => (p.ttl_s ? `${p.ttl_s} s` : 'default') },
      { title: 'Entries', value: (p) => fmt.num(p.entries), num: true },
      { title: 'Size', value: (p) => (p.bytes === null ? '—' : `${fmt.num(p.bytes)} B`), num: true },
      { title: '', value: (p) => action('Clear', async () => {
        await admin.delete('/cache', { org: p.org_id });
        ctx.refresh();
      }, { danger: true, confirmText: `Drop the cached answers of ${p.org}?` }) },
    ], policies),
    h('p', { class: 'muted' }, 'deterministic: only requests with temperature 0 (or a seed) are cached; all: every request; off: none.'),
  ];
  if (!ctx.org) {
    out.push(notice('Pick an org above to change its policy.', 'error'));
    return out;
  }
  const current = policies.find((p) => p.org_id === ctx.org) || {};
  out.push(h('h2', {}, 'Change the policy'), form([
    field('Mode', 'mode', { type: 'select', options: info.cache_modes.map((m) => [m, m]), value: current.mode || 'deterministic' }),
    field('TTL (seconds)', 'ttl_s', { type: 'number', min: 1, value: current.ttl_s ?? '' }),
  ], async (v) => {
    await admin.put('/cache', { org: ctx.org, mode: v.mode, ttl_s: numberOrNull(v.ttl_s) });
    ctx.refresh();
  }, { submit: 'Save policy', label: 'Cache policy' }));
  return out;
}

async function prices(ctx) {
  // Newest first; the newest of each provider and model is the price in force.
  const rows = (await list('/prices', { org: ctx.org })).reverse();
  const seen = new Set();
  for (const row of rows) {
    const key = `${row.org}/${row.provider}/${row.model}`;
    row.inForce = !seen.has(key);
    seen.add(key);
  }
  const providers = ctx.org ? await list('/providers', { org: ctx.org }) : [];
  const out = [
    h('h1', {}, 'Prices'),
    h('p', { class: 'muted' }, 'USD per 1M tokens. A new price applies from now on; past usage keeps the price it was billed at.'),
    table([
      { title: 'Provider', value: (p) => p.provider },
      { title: 'Model', value: (p) => p.model },
      { title: 'In', value: (p) => p.price_in ?? 'unpriced', num: true },
      { title: 'Out', value: (p) => p.price_out ?? 'unpriced', num: true },
      { title: 'From', value: (p) => fmt.date(p.effective_from) },
      { title: 'Status', value: (p) => (p.inForce ? 'in force' : 'replaced') },
      { title: 'Org', value: (p) => p.org },
    ], rows, { empty: 'No price changes yet: providers keep the prices they were added with.' }),
  ];
  if (!ctx.org) {
    out.push(notice('Pick an org above to change a price.', 'error'));
    return out;
  }
  out.push(h('h2', {}, 'Set a price'), form([
    field('Provider', 'provider', { type: 'select', options: providers.map((p) => [p.name, p.name]) }),
    field('Model', 'model', { required: true }),
    field('Price in', 'price_in', { type: 'number', min: 0, step: 'any' }),
    field('Price out', 'price_out', { type: 'number', min: 0, step: 'any' }),
  ], async (v) => {
    await admin.put('/prices', {
      org: ctx.org, provider: v.provider, model: v.model, price_in: numberOrNull(v.price_in), price_out: numberOrNull(v.price_out),
    });
    ctx.refresh();
  }, { submit: 'Set price', label: 'Set a price' }));
  return out;
}
