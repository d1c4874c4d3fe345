// labfleet development identity provider: a real OpenID Connect provider on
// loopback, shaped like INDIGO IAM (endpoint paths, scopes, group claims).
//
//   DEVELOPMENT IDENTITY PROVIDER — NOT FOR PRODUCTION
//
// Accounts (with plain-text demo passwords) come from a YAML file that is
// re-read whenever it changes (and on SIGHUP); registered clients come from a
// JSON file. Passwords and tokens are never logged.
//
// Usage:
//   node server.mjs --accounts config/accounts.yaml --clients clients.json \
//        [--host 127.0.0.1] [--port 9080] [--issuer http://127.0.0.1:9080] \
//        [--state-dir DIR] [--access-token-ttl 3600] [--refresh-token-ttl 2592000]
//        [--withhold-groups ai-infn/admins,...]
// Every option can also be given as an environment variable DEVIDP_<NAME>
// (upper case, dashes as underscores), e.g. DEVIDP_PORT=9080.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { parseArgs } from 'node:util';

import yaml from 'js-yaml';
import Provider from 'oidc-provider';

const BANNER_TEXT = 'DEVELOPMENT IDENTITY PROVIDER — NOT FOR PRODUCTION';
const SCOPES = ['openid', 'profile', 'email', 'offline_access', 'wlcg', 'wlcg.groups'];
const USERNAME_RE = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;
const GROUP_RE = /^\/?[A-Za-z0-9][A-Za-z0-9._-]*(\/[A-Za-z0-9][A-Za-z0-9._-]*)*$/;

function log(message) {
  process.stdout.write(`[devidp ${new Date().toISOString()}] ${message}\n`);
}

class ConfigError extends Error {}

// ---------------------------------------------------------------- options --

