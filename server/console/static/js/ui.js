// DOM helpers: elements built with createElement and textContent only (never innerHTML), so nothing an API
// returns can become markup.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') element.addEventListener(name.slice(2), value);
    else if (name === 'class') element.className = value;
    else if (value === true) element.setAttribute(name, '');
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

let counter = 0;
export function uid(prefix = 'f') {
  counter += 1;
  return `${prefix}-${counter}`;
}

// A labelled control. `type` is an input type, 'select' (options: [[value, text]...]) or 'textarea'.
export function field(label, name, { type = 'text', value = '', options = [], required = false, placeholder,
                                     min, max, step, help, autocomplete = 'off' } = {}) {
  let control;
  if (type === 'select') {
    control = h('select', { name, required }, options.map(([v, text]) => h('option', { value: v }, text ?? v)));
    // No value given: the first option stays selected (setting '' would select nothing at all).
    if (value !== '') control.value = value;
  } else if (type === 'textarea') {
    control = h('textarea', { name, required, placeholder });
    control.value = value;
  } else if (type === 'checkbox') {
    control = h('input', { type, name, checked: Boolean(value) });
    return h('label', { class: 'check' }, control, ' ', label);
  } else {
    control = h('input', { type, name, value, required, placeholder, min, max, step, autocomplete });
  }
  return h('label', {}, label, control, help ? h('span', { class: 'muted' }, help) : null);
}

// A form whose submit runs `action(values, form)` with the button disabled; errors are shown under it.
export function form(children, action, { submit = 'Save', className = 'inline', label } = {}) {
  const status = h('div', { 'aria-live': 'polite' });
  const button = h('button', { type: 'submit', class: 'primary' }, submit);
  const element = h('form', { class: className, 'aria-label': label }, children, button);
  element.addEventListener('submit', async (event) => {
    event.preventDefault();
    button.disabled = true;
    clear(status);
    try {
      await action(values(element), element);
    } catch (error) {
      clear(status, notice(error.message, 'error'));
    } finally {
      button.disabled = false;
    }
  });
  return h('div', {}, element, status);
}

export function values(formElement) {
  const result = {};
  for (const control of formElement.elements) {
    if (!control.name) continue;
    result[control.name] = control.type === 'checkbox' ? control.checked : control.value.trim();
  }
  return result;
}

export function notice(text, kind = 'ok') {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
}

// A button that runs `action` and shows a failure next to it.
export function action(text, run, { danger = false, confirmText } = {}) {
  const button = h('button', { type: 'button', class: danger ? 'danger' : '' }, text);
  button.addEventListener('click', async () => {
    if (confirmText && !window.confirm(confirmText)) return;
    button.disabled = true;
    try {
      await run();
    } catch (error) {
      button.after(notice(error.message, 'error'));
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

// columns: [{ title, value: row => text|Node, num }]
export function table(columns, rows, { empty = 'Nothing yet.', caption } = {}) {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  return h('div', { class: 'table-wrap' },
    h('table', {},
      caption ? h('caption', { class: 'muted' }, caption) : null,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : '' }, c.title)))),
      h('tbody', {}, rows.map((row) => h('tr', {},
        columns.map((c) => h('td', { class: c.num ? 'num' : '' }, c.value(row) ?? '—')))))));
}

// A secret shown once: selectable, with a copy button; gone when the page is left.
export function secret(label, text) {
  const code = h('code', { tabindex: '0' }, text);
  const copied = h('span', { role: 'status', class: 'muted' });
  const copy = h('button', { type: 'button' }, 'Copy');
  copy.addEventListener('click', async () => {
    await copyText(text);
    copied.textContent = 'Copied';
  });
  return h('div', { class: 'panel', 'data-secret': '' },
    h('strong', {}, label), h('p', { class: 'muted' }, 'Shown once: copy it now.'),
    h('div', { class: 'secret' }, code, copy, copied));
}

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return;
    } catch {
      // fall through to the selection copy (a browser that refuses the clipboard API without a gesture grant)
    }
  }
  const area = h('textarea', { readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}

export function page(title, ...children) {
  return [h('h1', {}, title), ...children];
}

export const fmt = {
  num: (v) => (v === null || v === undefined ? '—' : Number(v).toLocaleString('en-US')),
  usd: (v) => (v === null || v === undefined ? 'unpriced' : '$' + Number(v).toFixed(v !== 0 && Math.abs(v) < 0.01 ? 6 : 4)),
  ms: (v) => (v === null || v === undefined ? '—' : v >= 1000 ? (v / 1000).toFixed(2) + ' s' : Math.round(v) + ' ms'),
  date: (v) => (v ? new Date(v).toLocaleString() : '—'),
  bytes: (v) => (v === null || v === undefined ? '—' : v >= 1e9 ? (v / 1e9).toFixed(1) + ' GB' : (v / 1e6).toFixed(0) + ' MB'),
  list: (v) => (v && v.length ? v.join(', ') : '—'),
};

export function splitList(text) {
  return (text || '').split(',').map((s) => s.trim()).filter(Boolean);
}

export function numberOrNull(text) {
  if (text === undefined || text === null || String(text).trim() === '') return null;
  const value = Number(text);
  if (Number.isNaN(value)) throw new Error(`${text} is not a number`);
  return value;
}
