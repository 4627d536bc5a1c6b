// API keys: create (the key is shown once, with a copy button), revoke, allowed models, and each key's limits
// with what is left of them now.

import { admin, list } from '../api.js';
import { action, field, fmt, form, h, notice, secret, splitList, table } from '../ui.js';

export async function render(ctx) {
  const created = h('div', { 'aria-live': 'polite' });
  const holder = h('div', {});
  const canManageLimits = ctx.me.role !== 'developer';
  const fill = async () => {
    const keys = await list('/keys', { org: ctx.org });
    // A developer may not read limits: their keys' rows show none.
    const limits = canManageLimits ? await list('/limits', { org: ctx.org }).catch(() => []) : [];
    const byKey = Object.fromEntries(limits.filter((l) => l.key_id).map((l) => [l.key_id, l]));
    holder.replaceChildren(keyTable(ctx, keys, byKey, canManageLimits));
  };
  await fill();
  const out = [h('h1', {}, 'API keys'), holder, h('h2', {}, 'Create a key')];
  const org = ctx.org;
  if (!org) {
    out.push(notice('Pick an org above to create a key in it.', 'error'));
    return out;
  }
  out.push(form([
    field('Name', 'name', { placeholder: 'e.g. backend' }),
    field('Allowed models', 'models', { placeholder: 'empty: every model', help: 'comma-separated' }),
    field('Expires', 'expires_at', { type: 'date' }),
  ], async (v) => {
    const body = { org, name: v.name, models: splitList(v.models) };
    if (v.expires_at) body.expires_at = new Date(v.expires_at + 'T23:59:59').toISOString();
    const key = await admin.post('/keys', body);
    created.replaceChildren(secret(`API key ${key.name || key.prefix}`, key.key),
      h('p', { class: 'muted' }, `Use it with base_url ${window.location.origin}/v1`));
    await fill();
  }, { submit: 'Create key', label: 'Create API key' }), created);
  return out;
}

function keyTable(ctx, keys, byKey, canManageLimits) {
  return table([
      { title: 'Name', value: (k) => k.name || '—' },
      { title: 'Key', value: (k) => h('code', {}, `${k.prefix}…`) },
      { title: 'Org', value: (k) => k.org },
      { title: 'Models', value: (k) => (k.models.length ? k.models.join(', ') : 'all of the org') },
      { title: 'Limits (left now)', value: (k) => describeLimits(byKey[k.id]) },
      { title: 'Expires', value: (k) => fmt.date(k.expires_at) },
      { title: 'Status', value: (k) => (k.revoked_at ? `revoked ${fmt.date(k.revoked_at)}` : 'active') },
      { title: '', value: (k) => h('div', { class: 'row-actions' },
        canManageLimits ? h('a', { href: `#/limits?key=${encodeURIComponent(k.id)}` }, 'Limits') : null,
        k.revoked_at ? null : action('Revoke', async () => {
          await admin.post(`/keys/${k.id}/revoke`);
          ctx.refresh();
        }, { danger: true, confirmText: `Revoke ${k.name || k.prefix}? Clients using it stop at once.` })) },
  ], keys, { empty: 'No API keys yet.' });
}

export function describeLimits(limits) {
  if (!limits) return '—';
  const parts = [];
  const usage = limits.usage || {};
  if (limits.rpm !== null) parts.push(`${usage.requests_remaining ?? '?'} of ${limits.rpm} req/min`);
  if (limits.tpm !== null) parts.push(`${usage.tokens_remaining ?? '?'} of ${limits.tpm} tok/min`);
  if (limits.concurrency !== null) parts.push(`${usage.in_flight ?? 0} of ${limits.concurrency} concurrent`);
  for (const name of ['tokens_per_day', 'tokens_per_month', 'usd_per_day', 'usd_per_month']) {
    if (limits[name] !== null) parts.push(`${usage[name + '_used'] ?? 0} of ${limits[name]} ${name.replaceAll('_', ' ')}`);
  }
  return parts.join('; ') || '—';
}
