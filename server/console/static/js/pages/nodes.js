// Nodes: live state (ready, busy slots / total, paused by its owner, draining, offline), hardware and GPUs,
// models with their measured tokens/s, the plane each is connected to; drain / resume / revoke; and enrolling
// a machine: a token and the one-line install command for each OS.

import { admin, list } from '../api.js';
import { action, copyText, field, fmt, form, h, notice, table } from '../ui.js';

const REFRESH_MS = 2000;

export async function render(ctx) {
  const holder = h('div', { 'data-testid': 'nodes' });
  const fill = async () => holder.replaceChildren(nodeTable(ctx, await list('/nodes', { org: ctx.org }), fill));
  await fill();
  // Live: refreshed while the page is on screen, stopped once it is left.
  const timer = window.setInterval(async () => {
    if (!holder.isConnected) {
      window.clearInterval(timer);
      return;
    }
    try {
      await fill();
    } catch {
      // a failed refresh keeps the last table; the next one tries again
    }
  }, REFRESH_MS);
  const out = [h('h1', {}, 'Nodes'), holder];
  out.push(...(await enrollment(ctx)));
  return out;
}

function nodeTable(ctx, nodes, fill) {
  const manage = ctx.me.role !== 'developer';
  const mayRevoke = ctx.me.role === 'plane_admin' || ctx.me.role === 'org_admin';
  return table([
    { title: 'Name', value: (n) => h('span', {}, n.name, h('br'), h('code', { class: 'muted' }, n.id)) },
    { title: 'State', value: (n) => h('span', { class: `state state-${n.state}`, 'data-state': n.state }, n.state) },
    { title: 'Slots busy / total', value: (n) => slots(n), num: true },
    { title: 'Models (tokens/s)', value: (n) => (n.models || []).map((m) =>
      `${m.name} (${m.tokens_per_s ?? 'not measured'})`).join(', ') || '—' },
    { title: 'Hardware', value: (n) => hardware(n) },
    { title: 'Plane', value: (n) => n.plane || '—' },
    { title: 'Last heartbeat', value: (n) => (n.last_heartbeat_s === undefined ? '—' : `${n.last_heartbeat_s} s ago`) },
    { title: '', value: (n) => (!manage || n.state === 'revoked' ? '' : h('div', { class: 'row-actions' },
      n.drained
        ? action('Resume', async () => { await admin.post(`/nodes/${n.id}/resume`); await fill(); })
        : action('Drain', async () => { await admin.post(`/nodes/${n.id}/drain`); await fill(); }),
      mayRevoke ? action('Revoke', async () => { await admin.post(`/nodes/${n.id}/revoke`); await fill(); },
        { danger: true, confirmText: `Revoke ${n.name}? It is disconnected and cannot come back without a new token.` }) : null)) },
  ], nodes, { empty: 'No nodes yet: enroll a machine below.' });
}

function slots(node) {
  const models = node.models || [];
  if (!models.length) return '—';
  const busy = models.reduce((s, m) => s + m.slots_busy, 0);
  const total = models.reduce((s, m) => s + m.slots_total, 0);
  return `${busy} / ${total}`;
}

function hardware(node) {
  const hw = node.hardware;
  if (!hw) return '—';
  const gpus = hw.gpus.length ? hw.gpus.map((g) => `${g.name} ${fmt.bytes(g.vram_total_bytes)}`).join(', ') : 'no GPU';
  return `${hw.hostname}: ${hw.cpu_count} × ${hw.cpu_model || 'CPU'}, ${fmt.bytes(hw.ram_total_bytes)} RAM; ${gpus}` +
    (node.os ? ` (${node.os}, agent ${node.agent_version})` : '');
}

