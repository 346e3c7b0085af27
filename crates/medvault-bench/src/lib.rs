//! medvault-bench — the standard benchmark (`medvault bench`): the secure path
//! (in-process caller → authorize → seal/open → blind index → audit append) against the
//! same store read and written without security (plaintext JSON bodies, plaintext index
//! tokens, no policy, no audit). Both run the same operations with the same thread count.
//!
//! This room is the one place that writes records around the gate: the "plain" column
//! writes plaintext into a store of its own, in a temporary directory that is deleted
//! afterwards. It must never open a real data directory, and nothing else may depend on
//! it but the binary. The secure column goes through [`medvault_core::Vault`] only; audit
//! appends are measured on the secure store with records shaped as the gate shapes them.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medvault_fhir::{Resource, ResourceType};
use medvault_store::{
    Expect, IndexRow, Op, SearchQuery, SqliteStore, Store, VersionRow, WriteBatch,
};
use medvault_types::{Clock, PatientId};
use serde_json::{json, Value};

use base64::Engine as _;
use medvault_core::{
    AuditRecord, AuditVerdict, Caller, LocalOperator, MasterKeySource, Outcome, Role, Vault,
    VaultError, VaultOptions,
};

/// Benchmark parameters.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Patient counts to run at (the SPEC table uses 1 and 100,000).
    pub sizes: [usize; 2],
    /// Operations per measurement.
    pub ops: usize,
    /// Concurrent client threads.
    pub threads: usize,
    /// Entries in the audit log built for the verification and proof rows.
    pub audit_log: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            sizes: [1, 100_000],
            ops: 20_000,
            threads: 8,
            audit_log: 1_000_000,
        }
    }
}

/// One measured row: secure and plain throughput (ops/s) and latency (µs).
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Patients in the store; 0 for rows about the audit log alone.
    pub patients: usize,
    pub operation: String,
    pub secure: Measure,
    pub plain: Option<Measure>,
}

fn set(v: &mut Value, key: &str, value: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_owned(), value);
    }
}

fn measure(
    threads: usize,
    ops: usize,
    f: &(dyn Fn(usize) -> Result<(), VaultError> + Sync),
) -> Result<Measure, VaultError> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<Result<Vec<Duration>, VaultError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(ops / threads.max(1) + 1);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ops {
                            return Ok(lat);
                        }
                        let t = Instant::now();
                        f(i)?;
                        lat.push(t.elapsed());
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(VaultError::Internal("bench thread panicked".into())))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all: Vec<Duration> = vec![];
    for r in results {
        all.extend(r?);
    }
    all.sort();
    let pct = |p: f64| {
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all.get(i).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
    };
    Ok(Measure {
        ops_per_sec: ops as f64 / elapsed.max(1e-9),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

fn patient_json(i: usize) -> Value {
    json!({"resourceType": "Patient", "identifier": [{"system": "https://medvault.dev/sid/mrn", "value": format!("MRN-{i:08}")}],
        "name": [{"family": format!("Family{}", i % 5000), "given": [format!("Given{}", i % 700)]}], "gender": "female",
        "birthDate": format!("{}-0{}-1{}", 1940 + i % 80, 1 + i % 9, i % 10)})
}

fn obs_json(patient: &str, i: usize) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": "2026-01-02T10:00:00Z",
        "valueQuantity": {"value": 50 + i % 60, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}})
}

/// A patient-privacy Consent for the chart at `purl` denying another clinician its notes.
fn consent_json(purl: &str) -> Value {
    json!({"resource": {"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": purl},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit", "provision": [{"type": "deny",
            "actor": [{"role": {"text": "clinician"}, "reference": {"reference": "Practitioner/another-clinician"}}],
            "class": [{"code": "DocumentReference"}]}]}},
        "request": {"method": "POST", "url": "Consent"}})
}

struct Fixture {
    vault: Vault,
    /// The benchmark opened the gate itself: it acts as the local operator.
    operator: LocalOperator,
    /// The secure side's store, for appending audit records directly.
    secure: Arc<dyn Store>,
    plain: Arc<dyn Store>,
    /// (patient id, observation id) pairs, secure side and plain side.
    secure_ids: Vec<(String, String)>,
    plain_ids: Vec<(String, String)>,
    /// A signed-in physician on every patient's care team.
    physician: Caller,
}

fn plain_put(rt: &str, id: &str, patient: &str, v: &Value, index: Vec<IndexRow>) -> Op {
    Op::PutVersion {
        row: VersionRow {
            patient: PatientId::new(patient).ok(),
            rtype: rt.into(),
            id: id.into(),
            version: 1,
            last_updated: "2026-01-01T00:00:00.000Z".into(),
            deleted: false,
            category: "vitals".into(),
            key_version: 0,
            body: serde_json::to_vec(v).unwrap_or_default(),
        },
        expect: Expect::Absent,
        index,
    }
}

/// Where the benchmark's two stores live.
#[derive(Debug, Clone)]
pub enum BenchBackend {
    /// SQLite files in a temporary directory.
    Sqlite,
    /// Fresh databases created (and dropped) through this PostgreSQL URL.
    Postgres(String),
}

