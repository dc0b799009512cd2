// panva's oidc-provider configured as an IdP that offers OpenID CIBA (poll mode), for
// tests/interop/test_ciba.py. Its own configuration, apart from server.mjs's profiles.
//
//   node ciba.mjs --port 0 --client-secret S --redirect-uri URI [--interval N]
//
// Prints one JSON line {"issuer": ..., "port": ...} once it listens on 127.0.0.1.
//
// What it is: the OP's CIBA feature as documented (features.ciba: processLoginHint,
// triggerAuthenticationDevice; validateBindingMessage left at the library's default, the
// strictest common rule: 1-20 characters of [a-zA-Z0-9-._+/!?#]), the claims parameter on
// (so acr, amr and auth_time can be asked for), RFC 9068 JWT access tokens for the API
// (typ at+jwt, with acr and auth_time), and an IdP's own polling rules:
//   - the acknowledgement names an `interval` (--interval, default 1 s);
//   - the request lives as long as `requested_expiry` asks (at most 120 s);
//   - a poll sooner than the interval after the last one is answered `slow_down`, and the
//     interval grows by 5 s (CIBA Core 1.0 section 11).
// A code-flow sign-in (password, optionally an OTP) gives the API client its first token.
//
// Test-only endpoints (loopback only, never part of a real IdP), the "authentication
// device" the test plays:
//   GET  /_admin/ciba                    pending requests: auth_req_id, login, binding message
//   POST /_admin/ciba/ID/approve         the user approves (form: factor=pwd|otp|key)
//   POST /_admin/ciba/ID/deny            the user refuses
//   GET  /_admin/ciba/polls              every CIBA poll the token endpoint saw: when, for
//                                        which request, what it answered, and whether early

import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'client-id': { type: 'string', default: 'stepup-authz' },
    'client-secret': { type: 'string', default: 'op-secret' },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
    audience: { type: 'string', default: 'stepup-demo' },
    resource: { type: 'string', default: 'https://api.example.test/trading' },
    interval: { type: 'string', default: '1' },
  },
});
const INTERVAL_S = Number(args.interval);
const MAX_EXPIRY_S = 120;

// login -> password, stable id (the tokens' `sub`)
const USERS = {
  alice: { password: 'alice-password', id: 'u1-alice' },
  bob: { password: 'bob-password', id: 'u2-bob' },
};
const OTP = '246810';
const byId = new Map(Object.entries(USERS).map(([login, u]) => [u.id, { login, ...u }]));

// What an approval with a factor proves: `key` is a hardware key.
const FACTORS = {
  pwd: { acr: 'pwd', amr: ['pwd'] },
  otp: { acr: 'mfa', amr: ['pwd', 'otp'] },
  key: { acr: 'phr', amr: ['pwd', 'hwk'] },
};

const pending = new Map(); // auth_req_id -> what the "phone" shows
const polls = []; // every CIBA poll: {auth_req_id, at_ms, answer, early}
const lastPoll = new Map(); // auth_req_id -> {at_ms, interval_s}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: `k-${randomBytes(6).toString('hex')}`, use: 'sig', alg: 'RS256' };

function sourceOf(ctx, token) {
  const e = ctx?.oidc?.entities || {};
  return e.AuthorizationCode || e.BackchannelAuthenticationRequest || e.RefreshToken || token;
}

