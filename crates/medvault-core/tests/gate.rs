//! The gate from outside: its typestate checked by the compiler, and the audit log it keeps
//! over a real SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use base64::Engine as _;
use medvault_core::{
    AuditRecord, AuditVerdict, Caller, MasterKeySource, Outcome, Role, Vault, VaultError,
    VaultOptions,
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

fn open(store: Arc<dyn Store>, master: &std::path::Path) -> Vault {
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
    let v = Vault::open_with_store(
        store.clone(),
        &MasterKeySource::NewFile(master.clone()),
        Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        )),
        VaultOptions::default(),
    )
    .unwrap();
    drop(v);
    let v = open(store.clone(), &master);
    grow(&store, 700);
    let (signed, _) = v.checkpoint(&Caller::system("test")).unwrap().unwrap();
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
        v.checkpoint(&Caller::cli(Role::Physician)),
        Err(VaultError::Forbidden { .. })
    ));
    // A restarted server resumes from the stored tiles and extends them.
    drop(v);
    let v = open(store.clone(), &master);
    grow(&store, 300);
    let n = store.audit_len().unwrap();
    let auditor = Caller::cli(Role::Auditor);
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
        v.verify_audit(&Caller::cli(Role::Nurse), &|_, _| {}),
        Err(VaultError::Forbidden { .. })
    ));
}