fn open_store(
    backend: &BenchBackend,
    dir: &Path,
    name: &str,
    created: &mut Vec<String>,
) -> Result<Arc<dyn Store>, VaultError> {
    Ok(match backend {
        BenchBackend::Sqlite => SqliteStore::open(&dir.join(format!("{name}.db")))?,
        BenchBackend::Postgres(admin) => {
            let db = format!(
                "mv_bench_{name}_{}",
                medvault_types::random_uuid().replace('-', "")
            );
            let url = medvault_store::PgStore::create_database(admin, &db)?;
            created.push(db);
            medvault_store::PgStore::open(&url)?
        }
    })
}

fn setup(
    backend: &BenchBackend,
    dir: &Path,
    patients: usize,
    clock: Arc<dyn Clock>,
    progress: &dyn Fn(usize, usize),
    created: &mut Vec<String>,
) -> Result<Fixture, VaultError> {
    let store = open_store(backend, dir, "secure", created)?;
    // Public transparency: proofs are served as to an anonymous witness (not audited).
    let options = VaultOptions {
        public_transparency: true,
        ..VaultOptions::default()
    };
    let (vault, operator) = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::Ephemeral,
        clock.clone(),
        options,
    )?;
    let plain = open_store(backend, dir, "plain", created)?;
    let importer = Caller::cli(&operator, Role::Importer);
    // The physician every clinical row acts as: a real user with a Practitioner, on every
    // bench patient's care team, so reads and searches run with relationships in force.
    let password = medvault_core::Password::new("bench correct horse battery".into());
    let doctor = vault.add_user(
        &Caller::cli(&operator, Role::SecurityAdmin),
        "bench.physician",
        Role::Physician,
        Some(password.clone()),
    )?;
    let practitioner = doctor.practitioner_id.clone().ok_or(VaultError::Internal(
        "a physician has a Practitioner".into(),
    ))?;
    let mut secure_ids = vec![];
    let mut plain_ids = vec![];
    let chunk = 1000;
    let mut done = 0;
    while done < patients {
        let n = chunk.min(patients - done);
        let mut entries = vec![];
        let mut ops = vec![];
        for i in done..done + n {
            let purl = format!("urn:uuid:{}", medvault_types::random_uuid());
            entries.push(json!({"fullUrl": purl, "resource": patient_json(i), "request": {"method": "POST", "url": "Patient"}}));
            let mut o = obs_json("x", i);
            set(&mut o, "subject", json!({"reference": purl}));
            entries
                .push(json!({"resource": o, "request": {"method": "POST", "url": "Observation"}}));
            entries.push(
                json!({"resource": {"resourceType": "CareTeam", "status": "active",
                "subject": {"reference": purl},
                "participant": [{"member": {"reference": format!("Practitioner/{practitioner}")}}]},
                "request": {"method": "POST", "url": "CareTeam"}}),
            );
            // Consents in force: one patient in ten denies another clinician their notes.
            if i % 10 == 0 {
                entries.push(consent_json(&purl));
            }
            let (pid, oid) = (medvault_types::random_uuid(), medvault_types::random_uuid());
            let tok = |p: &str, v: &str| IndexRow {
                param: p.into(),
                token: v.as_bytes().to_vec(),
            };
            ops.push(plain_put(
                "Patient",
                &pid,
                &pid,
                &patient_json(i),
                vec![tok("identifier", &format!("MRN-{i:08}"))],
            ));
            ops.push(plain_put(
                "Observation",
                &oid,
                &pid,
                &obs_json(&pid, i),
                vec![tok("code", "8867-4"), tok("status", "final")],
            ));
            plain_ids.push((pid, oid));
        }
        let results = vault.transaction(
            &importer,
            json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
            "import",
            false,
        )?;
        // Each chart starts with its Patient, then its Observation.
        let mut it = results.iter().peekable();
        while let Some(r) = it.next() {
            let Some(p) = r.written.as_ref().filter(|w| w.rtype.as_str() == "Patient") else {
                continue;
            };
            if let Some(o) = it.peek().and_then(|o| o.written.as_ref()) {
                secure_ids.push((p.id.clone(), o.id.clone()));
            }
        }
        plain.commit(WriteBatch { ops, audit: vec![] })?;
        done += n;
        progress(done, patients);
    }
    // Signed in as a clinician is (password, then TOTP).
    let anonymous = Caller::anonymous(Some("bench".into()), "bench-physician".into());
    let ch = vault.login(&anonymous, "bench.physician", &password)?;
    let code = medvault_core::totp_now(&doctor.totp_secret, clock.now().unix_timestamp())
        .ok_or(VaultError::Internal("totp".into()))?;
    let grant = vault.login_factor(
        &anonymous,
        &ch.mfa_token,
        &medvault_core::Factor::Totp(&code),
    )?;
    let physician = vault.authenticate(&anonymous, &grant.token, None)?;
    Ok(Fixture {
        vault,
        operator,
        secure: store,
        plain,
        secure_ids,
        plain_ids,
        physician,
    })
}

