// panva's oidc-provider (OpenID Certified), run by tests/interop in a named configuration.
//
//   node server.mjs --config default --port 0 --client-secret S --redirect-uri URI
//        [--backchannel-logout-uri URI] [--post-logout-redirect-uri URI] [--audience A]
//
// Prints one JSON line {"issuer": ..., "port": ...} once it listens on 127.0.0.1.
//
// Configurations (what each emulates is written next to it below):
//   default   the OP as it ships: opaque access tokens, no claims parameter, no resource
//             servers; introspection, back-channel logout and CIBA (poll) turned on.
//   jwt       RFC 9068 JWT access tokens (typ at+jwt) for a resource requested with
//             RFC 8707 `resource`, carrying acr/amr/auth_time; claims parameter on.
//   keycloak  JWT access tokens always (no `resource` needed), typ "JWT", with acr, amr,
//             auth_time, sid and azp, as Keycloak's mappers give them.
//   okta      JWT access tokens (no typ header) whose `sub` is the login and `uid` the user id (the ID
//             token's `sub`), `cid` for the client, no `amr`.
//   entra     JWT access tokens typ "JWT"; step-up as authentication-context ids in an
//             `acrs` claim (ID and access token) requested through the claims parameter;
//             `oid` for the user, `azp` for the client.
//
// Test-only admin endpoints (loopback only, never part of a real IdP):
//   POST /_admin/rotate[?keep=N]     new signing key first; N previous keys stay published
//   GET  /_admin/ciba                pending CIBA requests (auth_req_id, login, binding message)
//   POST /_admin/ciba/ID/approve     the user approves on the "phone" (form: factor=otp|key)
//   POST /_admin/ciba/ID/deny        the user refuses

import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    config: { type: 'string', default: 'default' },
    port: { type: 'string', default: '0' },
    'client-id': { type: 'string', default: 'stepup-authz' },
    'client-secret': { type: 'string', default: 'op-secret' },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
    'backchannel-logout-uri': { type: 'string' },
    'post-logout-redirect-uri': { type: 'string', multiple: true, default: [] },
    audience: { type: 'string', default: 'stepup-demo' },
    resource: { type: 'string', default: 'https://api.example.test/trading' },
  },
});

const CONFIGS = new Set(['default', 'jwt', 'keycloak', 'okta', 'entra']);
if (!CONFIGS.has(args.config)) {
  process.stderr.write(`unknown --config ${args.config}; one of ${[...CONFIGS].join(', ')}\n`);
  process.exit(2);
}
const config = args.config;

// Users: the login name, the password, the stable user id (the ID token's `sub`).
const USERS = {
  alice: { password: 'alice-password', id: 'u1-alice', email: 'alice@example.com' },
  bob: { password: 'bob-password', id: 'u2-bob', email: 'bob@example.com' },
};
const OTP = '246810'; // the one code the test "authenticator" shows
const byId = new Map(Object.values(USERS).map((u) => [u.id, u]));

function loginOf(hint) {
  if (USERS[hint]) return USERS[hint];
  return byId.get(hint) || Object.values(USERS).find((u) => u.email === hint);
}

// What a sign-in with the given factors proves. `key` stands for a hardware key (phr).
function evidence(factor) {
  if (factor === 'key') return { acr: 'phr', amr: ['pwd', 'hwk'] };
  if (factor === 'otp') return { acr: 'mfa', amr: ['pwd', 'otp'] };
  return { acr: 'pwd', amr: ['pwd'] };
}

// Entra: authentication contexts satisfied by a sign-in (c1 = MFA, c2 = phishing-resistant).
function acrsOf(acr) {
  if (acr === 'phr') return ['c1', 'c2'];
  if (acr === 'mfa') return ['c1'];
  return [];
}

// The sign-in a token or ID token is derived from: the code, the CIBA request or the
// refresh token being exchanged.
function sourceOf(ctx, token) {
  const e = ctx?.oidc?.entities || {};
  return e.AuthorizationCode || e.BackchannelAuthenticationRequest || e.RefreshToken || token;
}

async function findAccount(ctx, id, token) {
  const user = byId.get(id);
  if (!user) return undefined;
  return {
    accountId: id,
    async claims() {
      const out = { sub: id, email: user.email, preferred_username: user.email };
      if (config === 'entra') {
        const src = sourceOf(ctx, token);
        out.oid = `oid-${id}`;
        out.acrs = acrsOf(src?.acr);
      }
      return out;
    },
  };
}

