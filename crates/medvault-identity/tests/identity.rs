#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed assumption should fail the test loudly"
)]
//! Identity against a real store: the attacks of issue 10 (guessing second factors,
//! password guessing, spraying, enumeration) and the lifecycle that must hold.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use medvault_crypto::DataKey;
use medvault_identity::{
    totp_code, Argon2id, Factor, Identity, IdentityError, LockoutPolicy, Password, PasswordHashing,
    Refused, SessionPolicy,
};
use medvault_store::{CredentialRow, Op, SqliteStore, Store, WriteBatch};
use medvault_types::{ManualClock, Role, Username};

/// Counts every hash and verification it is asked for (the work a login does), and
/// does it with cheap Argon2id parameters.
#[derive(Default)]
struct CountingHasher {
    inner: Option<Argon2id>,
    hashes: AtomicUsize,
    verifies: AtomicUsize,
}

impl CountingHasher {
    fn new() -> Self {
        CountingHasher {
            inner: Some(Argon2id::new(1024, 1, 1).unwrap()),
            ..Default::default()
        }
    }
    fn work(&self) -> (usize, usize) {
        (
            self.hashes.load(Ordering::SeqCst),
            self.verifies.load(Ordering::SeqCst),
        )
    }
}

impl PasswordHashing for CountingHasher {
    fn hash(&self, p: &Password) -> Result<String, IdentityError> {
        self.hashes.fetch_add(1, Ordering::SeqCst);
        self.inner.as_ref().unwrap().hash(p)
    }
    fn verify(&self, hash: &str, p: &Password) -> bool {
        self.verifies.fetch_add(1, Ordering::SeqCst);
        self.inner.as_ref().unwrap().verify(hash, p)
    }
    fn is_current(&self, hash: &str) -> bool {
        self.inner.as_ref().unwrap().is_current(hash)
    }
}

struct World {
    _dir: Option<tempfile::TempDir>,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    hasher: Arc<CountingHasher>,
    key: DataKey,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        Self::over(store, Some(dir), DataKey::generate())
    }
    fn over(store: Arc<dyn Store>, dir: Option<tempfile::TempDir>, key: DataKey) -> Self {
        World {
            _dir: dir,
            store,
            clock: Arc::new(ManualClock::new(
                time::macros::datetime!(2026-11-29 08:00 UTC),
            )),
            hasher: Arc::new(CountingHasher::new()),
            key,
        }
    }
    fn identity(&self) -> Identity {
        Identity::new(
            self.store.clone(),
            self.clock.clone(),
            &self.key,
            SessionPolicy::default(),
            LockoutPolicy::default(),
            self.hasher.clone(),
        )
        .unwrap()
    }
    fn apply(&self, ops: Vec<Op>) {
        self.store
            .commit(WriteBatch { ops, audit: vec![] })
            .unwrap();
    }
    fn now(&self) -> i64 {
        medvault_types::Clock::now(&*self.clock).unix_timestamp()
    }
    fn advance(&self, secs: i64) {
        self.clock.advance(time::Duration::seconds(secs));
    }
    /// A user with a known password; returns the TOTP seed and recovery codes.
    fn user(&self, id: &Identity, name: &str) -> (Vec<u8>, Vec<String>) {
        let step = id
            .new_user(
                Username::new(name).unwrap(),
                Role::Nurse,
                Some(pw("correct horse battery")),
                None,
            )
            .unwrap();
        self.apply(step.ops);
        (
            step.value.totp.bytes().to_vec(),
            step.value.recovery_codes.clone(),
        )
    }
    fn code(&self, seed: &[u8]) -> String {
        totp_code(seed, self.now().div_euclid(30))
    }
    /// Applies a refusal's operations and returns its error.
    fn refused(&self, r: Refused) -> IdentityError {
        self.apply(r.ops);
        r.error
    }
}

fn pw(s: &str) -> Password {
    Password::new(s.into())
}

const HOME: Option<&str> = Some("10.1.1.1");
const ELSEWHERE: Option<&str> = Some("203.0.113.9");

fn locked(e: &IdentityError) -> i64 {
    match e {
        IdentityError::Locked { retry_after } => *retry_after,
        other => panic!("expected a lock, got {other:?}"),
    }
}