/// `1000000` → `1M`, `250000` → `250k`.
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// The audit log rows: batched appends while building a log of `opts.audit_log` entries,
/// integrating it into stored tiles, verifying all of it, and serving and checking
/// inclusion proofs from the tiles.
fn audit_log_rows(
    fx: &Fixture,
    c: &Caller,
    clock: &dyn Clock,
    opts: BenchOptions,
    rows: &mut Vec<BenchRow>,
    figures: &mut Vec<String>,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<(), VaultError> {
    const BATCH: u64 = 1_000;
    let vault = &fx.vault;
    let need = opts.audit_log.saturating_sub(fx.secure.audit_len()?);
    let batches = usize::try_from(need.div_ceil(BATCH)).unwrap_or(usize::MAX);
    progress("building the audit log", 0, 1);
    if batches > 0 {
        let m = measure(opts.threads, batches, &|i| {
            let n = need.saturating_sub(i as u64 * BATCH).min(BATCH);
            append(&fx.secure, c, clock, n)
        })?;
        rows.push(BenchRow {
            patients: 0,
            operation: format!("append b{BATCH}"),
            secure: Measure {
                ops_per_sec: m.ops_per_sec * BATCH as f64,
                p50_us: m.p50_us,
                p99_us: m.p99_us,
            },
            plain: None,
        });
    }
    progress("integrating the tree into tiles", 0, 1);
    let anonymous = Caller::anonymous(Some("bench".into()), "bench".into());
    let before = vault
        .latest_checkpoint(&anonymous)?
        .map(|n| checkpoint_size(&n))
        .unwrap_or(0);
    let started = Instant::now();
    let signed = vault
        .checkpoint(&Caller::system(&fx.operator, "bench"))?
        .map(|(n, _)| n)
        .unwrap_or(before);
    let secs = started.elapsed().as_secs_f64();
    let integrated = signed.saturating_sub(before);
    rows.push(BenchRow {
        patients: 0,
        operation: format!("integrate {}", short(integrated)),
        secure: Measure {
            ops_per_sec: integrated as f64 / secs.max(1e-9),
            p50_us: per_entry(secs, integrated) * 1e6,
            p99_us: per_entry(secs, integrated) * 1e6,
        },
        plain: None,
    });
    progress("verifying the audit log", 0, 1);
    let started = Instant::now();
    let verdict = vault.verify_audit(&Caller::cli(&fx.operator, Role::Auditor), &|d, t| {
        progress(
            "verifying the audit log",
            usize::try_from(d).unwrap_or(0),
            usize::try_from(t).unwrap_or(0),
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    let AuditVerdict::Intact { size: entries, .. } = verdict else {
        return Err(VaultError::Internal(
            "the benchmark's audit log does not verify".into(),
        ));
    };
    rows.push(BenchRow {
        patients: 0,
        operation: format!("verify {}", short(entries)),
        secure: Measure {
            ops_per_sec: entries as f64 / secs.max(1e-9),
            p50_us: per_entry(secs, entries) * 1e6,
            p99_us: per_entry(secs, entries) * 1e6,
        },
        plain: None,
    });
    // Inclusion proofs in the signed tree, served from the stored tiles, then checked.
    let size = signed.max(1);
    let pick = |i: usize| (i as u64).wrapping_mul(2_654_435_761) % size;
    progress("inclusion proofs", 0, 1);
    let serve = measure(opts.threads, 2_000, &|i| {
        vault.inclusion_proof(&anonymous, pick(i), size).map(|_| ())
    })?;
    rows.push(BenchRow {
        patients: 0,
        operation: "proof serve".into(),
        secure: serve,
        plain: None,
    });
    let mut proofs = vec![];
    for i in 0..200 {
        let idx = pick(i);
        let p = vault.inclusion_proof(&anonymous, idx, size)?;
        let proof = p
            .proof
            .iter()
            .map(|h| hash(h))
            .collect::<Result<Vec<_>, _>>()?;
        proofs.push((idx, hash(&p.leaf_hash)?, proof, hash(&p.root)?));
    }
    let started = Instant::now();
    let mut ok = 0u32;
    for _ in 0..50 {
        for (idx, leaf, p, root) in &proofs {
            if medvault_core::verify_inclusion(leaf, *idx, size, p, root) {
                ok += 1;
            }
        }
    }
    let per = started.elapsed().as_secs_f64() / f64::from(ok.max(1));
    rows.push(BenchRow {
        patients: 0,
        operation: "proof verify".into(),
        secure: Measure {
            ops_per_sec: 1.0 / per.max(1e-12),
            p50_us: per * 1e6,
            p99_us: per * 1e6,
        },
        plain: None,
    });
    let hashes = proofs.first().map(|p| p.2.len()).unwrap_or(0);
    figures.push(format!(
        "audit log of {entries} entries verified in {secs:.2} s ({:.0} entries/s; 10M entries ≈ {:.1} s at this rate); \
         an inclusion proof in a tree of {size} is {hashes} hashes ({} bytes), served from stored tiles in {:.0} µs (p50)",
        entries as f64 / secs.max(1e-9),
        10_000_000.0 * per_entry(secs, entries),
        hashes * 32,
        serve.p50_us,
    ));
    Ok(())
}

/// Appends `n` audit records for `c` in one commit, shaped as the gate shapes them
/// (canonical record, salted commitment leaf).
fn append(store: &Arc<dyn Store>, c: &Caller, clock: &dyn Clock, n: u64) -> Result<(), VaultError> {
    let now = medvault_types::fhir_instant(clock.now());
    let audit = (0..n)
        .map(|_| {
            let mut r = AuditRecord::new(
                "bench",
                c.actor(),
                Outcome::Success,
                now.clone(),
                &c.request_id,
            );
            r.role = c.role().map(|r| r.as_str().to_owned());
            r.purpose = Some(c.purpose.as_str().to_owned());
            r.source = c.source.clone();
            r.to_leaf()
        })
        .collect();
    store.commit(WriteBatch { ops: vec![], audit })?;
    Ok(())
}

/// A base64 hash of a proof, as 32 bytes.
/// The bulk export rows: the physician's `Group/my-patients/$export` run to its end and
/// every file downloaded (sealed while waiting, opened once, every chart's read audited),
/// against the same charts' rows read from the plain store and written as NDJSON.
/// Resources per second, and megabytes (10^6 bytes) of NDJSON per second.
fn export_rows(fx: &Fixture, dir: &Path, size: usize) -> Result<Vec<BenchRow>, VaultError> {
    let c = &fx.physician;
    fx.vault.set_export_spool(dir.join("exports"))?;
    let start = Instant::now();
    let job = fx.vault.export_kickoff(
        c,
        medvault_core::ExportLevel::Group(medvault_core::MY_PATIENTS_GROUP.into()),
        &[],
        "bench",
    )?;
    fx.vault.run_export(&job);
    let status = fx.vault.export_status(c, &job)?;
    if status.state != "complete" {
        return Err(VaultError::Internal(format!(
            "bench export {}: {}",
            status.state,
            status.error.unwrap_or_default()
        )));
    }
    let (mut resources, mut bytes) = (0u64, 0u64);
    for o in &status.output {
        bytes += fx.vault.export_file(c, &job, &o.name)?.len() as u64;
        resources += o.count;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let start = Instant::now();
    let (mut plain_resources, mut plain_bytes) = (0u64, 0u64);
    let mut charts: Vec<&str> = fx.plain_ids.iter().map(|(p, _)| p.as_str()).collect();
    charts.dedup();
    for pid in charts.into_iter().take(status.total.max(1)) {
        let q = SearchQuery {
            patient: PatientId::new(pid).ok(),
            limit: 100_000,
            ..Default::default()
        };
        for row in fx.plain.search(&q)?.rows {
            let v: Value = serde_json::from_slice(row.ciphertext())
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            let line = serde_json::to_vec(&v).map_err(|e| VaultError::Internal(e.to_string()))?;
            plain_bytes += line.len() as u64 + 1;
            plain_resources += 1;
        }
    }
    let plain_secs = start.elapsed().as_secs_f64().max(1e-9);
    let row = |op: &str, secure: f64, plain: f64| BenchRow {
        patients: size,
        operation: op.into(),
        secure: Measure {
            ops_per_sec: secure,
            p50_us: 0.0,
            p99_us: 0.0,
        },
        plain: Some(Measure {
            ops_per_sec: plain,
            p50_us: 0.0,
            p99_us: 0.0,
        }),
    };
    Ok(vec![
        row(
            "export res",
            resources as f64 / secs,
            plain_resources as f64 / plain_secs,
        ),
        row(
            "export MB",
            bytes as f64 / 1e6 / secs,
            plain_bytes as f64 / 1e6 / plain_secs,
        ),
    ])
}

fn hash(b64: &str) -> Result<[u8; 32], VaultError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| VaultError::Internal("a proof hash is not 32 bytes".into()))
}

fn checkpoint_size(note: &str) -> u64 {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

fn per_entry(secs: f64, entries: u64) -> f64 {
    secs / (entries.max(1) as f64)
}

/// Runs the benchmark in `dir` (a fresh temporary directory).
/// Rows measured by the caller on the largest fixture (the binary's backup, restore and
/// shred rows, which need rooms this crate does not depend on): given the gate, this
/// process's operator capability, a scratch directory and the patient count.
pub type ExtraRows<'a> =
    dyn Fn(&Vault, &LocalOperator, &Path, usize) -> Result<Vec<BenchRow>, VaultError> + 'a;

pub fn run(
    backend: &BenchBackend,
    dir: &Path,
    opts: BenchOptions,
    clock: Arc<dyn Clock>,
    progress: &dyn Fn(&str, usize, usize),
    extra: &ExtraRows<'_>,
) -> Result<(Vec<BenchRow>, Vec<String>), VaultError> {
    let mut rows = vec![];
    let mut audit_figures: Vec<String> = vec![];
    for (k, &size) in opts.sizes.iter().enumerate() {
        let sub = dir.join(format!("run{k}"));
        std::fs::create_dir_all(&sub).map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut created = vec![];
        let fx = setup(
            backend,
            &sub,
            size.max(1),
            clock.clone(),
            &|d, t| progress("loading patients", d, t),
            &mut created,
        );
        let fx = match fx {
            Ok(f) => f,
            Err(e) => {
                drop_databases(backend, &created);
                return Err(e);
            }
        };
        // A signed-in physician treating (the role's default purpose), on the care team.
        let c = fx.physician.clone();
        // First, while the physician's second factor is fresh (bulk export needs step-up).
        progress("bulk export", 0, 1);
        rows.extend(export_rows(&fx, &sub, size)?);
        let obs = ResourceType::parse("Observation").ok_or(VaultError::Internal("type".into()))?;
        let n = fx.secure_ids.len().max(1);
        let pick = |i: usize| (i.wrapping_mul(2_654_435_761)) % n;
        progress("reads", 0, 1);
        let secure = measure(opts.threads, opts.ops, &|i| {
            let (_, oid) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            fx.vault.read(&c, obs, oid).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops, &|i| {
            let (_, oid) = fx.plain_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let row = fx
                .plain
                .current("Observation", oid)?
                .ok_or(VaultError::NotFound)?;
            let _: Value = serde_json::from_slice(row.ciphertext())
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "read".into(),
            secure,
            plain: Some(plain),
        });
        if size == opts.sizes.last().copied().unwrap_or(0) {
            // The same reads with the live detection consumer running beside them (its
            // own thread, as the server runs it): the "plain" column is detection off.
            // Alternating rounds, the best of each, so the machine's drift does not
            // decide the ratio.
            progress("reads with live detection", 0, 1);
            let read = || {
                measure(opts.threads, opts.ops, &|i| {
                    let (_, oid) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
                    fx.vault.read(&c, obs, oid).map(|_| ())
                })
            };
            let faster = |a: Measure, b: Measure| if b.ops_per_sec > a.ops_per_sec { b } else { a };
            // One consumer throughout (a new one would stand by while this one's lease
            // lasts, as on a second server).
            let mut live = medvault_core::LiveDetection::new(
                medvault_core::detect::Thresholds::default(),
                medvault_core::DetectResponses::default(),
            );
            let (mut off, mut on) = (secure, with_live_detection(&fx, &mut live, read)?);
            for _ in 0..2 {
                off = faster(off, read()?);
                on = faster(on, with_live_detection(&fx, &mut live, read)?);
            }
            rows.push(BenchRow {
                patients: size,
                operation: "read, detect on/off".into(),
                secure: on,
                plain: Some(off),
            });
        }
        if size == opts.sizes.first().copied().unwrap_or(0) {
            // One policy decision of the common case (a clinician reading vitals of a
            // patient they treat), evaluated by Cedar afresh; the gate caches decisions
            // per query, so this is the cost of the first of each kind.
            progress("policy decisions", 0, 1);
            let rel = |i: usize| {
                if i % 2 == 0 {
                    medvault_core::Relationship::Treatment
                } else {
                    medvault_core::Relationship::None
                }
            };
            let check = |allowed: bool, i: usize| match allowed == (i % 2 == 0) {
                true => Ok(()),
                false => Err(VaultError::Internal("unexpected decision".into())),
            };
            let (read, vitals) = (medvault_core::Action::Read, medvault_core::Category::Vitals);
            let m = measure(opts.threads, opts.ops * 10, &|i| {
                check(fx.vault.decision(&c, read, vitals, rel(i)), i)
            })?;
            rows.push(BenchRow {
                patients: 0,
                operation: "policy decision".into(),
                secure: m,
                plain: None,
            });
            let m = measure(opts.threads, opts.ops, &|i| {
                check(fx.vault.explain(&c, read, vitals, rel(i)).allowed, i)
            })?;
            rows.push(BenchRow {
                patients: 0,
                operation: "Cedar evaluation".into(),
                secure: m,
                plain: None,
            });
        }

        progress("searches", 0, 1);
        let secure = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let p = vec![
                ("patient".to_owned(), pid.clone()),
                ("code".to_owned(), "http://loinc.org|8867-4".to_owned()),
            ];
            fx.vault.search(&c, obs, &p, false).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.plain_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let q = SearchQuery {
                rtype: Some("Observation".into()),
                patient: PatientId::new(pid).ok(),
                tokens: vec![("code".into(), vec![b"8867-4".to_vec()])],
                limit: 50,
                ..Default::default()
            };
            for row in fx.plain.search(&q)?.rows {
                let _: Value = serde_json::from_slice(row.ciphertext())
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
            }
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "search".into(),
            secure,
            plain: Some(plain),
        });

        // A clinician's first query: this patient's vitals of one month (clinical dates are
        // blind-indexed: covering tokens, then exact comparison after decryption).
        progress("date-range searches", 0, 1);
        let secure = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let p = vec![
                ("patient".to_owned(), pid.clone()),
                ("date".to_owned(), "ge2026-01-01".to_owned()),
                ("date".to_owned(), "lt2026-02-01".to_owned()),
            ];
            fx.vault.search(&c, obs, &p, false).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.plain_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let q = SearchQuery {
                rtype: Some("Observation".into()),
                patient: PatientId::new(pid).ok(),
                limit: 50,
                ..Default::default()
            };
            for row in fx.plain.search(&q)?.rows {
                let v: Value = serde_json::from_slice(row.ciphertext())
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                let d = v
                    .get("effectiveDateTime")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                std::hint::black_box(("2026-01-01".."2026-02-01").contains(&d));
            }
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "date-range search".into(),
            secure,
            plain: Some(plain),
        });

        progress("_include searches", 0, 1);
        let secure = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let p = vec![
                ("patient".to_owned(), pid.clone()),
                ("_include".to_owned(), "Observation:subject".to_owned()),
            ];
            fx.vault.search(&c, obs, &p, false).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.plain_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let q = SearchQuery {
                rtype: Some("Observation".into()),
                patient: PatientId::new(pid).ok(),
                limit: 50,
                ..Default::default()
            };
            for row in fx.plain.search(&q)?.rows {
                let _: Value = serde_json::from_slice(row.ciphertext())
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
            }
            let p = fx
                .plain
                .current("Patient", pid)?
                .ok_or(VaultError::NotFound)?;
            let _: Value = serde_json::from_slice(p.ciphertext())
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "_include search".into(),
            secure,
            plain: Some(plain),
        });

        // Registration that refuses duplicates: If-None-Exist on the MRN (a new one, so
        // the search finds nothing and the chart is created).
        progress("conditional creates", 0, 1);
        let desk = Caller::cli(&fx.operator, Role::FrontDesk);
        let patient_rt =
            ResourceType::parse("Patient").ok_or(VaultError::Internal("type".into()))?;
        let secure = measure(opts.threads, opts.ops / 2, &|i| {
            let mrn = format!("NEW-S-{i:08}");
            let mut v = patient_json(i);
            set(
                &mut v,
                "identifier",
                json!([{"system": "https://medvault.dev/sid/mrn", "value": mrn}]),
            );
            let r = Resource::from_value(v, Some(patient_rt))?;
            let cond = format!("identifier=https://medvault.dev/sid/mrn|{mrn}");
            fx.vault.create_if_none_exist(&desk, r, &cond).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops / 2, &|i| {
            let mrn = format!("NEW-P-{i:08}");
            let q = SearchQuery {
                rtype: Some("Patient".into()),
                tokens: vec![("identifier".into(), vec![mrn.as_bytes().to_vec()])],
                limit: 2,
                ..Default::default()
            };
            if fx.plain.search(&q)?.rows.is_empty() {
                let id = medvault_types::random_uuid();
                let mut v = patient_json(i);
                set(
                    &mut v,
                    "identifier",
                    json!([{"system": "https://medvault.dev/sid/mrn", "value": mrn}]),
                );
                let op = plain_put(
                    "Patient",
                    &id,
                    &id,
                    &v,
                    vec![IndexRow {
                        param: "identifier".into(),
                        token: mrn.into_bytes(),
                    }],
                );
                fx.plain.commit(WriteBatch {
                    ops: vec![op],
                    audit: vec![],
                })?;
            }
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "conditional create".into(),
            secure,
            plain: Some(plain),
        });

        progress("writes", 0, 1);
        let secure = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.secure_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let r = Resource::from_value(obs_json(pid, i), Some(obs))?;
            fx.vault.create(&c, r).map(|_| ())
        })?;
        let plain = measure(opts.threads, opts.ops / 2, &|i| {
            let (pid, _) = fx.plain_ids.get(pick(i)).ok_or(VaultError::NotFound)?;
            let id = medvault_types::random_uuid();
            let tok = |p: &str, v: &str| IndexRow {
                param: p.into(),
                token: v.as_bytes().to_vec(),
            };
            let op = plain_put(
                "Observation",
                &id,
                pid,
                &obs_json(pid, i),
                vec![tok("code", "8867-4"), tok("status", "final")],
            );
            fx.plain.commit(WriteBatch {
                ops: vec![op],
                audit: vec![],
            })?;
            Ok(())
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "write".into(),
            secure,
            plain: Some(plain),
        });

        progress("audit appends", 0, 1);
        let secure = measure(opts.threads, opts.ops, &|_| {
            append(&fx.secure, &c, &*clock, 1)
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: "audit append".into(),
            secure,
            plain: None,
        });
        // Many concurrent requests: the store's group commit batches their records.
        let clients = 64;
        let secure = measure(clients, opts.ops.max(clients), &|_| {
            append(&fx.secure, &c, &*clock, 1)
        })?;
        rows.push(BenchRow {
            patients: size,
            operation: format!("append {clients}c"),
            secure,
            plain: None,
        });
        if k == 0 {
            progress("logins", 0, 1);
            identity_rows(&fx, opts, &*clock, &mut rows)?;
            audit_log_rows(
                &fx,
                &c,
                &*clock,
                opts,
                &mut rows,
                &mut audit_figures,
                progress,
            )?;
        }
        if k + 1 == opts.sizes.len() {
            progress("backup, restore, shred", 0, 1);
            let more = extra(&fx.vault, &fx.operator, &sub, size);
            match more {
                Ok(r) => rows.extend(r),
                Err(e) => {
                    drop(fx);
                    drop_databases(backend, &created);
                    return Err(e);
                }
            }
        }
        drop(fx);
        drop_databases(backend, &created);
    }
    Ok((rows, audit_figures))
}

