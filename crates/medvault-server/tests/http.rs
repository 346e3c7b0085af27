//! In-process HTTP tests (axum `Router::oneshot`) over a real SQLite file wrapped in a
//! failure-injecting store: the fail-closed law.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::disallowed_methods,
    reason = "test code: a failed assumption should fail the test loudly; the e2e TOTP client reads the real clock like an authenticator app"
)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use medvault_core::{Caller, MasterKeySource, Password, Role, Vault, VaultOptions};
use medvault_server::{router, AppState, HttpOptions};
use medvault_store::{faulty::FaultyStore, PgStore, SqliteStore, Store};
use medvault_types::ManualClock;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Fixture {
    _db: Option<PgDb>,
    _dir: tempfile::TempDir,
    faulty: Arc<FaultyStore>,
    app: axum::Router,
    token: String,
}

struct PgDb(String, String);

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = PgStore::drop_database(&self.0, &self.1);
    }
}

/// SQLite always; PostgreSQL too when `MEDVAULT_TEST_PG_URL` is set.
fn backends() -> Vec<bool> {
    if std::env::var("MEDVAULT_TEST_PG_URL").is_ok() {
        vec![false, true]
    } else {
        vec![false]
    }
}

async fn fixture() -> Fixture {
    fixture_on(false).await
}

async fn fixture_on(pg: bool) -> Fixture {
    // PostgreSQL's client runtime must not be driven from inside the test's runtime.
    tokio::task::spawn_blocking(move || build_fixture(pg))
        .await
        .unwrap()
}

fn build_fixture(pg: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (inner, db): (Arc<dyn Store>, Option<PgDb>) = if pg {
        let admin = std::env::var("MEDVAULT_TEST_PG_URL").unwrap();
        let name = format!("mv_http_{}", medvault_types::random_uuid().replace('-', ""));
        let url = PgStore::create_database(&admin, &name).unwrap();
        let store = PgStore::open(&url).unwrap();
        (store, Some(PgDb(admin, name)))
    } else {
        (
            SqliteStore::open(&dir.path().join("db.sqlite")).unwrap(),
            None,
        )
    };
    let faulty = FaultyStore::new(inner);
    let clock = Arc::new(ManualClock::new(
        time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
    ));
    let (vault, operator) = Vault::open_with_store(
        faulty.clone(),
        &MasterKeySource::Ephemeral,
        clock.clone(),
        VaultOptions::default(),
    )
    .unwrap();
    let vault = Arc::new(vault);
    let u = vault
        .add_user(
            &Caller::cli(&operator, Role::SecurityAdmin),
            "doc",
            Role::Physician,
            Some(Password::new("correct horse battery".into())),
        )
        .unwrap();
    let anonymous = Caller::anonymous(None, "t".into());
    let ch = vault
        .login(
            &anonymous,
            "doc",
            &Password::new("correct horse battery".into()),
        )
        .unwrap();
    let code = medvault_core::totp_now(&u.totp_secret, 1_790_000_000).unwrap();
    let grant = vault
        .login_factor(
            &anonymous,
            &ch.mfa_token,
            &medvault_core::Factor::Totp(&code),
        )
        .unwrap();
    let app = router(AppState {
        vault,
        options: HttpOptions::default(),
    });
    Fixture {
        _db: db,
        _dir: dir,
        faulty,
        app,
        token: grant.token.expose().to_owned(),
    }
}

async fn call(f: &Fixture, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", f.token));
    if body.is_some() {
        b = b.header("content-type", "application/fhir+json");
    }
    let req = b
        .body(
            body.map(|v| Body::from(v.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let res = f.app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_failure_fails_closed_with_no_phi() {
    for pg in backends() {
        fails_closed(fixture_on(pg).await).await;
    }
}

async fn audit_len(f: &Fixture) -> u64 {
    let s = f.faulty.clone();
    tokio::task::spawn_blocking(move || s.audit_len().unwrap())
        .await
        .unwrap()
}

async fn fails_closed(f: Fixture) {
    let (s, body) = call(
        &f,
        "POST",
        "/fhir/Patient",
        Some(json!({"resourceType": "Patient", "name": [{"family": "Failclosed"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let audit_before = audit_len(&f).await;

    f.faulty.set_fail_audit(true);
    // Reads: no PHI leaves without its audit record.
    for uri in [
        format!("/fhir/Patient/{id}"),
        "/fhir/Patient?family=failclosed".into(),
        format!("/fhir/Patient/{id}/$everything"),
        format!("/fhir/Patient/{id}/_history"),
        format!("/fhir/Patient/{id}/_history/1"),
    ] {
        let (s, body) = call(&f, "GET", &uri, None).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert!(!body.contains("Failclosed"), "{uri} leaked PHI: {body}");
        assert!(
            body.contains("OperationOutcome") && body.contains("audit"),
            "{body}"
        );
    }
    // Writes: nothing is written when its audit record cannot be.
    let (s, _) = call(
        &f,
        "POST",
        "/fhir/Patient",
        Some(json!({"resourceType": "Patient", "name": [{"family": "Ghost"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = call(&f, "DELETE", &format!("/fhir/Patient/{id}"), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = call(&f, "POST", "/fhir", Some(json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Ghost"}]}, "request": {"method": "POST", "url": "Patient"}}]}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // Denials are audited too, so they fail closed as well.
    let (s, _) = call(&f, "GET", "/fhir/Claim/nope", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        audit_len(&f).await,
        audit_before,
        "no audit entries were appended"
    );

    f.faulty.set_fail_audit(false);
    let (s, body) = call(&f, "GET", "/fhir/Patient?family=ghost", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !body.contains("Ghost"),
        "the failed writes left nothing behind"
    );
    let (s, body) = call(&f, "GET", &format!("/fhir/Patient/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "the deletion did not happen");
    assert!(body.contains("Failclosed"));
    assert!(audit_len(&f).await > audit_before);
    tokio::task::spawn_blocking(move || drop(f)).await.unwrap();
}

#[tokio::test]
async fn storage_read_failure_is_a_503_without_internals() {
    let f = fixture().await;
    f.faulty.set_fail_reads(true);
    let (s, body) = call(&f, "GET", "/fhir/Patient/abc", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !body.contains("injected"),
        "no internals in the response: {body}"
    );
}

#[tokio::test]
async fn every_response_carries_security_headers() {
    let f = fixture().await;
    for uri in ["/", "/fhir/metadata", "/nope", "/fhir/Patient/zzz"] {
        let req = Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {}", f.token))
            .body(Body::empty())
            .unwrap();
        let res = f.app.clone().oneshot(req).await.unwrap();
        let h = res.headers();
        assert_eq!(
            h["strict-transport-security"], "max-age=63072000; includeSubDomains",
            "{uri}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'"));
    }
}

/// The capability and the typestate, checked by the compiler: a handler cannot reach the
/// store through the gate, nor construct a `Disclosed` or a permission (tests/ui/*.rs, each
/// with the compiler's expected error beside it).
#[test]
fn handlers_cannot_reach_the_store_or_forge_a_disclosure() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
