// A real OpenID Connect provider for CodeHub's tests: panva's oidc-provider (a certified
// OpenID Provider implementation) with two test users, a confidential client and login and
// consent forms of its own (the package's devInteractions accept any name and no password).
//
// Usage: node provider.js CONFIG.json. The harness (tests/harness/oidc.py) writes CONFIG:
//   {"port": 1234, "issuer": "http://127.0.0.1:1234", "keys": [<private JWK>, ...],
//    "redirect_uris": [...], "post_logout_redirect_uris": [...], "clients": [<extra>],
//    "id_token_ttl": 600}
// The signing keys come from the harness, so a test rotates them by restarting the
// provider with new ones. It prints "listening <issuer>" when it answers.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

export const USERS = {
  alice: { password: 'alice-password', email: 'alice@example.test', name: 'Alice Example',
           groups: ['developers', 'codehub-admins'] },
  bob: { password: 'bob-password', email: 'bob@other.test', name: 'Bob Other',
         groups: ['developers'] },
};

const CLIENT = {
  client_id: 'codehub',
  client_secret: 'codehub-test-secret',
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  redirect_uris: config.redirect_uris,
  post_logout_redirect_uris: config.post_logout_redirect_uris || [],
};

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const page = (title, body) => `<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>${escape(title)}</title></head><body><main><h1>${escape(title)}</h1>${body}</main></body></html>`;

const loginForm = (uid, error) => page('Sign in', `
${error ? `<p role="alert" id="error">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login" autocomplete="off">
  <label>User name <input name="login" id="login" required autofocus></label>
  <label>Password <input name="password" id="password" type="password" required></label>
  <button type="submit" id="sign-in">Sign in</button>
</form>`);

const consentForm = (uid, client, scopes) => page('Authorize', `
<p>${escape(client)} asks for: ${escape(scopes.join(', ') || 'nothing new')}.</p>
<form method="post" action="/interaction/${escape(uid)}/confirm">
  <button type="submit" id="authorize">Authorize</button>
</form>
<form method="post" action="/interaction/${escape(uid)}/abort">
  <button type="submit" id="deny">Deny</button>
</form>`);

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

const provider = new Provider(config.issuer, {
  clients: [CLIENT, ...(config.clients || [])],
  jwks: { keys: config.keys },
  cookies: { keys: ['codehub-test-provider-cookie-key'] },
  async findAccount(ctx, id) {
    const user = USERS[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, name: user.name, email: user.email,
                 email_verified: true, groups: user.groups };
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false, // the ID token carries the claims of the granted scopes
  pkce: { required: () => true },
  ttl: { IdToken: config.id_token_ttl || 600 },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      // Its own pages: the package's defaults load a web font from a CDN.
      async logoutSource(ctx, form) {
        ctx.body = page('Sign out', `${form}<button type="submit" form="op.logoutForm"
          value="yes" name="logout" id="sign-out">Yes, sign me out</button>`);
      },
      async postLogoutSuccessSource(ctx) {
        ctx.body = page('Signed out', '<p>You are signed out of the provider.</p>');
      },
    },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});
provider.proxy = false;

const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/;

provider.use(async (ctx, next) => {
  const m = INTERACTION.exec(ctx.path);
  if (!m) return next();
  const [, uid, action] = m;
  ctx.set('Cache-Control', 'no-store');
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) ctx.throw(400, 'interaction mismatch');
  const { prompt, params, session, grantId } = details;
  if (!action && ctx.method === 'GET') {
    ctx.type = 'html';
    ctx.body = prompt.name === 'login' ? loginForm(uid)
      : consentForm(uid, params.client_id, [...(prompt.details.missingOIDCScope || [])]);
    return undefined;
  }
  if (ctx.method !== 'POST') ctx.throw(405);
  ctx.respond = false; // interactionFinished writes the redirect itself
  if (action === 'abort') {
    return provider.interactionFinished(ctx.req, ctx.res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
  }
  if (action === 'login') {
    const form = await readForm(ctx.req);
    const user = USERS[form.get('login')];
    if (prompt.name !== 'login' || !user || user.password !== form.get('password')) {
      ctx.respond = true;
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = loginForm(uid, 'Wrong user name or password.');
      return undefined;
    }
    return provider.interactionFinished(ctx.req, ctx.res, {
      login: { accountId: form.get('login') },
    }, { mergeWithLastSubmission: false });
  }
  // confirm: grant what the consent prompt lists
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  return provider.interactionFinished(ctx.req, ctx.res, {
    consent: { grantId: await grant.save() },
  }, { mergeWithLastSubmission: true });
});

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`listening ${config.issuer}`);
});
