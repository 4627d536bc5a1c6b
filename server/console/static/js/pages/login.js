// Sign in, or accept an invitation (its token arrives in the URL's fragment, which is never sent to a server;
// it is taken out of the address bar and history at once).

import { request, setCsrf } from '../api.js';
import { field, form, h } from '../ui.js';

export function render({ accept, params, signedIn }) {
  if (accept) {
    const token = params.get('token') || '';
    // Out of the address bar and the history at once.
    window.history.replaceState(null, '', '/console/#/accept');
    return h('section', { class: 'login panel', 'aria-labelledby': 'accept-title' },
      h('h1', { id: 'accept-title' }, 'Accept your invitation'),
      h('p', { class: 'muted' }, 'Choose your name and a password to create your account.'),
      form([
        field('Name', 'name', { required: true, autocomplete: 'name' }),
        field('Password', 'password', { type: 'password', required: true, help: 'At least 10 characters.',
          autocomplete: 'new-password' }),
      ], async (v) => {
        const answer = await request('POST', '/auth/invitations/accept', { token, name: v.name, password: v.password });
        setCsrf(answer.csrf_token);
        window.history.replaceState(null, '', '/console/#/');
        await signedIn();
      }, { submit: 'Create account', className: '', label: 'Accept invitation' }));
  }
  return h('section', { class: 'login panel', 'aria-labelledby': 'login-title' },
    h('h1', { id: 'login-title' }, 'Sign in to Hatchway'),
    form([
      // Named as password managers expect, so they fill (and offer to save) the account's credentials.
      field('Email', 'email', { type: 'email', required: true, autocomplete: 'username' }),
      field('Password', 'password', { type: 'password', required: true, autocomplete: 'current-password' }),
    ], async (v) => {
      const answer = await request('POST', '/auth/login', { email: v.email, password: v.password });
      setCsrf(answer.csrf_token);
      await signedIn();
    }, { submit: 'Sign in', className: '', label: 'Sign in' }));
}
