//! The gate from outside: its typestate checked by the compiler, and the audit log it keeps
//! over a real SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use base64::Engine as _;
use medvault_core::{
    AuditRecord, AuditVerdict, Caller, LocalOperator, MasterKeySource, Outcome, Precondition, Role,
    Vault, VaultError, VaultOptions,
};
use medvault_store::{SqliteStore, Store, WriteBatch};
use medvault_types::ManualClock;

/// The typestate, checked by the compiler from inside core: another module of the crate
/// cannot mint a `Permitted` (its constructor is private to `typestate`), nor forge the
/// policy engine's `Decision` that `typestate::permit` requires.
#[test]
fn only_the_decision_makes_a_permission() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}

fn open(store: Arc<dyn Store>, master: &std::path::Path) -> (Vault, LocalOperator) {
    let clock = Arc::new(ManualClock::new(
        time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
    ));
    Vault::open_with_store(
        store,
        &MasterKeySource::File(master.to_owned()),
        clock,
        VaultOptions {
            public_transparency: true,
            ..VaultOptions::default()
        },
    )
    .unwrap()
}

/// Appends `n` records to the log, as the gate's own appends do.
fn grow(store: &Arc<dyn Store>, n: usize) {
    let audit = (0..n)
        .map(|_| {
            AuditRecord::new(
                "test",
                "cli.test",
                Outcome::Success,
                "2026-11-29T00:00:00.000Z".into(),
                "t",
            )
            .to_leaf()
        })
        .collect();
    store.commit(WriteBatch { ops: vec![], audit }).unwrap();
}

fn leaves(store: &Arc<dyn Store>, n: u64) -> Vec<[u8; 32]> {
    store
        .audit_range(0, n)
        .unwrap()
        .iter()
        .map(|r| medvault_audit::record_leaf(&r.record))
        .collect()
}

fn b64(h: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(h)
}

#[test]
fn proofs_from_tiles_survive_a_restart_and_anonymous_callers_cannot_force_signing() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    let master = dir.path().join("master.key");
    let (v, _) = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::NewFile(master.clone()),
        Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        )),
        VaultOptions::default(),
    )
    .unwrap();
    drop(v);
    let (v, op) = open(store.clone(), &master);
    grow(&store, 700);
    let (signed, _) = v.checkpoint(&Caller::system(&op, "test")).unwrap().unwrap();
    grow(&store, 10);
    // Anonymous (public transparency): within the signed tree only.
    let anonymous = Caller::anonymous(None, "test".into());
    assert!(v.inclusion_proof(&anonymous, 3, signed).is_ok());
    assert!(matches!(
        v.inclusion_proof(&anonymous, 3, signed + 5),
        Err(VaultError::BadRequest(_))
    ));
    // Only the server's own signer signs on schedule.
    assert!(matches!(
        v.checkpoint(&Caller::cli(&op, Role::Physician)),
        Err(VaultError::Forbidden { .. })
    ));
    // A restarted server resumes from the stored tiles and extends them.
    drop(v);
    let (v, op) = open(store.clone(), &master);
    grow(&store, 300);
    let n = store.audit_len().unwrap();
    let auditor = Caller::cli(&op, Role::Auditor);
    let p = v.inclusion_proof(&auditor, 650, n - 1).unwrap();
    let all = leaves(&store, n - 1);
    let expected: Vec<String> = medvault_audit::merkle::inclusion_proof(&all, 650)
        .unwrap()
        .iter()
        .map(|h| b64(h))
        .collect();
    assert_eq!(p.proof, expected);
    assert_eq!(p.root, b64(&medvault_audit::merkle::root(&all)));
    let cp = v.consistency_proof(&anonymous, signed, n - 1);
    assert!(
        cp.is_ok(),
        "the auditor's request signed a tree covering it"
    );
    assert!(matches!(
        v.verify_audit(&auditor, &|_, _| {}).unwrap(),
        AuditVerdict::Intact { .. }
    ));
    // Verification is decided by policy too: a clinician may not run it.
    assert!(matches!(
        v.verify_audit(&Caller::cli(&op, Role::Nurse), &|_, _| {}),
        Err(VaultError::Forbidden { .. })
    ));
}