function readOptions(argv, env) {
  const spec = {
    host: { type: 'string' },
    port: { type: 'string' },
    issuer: { type: 'string' },
    accounts: { type: 'string' },
    clients: { type: 'string' },
    'state-dir': { type: 'string' },
    'access-token-ttl': { type: 'string' },
    'refresh-token-ttl': { type: 'string' },
    'allow-non-loopback': { type: 'boolean' },
    'withhold-groups': { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  };
  const { values } = parseArgs({ args: argv, options: spec, strict: true });
  const get = (name) => values[name] ?? env[`DEVIDP_${name.toUpperCase().replaceAll('-', '_')}`];
  if (values.help) {
    process.stdout.write(
      'usage: node server.mjs --accounts FILE.yaml [--clients FILE.json] [--host 127.0.0.1]\n'
      + '       [--port 9080] [--issuer URL] [--state-dir DIR]\n'
      + '       [--access-token-ttl SECONDS] [--refresh-token-ttl SECONDS]\n'
      + '       [--withhold-groups GROUP,...]  (groups no account gets, whatever the file says)\n',
    );
    process.exit(0);
  }
  const host = get('host') || '127.0.0.1';
  const allowNonLoopback = Boolean(values['allow-non-loopback'] || env.DEVIDP_ALLOW_NON_LOOPBACK === '1');
  if (!allowNonLoopback && !isLoopback(host)) {
    throw new ConfigError(
      `--host ${host} is not a loopback address; the development IdP only listens on `
      + '127.0.0.0/8, ::1 or localhost (pass --allow-non-loopback to override)',
    );
  }
  const port = parsePositiveInt(get('port') ?? '9080', 'port', { allowZero: false, max: 65535 });
  const issuer = (get('issuer') || `http://${host.includes(':') ? `[${host}]` : host}:${port}`).replace(/\/+$/, '');
  let issuerUrl;
  try {
    issuerUrl = new URL(issuer);
  } catch {
    throw new ConfigError(`--issuer ${issuer} is not a URL; expected e.g. http://127.0.0.1:${port}`);
  }
  if (!['http:', 'https:'].includes(issuerUrl.protocol)) {
    throw new ConfigError(`--issuer ${issuer} must be an http:// or https:// URL`);
  }
  if (issuerUrl.pathname !== '/' || issuerUrl.search || issuerUrl.hash) {
    throw new ConfigError(`--issuer ${issuer} must not have a path, query or fragment (e.g. http://127.0.0.1:${port})`);
  }
  const accounts = get('accounts');
  if (!accounts) {
    throw new ConfigError('--accounts FILE.yaml (or DEVIDP_ACCOUNTS) is required');
  }
  return {
    host,
    port,
    issuer,
    accounts: path.resolve(accounts),
    clients: get('clients') ? path.resolve(get('clients')) : undefined,
    stateDir: get('state-dir') ? path.resolve(get('state-dir')) : undefined,
    accessTokenTtl: parsePositiveInt(get('access-token-ttl') ?? '3600', 'access-token-ttl'),
    refreshTokenTtl: parsePositiveInt(get('refresh-token-ttl') ?? String(30 * 24 * 3600), 'refresh-token-ttl'),
    // e.g. the groups that make hub admins, unless the demo admin was asked for
    withheldGroups: new Set((get('withhold-groups') || '').split(',')
      .map((g) => g.trim().replace(/^\//, '')).filter(Boolean)),
  };
}

function parsePositiveInt(text, name, { allowZero = false, max = Number.MAX_SAFE_INTEGER } = {}) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < (allowZero ? 0 : 1) || n > max) {
    throw new ConfigError(`--${name} must be an integer between ${allowZero ? 0 : 1} and ${max}, got ${JSON.stringify(text)}`);
  }
  return n;
}

function isLoopback(host) {
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.split('.')[0] === '127';
  if (net.isIPv6(host)) return host === '::1';
  return false;
}

// --------------------------------------------------------------- accounts --

// A stable, UUID-shaped subject derived from the username (like IAM's uuid subs).
export function subjectFor(username) {
  const h = crypto.createHash('sha256').update(`labfleet-devidp:${username}`).digest();
  h[6] = (h[6] & 0x0f) | 0x50; // version nibble 5 (name-based)
  h[8] = (h[8] & 0x3f) | 0x80; // RFC 4122 variant
  const x = h.subarray(0, 16).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20, 32)}`;
}

function parseAccounts(text, file, withheld = new Set()) {
  let doc;
  try {
    doc = yaml.load(text, { filename: file });
  } catch (err) {
    throw new ConfigError(`${file}: not valid YAML: ${err.message}`);
  }
  const users = doc?.users;
  if (!Array.isArray(users)) {
    throw new ConfigError(`${file}: expected a mapping with a "users" list`);
  }
  const byUsername = new Map();
  const bySub = new Map();
  users.forEach((u, i) => {
    const where = `${file}: users[${i}]`;
    if (!u || typeof u !== 'object') throw new ConfigError(`${where}: expected a mapping`);
    const { username, password } = u;
    if (typeof username !== 'string' || !USERNAME_RE.test(username)) {
      throw new ConfigError(`${where}: "username" must match ${USERNAME_RE} (got ${JSON.stringify(username)})`);
    }
    if (typeof password !== 'string' || password.length === 0) {
      throw new ConfigError(`${where} (${username}): "password" must be a non-empty string`);
    }
    if (byUsername.has(username)) throw new ConfigError(`${where}: duplicate username ${username}`);
    const groupsIn = u.groups ?? [];
    if (!Array.isArray(groupsIn) || !groupsIn.every((g) => typeof g === 'string' && GROUP_RE.test(g))) {
      throw new ConfigError(
        `${where} (${username}): "groups" must be a list of IAM group names like "ai-infn/users"`,
      );
    }
    for (const k of ['email', 'name', 'sub']) {
      if (u[k] !== undefined && typeof u[k] !== 'string') {
        throw new ConfigError(`${where} (${username}): "${k}" must be a string`);
      }
    }
    const groups = [...new Set(groupsIn.map((g) => g.replace(/^\//, '')))]
      .filter((g) => !withheld.has(g));
    const sub = u.sub || subjectFor(username);
    if (bySub.has(sub)) throw new ConfigError(`${where}: duplicate sub ${sub}`);
    const account = {
      username,
      password,
      sub,
      email: u.email,
      name: u.name ?? username,
      groups,
    };
    byUsername.set(username, account);
    bySub.set(sub, account);
  });
  return { byUsername, bySub };
}

class AccountStore {
  constructor(file, withheld = new Set()) {
    this.file = file;
    this.withheld = withheld;
    this.stamp = null;
    this.data = null;
    this.reload({ fatal: true });
  }

  statStamp() {
    try {
      const st = fs.statSync(this.file);
      return `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
    } catch {
      return null;
    }
  }

  reload({ fatal = false, force = true } = {}) {
    const stamp = this.statStamp();
    if (!force && stamp === this.stamp) return;
    try {
      let text;
      try {
        text = fs.readFileSync(this.file, 'utf8');
      } catch (err) {
        throw new ConfigError(`cannot read accounts file ${this.file}: ${err.code || err.message}`);
      }
      const data = parseAccounts(text, this.file, this.withheld);
      const first = this.data === null;
      this.data = data;
      this.stamp = stamp;
      log(`${first ? 'loaded' : 'reloaded'} ${data.byUsername.size} account(s) from ${this.file}`);
    } catch (err) {
      if (fatal) throw err;
      this.stamp = stamp; // do not retry the same broken content on every request
      log(`ERROR: keeping the previous accounts: ${err.message}`);
    }
  }

  // Re-read the file whenever it changed, so edits show at the next login,
  // refresh or userinfo call without a restart.
  current() {
    this.reload({ force: false });
    return this.data;
  }

  bySub(sub) {
    return this.current().bySub.get(sub);
  }

  check(username, password) {
    const account = this.current().byUsername.get(username);
    const digest = (s) => crypto.createHash('sha256').update(String(s)).digest();
    // compare digests in constant time; also spend the time for unknown users
    const ok = crypto.timingSafeEqual(digest(account ? account.password : crypto.randomUUID()), digest(password));
    return ok && account ? account : undefined;
  }
}

