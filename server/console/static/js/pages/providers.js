// Providers: add one, edit its failover limits, test its connection (a one-token request through its own
// keys and egress), remove it.

import { admin, list } from '../api.js';
import { action, clear, field, fmt, form, h, notice, numberOrNull, splitList, table } from '../ui.js';

export async function render(ctx) {
  const [providers, info] = await Promise.all([list('/providers', { org: ctx.org }), admin.get('/console/info')]);
  const editor = h('div', {});
  const out = [
    h('h1', {}, 'Providers'),
    table([
      { title: 'Name', value: (p) => p.name },
      { title: 'Org', value: (p) => p.org },
      { title: 'Base URL', value: (p) => h('code', {}, p.base_url) },
      { title: 'Keys', value: (p) => p.api_keys.map((k) => k.hint).join(', ') || 'none' },
      { title: 'Models (price in/out per 1M)', value: (p) => p.models.map((m) =>
        `${m.alias}${m.upstream !== m.alias ? ' → ' + m.upstream : ''} (${price(m.price_in)}/${price(m.price_out)})`).join(', ') },
      { title: 'Failover limits', value: (p) => Object.entries(p.policy).map(([k, v]) => `${k}=${v}`).join(', ') || 'defaults' },
      { title: '', value: (p) => h('div', { class: 'row-actions' }, testButton(p),
        action('Edit limits', async () => { clear(editor, policyEditor(ctx, p, info)); editor.querySelector('input')?.focus(); }),
        action('Remove', async () => {
          await admin.delete(`/providers/${p.id}`);
          ctx.refresh();
        }, { danger: true, confirmText: `Remove provider ${p.name}?` })) },
    ], providers, { empty: 'No providers yet.' }),
    editor,
    h('h2', {}, 'Add a provider'),
  ];
  if (!ctx.org) {
    out.push(notice('Pick an org above to add a provider to it.', 'error'));
    return out;
  }
  out.push(form([
    field('Name', 'name', { required: true, placeholder: 'openai' }),
    field('Base URL', 'base_url', { type: 'url', required: true, placeholder: 'https://api.openai.com/v1' }),
    field('API keys', 'api_keys', { type: 'password', autocomplete: 'new-password', help: 'comma-separated; stored encrypted, never shown again' }),
    field('Models', 'models', { required: true, placeholder: 'gpt-4o-mini, fast=gpt-4o-mini', help: 'alias[=upstream], comma-separated' }),
    field('Price in', 'price_in', { type: 'number', step: 'any', min: 0, help: 'USD per 1M tokens' }),
    field('Price out', 'price_out', { type: 'number', step: 'any', min: 0, help: 'USD per 1M tokens' }),
  ], async (v) => {
    await admin.post('/providers', {
      org: ctx.org, name: v.name, base_url: v.base_url, api_keys: splitList(v.api_keys), models: splitList(v.models),
      price_in: numberOrNull(v.price_in), price_out: numberOrNull(v.price_out),
    });
    ctx.refresh();
  }, { submit: 'Add provider', label: 'Add provider' }));
  return out;
}

function price(value) {
  return value === null || value === undefined ? '—' : `$${value}`;
}

function testButton(provider) {
  const result = h('span', { 'aria-live': 'polite' });
  const button = h('button', { type: 'button' }, 'Test connection');
  button.addEventListener('click', async () => {
    button.disabled = true;
    result.replaceChildren(h('span', { role: 'status' }, 'Testing…'));
    try {
      const answer = await admin.post(`/providers/${provider.id}/test`);
      result.replaceChildren(answer.ok
        ? notice(`OK: ${answer.model} answered in ${fmt.ms(answer.latency_ms)}`)
        : notice(`Failed (${answer.status}): ${answer.error} after ${fmt.ms(answer.latency_ms)}`, 'error'));
    } catch (error) {
      result.replaceChildren(notice(error.message, 'error'));
    } finally {
      button.disabled = false;
    }
  });
  return h('span', {}, button, result);
}

function policyEditor(ctx, provider, info) {
  const fields = info.failover_fields.map((f) => field(f.name.replaceAll('_', ' '), f.name, {
    type: 'number', step: 'any', min: 0, value: provider.policy[f.name] ?? '', placeholder: String(f.default), help: f.help,
  }));
  return h('section', { class: 'panel', 'aria-label': `Failover limits of ${provider.name}` },
    h('h2', {}, `Failover limits of ${provider.name}`),
    h('p', { class: 'muted' }, 'Empty fields keep the plane default (shown greyed).'),
    form(fields, async (v) => {
      const policy = {};
      for (const f of info.failover_fields) policy[f.name] = numberOrNull(v[f.name]);
      await admin.patch(`/providers/${provider.id}`, { policy });
      ctx.refresh();
    }, { submit: 'Save limits', label: `Failover limits of ${provider.name}` }));
}