#[test]
fn wrong_second_factors_kill_the_challenge() {
    let w = World::new();
    let id = w.identity();
    let (seed, _) = w.user(&id, "ann");
    let ch = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap();
    w.apply(ch.ops);
    let token = ch.value.mfa_token;
    for _ in 0..3 {
        let e = id
            .finish_login(&token, &Factor::Totp("000000"), HOME)
            .unwrap_err();
        assert!(matches!(w.refused(e), IdentityError::BadCode));
    }
    let right = w.code(&seed);
    let e = id
        .finish_login(&token, &Factor::Totp(&right), HOME)
        .unwrap_err();
    assert!(
        matches!(e.error, IdentityError::BadChallenge),
        "after three wrong codes the right one no longer works: back to the password"
    );
}

#[test]
fn a_right_answer_racing_wrong_ones_cannot_outlive_the_limit() {
    let w = World::new();
    let id = w.identity();
    let (seed, _) = w.user(&id, "ann");
    let ch = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap();
    w.apply(ch.ops);
    let token = ch.value.mfa_token;
    // The right answer is verified while the challenge is live...
    let ok = id
        .finish_login(&token, &Factor::Totp(&w.code(&seed)), HOME)
        .unwrap();
    // ...but three wrong ones commit first.
    for _ in 0..3 {
        let e = id
            .finish_login(&token, &Factor::Totp("000000"), HOME)
            .unwrap_err();
        w.refused(e);
    }
    assert!(w
        .store
        .commit(WriteBatch {
            ops: ok.ops,
            audit: vec![]
        })
        .is_err());
}

#[test]
fn the_account_locks_after_five_failures_even_to_the_right_password() {
    let w = World::new();
    let id = w.identity();
    w.user(&id, "ann");
    for _ in 0..5 {
        let e = id
            .begin_login("ann", &pw("wrong password!!"), HOME)
            .unwrap_err();
        assert!(matches!(w.refused(e), IdentityError::BadCredentials));
    }
    let before = w.hasher.work();
    let e = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap_err();
    assert_eq!(locked(&e.error), 30);
    assert_eq!(w.hasher.work(), before, "a locked attempt does no hashing");
    // From her own workstation elsewhere, the clinician is not locked out.
    let ok = id.begin_login("ann", &pw("correct horse battery"), ELSEWHERE);
    assert!(ok.is_ok(), "the lock is per account and address");
    // Backoff doubles after the lock passes and she fails again, and is capped.
    w.advance(31);
    let e = id
        .begin_login("ann", &pw("wrong password!!"), HOME)
        .unwrap_err();
    w.refused(e);
    let e = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap_err();
    assert_eq!(locked(&e.error), 60);
    for _ in 0..10 {
        w.advance(1000);
        let e = id
            .begin_login("ann", &pw("wrong password!!"), HOME)
            .unwrap_err();
        w.refused(e);
    }
    let e = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap_err();
    assert_eq!(locked(&e.error), 900, "backoff is capped");
    // A security administrator unlocks.
    w.apply(id.unlock("ann").unwrap());
    assert!(id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .is_ok());
}

#[test]
fn spraying_one_account_from_many_addresses_does_not_stop_her_passkey() {
    let w = World::new();
    let id = w.identity();
    w.user(&id, "ann");
    w.apply(vec![Op::PutCredential(CredentialRow {
        kind: "webauthn".into(),
        id: vec![1, 2, 3],
        username: "ann".into(),
        name: "ward laptop".into(),
        data: vec![0],
        created: 0,
        last_used: 0,
    })]);
    for i in 0..20 {
        let src = format!("198.51.100.{i}");
        let e = id
            .begin_login("ann", &pw("wrong password!!"), Some(&src))
            .unwrap_err();
        w.refused(e);
    }
    let e = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap_err();
    assert!(
        locked(&e.error) > 0,
        "the softer account-wide limit slows passwords"
    );
    let passkey = id.passkey_login("ann", vec![1, 2, 3], vec![1], HOME);
    assert!(
        passkey.is_ok(),
        "a passkey from her workstation still signs her in"
    );
}

#[test]
fn an_address_spraying_many_accounts_is_throttled() {
    let w = World::new();
    let id = w.identity();
    w.user(&id, "ann");
    for i in 0..20 {
        let e = id
            .begin_login(&format!("user{i}"), &pw("Winter2026!!x"), ELSEWHERE)
            .unwrap_err();
        w.refused(e);
    }
    let e = id
        .begin_login("ann", &pw("correct horse battery"), ELSEWHERE)
        .unwrap_err();
    assert!(locked(&e.error) > 0);
    assert!(id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .is_ok());
    w.advance(61 + 30);
    assert!(
        id.begin_login("ann", &pw("correct horse battery"), ELSEWHERE)
            .is_ok(),
        "the address's minute passes"
    );
}