async function enrollment(ctx) {
  const out = [h('h2', {}, 'Enroll a machine')];
  const org = ctx.org;
  if (!org) {
    out.push(notice('Pick an org above to enroll a machine into it.', 'error'));
    return out;
  }
  const info = await admin.get('/console/info');
  const shown = h('div', { 'aria-live': 'polite' });
  const plane = `${window.location.hostname}:${info.grpc_port}`;
  out.push(h('p', { class: 'muted' }, 'A token is single-use and expiring by default; it carries the plane\'s ',
    'address and the fingerprint of its CA, so the agent checks the plane before it trusts it.'),
  form([
    field('Node service address', 'plane', { value: plane, required: true, help: 'host:port agents dial' }),
    field('Valid for (hours)', 'hours', { type: 'number', min: 0.01, step: 'any', value: '1' }),
    field('Uses', 'uses', { type: 'number', min: 1, value: '1' }),
    field('Model file on the machine', 'model', { value: '/srv/models/model.gguf' }),
    field('Served as', 'name', { value: 'my-model' }),
  ], async (v) => {
    const token = await admin.post('/node-tokens', {
      org, ttl_s: Number(v.hours) * 3600, uses: Number(v.uses), planes: [v.plane],
    });
    shown.replaceChildren(commands(token.token, v.plane, v.model, v.name, info.grpc_insecure));
    await tokens.refresh();
  }, { submit: 'Create token', label: 'Enroll a machine' }), shown);
  const tokens = await tokenTable(ctx);
  out.push(tokens.element);
  return out;
}

export function installCommands(token, plane, model, name, insecure) {
  const spec = `${model}=${name}`;
  const flag = insecure ? ' --insecure' : '';
  const winModel = model.startsWith('/') ? `C:\\models\\${model.split('/').pop()}` : model;
  return [
    ['Linux (systemd)', 'tar -xzf hatchway-agent-linux-x64.tar.gz && cd hatchway-agent-linux-x64 && ' +
      `sudo sh install.sh --plane ${plane} --token ${token} --model ${spec}${flag}`],
    ['macOS (launchd)', 'tar -xzf hatchway-agent-macos-arm64.tar.gz && cd hatchway-agent-macos-arm64 && ' +
      `sudo sh install.sh --plane ${plane} --token ${token} --model ${spec}${flag}`],
    ['Windows (Administrator PowerShell)', 'Expand-Archive hatchway-agent-windows-x64.zip -DestinationPath .; ' +
      'cd hatchway-agent-windows-x64; powershell -ExecutionPolicy Bypass -File install.ps1 ' +
      `-Plane ${plane} -Token ${token} -Model ${winModel}=${name}${insecure ? ' -Insecure' : ''}`],
    ['Docker', `docker run -d --name hatchway-agent -e HATCHWAY_PLANE=${plane} -e HATCHWAY_ENROLL_TOKEN=${token} ` +
      `-v hatchway-agent:/var/lib/hatchway-agent -v ${dirname(model)}:/models:ro --restart unless-stopped ` +
      `hatchway-agent --model /models/${model.split('/').pop()}=${name}`],
    ['An installed agent (pip install \'hatchway[agent]\')', `hatchway-agent enroll --plane ${plane} --token ${token}${flag} ` +
      `&& hatchway-agent run --model ${spec}`],
  ];
}

function dirname(path) {
  const index = path.lastIndexOf('/');
  return index > 0 ? path.slice(0, index) : '/srv/models';
}

function commands(token, plane, model, name, insecure) {
  return h('section', { class: 'panel', 'data-secret': '', 'aria-label': 'Install commands' },
    h('strong', {}, 'Enrollment token'), h('p', { class: 'muted' }, 'Shown once. Run one of these on the machine:'),
    h('pre', { 'data-testid': 'enroll-token' }, token),
    installCommands(token, plane, model, name, insecure).map(([os, line]) => {
      const copy = h('button', { type: 'button', 'aria-label': `Copy the ${os} command` }, 'Copy');
      const done = h('span', { role: 'status', class: 'muted' });
      copy.addEventListener('click', async () => { await copyText(line); done.textContent = 'Copied'; });
      return h('div', {}, h('h3', {}, os), h('pre', { 'data-os': os }, line), copy, done);
    }));
}

async function tokenTable(ctx) {
  const element = h('div', {});
  const refresh = async () => {
    const rows = await list('/node-tokens', { org: ctx.org }).catch(() => null);
    if (rows === null) return;
    element.replaceChildren(h('h2', {}, 'Enrollment tokens'), table([
      { title: 'ID', value: (t) => h('code', {}, t.id) },
      { title: 'Uses left', value: (t) => t.uses_left, num: true },
      { title: 'Expires', value: (t) => fmt.date(t.expires_at) },
      { title: 'Revoked', value: (t) => fmt.date(t.revoked_at) },
      { title: '', value: (t) => (t.revoked_at ? '' : action('Revoke', async () => {
        await admin.post(`/node-tokens/${t.id}/revoke`);
        await refresh();
      }, { danger: true })) },
    ], rows, { empty: 'No tokens.' }));
  };
  await refresh();
  return { element, refresh };
}
