// A real OpenID provider (panva/oidc-provider, certified) for medvault's single sign-on
// tests, and a scripted browser that signs a user in at it.
//
//   node idp.mjs serve PORT REDIRECT_BASE     prints "ready http://127.0.0.1:PORT" when listening
//   node idp.mjs login AUTHORIZE_URL LOGIN    follows the sign-in; prints the redirect to medvault
//
// Clients (secret "medvault-test-secret"): `medvault` is honest; `medvault-badaud`,
// `medvault-badnonce` and `medvault-expired` get ID tokens re-signed by this provider's own
// key with the audience, nonce or expiry made wrong, so the relying party must refuse them.
// Users: any login; `dr.alice` is in `ehr-physicians` and signs in with MFA (amr pwd+otp),
// `nurse.bob` is in `ehr-nurses` (amr pwd), anyone else is in `cafeteria` (maps to no role).
import Provider from 'oidc-provider';
import { SignJWT, decodeJwt, exportJWK, generateKeyPair, importJWK } from 'jose';

const [, , mode, ...args] = process.argv;

const GROUPS = { 'dr.alice': ['ehr-physicians'], 'nurse.bob': ['ehr-nurses'] };
const AMR = { 'dr.alice': ['pwd', 'otp'] };
const SECRET = 'medvault-test-secret';
const TAMPER = {
  'medvault-badaud': (c) => ({ ...c, aud: 'someone-else' }),
  'medvault-badnonce': (c) => ({ ...c, nonce: 'forged-nonce' }),
  'medvault-expired': (c) => ({ ...c, iat: c.iat - 7200, exp: c.iat - 3600 }),
};

async function serve(port, redirectBase) {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), kid: 'medvault-test', use: 'sig', alg: 'RS256' };
  const signer = await importJWK(jwk, 'RS256');
  const clients = ['medvault', ...Object.keys(TAMPER)].map((id) => ({
    client_id: id,
    client_secret: SECRET,
    redirect_uris: [`${redirectBase}/auth/oidc/${id}/callback`],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }));
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [jwk] },
    cookies: { keys: ['medvault-test-cookie-key'] },
    pkce: { required: () => true },
    conformIdTokenClaims: false,
    claims: { openid: ['sub', 'amr'], profile: ['preferred_username', 'groups'] },
    features: { devInteractions: { enabled: true } },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, preferred_username: id, groups: GROUPS[id] ?? ['cafeteria'] };
        },
      };
    },
    // First-party clients: no consent screen.
    async loadExistingGrant(ctx) {
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid profile');
      grant.addOIDCClaims(['groups', 'preferred_username', 'amr']);
      await grant.save();
      return grant;
    },
  });
  // devInteractions signs anyone in with a password alone; the authentication methods a
  // user passed (amr) are written into the ID token here, and the tampering clients' tokens
  // made wrong, both re-signed with the provider's own key.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/token' && ctx.body && typeof ctx.body === 'object' && ctx.body.id_token) {
      const claims = decodeJwt(ctx.body.id_token);
      const amr = AMR[claims.sub] ?? ['pwd'];
      const tamper = TAMPER[claims.aud] ?? ((c) => c);
      const forged = tamper({ ...claims, amr });
      ctx.body.id_token = await new SignJWT(forged)
        .setProtectedHeader({ alg: 'RS256', kid: 'medvault-test' })
        .sign(signer);
    }
  });
  provider.listen(port, '127.0.0.1', () => {
    console.log(`ready ${issuer}`);
  });
}

// A browser without a screen: follows redirects with a cookie jar, submits the login form,
// and stops at the first redirect that leaves the provider.
async function login(authorizeUrl, user) {
  const jar = new Map();
  const origin = new URL(authorizeUrl).origin;
  const send = async (url, init = {}) => {
    const headers = { ...(init.headers ?? {}) };
    if (jar.size) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
    const r = await fetch(url, { ...init, headers, redirect: 'manual' });
    for (const c of r.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      jar.set(pair.slice(0, i), pair.slice(i + 1));
    }
    return r;
  };
  let url = authorizeUrl;
  let body;
  for (let hops = 0; hops < 20; hops += 1) {
    const r = await send(url, body ? {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body,
    } : {});
    body = undefined;
    if (r.status >= 300 && r.status < 400) {
      const next = new URL(r.headers.get('location'), url);
      if (next.origin !== origin) {
        console.log(next.toString());
        return;
      }
      url = next.toString();
      continue;
    }
    const html = await r.text();
    const action = /<form[^>]*action="([^"]+)"/.exec(html);
    if (!action) throw new Error(`no form at ${url}: ${r.status} ${html.slice(0, 300)}`);
    const form = new URLSearchParams();
    for (const m of html.matchAll(/<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"/g)) {
      form.set(m[1], m[2]);
    }
    if (form.get('prompt') === 'login') {
      form.set('login', user);
      form.set('password', 'any password');
    }
    url = new URL(action[1], url).toString();
    body = form.toString();
  }
  throw new Error('too many redirects');
}

if (mode === 'serve') {
  await serve(Number(args[0]), args[1]);
} else if (mode === 'login') {
  await login(args[0], args[1]);
} else {
  console.error('usage: node idp.mjs serve PORT REDIRECT_BASE | login AUTHORIZE_URL LOGIN');
  process.exit(2);
}