function claimsFor(account) {
  return {
    sub: account.sub,
    preferred_username: account.username,
    name: account.name,
    ...(account.email ? { email: account.email, email_verified: true } : {}),
    groups: [...account.groups],
    'wlcg.ver': '1.0',
    'wlcg.groups': account.groups.map((g) => `/${g}`),
    organisation_name: 'labfleet-dev',
  };
}

// ---------------------------------------------------------------- clients --

function loadClients(file) {
  if (!file) return [];
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new ConfigError(`cannot read clients file ${file}: ${err.code || err.message}`);
  }
  const list = Array.isArray(doc) ? doc : doc?.clients;
  if (!Array.isArray(list)) {
    throw new ConfigError(`${file}: expected a JSON list of clients or {"clients": [...]}`);
  }
  return list.map((c, i) => {
    const where = `${file}: clients[${i}]`;
    if (!c || typeof c.client_id !== 'string' || !c.client_id) {
      throw new ConfigError(`${where}: "client_id" must be a non-empty string`);
    }
    if (!Array.isArray(c.redirect_uris) || c.redirect_uris.length === 0
        || !c.redirect_uris.every((u) => typeof u === 'string')) {
      throw new ConfigError(`${where} (${c.client_id}): "redirect_uris" must be a non-empty list of URLs`);
    }
    if (c.client_secret !== undefined && (typeof c.client_secret !== 'string' || !c.client_secret)) {
      throw new ConfigError(`${where} (${c.client_id}): "client_secret" must be a non-empty string when given`);
    }
    const out = {
      client_id: c.client_id,
      redirect_uris: c.redirect_uris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: c.token_endpoint_auth_method
        ?? (c.client_secret ? 'client_secret_basic' : 'none'),
    };
    if (c.client_secret) out.client_secret = c.client_secret;
    if (c.post_logout_redirect_uris) out.post_logout_redirect_uris = c.post_logout_redirect_uris;
    if (c.client_name) out.client_name = c.client_name;
    return out;
  });
}

// ------------------------------------------------------------ persistence --