async function extraTokenClaims(ctx, token) {
  const src = sourceOf(ctx, token);
  const out = {};
  // Introspection (all configurations) and JWT access tokens report what was proved.
  if (src?.acr) out.acr = src.acr;
  if (src?.authTime) out.auth_time = src.authTime;
  if (['jwt', 'keycloak'].includes(config) && src?.amr) out.amr = src.amr;
  if (config === 'keycloak') {
    if (src?.sid) out.sid = src.sid;
    out.azp = token.clientId;
  }
  if (config === 'okta') {
    const user = byId.get(token.accountId);
    out.uid = token.accountId;
    out.cid = token.clientId;
    if (user) out.login = user.email;
  }
  if (config === 'entra') {
    out.oid = `oid-${token.accountId}`;
    out.azp = token.clientId;
    out.acrs = acrsOf(src?.acr);
    out.ver = '2.0';
  }
  return out;
}

function jwtCustomizer(ctx, token, jwt) {
  if (config === 'keycloak' || config === 'entra') {
    jwt.header = { typ: 'JWT' };
  }
  if (config === 'okta') jwt.header = { typ: undefined }; // header: kid and alg only
  if (config === 'entra') delete jwt.payload.acr; // Entra states step-up in `acrs` only
  if (config === 'okta') {
    // Okta: the access token's `sub` is the user's login, the ID token's `sub` the user id.
    jwt.payload.sub = jwt.payload.login;
    delete jwt.payload.login;
  }
  if (config === 'okta' || config === 'entra') delete jwt.payload.client_id;
}

const JWT_CONFIG = config !== 'default';
const ALWAYS_JWT = ['keycloak', 'okta', 'entra'].includes(config);

const pendingCiba = new Map(); // auth_req_id -> {login, binding_message, acr_values}

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `k-${randomBytes(6).toString('hex')}`, use: 'sig', alg: 'RS256' };
}

let keys = [newKey()];
const cookieKeys = [randomBytes(32).toString('hex')];

