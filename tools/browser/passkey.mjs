// A passkey registered and used in real Chromium, through the DevTools protocol's virtual
// authenticator (an internal platform authenticator that verifies the user, as a
// fingerprint reader or face unlock does). The page runs the WebAuthn ceremonies with the
// browser's own navigator.credentials against medvault's endpoints.
//
// Environment: MEDVAULT_URL (https://localhost:PORT), MEDVAULT_CERT (the server's PEM
// certificate, trusted by its SPKI hash), MEDVAULT_TOKEN (a session that has just stepped
// up), MEDVAULT_USER and MEDVAULT_PASSWORD (to sign in again with the passkey), CHROMIUM
// (default /usr/bin/chromium). Prints one JSON line: what each step answered.
import { createHash, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import puppeteer from 'puppeteer-core';

const env = process.env;
const pem = readFileSync(env.MEDVAULT_CERT);
const spki = createHash('sha256')
  .update(new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' }))
  .digest('base64');
const browser = await puppeteer.launch({
  executablePath: env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', `--ignore-certificate-errors-spki-list=${spki}`],
});
try {
  const page = await browser.newPage();
  const cdp = await page.createCDPSession();
  await cdp.send('WebAuthn.enable');
  const { authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2',
      transport: 'internal',
      hasResidentKey: true,
      hasUserVerification: true,
      isUserVerified: true,
      automaticPresenceSimulation: true,
    },
  });
  // The ceremony script is injected by this test, not served by medvault: medvault's pages
  // forbid scripts and fetches (CSP default-src 'none') until the web console serves its own.
  await page.setBypassCSP(true);
  await page.goto(`${env.MEDVAULT_URL}/`);
  const result = await page.evaluate(async (token, user, password) => {
    const dec = (s) => Uint8Array.from(
      atob(s.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((s.length + 3) % 4)),
      (c) => c.charCodeAt(0),
    );
    const enc = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
      .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
    const post = async (path, body, auth) => {
      const headers = { 'Content-Type': 'application/json' };
      if (auth) headers.Authorization = `Bearer ${auth}`;
      const r = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body ?? {}) });
      const text = await r.text();
      return { status: r.status, body: text ? JSON.parse(text) : null };
    };
    const out = {};
    // Registration, as a browser does it.
    const start = await post('/auth/webauthn/register/start', {}, token);
    out.register_start = start.status;
    const opts = start.body.publicKey;
    opts.challenge = dec(opts.challenge);
    opts.user.id = dec(opts.user.id);
    for (const c of opts.excludeCredentials ?? []) c.id = dec(c.id);
    const cred = await navigator.credentials.create({ publicKey: opts });
    const finish = await post('/auth/webauthn/register/finish', {
      name: 'Chromium platform authenticator',
      credential: {
        id: cred.id,
        rawId: enc(cred.rawId),
        type: cred.type,
        response: {
          attestationObject: enc(cred.response.attestationObject),
          clientDataJSON: enc(cred.response.clientDataJSON),
        },
        extensions: cred.getClientExtensionResults(),
      },
    }, token);
    out.register_finish = finish.status;
    // Sign in again: password, then the passkey.
    const login = await post('/auth/login', { username: user, password });
    out.methods = login.body.methods;
    const mfa = login.body.mfa_token;
    const ls = await post('/auth/webauthn/login/start', { mfa_token: mfa });
    out.login_start = ls.status;
    const ropts = ls.body.publicKey;
    ropts.challenge = dec(ropts.challenge);
    for (const c of ropts.allowCredentials ?? []) c.id = dec(c.id);
    const a = await navigator.credentials.get({ publicKey: ropts });
    const assertion = {
      id: a.id,
      rawId: enc(a.rawId),
      type: a.type,
      response: {
        authenticatorData: enc(a.response.authenticatorData),
        clientDataJSON: enc(a.response.clientDataJSON),
        signature: enc(a.response.signature),
        userHandle: a.response.userHandle ? enc(a.response.userHandle) : null,
      },
      extensions: a.getClientExtensionResults(),
    };
    const lf = await post('/auth/webauthn/login/finish', { mfa_token: mfa, credential: assertion });
    out.login_finish = lf.status;
    out.token = lf.body?.token ?? null;
    out.detail = lf.status === 200 ? null : lf.body;
    // The same assertion again is a replay.
    out.replay = (await post('/auth/webauthn/login/finish', { mfa_token: mfa, credential: assertion })).status;
    return out;
  }, env.MEDVAULT_TOKEN, env.MEDVAULT_USER, env.MEDVAULT_PASSWORD);
  const { credentials } = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  result.authenticator_credentials = credentials.length;
  result.sign_count = credentials[0]?.signCount ?? null;
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