/// A stored row whose category this server does not know is denied — and the denial is
/// recorded, saying why and naming no category — on read, update and delete alike. (It
/// was an unrecorded internal error on read, and an update blamed the new category.)
#[test]
fn unknown_stored_category_is_a_recorded_denial_naming_no_category() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let store: Arc<dyn Store> = SqliteStore::open(&db).unwrap();
    let (v, op) = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::Ephemeral,
        Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        )),
        VaultOptions::default(),
    )
    .unwrap();
    let doc = Caller::cli(&op, Role::Physician);
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "name": [{"family": "Unknown"}]}},
        {"request": {"method": "POST", "url": "Condition"},
         "resource": {"resourceType": "Condition", "subject": {"reference": "urn:uuid:p"},
                      "code": {"text": "x"}}}]});
    let importer = Caller::cli(&op, Role::Importer);
    let written = v.transaction(&importer, bundle, "import", false).unwrap();
    let patient = written[0].written.clone().unwrap();
    let condition = written[1].written.clone().unwrap();
    let body = serde_json::json!({"resourceType": "Condition", "id": condition.id,
        "subject": {"reference": format!("Patient/{}", patient.id)}, "code": {"text": "y"}});
    // Someone with the database file relabels the row.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER versions_no_update;
         UPDATE resource_versions SET category = 'bogus' WHERE rtype = 'Condition';
         UPDATE resource_current SET category = 'bogus' WHERE rtype = 'Condition';",
    )
    .unwrap();
    let rt = condition.rtype;
    let last = |store: &Arc<dyn Store>| {
        let n = store.audit_len().unwrap();
        let r = store.audit_range(n - 1, n).unwrap().remove(0);
        AuditRecord::from_canonical(&r.record).unwrap()
    };
    let denied =
        |e: VaultError| matches!(e, VaultError::Forbidden { withheld } if withheld.is_empty());
    assert!(denied(v.read(&doc, rt, &condition.id).unwrap_err()));
    let update = medvault_fhir::Resource::from_value(body, Some(rt)).unwrap();
    let refused = |e: VaultError, what: &str| matches!(e, VaultError::Refused { action, rtype } if action == what && rtype == "Condition");
    assert!(refused(
        v.update(&doc, &condition.id, update, Precondition::default())
            .unwrap_err(),
        "update"
    ));
    let rec = last(&store);
    assert_eq!(rec.outcome, Outcome::Denied);
    assert_eq!(rec.detail.as_deref(), Some("unknown stored category"));
    assert!(rec.categories_withheld.is_empty(), "{rec:?}");
    assert!(refused(
        v.delete(&doc, rt, &condition.id, Precondition::default())
            .unwrap_err(),
        "delete"
    ));
    let rec = last(&store);
    assert_eq!(
        (rec.action.as_str(), rec.outcome),
        ("delete", Outcome::Denied)
    );
    assert_eq!(rec.detail.as_deref(), Some("unknown stored category"));
}

/// A gate over a fresh SQLite store in a temporary directory (kept alive by the first
/// element), with an ephemeral master key and a fixed clock.
fn ephemeral_vault() -> (tempfile::TempDir, Arc<dyn Store>, Vault, LocalOperator) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    let (v, op) = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::Ephemeral,
        Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        )),
        VaultOptions::default(),
    )
    .unwrap();
    (dir, store, v, op)
}

/// A write whose blind-index tokens were made under a view a key rotation has moved past
/// is refused by the store in its own transaction (503, retry), and nothing of it lands:
/// no version, no tokens, no audit entry.
#[test]
fn a_write_under_an_outdated_index_view_is_refused_whole() {
    let (_dir, store, v, op) = ephemeral_vault();
    let desk = Caller::cli(&op, Role::Importer);
    let patient = |family: &str| {
        medvault_fhir::Resource::from_value(
            serde_json::json!({"resourceType": "Patient", "name": [{"family": family}]}),
            None,
        )
        .unwrap()
    };
    v.create(&desk, patient("Before")).unwrap();
    // Another process moved the rotation on: writes must now carry generations 1 and 2.
    store
        .commit(WriteBatch {
            ops: vec![medvault_store::Op::PutMeta {
                key: "search.index_writers".into(),
                value: b"1+2".to_vec(),
            }],
            audit: vec![],
        })
        .unwrap();
    let (versions, audit) = (store.census().unwrap(), store.audit_len().unwrap());
    let e = v.create(&desk, patient("Stale")).unwrap_err();
    assert!(matches!(e, VaultError::Unavailable(_)), "{e:?}");
    assert_eq!(store.census().unwrap(), versions, "no version written");
    assert_eq!(store.audit_len().unwrap(), audit, "nor audited");
}

/// A shred deletes only the chart's keys (constant time); until its rows are removed, a
/// search meeting them leaves them out rather than failing, and a read finds nothing.
#[test]
fn a_search_leaves_out_a_chart_shredded_before_its_rows_are_removed() {
    let (_dir, store, v, op) = ephemeral_vault();
    let importer = Caller::cli(&op, Role::Importer);
    let desk = Caller::cli(&op, Role::FrontDesk);
    let twin = || {
        medvault_fhir::Resource::from_value(
            serde_json::json!({"resourceType": "Patient", "name": [{"family": "Twin"}]}),
            None,
        )
        .unwrap()
    };
    let kept = v.create(&importer, twin()).unwrap();
    let gone = v.create(&importer, twin()).unwrap();
    let (kept, gone) = (kept.id, gone.id);
    let system = Caller::system(&op, "test");
    assert_eq!(
        v.replay_shred_ledger(&system, &[(gone.clone(), 1)])
            .unwrap(),
        std::slice::from_ref(&gone)
    );
    assert!(
        store.current("Patient", &gone).unwrap().is_some(),
        "the shred itself leaves the rows"
    );
    let rt = medvault_fhir::ResourceType::parse("Patient").unwrap();
    let found = v
        .search(&desk, rt, &[("family".into(), "Twin".into())], false)
        .unwrap();
    let ids: Vec<String> = found
        .entries
        .iter()
        .map(|d| d.json().unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&kept));
    assert!(matches!(
        v.read(&desk, rt, &gone),
        Err(VaultError::NotFound)
    ));
    assert!(v.read(&desk, rt, &kept).is_ok());
    assert_eq!(v.remove_shredded(&system).unwrap(), 1);
    assert!(store.current("Patient", &gone).unwrap().is_none());
    assert!(store
        .chart_census(&medvault_types::PatientId::new(&gone).unwrap())
        .unwrap()
        .is_empty());
}