#[test]
fn an_unknown_user_costs_the_same_work_and_gets_the_same_answer() {
    let w = World::new();
    let id = w.identity();
    w.user(&id, "ann");
    let disabled = w.user(&id, "bob");
    let _ = disabled;
    w.apply(id.set_disabled("bob", true).unwrap());
    let mut answers = vec![];
    for name in ["ann", "nobody-here", "bob"] {
        let before = w.hasher.work();
        let e = id
            .begin_login(name, &pw("wrong password!!"), Some(name))
            .unwrap_err();
        let after = w.hasher.work();
        answers.push((after.0 - before.0, after.1 - before.1, e.error.to_string()));
        w.refused(e);
    }
    assert_eq!(answers[0], (0, 1, "invalid credentials".into()));
    assert_eq!(
        answers[0], answers[1],
        "unknown user: same work, same answer"
    );
    assert_eq!(
        answers[0], answers[2],
        "disabled user: same work, same answer"
    );
    // And the lock is the same for a name that does not exist.
    for _ in 0..5 {
        let e = id
            .begin_login("nobody-here", &pw("wrong password!!"), HOME)
            .unwrap_err();
        w.refused(e);
    }
    let e = id
        .begin_login("nobody-here", &pw("wrong password!!"), HOME)
        .unwrap_err();
    assert_eq!(locked(&e.error), 30);
}

#[test]
fn used_totp_and_recovery_codes_are_refused() {
    let w = World::new();
    let id = w.identity();
    let (seed, codes) = w.user(&id, "ann");
    assert_eq!(codes.len(), 10);
    let login = |f: &Factor<'_>| {
        let ch = id
            .begin_login("ann", &pw("correct horse battery"), HOME)
            .unwrap();
        w.apply(ch.ops);
        id.finish_login(&ch.value.mfa_token, f, HOME)
    };
    let code = w.code(&seed);
    w.apply(login(&Factor::Totp(&code)).unwrap().ops);
    assert!(
        login(&Factor::Totp(&code)).is_err(),
        "a TOTP code is accepted once"
    );
    let rc = codes[3].to_lowercase().replace('-', " ");
    let ok = login(&Factor::Recovery(&rc)).unwrap();
    assert_eq!(ok.value.method, "password+recovery");
    w.apply(ok.ops);
    let again = login(&Factor::Recovery(&codes[3])).unwrap_err();
    assert!(matches!(again.error, IdentityError::BadCode));
}

#[test]
fn stronger_parameters_rehash_at_the_next_login() {
    let w = World::new();
    let weak = Identity::new(
        w.store.clone(),
        w.clock.clone(),
        &w.key,
        SessionPolicy::default(),
        LockoutPolicy::default(),
        Arc::new(Argon2id::new(1024, 1, 1).unwrap()),
    )
    .unwrap();
    w.user(&weak, "ann");
    let old = w.store.user("ann").unwrap().unwrap().password_hash;
    let strong = Identity::new(
        w.store.clone(),
        w.clock.clone(),
        &w.key,
        SessionPolicy::default(),
        LockoutPolicy::default(),
        Arc::new(Argon2id::new(2048, 2, 1).unwrap()),
    )
    .unwrap();
    let ch = strong
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap();
    w.apply(ch.ops);
    let new = w.store.user("ann").unwrap().unwrap().password_hash;
    assert_ne!(old, new);
    assert!(new.contains("m=2048,t=2"), "{new}");
    assert!(strong
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .is_ok());
}