const configuration = {
  clients: [{
    client_id: args['client-id'],
    client_secret: args['client-secret'],
    redirect_uris: args['redirect-uri'],
    response_types: ['code'],
    grant_types: ['authorization_code', 'urn:openid:params:grant-type:ciba'],
    token_endpoint_auth_method: 'client_secret_basic',
    backchannel_token_delivery_mode: 'poll',
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  async findAccount(ctx, id) {
    if (!byId.has(id)) return undefined;
    return { accountId: id, async claims() { return { sub: id }; } };
  },
  async extraTokenClaims(ctx, token) {
    const src = sourceOf(ctx, token);
    const out = {};
    if (src?.acr) out.acr = src.acr;
    if (src?.authTime) out.auth_time = src.authTime;
    return out;
  },
  acrValues: ['pwd', 'mfa', 'phr'],
  claims: { openid: ['sub'], amr: null },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    claimsParameter: { enabled: true },
    ciba: {
      enabled: true,
      deliveryModes: ['poll'],
      async processLoginHint(ctx, hint) {
        return USERS[hint]?.id || (byId.has(hint) ? hint : undefined);
      },
      async validateRequestContext() {},
      async verifyUserCode() {},
      async triggerAuthenticationDevice(ctx, request, account) {
        pending.set(request.jti, {
          auth_req_id: request.jti,
          login: byId.get(account.accountId)?.login,
          binding_message: request.params.binding_message,
          acr_values: request.params.acr_values,
          login_hint: request.params.login_hint,
          claims: request.params.claims,
        });
      },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => args.resource,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resource) => {
        if (resource !== args.resource) throw new errors.InvalidTarget();
        return {
          scope: 'trading',
          audience: args.audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    AccessToken: 600,
    IdToken: 600,
    Grant: 600,
    Interaction: 600,
    Session: 600,
    BackchannelAuthenticationRequest: (ctx) => {
      const asked = Number(ctx?.oidc?.params?.requested_expiry);
      return Number.isSafeInteger(asked) && asked > 0 ? Math.min(asked, MAX_EXPIRY_S) : MAX_EXPIRY_S;
    },
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = `<!doctype html><title>error</title><pre>${JSON.stringify(out)}</pre>`;
  },
};

let issuer;
let provider;
let handler;

// The IdP's polling rules, around the library's own endpoints.
async function pollingRules(ctx, next) {
  await next();
  if (ctx.path === '/backchannel' && ctx.status === 200 && ctx.body?.auth_req_id) {
    ctx.body = { ...ctx.body, interval: INTERVAL_S };
    lastPoll.set(ctx.body.auth_req_id, { at_ms: Date.now(), interval_s: INTERVAL_S });
    return;
  }
  const params = ctx.oidc?.params;
  if (ctx.path !== '/token' || params?.grant_type !== 'urn:openid:params:grant-type:ciba') return;
  const id = params.auth_req_id;
  const now = Date.now();
  const last = lastPoll.get(id);
  const early = last !== undefined && now - last.at_ms < last.interval_s * 1000;
  const answer = ctx.status === 200 ? 'tokens' : ctx.body?.error;
  polls.push({ auth_req_id: id, at_ms: now, answer, early });
  const interval = early ? last.interval_s + 5 : last?.interval_s ?? INTERVAL_S;
  lastPoll.set(id, { at_ms: now, interval_s: interval });
  if (early && answer === 'authorization_pending') {
    ctx.status = 400;
    ctx.body = { error: 'slow_down', error_description: 'you are polling too quickly' };
  }
}

function send(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

async function readForm(req) {
  let raw = '';
  for await (const chunk of req) {
    raw += chunk;
    if (raw.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(raw);
}

function loginPage(uid, message) {
  return `<!doctype html><title>Sign in</title><p>${message}</p>
    <form method="post" action="/interaction/${uid}/login">
    <input name="username"><input name="password" type="password"><input name="otp">
    <button>Sign in</button></form>`;
}

// The code flow's login and consent (consent granted as asked).
async function interaction(req, res, url) {
  const parts = url.pathname.split('/');
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session, uid } = details;
  if (parts.length === 3 && req.method === 'GET') {
    if (prompt.name === 'login') return send(res, 200, loginPage(uid, 'Sign in'), 'text/html');
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, {
      mergeWithLastSubmission: true,
    });
  }
  if (parts[3] === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const user = USERS[form.get('username')];
    if (!user || user.password !== form.get('password')) {
      return send(res, 401, loginPage(uid, 'Invalid username or password.'), 'text/html');
    }
    let factor = 'pwd';
    if (form.get('otp')) {
      if (form.get('otp') !== OTP) return send(res, 401, loginPage(uid, 'Invalid code.'), 'text/html');
      factor = 'otp';
    }
    const { acr, amr } = FACTORS[factor];
    return provider.interactionFinished(req, res, { login: { accountId: user.id, acr, amr } }, {
      mergeWithLastSubmission: false,
    });
  }
  return send(res, 404, { error: 'not_found' });
}

// The user's phone.
async function device(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean); // ['_admin', 'ciba', ...]
  if (req.method === 'GET' && parts.length === 2) return send(res, 200, [...pending.values()]);
  if (req.method === 'GET' && parts[2] === 'polls') return send(res, 200, polls);
  if (req.method !== 'POST' || parts.length !== 4) return send(res, 404, { error: 'not_found' });
  const shown = pending.get(parts[2]);
  if (!shown) return send(res, 404, { error: 'unknown auth_req_id' });
  pending.delete(parts[2]);
  const request = await provider.BackchannelAuthenticationRequest.find(parts[2]);
  if (!request) return send(res, 404, { error: 'expired auth_req_id' });
  if (parts[3] === 'deny') {
    await provider.backchannelResult(request, new errors.AccessDenied('the user refused'));
    return send(res, 200, { denied: true });
  }
  const form = await readForm(req);
  const factor = FACTORS[form.get('factor') || 'otp'];
  if (!factor) return send(res, 400, { error: 'unknown factor' });
  const grant = new provider.Grant({ accountId: request.accountId, clientId: request.clientId });
  grant.addOIDCScope(request.scope);
  if (request.claims?.id_token) grant.addOIDCClaims(Object.keys(request.claims.id_token));
  await grant.save();
  await provider.backchannelResult(request, grant, {
    acr: factor.acr,
    amr: factor.amr,
    authTime: Math.floor(Date.now() / 1000),
  });
  return send(res, 200, { approved: true, acr: factor.acr });
}

const server = createServer((req, res) => {
  const url = new URL(req.url, issuer);
  let route = null;
  if (url.pathname.startsWith('/interaction/')) route = interaction;
  else if (url.pathname.startsWith('/_admin/ciba')) route = device;
  if (route === null) return handler(req, res);
  route(req, res, url).catch((err) => {
    process.stderr.write(`${url.pathname}: ${err.stack}\n`);
    if (!res.headersSent) send(res, err.statusCode || 500, { error: err.error || 'server_error' });
  });
});

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  provider = new Provider(issuer, configuration);
  provider.use(pollingRules);
  handler = provider.callback();
  provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
