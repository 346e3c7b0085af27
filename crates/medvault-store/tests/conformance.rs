#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::disallowed_methods,
    reason = "test code: a failed assumption should fail the test loudly; the e2e TOTP client reads the real clock like an authenticator app"
)]
use std::sync::Arc;

use medvault_store::{conformance, faulty::FaultyStore, SqliteStore, Store, WriteBatch};

#[test]
fn sqlite_passes_the_conformance_suite() {
    let dirs = std::sync::Mutex::new(vec![]);
    conformance::run_all(&|| {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = SqliteStore::open(&d.path().join("db.sqlite")).unwrap();
        dirs.lock().unwrap().push(d);
        s
    });
}

#[test]
fn audit_log_rows_cannot_be_updated_or_deleted_in_sqlite() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("db.sqlite");
    let s = SqliteStore::open(&path).unwrap();
    s.commit(WriteBatch {
        ops: vec![],
        audit: vec![(vec![1], b"r".to_vec())],
    })
    .unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    assert!(c
        .execute("UPDATE audit_log SET record = x'00'", [])
        .is_err());
    assert!(c.execute("DELETE FROM audit_log", []).is_err());
}

#[test]
fn faulty_store_fails_audit_appends_only_when_told() {
    let d = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Store> = SqliteStore::open(&d.path().join("db.sqlite")).unwrap();
    let f = FaultyStore::new(inner);
    let b = || WriteBatch {
        ops: vec![],
        audit: vec![(vec![1], b"r".to_vec())],
    };
    f.commit(b()).unwrap();
    f.set_fail_audit(true);
    assert!(f.commit(b()).is_err());
    assert_eq!(f.audit_len().unwrap(), 1);
}
