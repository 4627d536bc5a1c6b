// Playground: chat with any model the signed-in account may call, streamed from /v1/chat/completions with the
// session (as the account's own console key: its limits, usage and cost apply). Each answer shows the route that
// served, the attempts, time to first token, tokens/s and cost (x-hatchway-* headers, the stream's usage, and
// the request's usage row once stored). Compare mode sends one prompt to several models at once.

import { admin, setPlaygroundOrg, v1, v1Error } from '../api.js';
import { clear, field, fmt, h, notice } from '../ui.js';

// How long the playground waits for the batch writer to store a request's row (it flushes every ~100-250 ms).
const ROW_WAIT_MS = 4000;

export async function render(ctx) {
  setPlaygroundOrg(ctx.isPlaneAdmin ? ctx.org : null);
  if (ctx.isPlaneAdmin && !ctx.org) {
    return [h('h1', {}, 'Playground'), notice('Pick an org above: your requests run as your console key in it.', 'error')];
  }
  const response = await v1('/models');
  if (!response.ok) throw await v1Error(response);
  const models = (await response.json()).data.map((m) => m.id);
  if (!models.length) {
    return [h('h1', {}, 'Playground'), notice('No model can be called yet: add a provider or enroll a node.', 'error')];
  }
  const mode = ctx.params.get('mode') === 'compare' ? 'compare' : 'chat';
  const tabs = h('div', { class: 'tabs', role: 'group', 'aria-label': 'Mode' },
    ['chat', 'compare'].map((m) => {
      const button = h('button', { type: 'button', 'aria-pressed': String(m === mode) }, m === 'chat' ? 'Chat' : 'Compare');
      button.addEventListener('click', () => ctx.navigate('playground', m === 'chat' ? undefined : { mode: m }));
      return button;
    }));
  return [h('h1', {}, 'Playground'), tabs, mode === 'chat' ? chat(models) : compare(models)];
}

function parameters() {
  return h('fieldset', { class: 'panel' }, h('legend', {}, 'Parameters'),
    h('div', { class: 'fields' },
      field('System prompt', 'system', { placeholder: 'optional' }),
      field('Temperature', 'temperature', { type: 'number', min: 0, max: 2, step: 0.1, value: '0.7' }),
      field('Max tokens', 'max_tokens', { type: 'number', min: 1, value: '256' }),
      field('Top p', 'top_p', { type: 'number', min: 0, max: 1, step: 0.05, value: '1' })));
}

function readParameters(container) {
  const value = (name) => container.querySelector(`[name=${name}]`).value.trim();
  const body = {};
  for (const name of ['temperature', 'top_p']) if (value(name) !== '') body[name] = Number(value(name));
  if (value('max_tokens') !== '') body.max_tokens = Number(value('max_tokens'));
  return { body, system: value('system') };
}

function chat(models) {
  const history = [];
  const log = h('div', { class: 'chat', 'aria-live': 'polite', 'data-testid': 'chat-log' });
  const model = field('Model', 'model', { type: 'select', options: models.map((m) => [m, m]) });
  const params = parameters();
  const prompt = h('textarea', { name: 'prompt', required: true, placeholder: 'Ask something…', 'aria-label': 'Message' });
  const send = h('button', { type: 'submit', class: 'primary' }, 'Send');
  const stop = h('button', { type: 'button', disabled: true }, 'Stop');
  const reset = h('button', { type: 'button' }, 'New chat');
  let controller = null;
  stop.addEventListener('click', () => controller?.abort());
  reset.addEventListener('click', () => { history.length = 0; clear(log); prompt.focus(); });
  // Enter sends, Shift+Enter starts a new line.
  prompt.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey) {
      event.preventDefault();
      formElement.requestSubmit();
    }
  });
  const formElement = h('form', { 'aria-label': 'Chat' }, model, params, prompt,
    h('div', { class: 'row-actions' }, send, stop, reset));
  formElement.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    const { body, system } = readParameters(params);
    history.push({ role: 'user', content: text });
    log.append(h('div', { class: 'message user' }, text));
    prompt.value = '';
    const answer = h('div', { class: 'message assistant', 'data-testid': 'answer' });
    const facts = h('div', { class: 'facts', 'data-testid': 'facts' }, 'Waiting for the first token…');
    log.append(h('div', {}, answer, facts));
    send.disabled = true;
    stop.disabled = false;
    controller = new AbortController();
    const messages = system ? [{ role: 'system', content: system }, ...history] : [...history];
    const result = await complete(model.querySelector('select').value, messages, body, answer, controller.signal);
    showFacts(facts, result);
    if (result.text) history.push({ role: 'assistant', content: result.text });
    send.disabled = false;
    stop.disabled = true;
    prompt.focus();
  });
  return h('section', { 'aria-label': 'Chat' }, log, formElement);
}

