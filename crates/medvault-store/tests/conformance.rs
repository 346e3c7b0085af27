#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::disallowed_methods,
    reason = "test code: a failed assumption should fail the test loudly; the e2e TOTP client reads the real clock like an authenticator app"
)]
use std::sync::Arc;

use medvault_store::{conformance, faulty::FaultyStore, PgStore, SqliteStore, Store, WriteBatch};

#[test]
fn sqlite_passes_the_conformance_suite() {
    let dirs = std::sync::Mutex::new(vec![]);
    conformance::run_all(&|| {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = SqliteStore::open(&d.path().join("db.sqlite")).unwrap();
        dirs.lock().unwrap().push(d);
        s
    })
    .unwrap();
}

/// Also loads the image into a fresh PostgreSQL database when `MEDVAULT_TEST_PG_URL` names
/// a server.
#[test]
fn sqlite_snapshots_are_page_images_that_restore_whole() {
    let d = tempfile::tempdir().unwrap();
    let admin = std::env::var("MEDVAULT_TEST_PG_URL").ok();
    let name = format!("mv_img_{}", medvault_types::random_uuid().replace('-', ""));
    let pg = admin
        .as_ref()
        .map(|a| PgStore::open(&PgStore::create_database(a, &name).unwrap()).unwrap());
    conformance::page_images_restore_whole(d.path(), pg.as_deref().map(|p| p as &dyn Store))
        .unwrap();
    if let (Some(pg), Some(admin)) = (pg, admin) {
        pg.close();
        PgStore::drop_database(&admin, &name).unwrap();
    }
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

/// PostgreSQL runs when `MEDVAULT_TEST_PG_URL` names a server (CI sets it); each store gets
/// a fresh database, dropped afterwards.
#[test]
fn postgres_passes_the_conformance_suite() {
    let Ok(admin) = std::env::var("MEDVAULT_TEST_PG_URL") else {
        eprintln!("MEDVAULT_TEST_PG_URL unset: PostgreSQL conformance not run");
        return;
    };
    let names = std::sync::Mutex::new(vec![]);
    let stores = std::sync::Mutex::new(vec![]);
    conformance::run_all(&|| {
        let name = format!("mv_conf_{}", medvault_types::random_uuid().replace('-', ""));
        let url = PgStore::create_database(&admin, &name).unwrap();
        names.lock().unwrap().push(name);
        let s = PgStore::open(&url).unwrap();
        stores.lock().unwrap().push(s.clone());
        s as Arc<dyn Store>
    })
    .unwrap();
    for s in stores.lock().unwrap().drain(..) {
        s.close();
    }
    for n in names.lock().unwrap().iter() {
        PgStore::drop_database(&admin, n).unwrap();
    }
}

#[test]
fn postgres_audit_log_is_append_only_and_tables_are_partitioned() {
    let Ok(admin) = std::env::var("MEDVAULT_TEST_PG_URL") else {
        return;
    };
    let name = format!("mv_ao_{}", medvault_types::random_uuid().replace('-', ""));
    let url = PgStore::create_database(&admin, &name).unwrap();
    let s = PgStore::open(&url).unwrap();
    s.commit(WriteBatch {
        ops: vec![],
        audit: vec![(vec![1], b"r".to_vec())],
    })
    .unwrap();
    let psql = |sql: &str| {
        std::process::Command::new("psql")
            .arg(&url)
            .args(["-tAc", sql])
            .output()
            .unwrap()
    };
    assert!(!psql("UPDATE audit_log SET record = '\\x00'")
        .status
        .success());
    assert!(!psql("DELETE FROM audit_log").status.success());
    let parts = String::from_utf8(
        psql("SELECT count(*) FROM pg_inherits WHERE inhparent = 'resource_versions'::regclass")
            .stdout,
    )
    .unwrap();
    assert_eq!(parts.trim(), "8");
    let strategy = String::from_utf8(
        psql(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'search_index'::regclass",
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(strategy.trim(), "h", "hash partitioned by patient id");
    s.close();
    drop(s);
    PgStore::drop_database(&admin, &name).unwrap();
}

#[test]
fn postgres_uses_tls_when_the_url_asks() {
    let Ok(admin) = std::env::var("MEDVAULT_TEST_PG_URL") else {
        return;
    };
    let name = format!("mv_tls_{}", medvault_types::random_uuid().replace('-', ""));
    let url = PgStore::create_database(&admin, &name).unwrap();
    let plain = PgStore::open(&format!("{url}?sslmode=disable")).unwrap();
    assert!(!plain.connection_is_tls().unwrap());
    drop(plain);
    let server_has_tls = std::process::Command::new("psql")
        .arg(&admin)
        .args(["-tAc", "SHOW ssl"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&server_has_tls.stdout).trim() == "on" {
        let tls = PgStore::open(&format!("{url}?sslmode=require")).unwrap();
        assert!(
            tls.connection_is_tls().unwrap(),
            "sslmode=require must give an encrypted connection"
        );
        tls.commit(WriteBatch {
            ops: vec![],
            audit: vec![(vec![1], b"over tls".to_vec())],
        })
        .unwrap();
        drop(tls);
    } else {
        eprintln!("the PostgreSQL server has ssl off: TLS connection not exercised");
    }
    PgStore::drop_database(&admin, &name).unwrap();
}