/// Live detection: one consumer per cluster holds the lease; when it stops, another takes
/// over from the stored cursor, so nothing in the audit log is missed or read twice.
#[test]
fn one_detection_consumer_per_cluster_and_a_takeover_misses_nothing() {
    use medvault_core::detect::Thresholds;
    use medvault_core::{DetectResponses, LiveDetection};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    let clock = Arc::new(ManualClock::new(
        time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
    ));
    let (v, op) = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::Ephemeral,
        clock.clone(),
        VaultOptions::default(),
    )
    .unwrap();
    let importer = Caller::cli(&op, Role::Importer);
    let patient = || {
        medvault_fhir::Resource::from_value(
            serde_json::json!({"resourceType": "Patient", "name": [{"family": "Lease"}]}),
            None,
        )
        .unwrap()
    };
    v.create(&importer, patient()).unwrap();
    let sys = Caller::system(&op, "detect");
    let new = || LiveDetection::new(Thresholds::default(), DetectResponses::default());
    let (mut a, mut b) = (new(), new());
    let ra = v.detect_step(&sys, &mut a, 1_000).unwrap();
    assert!(!ra.standby && ra.cursor > 0);
    let rb = v.detect_step(&sys, &mut b, 1_000).unwrap();
    assert!(rb.standby, "a second server's consumer stands by");
    // Callers other than the server's own may not run it.
    let po = Caller::cli(&op, Role::PrivacyOfficer);
    assert!(v.detect_step(&po, &mut new(), 10).is_err());
    // The first server stops; more happens; its lease lapses and the second takes over.
    v.create(&importer, patient()).unwrap();
    clock.advance(time::Duration::seconds(16));
    let rb = v.detect_step(&sys, &mut b, 1_000).unwrap();
    assert!(!rb.standby);
    assert!(
        rb.entries >= 1,
        "it reads from the stored cursor on: {rb:?}"
    );
    assert!(rb.cursor > ra.cursor);
    assert!(
        v.detect_step(&sys, &mut a, 1_000).unwrap().standby,
        "and the first defers now"
    );
}

/// Fuzzing the paging cursor (a client echoes it back; it is the one opaque token a search
/// decodes): arbitrary strings and single-character changes to a real cursor are refused
/// as a 400 (`BadRequest`), never a panic, an internal error or another page. CI smoke:
/// 256 cases; longer: `PROPTEST_CASES=100000 cargo test -p medvault-core fuzz_`.
#[test]
fn fuzz_search_cursors_are_refused_cleanly() {
    use proptest::prelude::*;
    let (_dir, _store, v, op) = ephemeral_vault();
    let importer = Caller::cli(&op, Role::Importer);
    let desk = Caller::cli(&op, Role::FrontDesk);
    for i in 0..5 {
        v.create(
            &importer,
            medvault_fhir::Resource::from_value(
                serde_json::json!({"resourceType": "Patient", "name": [{"family": format!("Page{i}")}]}),
                None,
            )
            .unwrap(),
        )
        .unwrap();
    }
    let rt = medvault_fhir::ResourceType::parse("Patient").unwrap();
    let first = v
        .search(&desk, rt, &[("_count".into(), "2".into())], false)
        .unwrap();
    // The gate's `next` is the cursor itself (the server builds the link around it).
    let cursor = first.next.clone().expect("a second page");
    let page = |c: &str| {
        v.search(
            &desk,
            rt,
            &[
                ("_count".into(), "2".into()),
                ("_cursor".into(), c.to_owned()),
            ],
            false,
        )
    };
    assert!(page(&cursor).is_ok(), "the real cursor opens the next page");
    let mut runner = proptest::test_runner::TestRunner::default();
    let strategy = (
        prop_oneof![
            Just(String::new()),
            any::<String>(),
            "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,60}",
        ],
        any::<prop::sample::Index>(),
        any::<char>(),
    );
    runner
        .run(&strategy, |(junk, at, ch)| {
            let refused = |c: &str| matches!(page(c), Err(VaultError::BadRequest(_)));
            prop_assert!(junk == cursor || refused(&junk), "{junk:?}");
            let mut chars: Vec<char> = cursor.chars().collect();
            let i = at.index(chars.len());
            if chars[i] != ch {
                chars[i] = ch;
                let mutated: String = chars.into_iter().collect();
                prop_assert!(refused(&mutated), "{mutated:?}");
            }
            Ok(())
        })
        .unwrap();
}