function client() {
  const meta = {
    client_id: args['client-id'],
    client_secret: args['client-secret'],
    redirect_uris: args['redirect-uri'],
    post_logout_redirect_uris: args['post-logout-redirect-uri'],
    response_types: ['code'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:openid:params:grant-type:ciba'],
    token_endpoint_auth_method: 'client_secret_basic',
    backchannel_token_delivery_mode: 'poll',
  };
  if (args['backchannel-logout-uri']) {
    meta.backchannel_logout_uri = args['backchannel-logout-uri'];
    meta.backchannel_logout_session_required = true;
  }
  return meta;
}

function configuration() {
  return {
    clients: [client()],
    jwks: { keys },
    cookies: { keys: cookieKeys },
    findAccount,
    extraTokenClaims,
    acrValues: ['pwd', 'mfa', 'phr'],
    claims: {
      openid: ['sub'],
      email: ['email'],
      // Entra puts `oid` in ID tokens under the profile scope; `acrs` only when requested.
      profile: ['preferred_username', ...(config === 'entra' ? ['oid'] : [])],
      ...(JWT_CONFIG ? { amr: null } : {}), // requestable once the claims parameter is on
      ...(config === 'entra' ? { acrs: null } : {}),
    },
    // Without this the OP renders its own development login, which proves nothing.
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    pkce: { required: () => true },
    formats: { customizers: { jwt: JWT_CONFIG ? jwtCustomizer : undefined } },
    features: {
      devInteractions: { enabled: false },
      introspection: { enabled: true },
      revocation: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource: async (ctx, form) => {
          ctx.body = `<!doctype html><title>Sign out</title>${form}
            <button form="op.logoutForm" name="logout" value="yes">Sign out</button>`;
        },
      },
      claimsParameter: { enabled: JWT_CONFIG },
      ciba: {
        enabled: true,
        deliveryModes: ['poll'],
        processLoginHint: async (ctx, hint) => loginOf(hint)?.id,
        validateBindingMessage: async (ctx, message) => {
          if (message !== undefined && !/^[\w .,:#/-]{1,64}$/.test(message)) {
            throw new errors.InvalidBindingMessage('binding_message: 1-64 plain characters');
          }
        },
        validateRequestContext: async () => {},
        verifyUserCode: async () => {},
        triggerAuthenticationDevice: async (ctx, request, account) => {
          pendingCiba.set(request.jti, {
            auth_req_id: request.jti,
            login: byId.get(account.accountId)?.email,
            account: account.accountId,
            binding_message: request.params.binding_message,
            acr_values: request.params.acr_values,
          });
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, cl, oneOf) => oneOf || (ALWAYS_JWT ? args.resource : undefined),
        useGrantedResource: async () => ALWAYS_JWT,
        getResourceServerInfo: async (ctx, resource) => {
          if (!JWT_CONFIG || resource !== args.resource) throw new errors.InvalidTarget();
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
    ttl: { AccessToken: 600, IdToken: 600, BackchannelAuthenticationRequest: 300 },
    // Everything here is on loopback: the OP's SSRF guard (its outgoing requests refuse
    // special-use addresses, 127/8 among them) would refuse every back-channel logout POST
    // to the stack's Envoy. A deployed IdP posts to the service's public address.
    fetch: (url, { dispatcher, ...options }) => globalThis.fetch(url, options),
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = `<!doctype html><title>error</title><pre>${JSON.stringify(out)}</pre>`;
    },
  };
}

let issuer;
let provider;
let handler;

function build() {
  provider = new Provider(issuer, configuration());
  provider.on('backchannel.error', (ctx, err) => {
    process.stderr.write(`backchannel logout failed: ${err.message} ${err.cause?.message ?? ''}\n`);
  });
  provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  handler = provider.callback();
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

function page(uid, message) {
  return `<!doctype html><title>Sign in</title><p>${message}</p>
    <form method="post" action="/interaction/${uid}/login">
    <input name="username"><input name="password" type="password"><input name="otp">
    <button>Sign in</button></form>`;
}

// The login and consent steps every OP leaves to its deployer. Login: password, plus a
// one-time code (acr mfa) or a hardware key (acr phr). Consent: granted as requested.
async function interaction(req, res, url) {
  const parts = url.pathname.split('/');
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session, uid } = details;
  if (parts.length === 3 && req.method === 'GET') {
    if (prompt.name === 'login') return send(res, 200, page(uid, 'Sign in'), 'text/html');
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, {
      mergeWithLastSubmission: true,
    });
  }
  if (parts[3] === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const user = USERS[form.get('username')];
    if (!user || user.password !== form.get('password')) {
      return send(res, 401, page(uid, 'Invalid username or password.'), 'text/html');
    }
    let factor = 'pwd';
    if (form.get('otp')) {
      if (form.get('otp') !== OTP) return send(res, 401, page(uid, 'Invalid code.'), 'text/html');
      factor = 'otp';
    }
    if (form.get('key') === 'yes') factor = 'key';
    const { acr, amr } = evidence(factor);
    return provider.interactionFinished(req, res, { login: { accountId: user.id, acr, amr } }, {
      mergeWithLastSubmission: false,
    });
  }
  return send(res, 404, { error: 'not_found' });
}

async function admin(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean); // ['_admin', ...]
  if (req.method === 'POST' && parts[1] === 'rotate') {
    const keep = Number(url.searchParams.get('keep') ?? '1');
    keys = [newKey(), ...keys.slice(0, Number.isInteger(keep) && keep >= 0 ? keep : 1)];
    build(); // the memory adapter is shared by module: sessions, grants and tokens survive
    return send(res, 200, { kids: keys.map((k) => k.kid) });
  }
  if (req.method === 'GET' && parts[1] === 'ciba' && parts.length === 2) {
    return send(res, 200, [...pendingCiba.values()]);
  }
  if (req.method === 'POST' && parts[1] === 'ciba' && parts.length === 4) {
    const pending = pendingCiba.get(parts[2]);
    if (!pending) return send(res, 404, { error: 'unknown auth_req_id' });
    pendingCiba.delete(parts[2]);
    const request = await provider.BackchannelAuthenticationRequest.find(parts[2]);
    if (!request) return send(res, 404, { error: 'expired auth_req_id' });
    if (parts[3] === 'deny') {
      await provider.backchannelResult(request, new errors.AccessDenied('the user refused'));
      return send(res, 200, { denied: true });
    }
    const form = await readForm(req);
    const { acr, amr } = evidence(form.get('factor') || 'otp');
    const grant = new provider.Grant({ accountId: request.accountId, clientId: request.clientId });
    grant.addOIDCScope(request.scope);
    if (request.claims?.id_token) grant.addOIDCClaims(Object.keys(request.claims.id_token));
    await grant.save();
    await provider.backchannelResult(request, grant, {
      acr,
      amr,
      authTime: Math.floor(Date.now() / 1000),
    });
    return send(res, 200, { approved: true, acr });
  }
  return send(res, 404, { error: 'not_found' });
}

const server = createServer((req, res) => {
  const url = new URL(req.url, issuer);
  const route = url.pathname.startsWith('/interaction/')
    ? interaction
    : url.pathname.startsWith('/_admin/') ? admin : null;
  if (route === null) return handler(req, res);
  route(req, res, url).catch((err) => {
    process.stderr.write(`${url.pathname}: ${err.stack}\n`);
    if (!res.headersSent) send(res, err.statusCode || 500, { error: err.error || 'server_error' });
  });
});

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  build();
  process.stdout.write(`${JSON.stringify({ issuer, port, config })}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
