// Orgs, members and roles: accounts, invitations (a link shown once) and scoped admin tokens (shown once).

import { admin, list } from '../api.js';
import { action, field, fmt, form, h, notice, secret, table } from '../ui.js';

const ROLES = [['org_admin', 'Org admin'], ['developer', 'Developer'], ['provider', 'Provider']];

export async function render(ctx) {
  const out = [h('h1', {}, 'Orgs & members')];
  const orgs = await list('/orgs');
  out.push(h('h2', {}, ctx.isPlaneAdmin ? 'Orgs' : 'Your org'),
    table([
      { title: 'Name', value: (o) => o.name },
      { title: 'ID', value: (o) => h('code', {}, o.id) },
      { title: 'Providers may enroll machines', value: (o) => enrollToggle(o) },
      { title: 'Created', value: (o) => fmt.date(o.created_at) },
    ], orgs));
  if (ctx.isPlaneAdmin) {
    out.push(form([field('New org name', 'name', { required: true })], async (v) => {
      await admin.post('/orgs', { name: v.name });
      await ctx.reloadOrgs();
      ctx.refresh();
    }, { submit: 'Create org', label: 'Create org' }));
  }
  const roles = ctx.isPlaneAdmin ? [['plane_admin', 'Plane admin'], ...ROLES] : ROLES;
  const orgId = ctx.org;
  const accounts = await list('/accounts', { org: orgId });
  const created = h('div', {});
  out.push(h('h2', {}, 'Members'),
    table([
      { title: 'Email', value: (a) => a.email },
      { title: 'Name', value: (a) => a.name },
      { title: 'Role', value: (a) => roleSelect(a, roles) },
      { title: 'Org', value: (a) => (a.org_id ? ctx.orgName(a.org_id) : 'all') },
      { title: 'Status', value: (a) => (a.disabled ? 'disabled' : 'active') },
      { title: '', value: (a) => h('div', { class: 'row-actions' },
        action(a.disabled ? 'Enable' : 'Disable', async () => {
          await admin.patch(`/accounts/${a.id}`, { disabled: !a.disabled });
          ctx.refresh();
        }),
        action('Remove', async () => {
          await admin.delete(`/accounts/${a.id}`);
          ctx.refresh();
        }, { danger: true, confirmText: `Remove ${a.email}?` })) },
    ], accounts, { empty: 'No accounts in this org yet.' }));
  if (!orgId && !ctx.isPlaneAdmin) return out;
  const orgNote = orgId ? null : h('p', { class: 'muted' }, 'Pick an org above to add members to it (plane admins need none).');
  out.push(h('h2', {}, 'Invite someone'), orgNote,
    form([
      field('Email', 'email', { type: 'email', required: true }),
      field('Role', 'role', { type: 'select', options: roles, value: 'developer' }),
    ], async (v) => {
      const invitation = await admin.post('/invitations', { email: v.email, role: v.role, org_id: orgId });
      created.replaceChildren(secret(`Invitation link for ${v.email} (expires ${fmt.date(invitation.expires_at)})`,
        new URL(invitation.url, window.location.href).href));
    }, { submit: 'Create invitation link', label: 'Invite' }),
    h('h2', {}, 'Add an account with a password'),
    form([
      field('Email', 'email', { type: 'email', required: true }),
      field('Name', 'name'),
      field('Role', 'role', { type: 'select', options: roles, value: 'developer' }),
      field('Password', 'password', { type: 'password', required: true, autocomplete: 'new-password' }),
    ], async (v) => {
      await admin.post('/accounts', { email: v.email, name: v.name, role: v.role, org_id: orgId, password: v.password });
      ctx.refresh();
    }, { submit: 'Add account', label: 'Add account' }),
    created);

  const tokens = await list('/admin-tokens', { org: orgId }).catch(() => null);
  if (tokens) {
    const shown = h('div', {});
    out.push(h('h2', {}, 'Admin tokens for the API'),
      table([
        { title: 'Name', value: (t) => t.name || t.id },
        { title: 'Role', value: (t) => t.role },
        { title: 'Prefix', value: (t) => (t.prefix ? h('code', {}, t.prefix) : '—') },
        { title: 'Expires', value: (t) => fmt.date(t.expires_at) },
        { title: 'Revoked', value: (t) => fmt.date(t.revoked_at) },
        { title: '', value: (t) => (t.revoked_at ? '' : action('Revoke', async () => {
          await admin.post(`/admin-tokens/${t.id}/revoke`);
          ctx.refresh();
        }, { danger: true, confirmText: 'Revoke this token?' })) },
      ], tokens, { empty: 'No admin tokens.' }),
      form([
        field('Name', 'name'),
        field('Role', 'role', { type: 'select', value: 'org_admin', options: roles.filter(([r]) => r.endsWith('admin')) }),
        field('Expires in (days)', 'days', { type: 'number', min: 1, value: '30' }),
      ], async (v) => {
        const body = { name: v.name, role: v.role, org_id: orgId };
        if (v.days) body.ttl_s = Number(v.days) * 86400;
        const token = await admin.post('/admin-tokens', body);
        shown.replaceChildren(secret('Admin token', token.token));
      }, { submit: 'Create admin token', label: 'Create admin token' }),
      shown);
  }
  return out;
}

function roleSelect(account, roles) {
  const select = h('select', { 'aria-label': `Role of ${account.email}` },
    roles.map(([v, text]) => h('option', { value: v }, text)));
  select.value = account.role;
  select.addEventListener('change', async () => {
    try {
      await admin.patch(`/accounts/${account.id}`, { role: select.value });
      select.after(notice('Saved'));
    } catch (error) {
      select.value = account.role;
      select.after(notice(error.message, 'error'));
    }
  });
  return select;
}

function enrollToggle(org) {
  const box = h('input', { type: 'checkbox', checked: Boolean(org.providers_may_enroll) });
  box.addEventListener('change', async () => {
    try {
      await admin.patch(`/orgs/${org.id}`, { providers_may_enroll: box.checked });
    } catch (error) {
      box.checked = !box.checked;
      box.parentElement.after(notice(error.message, 'error'));
    }
  });
  return h('label', { class: 'check' }, box, ' allowed');
}
