// Drives medvault the way an integrator's FHIR client does, with fhir-kit-client (an
// independent library): create, read, conditional create, update with If-Match (and a stale
// one refused), a transaction posted the way the library posts it (to BASE/), search with
// _include paged to the end through the library's nextPage, checking Bundle.total, and
// history. Prints one JSON line of what it saw; exits non-zero on the first surprise.
//
// Environment: FHIR_BASE (https://host:port/fhir), FHIR_TOKEN (a clinician's bearer token),
// FHIR_PRACTITIONER (that clinician's Practitioner id) and NODE_EXTRA_CA_CERTS (medvault's
// certificate).
import { Client } from 'fhir-kit-client';

const client = new Client({ baseUrl: process.env.FHIR_BASE, bearerToken: process.env.FHIR_TOKEN });
const fail = (msg) => { console.error(`fhir-kit-client check failed: ${msg}`); process.exit(1); };
const expect = (cond, msg) => { if (!cond) fail(msg); };
const mrn = { system: 'https://example.org/mrn', value: `MRN-KIT-${Date.now()}` };

const patient = await client.create({
  resourceType: 'Patient',
  body: { resourceType: 'Patient', name: [{ family: 'Kitclient', given: ['Ada'] }], gender: 'female',
    birthDate: '1970-01-02', identifier: [mrn] },
});
expect(patient.resourceType === 'Patient' && patient.id, 'create returns the Patient');
// A clinician reaches a chart's clinical records through a treatment relationship: they
// begin an encounter naming themselves, as at admission.
const encounter = await client.create({
  resourceType: 'Encounter',
  body: { resourceType: 'Encounter', status: 'in-progress',
    class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
    subject: { reference: `Patient/${patient.id}` },
    participant: [{ individual: { reference: `Practitioner/${process.env.FHIR_PRACTITIONER}` } }] },
});
expect(encounter.id, 'an encounter begins the treatment relationship');
const read = await client.read({ resourceType: 'Patient', id: patient.id });
expect(read.id === patient.id && read.meta.versionId === '1', 'read returns version 1');

const again = await client.create({
  resourceType: 'Patient',
  body: { resourceType: 'Patient', name: [{ family: 'Kitclient' }], identifier: [mrn] },
  options: { headers: { 'If-None-Exist': `identifier=${mrn.system}|${mrn.value}` } },
});
expect(again.id === patient.id, `conditional create finds the existing chart (got ${again.id})`);

const updated = await client.update({
  resourceType: 'Patient', id: patient.id, body: { ...read, gender: 'other' },
  options: { headers: { 'If-Match': 'W/"1"' } },
});
expect(updated.meta.versionId === '2', 'update with If-Match writes version 2');
let stale = null;
try {
  await client.update({ resourceType: 'Patient', id: patient.id, body: { ...read, gender: 'male' },
    options: { headers: { 'If-Match': 'W/"1"' } } });
} catch (e) {
  stale = e.response ? e.response.status : String(e);
}
expect(stale === 412, `a stale If-Match is refused with 412 (got ${stale})`);

const entries = [];
for (let i = 0; i < 7; i++) {
  entries.push({
    fullUrl: `urn:uuid:00000000-0000-4000-8000-00000000000${i}`,
    resource: { resourceType: 'Observation', status: 'final',
      category: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' }] }],
      code: { coding: [{ system: 'http://loinc.org', code: '8867-4' }] },
      subject: { reference: `Patient/${patient.id}` }, effectiveDateTime: `2026-11-2${i}T08:00:00Z`,
      valueQuantity: { value: 60 + i, unit: '/min', system: 'http://unitsofmeasure.org', code: '/min' } },
    request: { method: 'POST', url: 'Observation' },
  });
}
const tx = await client.transaction({ body: { resourceType: 'Bundle', type: 'transaction', entry: entries } });
expect(tx.type === 'transaction-response' && tx.entry.length === 7, 'transaction posted to BASE/ answers');
expect(tx.entry.every((e) => e.response.status.startsWith('201')), 'every entry created');

let page = await client.search({ resourceType: 'Observation',
  searchParams: { patient: patient.id, _count: 3, _include: 'Observation:subject' } });
expect(page.total === 7, `Bundle.total is 7 (got ${page.total})`);
const seen = new Set();
let pages = 0;
let includedPatient = false;
while (page) {
  pages += 1;
  for (const e of page.entry || []) {
    if (e.search.mode === 'match') {
      expect(!seen.has(e.resource.id), `a page repeated ${e.resource.id}`);
      seen.add(e.resource.id);
    } else if (e.search.mode === 'include' && e.resource.resourceType === 'Patient') {
      includedPatient = true;
    }
  }
  page = await client.nextPage({ bundle: page });
}
expect(seen.size === 7 && pages === 3, `paged to the end: ${seen.size} in ${pages} pages`);
expect(includedPatient, '_include brought the Patient');

const history = await client.history({ resourceType: 'Patient', id: patient.id });
expect(history.type === 'history' && history.entry.length === 2, 'history has two versions');
expect(history.entry[1].request.url === 'Patient', 'the create is a POST to the type');

console.log(JSON.stringify({ patient: patient.id, pages, matches: seen.size, history: history.entry.length }));