function compare(models) {
  const choices = h('fieldset', { class: 'panel' }, h('legend', {}, 'Models to compare (each served by its route)'),
    models.map((m, i) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', name: 'models', value: m, checked: i < 2 }), ' ', m)));
  const params = parameters();
  const prompt = h('textarea', { name: 'prompt', required: true, placeholder: 'One prompt, sent to every model at once',
    'aria-label': 'Prompt' });
  const results = h('div', { class: 'compare', 'data-testid': 'compare-results' });
  const run = h('button', { type: 'submit', class: 'primary' }, 'Compare');
  const formElement = h('form', { 'aria-label': 'Compare' }, choices, params, prompt, h('div', { class: 'row-actions' }, run));
  formElement.addEventListener('submit', async (event) => {
    event.preventDefault();
    const chosen = [...choices.querySelectorAll('input:checked')].map((b) => b.value);
    const text = prompt.value.trim();
    if (!text || !chosen.length) return;
    const { body, system } = readParameters(params);
    const messages = [...(system ? [{ role: 'system', content: system }] : []), { role: 'user', content: text }];
    run.disabled = true;
    clear(results);
    await Promise.all(chosen.map(async (name) => {
      const answer = h('div', { class: 'message assistant', 'data-testid': 'answer' });
      const facts = h('div', { class: 'facts', 'data-testid': 'facts' }, 'Waiting…');
      results.append(h('article', { class: 'panel', 'data-model': name, 'aria-label': name }, h('h2', {}, name), answer, facts));
      showFacts(facts, await complete(name, messages, body, answer));
    }));
    run.disabled = false;
  });
  return h('section', { 'aria-label': 'Compare' }, formElement, results);
}

// One streamed chat completion, written into `answer` as it comes; returns what the page shows about it.
async function complete(model, messages, params, answer, signal) {
  const started = performance.now();
  const result = { model, text: '', error: null, ttftMs: null, totalMs: null, usage: null, headers: {} };
  let firstToken = null;
  try {
    const response = await v1('/chat/completions', {
      model, messages, stream: true, stream_options: { include_usage: true }, ...params,
    }, signal);
    for (const name of ['x-request-id', 'x-hatchway-route', 'x-hatchway-attempts', 'x-hatchway-cache', 'x-hatchway-model',
      'x-hatchway-cost-usd']) {
      result.headers[name] = response.headers.get(name);
    }
    if (!response.ok) throw await v1Error(response);
    for await (const event of serverEvents(response.body)) {
      if (event.error) throw new Error(event.error.message || 'the stream ended with an error');
      if (event.usage) result.usage = event.usage;
      const delta = event.choices?.[0]?.delta?.content;
      if (delta) {
        if (firstToken === null) firstToken = performance.now();
        result.text += delta;
        answer.textContent = result.text;
      }
    }
  } catch (error) {
    result.error = error.name === 'AbortError' ? 'stopped' : error.message;
  }
  const ended = performance.now();
  result.totalMs = ended - started;
  result.ttftMs = firstToken === null ? null : firstToken - started;
  const completion = result.usage?.completion_tokens;
  result.tokensPerS = completion && firstToken !== null && ended > firstToken ? completion / ((ended - firstToken) / 1000) : null;
  if (result.error) answer.after(notice(result.error, 'error'));
  result.row = result.headers['x-request-id'] && !result.error ? await storedRow(result.headers['x-request-id']) : null;
  return result;
}

// SSE `data:` payloads of a fetch body, parsed; ends at [DONE] or when the body ends.
async function* serverEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}

// The request's usage row: the cost as billed, the TTFT the plane measured (a stream's cost is known only at its end).
async function storedRow(requestId) {
  const deadline = performance.now() + ROW_WAIT_MS;
  while (performance.now() < deadline) {
    try {
      return await admin.get(`/console/requests/${encodeURIComponent(requestId)}`);
    } catch (error) {
      if (error.status !== 404) return null;
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return null;
}

function showFacts(element, result) {
  const fact = (label, value, name) => h('span', { 'data-fact': name }, `${label} `, h('b', {}, value));
  const row = result.row;
  const usage = result.usage || {};
  const route = result.headers['x-hatchway-route'] || row?.target || '—';
  clear(element,
    fact('route', route, 'route'),
    fact('attempts', result.headers['x-hatchway-attempts'] ?? row?.attempts ?? '—', 'attempts'),
    fact('TTFT', fmt.ms(result.ttftMs), 'ttft'),
    fact('total', fmt.ms(result.totalMs), 'latency'),
    fact('tokens/s', result.tokensPerS ? result.tokensPerS.toFixed(1) : '—', 'tokens_per_s'),
    fact('tokens', usage.prompt_tokens !== undefined ? `${usage.prompt_tokens} in / ${usage.completion_tokens} out` : '—', 'tokens'),
    fact('cost', row ? fmt.usd(row.cost_usd) : 'not recorded yet', 'cost'),
    result.headers['x-hatchway-cache'] ? fact('cache', result.headers['x-hatchway-cache'], 'cache') : null,
    row?.node_id ? fact('node', row.node_id, 'node') : null);
}