// Keys and cookie secrets: persisted in the state directory when given, so a
// restarted IdP keeps accepting the hub's tokens; ephemeral otherwise.
function loadSecrets(stateDir) {
  const file = stateDir ? path.join(stateDir, 'secrets.json') : undefined;
  if (file && fs.existsSync(file)) {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  }
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const secrets = {
    jwks: { keys: [{ ...jwk, kid: crypto.randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' }] },
    cookieKeys: [crypto.randomBytes(32).toString('base64url')],
  };
  if (file) {
    fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    writeAtomic(file, JSON.stringify(secrets));
  }
  return secrets;
}

function writeAtomic(file, text) {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, text, { mode: 0o600 });
  fs.renameSync(tmp, file);
}

const GRANTABLE = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest']);

// A small adapter keeping every artifact in one Map, optionally mirrored to a
// JSON file (state directory) so sessions, grants and refresh tokens survive a
// restart of the IdP.
function makeAdapter(stateDir) {
  const file = stateDir ? path.join(stateDir, 'store.json') : undefined;
  const store = new Map(); // key -> { payload, exp (ms epoch or null) }
  if (file && fs.existsSync(file)) {
    try {
      for (const [k, v] of JSON.parse(fs.readFileSync(file, 'utf8'))) store.set(k, v);
    } catch (err) {
      log(`WARNING: ignoring unreadable state file ${file}: ${err.message}`);
    }
  }
  let pending = false;
  const persist = () => {
    if (!file || pending) return;
    pending = true;
    setImmediate(() => {
      pending = false;
      const now = Date.now();
      for (const [k, v] of store) if (v.exp !== null && v.exp <= now) store.delete(k);
      writeAtomic(file, JSON.stringify([...store]));
    });
  };
  const get = (key) => {
    const v = store.get(key);
    if (!v) return undefined;
    if (v.exp !== null && v.exp <= Date.now()) {
      store.delete(key);
      return undefined;
    }
    return v.payload;
  };

  return class Adapter {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      const exp = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : null;
      store.set(this.key(id), { payload, exp });
      if (this.model === 'Session' && payload.uid) store.set(`sessionUid:${payload.uid}`, { payload: id, exp });
      if (payload.userCode) store.set(`userCode:${payload.userCode}`, { payload: id, exp });
      if (GRANTABLE.has(this.model) && payload.grantId) {
        const gk = `grant:${payload.grantId}`;
        const members = new Set(get(gk) ?? []);
        members.add(this.key(id));
        store.set(gk, { payload: [...members], exp: null });
      }
      persist();
    }

    async find(id) {
      return get(this.key(id));
    }

    async findByUid(uid) {
      const id = get(`sessionUid:${uid}`);
      return id ? this.find(id) : undefined;
    }

    async findByUserCode(userCode) {
      const id = get(`userCode:${userCode}`);
      return id ? this.find(id) : undefined;
    }

    async consume(id) {
      const v = store.get(this.key(id));
      if (v) v.payload.consumed = Math.floor(Date.now() / 1000);
      persist();
    }

    async destroy(id) {
      store.delete(this.key(id));
      persist();
    }

    async revokeByGrantId(grantId) {
      const gk = `grant:${grantId}`;
      for (const key of get(gk) ?? []) store.delete(key);
      store.delete(gk);
      persist();
    }
  };
}

// ------------------------------------------------------------------- html --

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

const STYLE = `body{font-family:system-ui,sans-serif;background:#f4f4f6;margin:0}
.banner{background:#b00020;color:#fff;font-weight:700;text-align:center;padding:.6em}
.box{max-width:22em;margin:3em auto;background:#fff;padding:1.5em 2em;border-radius:6px;box-shadow:0 1px 4px rgba(0,0,0,.2)}
label{display:block;margin-top:1em}input{width:100%;box-sizing:border-box;padding:.5em;margin-top:.3em}
button{margin-top:1.5em;width:100%;padding:.6em;background:#1f5fa8;color:#fff;border:0;border-radius:4px;font-size:1em;cursor:pointer}
.error{color:#b00020;background:#fde7ea;padding:.6em;border-radius:4px;margin-top:1em}
.muted{color:#666;font-size:.85em}`;

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>${STYLE}</style></head>
<body><div class="banner">${esc(BANNER_TEXT)}</div><div class="box">${body}</div></body></html>`;
}

function loginPage({ uid, clientId, username = '', error }) {
  return page('Sign in — labfleet development IdP', `
<h1>Sign in</h1>
<p class="muted">to <strong>${esc(clientId)}</strong> with a demo account</p>
${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<form id="login-form" method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
  <label for="username">Username</label>
  <input id="username" name="username" type="text" value="${esc(username)}" required autofocus>
  <label for="password">Password</label>
  <input id="password" name="password" type="password" required>
  <button id="login" type="submit">Sign in</button>
</form>`);
}

// ----------------------------------------------------------------- server --

function readBody(req, limit = 64 * 1024) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, html, headers = {}) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    ...headers,
  });
  res.end(html);
}

function buildProvider(opts, accounts, clients, secrets) {
  const configuration = {
    clients,
    jwks: secrets.jwks,
    cookies: {
      keys: secrets.cookieKeys,
      long: { httpOnly: true, sameSite: 'lax' },
      short: { httpOnly: true, sameSite: 'lax' },
    },
    adapter: makeAdapter(opts.stateDir),
    scopes: SCOPES,
    claims: {
      openid: ['sub', 'groups'],
      profile: ['name', 'preferred_username', 'organisation_name'],
      email: ['email', 'email_verified'],
      wlcg: ['wlcg.ver'],
      'wlcg.groups': ['wlcg.groups'],
    },
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    routes: {
      authorization: '/authorize',
      token: '/token',
      userinfo: '/userinfo',
      jwks: '/jwk',
      revocation: '/revoke',
      introspection: '/introspect',
      end_session: '/logout',
    },
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: true },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
      },
      introspection: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => client.clientAuthMethod !== 'none'
          || token.clientId === client.clientId,
      },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource: async (ctx, form) => {
          ctx.body = page('Sign out', `<h1>Sign out?</h1>${form}
<button id="logout" autofocus type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>`);
        },
        postLogoutSuccessSource: async (ctx) => {
          ctx.body = page('Signed out', '<h1>Signed out</h1>');
        },
      },
    },
    pkce: { required: () => false },
    ttl: {
      AccessToken: opts.accessTokenTtl,
      IdToken: opts.accessTokenTtl,
      AuthorizationCode: 120,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
      Grant: 365 * 24 * 3600,
      RefreshToken: opts.refreshTokenTtl,
    },
    // a registered client is trusted: refresh tokens whenever offline_access
    // was asked for, without the prompt=consent dance
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && code.scopes.has('offline_access'),
    rotateRefreshToken: () => true,
    // consent is auto-granted for registered clients
    loadExistingGrant: async (ctx) => {
      const { client, session } = ctx.oidc;
      const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
      let grant = grantId ? await ctx.oidc.provider.Grant.find(grantId) : undefined;
      if (!grant) {
        grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
      }
      grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(' '));
      const claims = [...ctx.oidc.requestParamClaims];
      if (claims.length) grant.addOIDCClaims(claims);
      await grant.save();
      return grant;
    },
    findAccount: async (ctx, sub) => {
      const account = accounts.bySub(sub);
      if (!account) return undefined;
      return {
        accountId: sub,
        // always the current file content: group edits show at the next refresh
        claims: async () => claimsFor(accounts.bySub(sub) ?? account),
      };
    },
    interactions: {
      url: async (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Error', `<h1>Something went wrong</h1>
<p class="error" id="error">${esc(out.error)}: ${esc(out.error_description ?? '')}</p>`);
    },
  };
  const provider = new Provider(opts.issuer, configuration);
  if (new URL(opts.issuer).protocol === 'https:') provider.proxy = true;

  for (const event of ['server_error', 'authorization.error', 'grant.error', 'userinfo.error',
    'introspection.error', 'revocation.error', 'end_session.error']) {
    provider.on(event, (ctx, err) => {
      log(`${event}: ${err.name}: ${err.message}${err.error_description ? ` (${err.error_description})` : ''}`);
    });
  }
  provider.on('grant.success', (ctx) => {
    log(`token issued: client=${ctx.oidc.client?.clientId} grant_type=${ctx.oidc.params?.grant_type}`);
  });
  return provider;
}

async function handleInteraction(provider, accounts, req, res, url) {
  const m = url.pathname.match(/^\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/);
  if (!m) {
    send(res, 404, page('Not found', '<p class="error">Unknown interaction URL</p>'));
    return;
  }
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    send(res, 400, page('Session expired', `<h1>Login session expired</h1>
<p class="error">${esc(err.error_description || err.message)}. Go back to the application and sign in again.</p>`));
    return;
  }
  if (details.uid !== m[1]) {
    send(res, 400, page('Error', '<p class="error">Interaction mismatch; start the login again.</p>'));
    return;
  }
  const { prompt, params } = details;

  if (prompt.name === 'consent') {
    // auto-grant for registered clients
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }

  if (prompt.name !== 'login') {
    send(res, 400, page('Error', `<p class="error">Unsupported prompt ${esc(prompt.name)}</p>`));
    return;
  }

  if (req.method === 'GET' && !m[2]) {
    send(res, 200, loginPage({ uid: details.uid, clientId: params.client_id, username: params.login_hint ?? '' }));
    return;
  }
  if (req.method === 'POST' && m[2]) {
    const form = new URLSearchParams(await readBody(req));
    const username = (form.get('username') ?? '').trim();
    const account = accounts.check(username, form.get('password') ?? '');
    if (!account) {
      log(`login failed for username ${JSON.stringify(username.slice(0, 64))}`);
      send(res, 200, loginPage({
        uid: details.uid,
        clientId: params.client_id,
        username,
        error: 'Invalid username or password.',
      }));
      return;
    }
    log(`login ok: ${account.username} (client ${params.client_id})`);
    await provider.interactionFinished(req, res, {
      login: { accountId: account.sub, amr: ['pwd'] },
    }, { mergeWithLastSubmission: false });
    return;
  }
  send(res, 405, page('Error', '<p class="error">Method not allowed</p>'), { allow: 'GET, POST' });
}

async function main() {
  let opts;
  let accounts;
  let clients;
  let secrets;
  try {
    opts = readOptions(process.argv.slice(2), process.env);
    accounts = new AccountStore(opts.accounts, opts.withheldGroups);
    clients = loadClients(opts.clients);
    secrets = loadSecrets(opts.stateDir);
  } catch (err) {
    if (err instanceof ConfigError || err instanceof TypeError) {
      process.stderr.write(`devidp: error: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }

  const line = '='.repeat(72);
  process.stdout.write(`${line}\n  ${BANNER_TEXT}\n  issuer:   ${opts.issuer}\n`
    + `  accounts: ${opts.accounts} (demo passwords, never use real ones)\n`
    + (opts.withheldGroups.size ? `  withheld: ${[...opts.withheldGroups].join(', ')} (given to nobody)\n` : '')
    + `  clients:  ${clients.map((c) => c.client_id).join(', ') || '(none)'}\n${line}\n`);

  const provider = buildProvider(opts, accounts, clients, secrets);
  const callback = provider.callback();

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, opts.issuer);
    res.on('finish', () => log(`${req.method} ${url.pathname} ${res.statusCode}`));
    if (url.pathname.startsWith('/interaction/')) {
      handleInteraction(provider, accounts, req, res, url).catch((err) => {
        log(`interaction error: ${err.name}: ${err.message}`);
        if (!res.headersSent) send(res, 500, page('Error', '<p class="error">Internal error</p>'));
        else res.end();
      });
      return;
    }
    if (url.pathname === '/' || url.pathname === '/health') {
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
      res.end(`${BANNER_TEXT}\nissuer: ${opts.issuer}\n`);
      return;
    }
    if (req.method === 'GET' && url.pathname === '/authorize') {
      // oidc-provider drops offline_access unless the request says
      // prompt=consent; IAM clients (and OAuthenticator) do not send it. Add
      // it here: the consent step is auto-granted below, so the user sees no
      // extra page and gets a refresh token, as with IAM.
      const scopes = (url.searchParams.get('scope') ?? '').split(' ');
      if (scopes.includes('offline_access') && !url.searchParams.has('prompt')) {
        url.searchParams.set('prompt', 'consent');
        req.url = `${url.pathname}${url.search}`;
      }
    }
    callback(req, res);
  });

  process.on('SIGHUP', () => {
    log('SIGHUP: reloading accounts');
    accounts.reload({ force: true });
  });
  const shutdown = (sig) => {
    log(`${sig}: shutting down`);
    server.close();
    server.closeAllConnections?.();
    setTimeout(() => process.exit(0), 200).unref();
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  server.on('error', (err) => {
    process.stderr.write(`devidp: error: cannot listen on ${opts.host}:${opts.port}: ${err.code || err.message}\n`);
    process.exit(3);
  });
  server.listen(opts.port, opts.host, () => {
    process.stdout.write(`READY ${opts.issuer}\n`);
  });
}

main();