#[test]
fn sessions_end_on_disable_password_change_and_mfa_reset() {
    let w = World::new();
    let id = w.identity();
    let (seed, _) = w.user(&id, "ann");
    let sign_in = || {
        let ch = id
            .begin_login("ann", &pw("correct horse battery"), HOME)
            .unwrap();
        w.apply(ch.ops);
        w.advance(30);
        let g = id
            .finish_login(&ch.value.mfa_token, &Factor::Totp(&w.code(&seed)), HOME)
            .unwrap();
        w.apply(g.ops);
        g.value.token
    };
    let t1 = sign_in();
    let t2 = sign_in();
    let me = id.authenticate(&t1).unwrap().value;
    let listed = id.sessions("ann", &me.token_hash).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed.iter().filter(|s| s.current).count(), 1);
    let other = listed.iter().find(|s| !s.current).unwrap();
    w.apply(id.end_session("ann", &other.id).unwrap());
    assert!(id.authenticate(&t2).is_err(), "ended from the list");
    w.apply(id.set_disabled("ann", true).unwrap());
    assert!(matches!(
        id.authenticate(&t1),
        Err(IdentityError::Unauthenticated)
    ));
    w.apply(id.set_disabled("ann", false).unwrap());
    let t3 = sign_in();
    let me = id.authenticate(&t3).unwrap().value;
    let e = id
        .change_password(
            &me.principal,
            &pw("correct horse battery"),
            &pw("password1234"),
            HOME,
        )
        .unwrap_err();
    assert!(matches!(e.error, IdentityError::WeakPassword(_)));
    let ok = id
        .change_password(
            &me.principal,
            &pw("correct horse battery"),
            &pw("a much longer passphrase"),
            HOME,
        )
        .unwrap();
    w.apply(ok.ops);
    assert!(
        id.authenticate(&t3).is_err(),
        "password change ends sessions"
    );
    let reset = id.reset_mfa("ann").unwrap();
    w.apply(reset.ops);
    let ch = id
        .begin_login("ann", &pw("a much longer passphrase"), HOME)
        .unwrap();
    w.apply(ch.ops);
    w.advance(30);
    assert!(
        id.finish_login(&ch.value.mfa_token, &Factor::Totp(&w.code(&seed)), HOME)
            .is_err(),
        "the old TOTP seed no longer works after a reset"
    );
}

#[test]
fn idle_and_absolute_timeouts_and_step_up_window() {
    let w = World::new();
    let id = w.identity();
    let (seed, _) = w.user(&id, "ann");
    let ch = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap();
    w.apply(ch.ops);
    let g = id
        .finish_login(&ch.value.mfa_token, &Factor::Totp(&w.code(&seed)), HOME)
        .unwrap();
    w.apply(g.ops);
    let t = g.value.token;
    let s = id.authenticate(&t).unwrap();
    assert!(id.stepped_up(s.value.mfa_at));
    w.advance(301);
    let s = id.authenticate(&t).unwrap();
    w.apply(s.ops);
    assert!(!id.stepped_up(s.value.mfa_at), "step-up lasts five minutes");
    w.advance(30);
    let up = id
        .step_up(&s.value, &Factor::Totp(&w.code(&seed)), HOME)
        .unwrap();
    w.apply(up.ops);
    assert!(id.stepped_up(id.authenticate(&t).unwrap().value.mfa_at));
    w.advance(901);
    assert!(matches!(id.authenticate(&t), Err(IdentityError::Expired)));
}

#[test]
fn dormant_accounts_cannot_sign_in_and_are_listed() {
    let w = World::new();
    let id = w.identity();
    w.user(&id, "ann");
    w.advance(91 * 86_400);
    assert_eq!(id.dormant_accounts().unwrap(), vec!["ann".to_string()]);
    let e = id
        .begin_login("ann", &pw("correct horse battery"), HOME)
        .unwrap_err();
    assert!(matches!(e.error, IdentityError::BadCredentials));
}

/// Two servers over one PostgreSQL enforce one limit: failures counted through one are
/// seen by the other.
#[test]
fn two_servers_over_one_postgres_share_one_lockout() {
    let Ok(admin) = std::env::var("MEDVAULT_TEST_PG_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the PostgreSQL lockout test: set MEDVAULT_TEST_PG_URL"
        );
        return;
    };
    let name = format!("mv_lock_{}", medvault_types::random_uuid().replace('-', ""));
    let url = medvault_store::PgStore::create_database(&admin, &name).unwrap();
    let key = DataKey::generate();
    let a = medvault_store::PgStore::open(&url).unwrap();
    let b = medvault_store::PgStore::open(&url).unwrap();
    let wa = World::over(a.clone(), None, key.clone());
    let wb = World::over(b.clone(), None, key);
    let (ia, ib) = (wa.identity(), wb.identity());
    wa.user(&ia, "ann");
    for i in 0..5 {
        let (w, id) = if i % 2 == 0 { (&wa, &ia) } else { (&wb, &ib) };
        let e = id
            .begin_login("ann", &pw("wrong password!!"), HOME)
            .unwrap_err();
        w.refused(e);
    }
    for id in [&ia, &ib] {
        let e = id
            .begin_login("ann", &pw("correct horse battery"), HOME)
            .unwrap_err();
        assert_eq!(locked(&e.error), 30, "both servers see the one lock");
    }
    a.close();
    b.close();
    drop((wa, wb, ia, ib, a, b));
    medvault_store::PgStore::drop_database(&admin, &name).unwrap();
}
