// medvault's web console in real Chromium (Debian's chromium, driven by puppeteer-core over
// the DevTools protocol): one browser, one isolated context per person, the scenario of
// issue 12's "Done means". Every page visited is checked for inline script and style, for
// CSP violations, and with axe-core (WCAG 2.1 A/AA rules) for serious or critical
// accessibility violations; every request URL is recorded so the caller can check that no
// patient name was in one. Screenshots of the main pages go to MEDVAULT_SCREENSHOTS.
//
// Environment: MEDVAULT_URL (https://localhost:PORT), MEDVAULT_CERT (the server's PEM
// certificate, trusted by its SPKI hash), MEDVAULT_SCENARIO (JSON: users with password,
// totp_secret and recovery codes; chart ids and the search name), MEDVAULT_SCREENSHOTS (a
// directory), CHROMIUM (default /usr/bin/chromium). Prints one JSON line: what each step saw.
import { createHash, createHmac, randomBytes, X509Certificate } from 'node:crypto';
import { request as httpsRequest } from 'node:https';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import puppeteer from 'puppeteer-core';

const env = process.env;
const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const sc = JSON.parse(env.MEDVAULT_SCENARIO);
const base = env.MEDVAULT_URL;
const shots = env.MEDVAULT_SCREENSHOTS;
mkdirSync(shots, { recursive: true });

// RFC 6238 TOTP (SHA-1, 6 digits, 30 s), as an authenticator app computes it.
function b32(s) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of s.replace(/=+$/, '').toUpperCase()) {
    bits += alphabet.indexOf(c).toString(2).padStart(5, '0');
  }
  const out = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) out.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(out);
}
function totp(secret) {
  const counter = Math.floor(Date.now() / 1000 / 30);
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const h = createHmac('sha1', b32(secret)).update(msg).digest();
  const o = h[h.length - 1] & 0xf;
  const n = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(n % 1000000).padStart(6, '0');
}
// Each person's recovery codes, used for step-ups (a TOTP code works once per 30 s).
function recovery(user) {
  return sc.users[user].recovery_codes.shift();
}

const pem = readFileSync(env.MEDVAULT_CERT);
const spki = createHash('sha256')
  .update(new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' }))
  .digest('base64');
const browser = await puppeteer.launch({
  executablePath: env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--ignore-certificate-errors-spki-list=${spki}`,
  ],
});

const out = { pages: {}, urls: [], csp_violations: [], axe: {}, inline: {}, steps: {} };

async function person() {
  const ctx = await browser.createBrowserContext();
  const page = await ctx.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  page.on('request', (r) => out.urls.push(r.url()));
  page.on('console', (m) => {
    if (/Content Security Policy|Refused to/i.test(m.text())) out.csp_violations.push(m.text());
  });
  return { ctx, page };
}

// Checks the page now shown: inline script/style, headers seen on its document, axe.
async function check(page, name, response) {
  const html = await page.content();
  const inline = [];
  if (/<script(?![^>]*\bsrc=)[^>]*>/i.test(html)) inline.push('inline <script>');
  if (/<style[\s>]/i.test(html)) inline.push('<style> element');
  if (/\sstyle\s*=/i.test(html)) inline.push('style attribute');
  if (/\son[a-z]+\s*=/i.test(html)) inline.push('event handler attribute');
  out.inline[name] = inline;
  if (response) {
    const h = response.headers();
    out.pages[name] = {
      status: response.status(),
      csp: h['content-security-policy'] ?? null,
      cache: h['cache-control'] ?? null,
      nosniff: h['x-content-type-options'] ?? null,
      hsts: h['strict-transport-security'] ?? null,
    };
  }
  // axe-core evaluated over DevTools (not as a page script, which the CSP forbids).
  await page.evaluate(axeSource);
  const r = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const res = await axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } });
    return res.violations
      .filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id}: ${v.nodes.map((n) => n.target.join(' ')).slice(0, 3).join(', ')}`);
  });
  out.axe[name] = r;
}

async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

async function go(page, path, name) {
  const r = await page.goto(`${base}${path}`, { waitUntil: 'load' });
  if (name) await check(page, name, r);
  return r;
}

async function submit(page, selector) {
  const [r] = await Promise.all([
    page.waitForNavigation({ waitUntil: 'load' }),
    page.click(selector),
  ]);
  return r;
}

