// Small SVG charts drawn here (no library): a line chart over time and a horizontal bar chart.

import { h } from './ui.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 360;
const H = 160;
const PAD = { left: 44, right: 8, top: 8, bottom: 22 };

function svg(tag, attrs = {}, ...children) {
  const element = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function niceMax(value) {
  if (!value || value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

// series: [{ name, values: [number|null] }], labels: [Date]; format: value -> text
export function lineChart(title, labels, series, format = String) {
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v !== null))));
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (labels.length > 1 ? (i / (labels.length - 1)) * innerW : innerW / 2);
  const y = (v) => PAD.top + innerH - (v / max) * innerH;
  const grid = [0, 0.5, 1].map((f) => [
    svg('line', { class: 'axis', x1: PAD.left, x2: W - PAD.right, y1: y(max * f), y2: y(max * f) }),
    svg('text', { x: PAD.left - 4, y: y(max * f) + 3, 'text-anchor': 'end' }, format(max * f)),
  ]);
  const ticks = labels.length ? [0, Math.floor((labels.length - 1) / 2), labels.length - 1] : [];
  const xLabels = [...new Set(ticks)].map((i) => svg('text', { x: x(i), y: H - 6, 'text-anchor': 'middle' },
    shortTime(labels[i], labels)));
  const paths = series.map((s, index) => {
    let d = '';
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    // A dot per point as well: a series with one point (or points between gaps) draws no line.
    const dots = s.values.map((v, i) => (v === null || v === undefined ? null
      : svg('circle', { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 1.6, class: `dot-${index}` },
        svg('title', {}, `${s.name} at ${labels[i].toLocaleString()}: ${format(v)}`))));
    return [svg('path', { d: d || 'M0,0', class: `series-${index}` }, svg('title', {}, s.name)), dots];
  });
  const description = series.map((s) => `${s.name}: peak ${format(Math.max(0, ...s.values.filter((v) => v !== null)))}`).join('; ');
  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}. ${description}` },
    grid, xLabels, paths);
  return h('figure', { class: 'chart' }, h('h3', {}, title), chart,
    series.length > 1 ? h('div', { class: 'legend' }, series.map((s, i) => h('span', { class: `swatch-${i}` }, `■ ${s.name}`))) : null);
}

// rows: [{ name, value }]
export function barChart(title, rows, format = String) {
  const shown = rows.slice(0, 10);
  const rowH = 18;
  const height = Math.max(rowH, shown.length * rowH) + 4;
  const labelW = 120;
  const max = niceMax(Math.max(0, ...shown.map((r) => r.value || 0)));
  const bars = shown.map((r, i) => {
    const width = ((r.value || 0) / max) * (W - labelW - 70);
    return [
      svg('text', { x: labelW - 4, y: i * rowH + 13, 'text-anchor': 'end' }, truncate(r.name, 20)),
      svg('rect', { class: 'bar', x: labelW, y: i * rowH + 3, width: Math.max(0, width).toFixed(1), height: rowH - 6 },
        svg('title', {}, `${r.name}: ${format(r.value)}`)),
      svg('text', { x: labelW + width + 4, y: i * rowH + 13 }, format(r.value)),
    ];
  });
  const label = `${title}. ` + shown.map((r) => `${r.name}: ${format(r.value)}`).join('; ');
  return h('figure', { class: 'chart' }, h('h3', {}, title),
    shown.length ? svg('svg', { viewBox: `0 0 ${W} ${height}`, role: 'img', 'aria-label': label }, bars)
      : h('p', { class: 'muted' }, 'No requests in this period.'));
}

function truncate(text, length) {
  return text.length > length ? text.slice(0, length - 1) + '…' : text;
}

function shortTime(date, labels) {
  if (!date) return '';
  const span = labels[labels.length - 1] - labels[0];
  return span > 2 * 86400000
    ? date.toLocaleDateString(undefined, { month: 'short', day: 'numeric' })
    : date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}
