// The console's shell: who is signed in, the pages their role may use, the org they look at, and a hash router
// (#/page?query) that loads each page's module when it is first opened.

import { ApiError, admin, list, request, setCsrf, setPlaygroundOrg } from './api.js';
import { clear, h, notice } from './ui.js';

const ADMINS = ['plane_admin', 'org_admin'];
// What each role may open; the server checks every call anyway (server.accounts.roles).
export const PAGES = [
  { id: 'overview', title: 'Overview', module: 'overview', roles: [...ADMINS, 'developer'] },
  { id: 'orgs', title: 'Orgs & members', module: 'orgs', roles: ADMINS },
  { id: 'keys', title: 'API keys', module: 'keys', roles: [...ADMINS, 'developer'] },
  { id: 'providers', title: 'Providers', module: 'providers', roles: ADMINS },
  { id: 'routes', title: 'Routing rules', module: 'routes', roles: ADMINS },
  { id: 'limits', title: 'Limits & quotas', module: 'policy', roles: ADMINS },
  { id: 'cache', title: 'Cache policy', module: 'policy', roles: ADMINS },
  { id: 'prices', title: 'Prices', module: 'policy', roles: ADMINS },
  { id: 'nodes', title: 'Nodes', module: 'nodes', roles: [...ADMINS, 'provider'] },
  { id: 'usage', title: 'Usage & cost', module: 'reports', roles: [...ADMINS, 'developer'] },
  { id: 'earnings', title: 'Node earnings', module: 'reports', roles: [...ADMINS, 'provider'] },
  { id: 'audit', title: 'Audit log', module: 'reports', roles: ADMINS },
  { id: 'playground', title: 'Playground', module: 'playground', roles: [...ADMINS, 'developer'] },
];

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const navList = document.getElementById('nav-list');
const orgPicker = document.getElementById('org-picker');
const orgSelect = document.getElementById('org-select');
const logout = document.getElementById('logout');
const whoami = document.getElementById('whoami');
const menuToggle = document.getElementById('menu-toggle');

const state = { me: null, orgs: [], org: null };

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, '');
  const [name, query] = raw.split('?');
  return { name: name || '', params: new URLSearchParams(query || '') };
}

export function navigate(name, params) {
  const query = params ? '?' + new URLSearchParams(params).toString() : '';
  window.location.hash = `#/${name}${query}`;
}

function allowed(me) {
  return PAGES.filter((p) => p.roles.includes(me.role));
}

function renderNav(current) {
  const pages = allowed(state.me);
  clear(navList, pages.map((p) => h('li', {},
    h('a', { href: `#/${p.id}`, 'aria-current': p.id === current ? 'page' : null }, p.title))));
  nav.hidden = false;
}

async function loadOrgs() {
  state.orgs = [];
  if (state.me.role !== 'plane_admin') {
    state.org = state.me.org_id;
    orgPicker.hidden = true;
    return;
  }
  state.orgs = await list('/orgs');
  const remembered = state.org;
  clear(orgSelect, h('option', { value: '' }, 'All orgs'),
    state.orgs.map((o) => h('option', { value: o.id }, o.name)));
  orgSelect.value = state.orgs.some((o) => o.id === remembered) ? remembered : '';
  state.org = orgSelect.value || null;
  orgPicker.hidden = false;
}

orgSelect.addEventListener('change', () => {
  state.org = orgSelect.value || null;
  route();
});

menuToggle.addEventListener('click', () => {
  const open = menuToggle.getAttribute('aria-expanded') !== 'true';
  menuToggle.setAttribute('aria-expanded', String(open));
  nav.classList.toggle('collapsed', !open);
});

logout.addEventListener('click', async () => {
  try {
    await request('POST', '/auth/logout', {});
  } finally {
    setCsrf(null);
    state.me = null;
    window.location.hash = '#/login';
    await boot();
  }
});

function context(page, params) {
  const orgName = (id) => (state.orgs.find((o) => o.id === id) || {}).name || id;
  return {
    me: state.me,
    page: page.id,
    params,
    org: state.org,
    orgs: state.orgs,
    orgName,
    isPlaneAdmin: state.me.role === 'plane_admin',
    refresh: () => route(),
    reloadOrgs: async () => { await loadOrgs(); },
    navigate,
  };
}

let routing = 0;
async function route() {
  const { name, params } = parseHash();
  if (!state.me) return;
  const pages = allowed(state.me);
  const page = pages.find((p) => p.id === name) || pages[0];
  if (!page) {
    clear(main, notice('This account may not use any console page.', 'error'));
    return;
  }
  if (page.id !== name) {
    window.history.replaceState(null, '', `#/${page.id}`);
  }
  renderNav(page.id);
  document.title = `${page.title} · Hatchway console`;
  if (window.matchMedia('(max-width: 720px)').matches) {
    nav.classList.add('collapsed');
    menuToggle.setAttribute('aria-expanded', 'false');
  }
  const run = ++routing;
  clear(main, h('p', { class: 'muted' }, 'Loading…'));
  try {
    const module = await import(`./pages/${page.module}.js`);
    const content = await module.render(context(page, params));
    if (run !== routing) return; // another page was opened meanwhile
    clear(main, content);
  } catch (error) {
    if (run !== routing) return;
    if (error instanceof ApiError && error.status === 401) {
      await boot();
      return;
    }
    clear(main, h('h1', {}, page.title), notice(error.message, 'error'));
  }
  main.focus({ preventScroll: true });
}

async function signedOut() {
  state.me = null;
  routing += 1; // a page still loading for the account that left must not replace the sign-in form
  nav.hidden = true;
  orgPicker.hidden = true;
  logout.hidden = true;
  whoami.textContent = '';
  // An invitation link is /console/accept#token=...: the token rides in the fragment, never sent to a server.
  const accepting = window.location.pathname.endsWith('/accept');
  const { name, params } = accepting ? { name: 'accept', params: new URLSearchParams(window.location.hash.slice(1)) }
    : parseHash();
  const module = await import('./pages/login.js');
  clear(main, module.render({ accept: name === 'accept', params, signedIn: boot }));
}

export async function boot() {
  let me;
  try {
    me = await admin.get('/me');
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      await signedOut();
      return;
    }
    clear(main, notice(`The plane did not answer: ${error.message}`, 'error'));
    return;
  }
  if (me.csrf_token) setCsrf(me.csrf_token);
  state.me = me;
  whoami.textContent = `${me.email || me.name || me.id} · ${me.role.replace('_', ' ')}`;
  logout.hidden = false;
  await loadOrgs();
  if (state.me !== me) return; // signed out (or booted again) meanwhile
  setPlaygroundOrg(state.me.role === 'plane_admin' ? state.org : null);
  if (window.location.pathname !== '/console/' || ['login', 'accept'].includes(parseHash().name)) {
    window.history.replaceState(null, '', '/console/#/');
  }
  await route();
}

window.addEventListener('hashchange', () => {
  if (state.me) route();
  else boot();
});

boot();