// A request from this script (playing a SMART app's back end) to the server, trusting its
// certificate: { status, body }.
function call(method, path, body, token) {
  return new Promise((resolve, reject) => {
    const u = new URL(base + path);
    const headers = {};
    if (body) headers['content-type'] = 'application/x-www-form-urlencoded';
    if (token) headers.authorization = `Bearer ${token}`;
    const req = httpsRequest(
      { hostname: u.hostname, port: u.port, path: u.pathname + u.search, method, ca: pem, headers },
      (res) => {
        let d = '';
        res.on('data', (c) => { d += c; });
        res.on('end', () => resolve({ status: res.statusCode, body: d }));
      },
    );
    req.on('error', reject);
    req.end(body ?? undefined);
  });
}

async function text(page) {
  return page.evaluate(() => document.body.innerText);
}

// Password, then TOTP (the default second factor).
async function signIn(page, user, label) {
  const r = await go(page, '/login', label ? `${label}-login` : null);
  if (label === 'nurse') await shot(page, 'sign-in');
  await page.type('#username', user);
  await page.type('#password', sc.users[user].password);
  const mfa = await submit(page, 'form[action="/login"] button[type="submit"]');
  if (label) await check(page, `${label}-mfa`, mfa);
  await page.type('#code', totp(sc.users[user].totp_secret));
  const home = await submit(page, 'form[action="/login/mfa"] button[type="submit"]');
  return { status: r.status(), landed: new URL(page.url()).pathname, home };
}

