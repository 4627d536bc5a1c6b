// Routing rules: per model (or glob), a strategy, an ordered list of targets (weights for `weighted`), fallback
// models and hedging; with the targets each model has now.

import { admin, list } from '../api.js';
import { action, field, fmt, form, h, notice, splitList, table } from '../ui.js';

export async function render(ctx) {
  const [routes, models, info] = await Promise.all([
    list('/routes', { org: ctx.org }), list('/models', { org: ctx.org }), admin.get('/console/info')]);
  const out = [
    h('h1', {}, 'Routing rules'),
    table([
      { title: 'Model', value: (r) => h('code', {}, r.model) },
      { title: 'Org', value: (r) => r.org },
      { title: 'Strategy', value: (r) => r.strategy },
      { title: 'Targets', value: (r) => fmt.list(r.targets) },
      { title: 'Fallback models', value: (r) => fmt.list(r.fallbacks) },
      { title: 'Hedge', value: (r) => r.hedge ?? 'default' },
      { title: '', value: (r) => action('Remove', async () => {
        await admin.delete('/routes', { org: r.org_id, model: r.model });
        ctx.refresh();
      }, { danger: true, confirmText: `Remove the rule for ${r.model}?` }) },
    ], routes, { empty: 'No rules: targets are tried in the order they were added.' }),
    h('h2', {}, 'Models and their targets now'),
    table([
      { title: 'Model', value: (m) => m.model },
      { title: 'Org', value: (m) => m.org },
      { title: 'Targets', value: (m) => m.targets.map((t) => `${t.id} (${t.kind})`).join(', ') },
    ], models, { empty: 'No model is served yet: add a provider or enroll a node.' }),
    h('h2', {}, 'Set a rule'),
  ];
  if (!ctx.org) {
    out.push(notice('Pick an org above to set a rule for it.', 'error'));
    return out;
  }
  out.push(form([
    field('Model (or glob)', 'model', { required: true, placeholder: 'gpt-4o-mini or llama-*' }),
    field('Strategy', 'strategy', { type: 'select', options: info.strategies.map((s) => [s, s]), value: 'priority' }),
    field('Targets', 'targets', { placeholder: 'openai, node-pool', help: 'in order; name=weight for weighted' }),
    field('Fallback models', 'fallbacks', { placeholder: 'gpt-4o', help: 'tried after every target' }),
    field('Hedge', 'hedge', { placeholder: 'off, auto or seconds', help: 'empty: the plane default' }),
  ], async (v) => {
    await admin.put('/routes', {
      org: ctx.org, model: v.model, strategy: v.strategy, targets: splitList(v.targets),
      fallbacks: splitList(v.fallbacks), hedge: v.hedge || null,
    });
    ctx.refresh();
  }, { submit: 'Save rule', label: 'Set a routing rule' }));
  return out;
}