/// Sign-in and token check through the gate, against their irreducible parts on the plain
/// side: one Argon2id verification per login, one session lookup per token check. Each
/// login needs its own user (a TOTP step is usable once per user), so the login row runs
/// over `logins` fresh users.
fn identity_rows(
    fx: &Fixture,
    opts: BenchOptions,
    clock: &dyn Clock,
    rows: &mut Vec<BenchRow>,
) -> Result<(), VaultError> {
    let admin = Caller::cli(&fx.operator, Role::SecurityAdmin);
    let logins = (opts.ops / 100).clamp(8, 200);
    let password = medvault_core::Password::new("bench correct horse battery".into());
    let users = (0..logins)
        .map(|i| {
            let name = format!(
                "bench.user{i}.{}",
                medvault_types::random_uuid().get(..8).unwrap_or("x")
            );
            fx.vault
                .add_user(&admin, &name, Role::Nurse, Some(password.clone()))
                .map(|u| (name, u.totp_secret))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let anonymous = |i: usize| Caller::anonymous(Some("192.0.2.1".into()), format!("bench-{i}"));
    let tokens = std::sync::Mutex::new(vec![]);
    let secure = measure(opts.threads, logins, &|i| {
        let (name, secret) = users.get(i).ok_or(VaultError::NotFound)?;
        let c = anonymous(i);
        let ch = fx.vault.login(&c, name, &password)?;
        let now = clock.now().unix_timestamp();
        let code = medvault_core::totp_now(secret, now).ok_or(VaultError::NotFound)?;
        let g = fx
            .vault
            .login_factor(&c, &ch.mfa_token, &medvault_core::Factor::Totp(&code))?;
        if let Ok(mut t) = tokens.lock() {
            t.push(g.token);
        }
        Ok(())
    })?;
    let hash = argon2::PasswordHasher::hash_password(
        &argon2::Argon2::default(),
        password.expose().as_bytes(),
        &argon2::password_hash::SaltString::generate(&mut rand::rngs::OsRng),
    )
    .map_err(|e| VaultError::Internal(e.to_string()))?
    .to_string();
    let plain = measure(opts.threads, logins, &|_| {
        let h =
            argon2::PasswordHash::new(&hash).map_err(|e| VaultError::Internal(e.to_string()))?;
        argon2::PasswordVerifier::verify_password(
            &argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon2::Params::new(19_456, 2, 1, None).unwrap_or_default(),
            ),
            password.expose().as_bytes(),
            &h,
        )
        .map_err(|e| VaultError::Internal(e.to_string()))
    })?;
    rows.push(BenchRow {
        patients: 0,
        operation: "login (password + TOTP)".into(),
        secure,
        plain: Some(plain),
    });
    let tokens = tokens
        .into_inner()
        .map_err(|_| VaultError::Internal("bench tokens".into()))?;
    let n = tokens.len().max(1);
    let secure = measure(opts.threads, opts.ops, &|i| {
        let t = tokens.get(i % n).ok_or(VaultError::NotFound)?;
        fx.vault.authenticate(&anonymous(i), t, None).map(|_| ())
    })?;
    let plain = measure(opts.threads, opts.ops, &|i| {
        let t = tokens.get(i % n).ok_or(VaultError::NotFound)?;
        fx.plain.session(&t.hash())?;
        Ok(())
    })?;
    rows.push(BenchRow {
        patients: 0,
        operation: "token check".into(),
        secure,
        plain: Some(plain),
    });
    Ok(())
}

/// Runs `f` while a detection consumer follows the audit log on its own thread, as the
/// server runs it; the consumer catches up with the log before `f` starts.
fn with_live_detection<T>(
    fx: &Fixture,
    live: &mut medvault_core::LiveDetection,
    f: impl FnOnce() -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    let c = Caller::system(&fx.operator, "detect");
    while fx.vault.detect_step(&c, live, 50_000)?.entries > 0 {}
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let consumer = s.spawn(|| -> Result<u64, VaultError> {
            let mut seen = 0;
            loop {
                let r = fx.vault.detect_step(&c, live, 20_000)?;
                seen += r.entries;
                if stop.load(Ordering::Relaxed) {
                    return Ok(seen);
                }
                if r.entries < 20_000 {
                    // The server's pace is a step a second (at once again under a
                    // backlog); here four a second, so short measurements see it work.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_millis(250) && !stop.load(Ordering::Relaxed)
                    {
                        std::thread::park_timeout(Duration::from_millis(10));
                    }
                }
            }
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        consumer
            .join()
            .map_err(|_| VaultError::Internal("detection consumer panicked".into()))??;
        out
    })
}

/// Offline detection rows: the detector core alone over a generated month of a hospital's
/// access (events/s, one core), and the whole scan with JSON parsing.
pub fn detection_rows() -> Vec<BenchRow> {
    use medvault_core::detect::{scan, scenario, Detector, Directory, Thresholds};
    let s = scenario::generate(1, scenario::Size::default());
    let mut dir = Directory::default();
    let roster = s.roster_csv();
    let patients = s.patients_jsonl();
    let events = s.events_jsonl();
    if scan::read_roster(&mut dir, roster.as_bytes()).is_err()
        || scan::read_patients(&mut dir, patients.as_bytes()).is_err()
    {
        return vec![];
    }
    let parsed: Vec<_> = events
        .lines()
        .filter_map(|l| scan::parse_event(&mut dir, l).ok())
        .collect();
    let n = parsed.len().max(1) as f64;
    let mut best = 0.0f64;
    let mut alerts = Vec::new();
    for _ in 0..5 {
        let mut det = Detector::new(Thresholds::default());
        let t = Instant::now();
        for e in &parsed {
            det.observe_into(&dir, e, &mut alerts);
            alerts.clear();
        }
        best = best.max(n / t.elapsed().as_secs_f64().max(1e-9));
    }
    let mut scan_best = 0.0f64;
    for _ in 0..3 {
        let mut d = Directory::default();
        let _ = scan::read_roster(&mut d, roster.as_bytes());
        let _ = scan::read_patients(&mut d, patients.as_bytes());
        let mut sink = std::io::sink();
        let t = Instant::now();
        if scan::scan(
            &mut d,
            Thresholds::default(),
            events.as_bytes(),
            &mut sink,
            &mut |_| {},
        )
        .is_ok()
        {
            scan_best = scan_best.max(n / t.elapsed().as_secs_f64().max(1e-9));
        }
    }
    vec![
        throughput_row(0, "detect core ev/s", best),
        throughput_row(0, "detect scan ev/s", scan_best),
    ]
}

fn drop_databases(backend: &BenchBackend, names: &[String]) {
    if let BenchBackend::Postgres(admin) = backend {
        for n in names {
            let _ = medvault_store::PgStore::drop_database(admin, n);
        }
    }
}

/// A row of one throughput figure (MB/s, or whatever `operation` names) with no latency.
pub fn throughput_row(patients: usize, operation: &str, per_sec: f64) -> BenchRow {
    BenchRow {
        patients,
        operation: operation.into(),
        secure: Measure {
            ops_per_sec: per_sec,
            p50_us: 0.0,
            p99_us: 0.0,
        },
        plain: None,
    }
}

/// A row from latencies (each one operation).
pub fn latency_row(patients: usize, operation: &str, lat: &mut [Duration]) -> BenchRow {
    lat.sort();
    let at = |q: f64| {
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let total: f64 = lat.iter().map(Duration::as_secs_f64).sum();
    BenchRow {
        patients,
        operation: operation.into(),
        secure: Measure {
            ops_per_sec: if total > 0.0 {
                lat.len() as f64 / total
            } else {
                0.0
            },
            p50_us: at(0.5),
            p99_us: at(0.99),
        },
        plain: None,
    }
}

/// A latency cell: `-` where none was measured (a throughput row).
fn us(x: f64) -> String {
    if x <= 0.0 {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2}µs")
    } else {
        format!("{x:.0}µs")
    }
}

/// A rate cell: one decimal below 100 (megabytes per second), whole numbers above.
fn rate(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// The table as text.
pub fn render(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:>9}  {:<15} {:>12} {:>12} {:>7}  {:>9} {:>9}  {:>9} {:>9}\n",
        "patients",
        "operation",
        "secure/s",
        "plain/s",
        "ratio",
        "sec p50",
        "sec p99",
        "plain p50",
        "plain p99"
    );
    for r in rows {
        let patients = match r.patients {
            0 => "-".to_string(),
            n => n.to_string(),
        };
        let (plain, ratio, pp50, pp99) = match &r.plain {
            Some(p) => (
                rate(p.ops_per_sec),
                format!("{:.2}", r.secure.ops_per_sec / p.ops_per_sec.max(1e-9)),
                us(p.p50_us),
                us(p.p99_us),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "{:>9}  {:<15} {:>12} {:>12} {:>7}  {:>9} {:>9}  {:>9} {:>9}\n",
            patients,
            r.operation,
            rate(r.secure.ops_per_sec),
            plain,
            ratio,
            us(r.secure.p50_us),
            us(r.secure.p99_us),
            pp50,
            pp99
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throughput_row_shows_no_latency_it_did_not_measure() {
        let table = render(&[
            throughput_row(20000, "backup (MB/s)", 456.0),
            latency_row(20000, "shred, 1 rec", &mut [Duration::from_micros(300)]),
        ]);
        let backup = table.lines().find(|l| l.contains("backup")).unwrap();
        assert!(!backup.contains("µs"), "{backup}");
        assert!(backup.contains("456"), "{backup}");
        let shred = table.lines().find(|l| l.contains("shred")).unwrap();
        assert!(shred.contains("300µs"), "{shred}");
    }
}