try {
  // 1. The nurse signs in with TOTP; the treated chart shows vitals and a restricted billing section.
  const nurse = await person();
  {
    const s = await signIn(nurse.page, sc.nurse, 'nurse');
    out.steps.nurse_landed = s.landed;
    await check(nurse.page, 'patients', s.home);
    await shot(nurse.page, 'patients');
    const r = await go(nurse.page, `/patients/${sc.treated}`, 'chart-nurse');
    const t = await text(nurse.page);
    out.steps.nurse_chart = {
      status: r.status(),
      vitals_plot: await nurse.page.$$eval('#vitals svg', (x) => x.length),
      vitals_rows: await nurse.page.$$eval('#vitals tbody tr', (x) => x.length),
      billing: await nurse.page.$eval('#billing', (x) => x.innerText),
      restricted_notice: t.includes('Some information in this chart is restricted'),
    };
    await shot(nurse.page, 'chart-nurse');
    // The same chart on a tablet in portrait.
    await nurse.page.setViewport({ width: 768, height: 1024 });
    await go(nurse.page, `/patients/${sc.treated}`, 'chart-tablet');
    await shot(nurse.page, 'chart-tablet');
    await nurse.page.setViewport({ width: 1280, height: 900 });
  }

  // 2. The physician registers a passkey (virtual platform authenticator) and signs in with it.
  const phys = await person();
  {
    const cdp = await phys.page.createCDPSession();
    await cdp.send('WebAuthn.enable');
    const { authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
      options: {
        protocol: 'ctap2', transport: 'internal', hasResidentKey: true,
        hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true,
      },
    });
    await signIn(phys.page, sc.physician, 'physician');
    await go(phys.page, '/account', 'account');
    await phys.page.$eval('#passkey-name', (e) => { e.value = ''; });
    await phys.page.type('#passkey-name', 'Chromium platform authenticator');
    await phys.page.type('#passkey-code', recovery(sc.physician));
    await Promise.all([
      phys.page.waitForNavigation({ waitUntil: 'load' }),
      phys.page.click('#passkey-register button[type="submit"]'),
    ]);
    const added = await text(phys.page);
    out.steps.passkey_added = added.includes('Passkey added') && added.includes('Chromium platform authenticator');
    await shot(phys.page, 'account');
    // Sign out, then password + passkey.
    await submit(phys.page, 'form[action="/logout"] button');
    out.steps.signed_out_at = new URL(phys.page.url()).pathname;
    await go(phys.page, '/login');
    await phys.page.type('#username', sc.physician);
    await phys.page.type('#password', sc.users[sc.physician].password);
    await submit(phys.page, 'form[action="/login"] button[type="submit"]');
    out.steps.passkey_button = (await phys.page.$('#passkey-signin')) !== null;
    await Promise.all([
      phys.page.waitForNavigation({ waitUntil: 'load' }),
      phys.page.click('#passkey-signin'),
    ]);
    out.steps.passkey_landed = new URL(phys.page.url()).pathname;
    const creds = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
    out.steps.authenticator_credentials = creds.credentials.length;

    // 3. A restricted chart: something is hidden, and the page says so without count or category.
    await go(phys.page, `/patients/${sc.treated}`, 'chart-physician');
    const t = await text(phys.page);
    out.steps.restricted_chart = {
      notice: t.includes('Some information in this chart is restricted'),
      leaks: sc.sensitive_words.filter((w) => t.toLowerCase().includes(w.toLowerCase())),
    };
    await shot(phys.page, 'chart-restricted');

    // 4. Search by name (posted), then break the glass on a chart with no relationship.
    await go(phys.page, '/patients');
    await phys.page.type('#q-name', sc.search_name);
    const res = await submit(phys.page, 'form[action="/patients"] button[type="submit"]');
    await check(phys.page, 'search-results', res);
    out.steps.search_found = await phys.page.$$eval(`a[href="/patients/${sc.glass}"]`, (x) => x.length);
    await Promise.all([
      phys.page.waitForNavigation({ waitUntil: 'load' }),
      phys.page.click(`a[href="/patients/${sc.glass}"]`),
    ]);
    await check(phys.page, 'chart-closed', null);
    const closed = await text(phys.page);
    out.steps.no_relationship = closed.includes('no treatment relationship');
    out.steps.break_glass_form = (await phys.page.$('#btg-reason')) !== null;
    await shot(phys.page, 'break-the-glass');
    await phys.page.select('#btg-reason', 'medical-emergency');
    await phys.page.type('#btg-justification', 'Unconscious in the emergency department; no record of allergies elsewhere.');
    await phys.page.type('#btg-code', recovery(sc.physician));
    const opened = await submit(phys.page, 'form[action$="/break-glass"] button[type="submit"]');
    const o = await text(phys.page);
    out.steps.glass_chart = {
      status: opened.status(),
      path: new URL(phys.page.url()).pathname,
      problems: o.includes('Asthma'),
      through: o.includes('break-the-glass'),
    };
    await check(phys.page, 'chart-glass', opened);
  }

  // 5. The privacy officer finds that access in the review queue and the access report.
  const po = await person();
  {
    await signIn(po.page, sc.privacy_officer, 'privacy');
    const r = await go(po.page, '/privacy/reviews', 'reviews');
    const t = await text(po.page);
    out.steps.review_queue = {
      status: r.status(),
      physician: t.includes(sc.physician),
      justification: t.includes('Unconscious in the emergency department'),
      chart_link: await po.page.$$eval(`a[href="/privacy/patients/${sc.glass}"]`, (x) => x.length),
    };
    await shot(po.page, 'reviews');
    await go(po.page, `/privacy/patients/${sc.glass}`, 'access-report');
    const a = await text(po.page);
    out.steps.access_report = {
      physician: a.includes(sc.physician),
      break_glass: await po.page.$$eval('tbody strong', (x) => x.filter((e) => e.innerText === 'break-the-glass').length),
      timeline: await po.page.$$eval('figure svg rect', (x) => x.length),
    };
    await shot(po.page, 'access-report');
    // Close the review.
    await go(po.page, '/privacy/reviews');
    await po.page.type('input[name="note"]', 'Confirmed with the emergency department.');
    await po.page.type('input[name="code"]', recovery(sc.privacy_officer));
    await submit(po.page, 'form[action^="/privacy/reviews/"] button[type="submit"]');
    out.steps.reviewed = (await text(po.page)).includes('Confirmed with the emergency department.');
    await go(po.page, '/privacy/audit-events', 'audit-events');
    await po.page.type('#e-agent', sc.physician);
    await submit(po.page, 'form[action="/privacy/audit-events"] button[type="submit"]');
    await check(po.page, 'audit-events-results', null);
    out.steps.audit_events = await po.page.$$eval('tbody tr', (x) => x.length);
    out.steps.audit_events_break_glass = await po.page.$$eval('tbody strong', (x) => x.filter((e) => e.innerText === 'break-the-glass').length);
    await go(po.page, '/privacy/integrity', 'integrity');
    await submit(po.page, 'form[action="/privacy/integrity"] button');
    out.steps.verified = await po.page.$eval('#verification', (x) => x.innerText);
    await shot(po.page, 'integrity');

    // Detection: the physician opened the nurse's own chart (a coworker's); the alert
    // reaches the queue within seconds, with its evidence.
    let cards = 0;
    for (let i = 0; i < 40 && cards === 0; i++) {
      await go(po.page, '/privacy/alerts', i === 0 ? 'alerts' : undefined);
      cards = await po.page.$$eval('form[action$="/status"]', (x) => x.length);
      if (cards === 0) await new Promise((r) => setTimeout(r, 500));
    }
    const q = await text(po.page);
    out.steps.alerts = {
      cards,
      coworker: q.includes('coworker snooping'),
      evidence: q.includes('an employee the user does not treat'),
      user_link: await po.page.$$eval(`a[href="/privacy/alerts/users/${sc.physician}"]`, (x) => x.length),
    };
    await shot(po.page, 'alerts');
    await go(po.page, `/privacy/alerts/users/${sc.physician}`, 'alerts-user');
    out.steps.alerts_user_timeline = await po.page.$$eval('figure svg rect', (x) => x.length);
    await go(po.page, `/privacy/alerts/patients/${sc.glass}`, 'alerts-patient');
    out.steps.alerts_patient_timeline = await po.page.$$eval('figure svg rect', (x) => x.length);
    await shot(po.page, 'alerts-patient');
    // Confirm it from the patient's page: back there, with an incident.
    await po.page.select('form[action$="/status"] select[name="status"]', 'confirmed');
    await po.page.type('form[action$="/status"] input[name="reason"]', 'No clinical reason to open a colleague chart.');
    await submit(po.page, 'form[action$="/status"] button[type="submit"]');
    await check(po.page, 'alerts-confirmed', null);
    out.steps.alert_confirmed = {
      path: new URL(po.page.url()).pathname,
      incident: (await text(po.page)).includes('Incident'),
    };
    // A suppression, added and ended.
    await go(po.page, '/privacy/suppressions', 'suppressions');
    await po.page.select('#sp-kind', 'after_hours');
    await po.page.type('#sp-user', sc.nurse);
    await po.page.type('#sp-reason', 'Covering night shifts on ward 4 this month');
    await submit(po.page, 'form[action="/privacy/suppressions"] button[type="submit"]');
    await check(po.page, 'suppressions-added', null);
    out.steps.suppression_added = (await text(po.page)).includes('Covering night shifts on ward 4');
    await submit(po.page, 'form[action$="/end"] button[type="submit"]');
    out.steps.suppression_ended = (await po.page.$$('form[action$="/end"]')).length === 0;
    await shot(po.page, 'suppressions');
  }

  // 6. The security administrator disables the nurse; the nurse's open page returns to sign-in.
  const admin = await person();
  {
    await signIn(admin.page, sc.security_admin, 'admin');
    await go(admin.page, '/admin/users', 'users');
    await shot(admin.page, 'users');
    await go(admin.page, '/admin/policies', 'policies');
    await go(admin.page, '/admin/clients', 'clients');
    await go(admin.page, '/admin/status', 'status');
    await go(admin.page, '/admin/staff', 'staff');
    out.steps.staff_rows = await admin.page.$$eval('tbody tr', (x) => x.length);
    await shot(admin.page, 'staff');
    await go(admin.page, '/admin/users');
    const form = `form[action="/admin/users/${sc.nurse}/disable"]`;
    await admin.page.$eval(`${form}`, (f) => { f.closest('details').open = true; });
    await admin.page.type(`${form} input[name="code"]`, recovery(sc.security_admin));
    await submit(admin.page, `${form} button[type="submit"]`);
    out.steps.disabled = (await text(admin.page)).includes('disabled');
    const t0 = Date.now();
    await nurse.page.waitForFunction(() => location.pathname === '/login', { timeout: 45000 });
    out.steps.nurse_returned_to = new URL(nurse.page.url()).pathname;
    out.steps.nurse_returned_after_ms = Date.now() - t0;
  }

  // 7. A patient sees their own record and their own access report.
  const pat = await person();
  {
    await signIn(pat.page, sc.patient, 'patient');
    out.steps.patient_landed = new URL(pat.page.url()).pathname;
    await go(pat.page, '/me', 'portal-record');
    out.steps.patient_record = (await text(pat.page)).includes('Treated');
    await go(pat.page, '/me/access', 'portal-access');
    const a = await text(pat.page);
    out.steps.patient_access_report = {
      nurse: a.includes(sc.nurse),
      timeline: await pat.page.$$eval('figure svg rect', (x) => x.length),
    };
    await shot(pat.page, 'portal-access');
    await go(pat.page, '/me/consents', 'portal-consents');
  }

  // 8. Legal holds, keys and backups (the security administrator), then a destruction
  //    requested by one privacy officer and approved by a second, with its certificate.
  {
    await go(admin.page, '/admin/legal-holds', 'legal-holds');
    await admin.page.type('#h-patient', sc.glass);
    await admin.page.type('#h-matter', 'CASE-2026-7');
    await admin.page.type('#h-reason', 'Litigation hold for the emergency access review');
    await admin.page.type('#h-code', recovery(sc.security_admin));
    await submit(admin.page, 'form[action="/admin/legal-holds"] button[type="submit"]');
    await check(admin.page, 'legal-holds-placed', null);
    out.steps.hold_placed = (await text(admin.page)).includes('CASE-2026-7');
    await admin.page.type('form[action$="/release"] input[name="code"]', recovery(sc.security_admin));
    await submit(admin.page, 'form[action$="/release"] button[type="submit"]');
    out.steps.hold_released = (await admin.page.$$('form[action$="/release"]')).length === 0;
    await go(admin.page, '/admin/keys', 'keys');
    out.steps.keys = (await text(admin.page)).includes('version 1');
    out.steps.index_key = (await text(admin.page)).includes('Blind-index key');
    await go(admin.page, '/admin/backups', 'backups');
    await admin.page.type('#run-code', recovery(sc.security_admin));
    await submit(admin.page, 'form[action="/admin/backups/run"] button[type="submit"]');
    await check(admin.page, 'backups-run', null);
    out.steps.backup_message = await admin.page.$eval('#backup-message', (x) => x.innerText);
    out.steps.backup_rows = await admin.page.$$eval('tbody tr', (x) => x.length);
    await admin.page.type('#drill-code', recovery(sc.security_admin));
    await submit(admin.page, 'form[action="/admin/backups/drill"] button[type="submit"]');
    out.steps.drill_message = await admin.page.$eval('#backup-message', (x) => x.innerText);
    out.steps.last_drill = await admin.page.$eval('#last-drill', (x) => x.innerText);
    await shot(admin.page, 'backups');

    await go(po.page, '/privacy/destruction', 'destruction');
    await po.page.type('#r-patient', sc.glass);
    await po.page.select('#r-reason', 'erasure-request');
    await po.page.type('#r-code', recovery(sc.privacy_officer));
    await submit(po.page, 'form[action="/privacy/destruction"] button[type="submit"]');
    await check(po.page, 'destruction-requested', null);
    out.steps.destruction_pending = await po.page.$$eval('form[action$="/approve"]', (x) => x.length);
    const po2 = await person();
    await signIn(po2.page, sc.privacy_officer2, 'privacy2');
    await go(po2.page, '/privacy/destruction');
    await po2.page.type('form[action$="/approve"] input[name="code"]', recovery(sc.privacy_officer2));
    await submit(po2.page, 'form[action$="/approve"] button[type="submit"]');
    await check(po2.page, 'certificate', null);
    out.steps.certificate = await po2.page.$eval('#certificate', (x) => x.innerText);
    await shot(po2.page, 'certificate');
  }

  // 9. Paper records (issue 15): the records clerk sets up a room, registers a volume, checks
  //    it out to someone not on the room's list (flagged) and takes it back, logs a visitor,
  //    exports CSV, proposes a retention schedule a privacy officer approves, and queues a
  //    paper destruction a privacy officer approves into a certificate; security places a
  //    hold on a record class.
  {
    const clerk = await person();
    const cp = clerk.page;
    const s = await signIn(cp, sc.records_clerk, 'clerk');
    out.steps.clerk_landed = s.landed;
    await check(cp, 'registry-empty', s.home);
    await go(cp, '/records/rooms', 'rooms');
    await cp.type('#rm-id', 'B1');
    await cp.type('#rm-name', 'Health records, basement B1');
    await cp.type('#rm-door', 'B1-door');
    await cp.type('#rm-auth', sc.records_clerk);
    await cp.type('#rm-cab', 'C1, C2');
    await cp.type('#rm-cov', 'door and aisles 1-4');
    await cp.type('#rm-days', '30');
    await submit(cp, 'form[action="/records/rooms"] button[type="submit"]');
    await check(cp, 'rooms-saved', null);
    out.steps.room_saved = (await cp.$$eval('#rooms tbody tr', (x) => x.length)) === 1;
    await go(cp, '/records', 'registry');
    await cp.type('#r-barcode', 'PV-1');
    await cp.type('#r-patient', sc.paper_patient);
    await cp.select('#r-room', 'B1');
    await cp.type('#r-cabinet', 'C1');
    await cp.type('#r-last', '2010-01-05');
    await submit(cp, 'form[action="/records/volumes"] button[type="submit"]');
    await check(cp, 'volume', null);
    out.steps.volume_path = new URL(cp.url()).pathname;
    await cp.select('#c-act', 'check-out');
    await cp.type('#c-to', sc.physician);
    await cp.type('#c-due', '2099-01-01');
    await cp.type('#c-retrieved', sc.physician);
    await submit(cp, 'form[action$="/custody"] button[type="submit"]');
    await check(cp, 'volume-out', null);
    out.steps.volume_holder = await cp.$eval('#volume-holder', (x) => x.innerText);
    out.steps.volume_flagged = (await cp.$eval('#volume-flags', (x) => x.innerText)).includes('unauthorized retrieval');
    await shot(cp, 'volume');
    await cp.select('#c-act', 'return');
    await cp.type('#c-returned', sc.physician);
    await submit(cp, 'form[action$="/custody"] button[type="submit"]');
    out.steps.volume_returned = await cp.$eval('#volume-status', (x) => x.innerText);
    out.steps.custody_rows = await cp.$$eval('#custody tbody tr', (x) => x.length);
    await go(cp, '/records', 'registry-flags');
    out.steps.registry_flags = await cp.$$eval('#flags tbody tr', (x) => x.length);
    await shot(cp, 'registry');
    out.steps.volumes_csv = await cp.evaluate(async () => {
      const r = await fetch('/records/export/volumes');
      return { type: r.headers.get('content-type'), disposition: r.headers.get('content-disposition'), body: await r.text() };
    });
    await go(cp, '/records/visitors', 'visitors');
    await cp.type('#v-name', 'A. Surveyor');
    await cp.type('#v-id', 'driver licence ...4821');
    await cp.click('#v-checked');
    await cp.type('#v-host', sc.records_clerk);
    await cp.type('#v-purpose', 'Joint Commission survey');
    await submit(cp, 'form[action="/records/visitors"] button[type="submit"]');
    await check(cp, 'visitors-in', null);
    out.steps.visitor_flags = await cp.$eval('#visitors tbody tr td:last-child', (x) => x.innerText);
    await submit(cp, 'form[action$="/sign-out"] button[type="submit"]');
    out.steps.visitor_signed_out = (await cp.$$('form[action$="/sign-out"]')).length === 0;
    await go(cp, '/records/retention', 'retention');
    out.steps.due_paper = (await cp.$eval('#due', (x) => x.innerText)).includes('paper volume PV-1');
    await cp.$eval('#s-j', (x) => { x.value = ''; });
    await cp.type('#s-j', 'US-NY');
    await cp.select('#s-c', 'adult_chart');
    await cp.type('#s-y', '10');
    await cp.type('#s-cite', '10 NYCRR 405.10');
    await cp.type('#s-code', recovery(sc.records_clerk));
    await submit(cp, 'form[action="/records/retention/schedules"] button[type="submit"]');
    await check(cp, 'retention-proposed', null);
    out.steps.schedule_pending = await cp.$$eval('form[action$="/approve"]', (x) => x.length);
    await go(po.page, '/records/retention', 'retention-po');
    await po.page.type('form[action$="/approve"] input[name="code"]', recovery(sc.privacy_officer));
    await submit(po.page, 'form[action$="/approve"] button[type="submit"]');
    out.steps.schedule_active = (await po.page.$eval('#schedules', (x) => x.innerText)).includes('US-NY');
    await go(cp, '/records/destruction', 'paper-destruction');
    out.steps.paper_eligible = (await cp.$eval('#eligible', (x) => x.innerText)).includes('PV-1');
    await cp.type('#d-vol', 'PV-1');
    await cp.select('#d-reason', 'retention-period-ended');
    await cp.select('#d-method', 'cross-cut-shredding');
    await cp.type('#d-vendor', 'Shred-it Springfield');
    await cp.type('#d-witness', 'J. Okafor (HIM)');
    await cp.type('#d-date', new Date().toISOString().slice(0, 10));
    await cp.type('#d-code', recovery(sc.records_clerk));
    await submit(cp, 'form[action="/records/destruction"] button[type="submit"]');
    await check(cp, 'paper-destruction-queued', null);
    out.steps.paper_pending = (await cp.$$('form[action$="/cancel"]')).length;
    await go(po.page, '/records/destruction');
    await po.page.type('form[action$="/approve"] input[name="code"]', recovery(sc.privacy_officer));
    await submit(po.page, 'form[action$="/approve"] button[type="submit"]');
    await check(po.page, 'paper-certificate', null);
    out.steps.paper_certificate = await po.page.$eval('#certificate', (x) => x.innerText);
    await go(admin.page, '/records/holds', 'records-holds');
    await admin.page.select('#rh-scope', 'record_class');
    await admin.page.type('#rh-target', 'billing');
    await admin.page.type('#rh-matter', 'QT-2026-7');
    await admin.page.type('#rh-reason', 'Billing investigation');
    await admin.page.type('#rh-code', recovery(sc.security_admin));
    await submit(admin.page, 'form[action="/records/holds"] button[type="submit"]');
    out.steps.class_hold = (await admin.page.$eval('#holds', (x) => x.innerText)).includes('all billing records');
  }

  // 10. Compliance (issue 16): security assigns a course to nurses long ago (so a nurse's
  //     training has lapsed); that nurse's sign-in shows the reminder and the nurse completes
  //     it; the privacy officer's home shows the quarterly review; an incident opened by hand
  //     runs the lost-device playbook and is assessed, showing its deadlines and HHS report;
  //     the safeguards page shows live evidence and the heat map; the printable report; a
  //     patient's accounting request is recorded.
  {
    const ap = admin.page;
    const setValue = (page, sel, v) => page.$eval(sel, (e, x) => { e.value = x; }, v);
    const daysAgo = (n) => new Date(Date.now() - n * 86400000).toISOString().slice(0, 10);
    await go(ap, '/training', 'training-officer');
    await ap.type('#c-id', 'sec-aware');
    await ap.type('#c-title', 'Security awareness');
    await ap.select('#c-topic', 'security_awareness');
    await ap.type('#c-roles', 'nurse');
    await setValue(ap, '#c-ass', daysAgo(100));
    await submit(ap, 'form[action="/training/courses"] button[type="submit"]');
    out.steps.course_rows = await ap.$$eval('#courses tbody tr', (x) => x.length);
    // A second nurse (the first was disabled in step 6) signs in: reminders come first.
    const nurse2 = await person();
    const np = nurse2.page;
    const ns = await signIn(np, sc.nurse2, 'nurse2');
    await check(np, 'reminders-nurse', ns.home);
    out.steps.nurse_reminders = {
      path: new URL(np.url()).pathname,
      text: await np.$eval('#reminders', (x) => x.innerText),
    };
    await go(np, '/training', 'training-nurse');
    out.steps.nurse_course_before = await np.$eval('#my-courses tbody tr', (x) => x.dataset.state);
    await submit(np, '#complete');
    out.steps.nurse_course_after = await np.$eval('#my-courses tbody tr', (x) => x.dataset.state);
    await go(po.page, '/', 'reminders-privacy');
    out.steps.po_reminders = await po.page.$eval('#reminders', (x) => x.innerText);
    await go(ap, '/incidents', 'incidents');
    await ap.type('#i-title', 'Laptop stolen from a car');
    await ap.select('#i-pb', 'lost_or_stolen_device');
    await submit(ap, 'form[action="/incidents"] button[type="submit"]');
    await check(ap, 'incident', null);
    out.steps.incident_tasks = await ap.$$eval('#tasks li', (x) => x.length);
    await ap.type('#facts', '{"affected": {"CA": 600, "NV": 12}}');
    await submit(ap, '#assess');
    await check(ap, 'incident-assessed', null);
    out.steps.incident_decision = await ap.$eval('#decision', (x) => x.innerText);
    out.steps.incident_deadlines = await ap.$eval('#deadlines', (x) => x.innerText);
    out.steps.incident_hhs = await ap.$eval('#hhs-report', (x) => x.innerText);
    await shot(ap, 'incident');
    await go(ap, '/compliance', 'safeguards');
    out.steps.safeguard_rows = await ap.$$eval('#safeguards tbody tr', (x) => x.length);
    out.steps.safeguards_text = await ap.$eval('#safeguards', (x) => x.innerText);
    await ap.type('#r-title', 'Stolen laptops');
    await ap.type('#r-l', '4');
    await ap.type('#r-i', '5');
    await ap.type('#r-owner', 'CISO');
    await setValue(ap, '#r-rev', daysAgo(-90));
    await submit(ap, 'form[action="/compliance/risks"] button[type="submit"]');
    out.steps.heat_map_counts = await ap.$$eval('#heat-map text.count', (x) => x.map((t) => t.textContent));
    await submit(ap, '#record-review');
    out.steps.next_review = await ap.$eval('#next-review', (x) => x.innerText);
    await shot(ap, 'safeguards');
    await go(ap, '/compliance/report', 'safeguards-report');
    await go(po.page, '/privacy/requests', 'privacy-requests');
    await po.page.type('#a-patient', sc.treated);
    await setValue(po.page, '#a-req', daysAgo(3));
    await submit(po.page, 'form[action="/privacy/requests/accounting"] button[type="submit"]');
    out.steps.accounting_rows = await po.page.$$eval('#accounting-requests tbody tr', (x) => x.length);
  }

  // 11. Sharing (issue 17): the security administrator registers a SMART app; the physician
  //     opens it from the treated chart, approves it on the consent screen, and the app's
  //     token (exchanged by this script, playing the app) reads that chart and no other;
  //     the physician revokes the grant and the token stops at once; the physician runs a
  //     bulk export of their charts and downloads a file, once; the patient's page of apps.
  {
    const ap = admin.page;
    await go(ap, '/apps', 'apps-admin');
    await ap.type('#a-name', 'Growth Chart');
    await ap.type('#a-redirect', 'http://127.0.0.1:9/cb');
    await ap.type('#a-launch', 'http://127.0.0.1:9/launch');
    await ap.type('#a-scope', 'launch patient/*.rs offline_access');
    await ap.type('#a-code', recovery(sc.security_admin));
    await submit(ap, 'form[action="/apps/register"] button[type="submit"]');
    const clientId = await ap.$eval('dl.facts dd code', (x) => x.innerText);
    out.steps.app_registered = clientId.startsWith('app-');
    const pp = phys.page;
    // The app's pages are answered by this script.
    const appHits = [];
    const app = (r) => {
      if (r.url().startsWith('http://127.0.0.1:9/')) {
        appHits.push(r.url());
        r.respond({ status: 200, contentType: 'text/html', body: '<!doctype html><html lang="en"><title>app</title><p>app</p></html>' });
      } else {
        r.continue();
      }
    };
    await pp.setRequestInterception(true);
    pp.on('request', app);
    await go(pp, `/patients/${sc.treated}`, null);
    await pp.select('#launch-app', clientId);
    await submit(pp, 'form[action$="/launch"] button[type="submit"]');
    await check(pp, 'app-launch', null);
    await submit(pp, 'a.button[rel="noopener"]');
    const launchUrl = new URL(appHits[appHits.length - 1]);
    const verifier = randomBytes(48).toString('base64url');
    const challenge = createHash('sha256').update(verifier).digest('base64url');
    const q = new URLSearchParams({
      response_type: 'code', client_id: clientId, redirect_uri: 'http://127.0.0.1:9/cb',
      scope: 'launch patient/*.rs', state: 's-1', aud: launchUrl.searchParams.get('iss'),
      code_challenge: challenge, code_challenge_method: 'S256',
      launch: launchUrl.searchParams.get('launch'),
    });
    await go(pp, `/oauth/authorize?${q}`, 'consent');
    out.steps.consent_text = await text(pp);
    await shot(pp, 'consent');
    await submit(pp, 'button[name="decision"][value="approve"]');
    const cb = new URL(appHits[appHits.length - 1]);
    out.steps.app_state = cb.searchParams.get('state');
    const tok = JSON.parse((await call('POST', '/auth/token', new URLSearchParams({
      grant_type: 'authorization_code', code: cb.searchParams.get('code'),
      redirect_uri: 'http://127.0.0.1:9/cb', code_verifier: verifier, client_id: clientId,
    }).toString())).body);
    out.steps.app_patient = tok.patient;
    const read = await call('GET', `/fhir/Observation?patient=${sc.treated}`, null, tok.access_token);
    out.steps.app_read = { status: read.status, total: JSON.parse(read.body).total };
    out.steps.app_other_chart = (await call('GET', `/fhir/Patient/${sc.glass}`, null, tok.access_token)).status;
    pp.off('request', app);
    await pp.setRequestInterception(false);
    await go(pp, '/apps', 'apps-physician');
    out.steps.app_grants = await pp.$$eval('form[action$="/revoke"]', (x) => x.length);
    await submit(pp, 'form[action$="/revoke"] button[type="submit"]');
    out.steps.app_revoked_notice = (await text(pp)).includes('Revoked');
    out.steps.app_after_revoke = (await call('GET', `/fhir/Observation?patient=${sc.treated}`, null, tok.access_token)).status;
    await go(pp, '/exports', 'exports');
    await pp.type('#x-types', 'Patient,Observation');
    await pp.type('#x-code', recovery(sc.physician));
    await submit(pp, 'form[action="/exports"] button[type="submit"]');
    for (let i = 0; i < 100 && !(await pp.$('a[download]')); i += 1) {
      await new Promise((r) => { setTimeout(r, 200); });
      await go(pp, '/exports', null);
    }
    await check(pp, 'exports-complete', null);
    const link = await pp.$eval('a[download]', (x) => x.getAttribute('href'));
    out.steps.export_download = await pp.evaluate(async (h) => {
      const r = await fetch(h);
      return { status: r.status, type: r.headers.get('content-type'), lines: (await r.text()).trim().split('\n').length };
    }, link);
    out.steps.export_again = await pp.evaluate(async (h) => (await fetch(h)).status, link);
    await go(pat.page, '/apps', 'apps-patient');
    out.steps.patient_apps = await pat.page.$eval('#grants-title', (x) => x.innerText);
  }
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
