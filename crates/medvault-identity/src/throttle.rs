//! The login throttle: failure counters in the store (so every server sharing it enforces
//! one limit), under keys that are MACs of what they count, never the names themselves.
//!
//! Three counters see every failed password, second factor, recovery code or passkey
//! assertion (OWASP Authentication Cheat Sheet, "Account lockout"; NIST SP 800-63B §5.2.2):
//! - the account from this source address: locks after `max_failures` (SPEC: 5);
//! - the account from anywhere: a softer limit (`account_max_failures`) that slows a spray
//!   from many addresses, but does not stop a passkey sign-in, which a sprayer cannot
//!   forge — so lockout cannot be used to keep a clinician out from her own workstation;
//! - the source address over every account: `source_max_failures` a minute.
//!
//! A counter at or over its limit locks for `base_backoff_secs · 2^(over)`, capped at
//! `max_backoff_secs`, from its last failure. Counters are keyed by the name *given*, so
//! an unknown user locks exactly like a known one.

use medvault_crypto::ServiceMac;
use medvault_store::{Op, ThrottleRow};

/// Limits of the login throttle (configuration `[lockout]`).
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    /// Consecutive failures of one account from one address before it locks.
    pub max_failures: i64,
    /// Failures of one account from all addresses before password sign-in slows down.
    pub account_max_failures: i64,
    /// Failures from one address, over all accounts, within a minute.
    pub source_max_failures: i64,
    /// The first lock's length, in seconds; each further failure doubles it.
    pub base_backoff_secs: i64,
    /// The longest lock, in seconds.
    pub max_backoff_secs: i64,
    /// Wrong answers a second-factor challenge survives (then: back to the password).
    pub challenge_attempts: i64,
    /// How long consecutive account failures are remembered, in seconds.
    pub memory_secs: i64,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            max_failures: 5,
            account_max_failures: 20,
            source_max_failures: 20,
            base_backoff_secs: 30,
            max_backoff_secs: 900,
            challenge_attempts: 3,
            memory_secs: 86_400,
        }
    }
}

const SOURCE_WINDOW_SECS: i64 = 60;

/// Which counters a sign-in method answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Password or a second factor after one: every counter.
    Password,
    /// A passkey alone (phishing-resistant): not the account-wide counter.
    Passkey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Pair,
    Account,
    Source,
}

/// The counters of one attempt: account `username` from address `source`.
pub(crate) struct Attempt {
    keys: [(Scope, Vec<u8>); 3],
    subject: Vec<u8>,
    source_subject: Vec<u8>,
}

/// A lock that just began, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEvent {
    /// What locked: "account from this address", "account", "address".
    pub scope: &'static str,
    pub failures: i64,
    pub seconds: i64,
}

pub(crate) fn subject(mac: &ServiceMac, username: &str) -> Vec<u8> {
    mac.tag(&[b"throttle/account", username.to_lowercase().as_bytes()])
        .to_vec()
}

impl Attempt {
    pub(crate) fn new(mac: &ServiceMac, username: &str, source: Option<&str>) -> Self {
        let user = username.to_lowercase();
        let src = source.unwrap_or("");
        let subject = subject(mac, &user);
        let source_subject = mac.tag(&[b"throttle/source", src.as_bytes()]).to_vec();
        Attempt {
            keys: [
                (
                    Scope::Pair,
                    mac.tag(&[b"throttle/pair", user.as_bytes(), src.as_bytes()])
                        .to_vec(),
                ),
                (Scope::Account, subject.clone()),
                (Scope::Source, source_subject.clone()),
            ],
            subject,
            source_subject,
        }
    }

    pub(crate) fn keys(&self) -> Vec<Vec<u8>> {
        self.keys.iter().map(|(_, k)| k.clone()).collect()
    }

    fn limit(p: &LockoutPolicy, scope: Scope) -> i64 {
        match scope {
            Scope::Pair => p.max_failures,
            Scope::Account => p.account_max_failures,
            Scope::Source => p.source_max_failures,
        }
    }

    fn window(p: &LockoutPolicy, scope: Scope) -> i64 {
        match scope {
            Scope::Source => SOURCE_WINDOW_SECS,
            Scope::Pair | Scope::Account => p.memory_secs,
        }
    }

    fn live(p: &LockoutPolicy, scope: Scope, row: &ThrottleRow, now: i64) -> i64 {
        if now - row.window_start >= Self::window(p, scope) {
            0
        } else {
            row.failures
        }
    }

    /// Seconds until the attempt may be made (0 when it may be made now).
    pub(crate) fn retry_after(
        &self,
        p: &LockoutPolicy,
        method: Method,
        rows: &[ThrottleRow],
        now: i64,
    ) -> i64 {
        let mut wait = 0;
        for (scope, key) in &self.keys {
            if method == Method::Passkey && *scope == Scope::Account {
                continue;
            }
            let Some(row) = rows.iter().find(|r| &r.key == key) else {
                continue;
            };
            let failures = Self::live(p, *scope, row, now);
            let limit = Self::limit(p, *scope);
            if failures >= limit {
                let until = row.last_failure + backoff(p, failures - limit);
                wait = wait.max(until - now);
            }
        }
        wait
    }

    /// Seconds the account-wide counter keeps password sign-in locked (for the users API).
    pub(crate) fn account_retry_after(
        &self,
        p: &LockoutPolicy,
        rows: &[ThrottleRow],
        now: i64,
    ) -> i64 {
        let account: Vec<ThrottleRow> = rows
            .iter()
            .filter(|r| {
                self.keys
                    .iter()
                    .any(|(s, k)| *s == Scope::Account && *k == r.key)
            })
            .cloned()
            .collect();
        self.retry_after(p, Method::Password, &account, now)
    }

    /// The operations that count one failure, and the locks it starts.
    pub(crate) fn fail(
        &self,
        p: &LockoutPolicy,
        rows: &[ThrottleRow],
        now: i64,
    ) -> (Vec<Op>, Vec<LockEvent>) {
        let mut ops = vec![];
        let mut events = vec![];
        for (scope, key) in &self.keys {
            let window = Self::window(p, *scope);
            ops.push(Op::CountFailure {
                key: key.clone(),
                subject: if *scope == Scope::Source {
                    self.source_subject.clone()
                } else {
                    self.subject.clone()
                },
                at: now,
                window_secs: window,
            });
            let before = rows
                .iter()
                .find(|r| &r.key == key)
                .map(|r| Self::live(p, *scope, r, now))
                .unwrap_or(0);
            let after = before + 1;
            let limit = Self::limit(p, *scope);
            if after >= limit {
                events.push(LockEvent {
                    scope: match scope {
                        Scope::Pair => "account from this address",
                        Scope::Account => "account",
                        Scope::Source => "address",
                    },
                    failures: after,
                    seconds: backoff(p, after - limit),
                });
            }
        }
        (ops, events)
    }

    /// The operations that forget this account's failures from this address after a
    /// completed sign-in (the address's own counter stays: it spans accounts).
    pub(crate) fn succeed(&self, rows: &[ThrottleRow]) -> Vec<Op> {
        self.keys
            .iter()
            .filter(|(scope, key)| *scope != Scope::Source && rows.iter().any(|r| &r.key == key))
            .map(|(_, key)| Op::ClearFailures { key: key.clone() })
            .collect()
    }
}

/// The lock length after `over` failures beyond the limit: base · 2^over, capped.
pub(crate) fn backoff(p: &LockoutPolicy, over: i64) -> i64 {
    let shift = u32::try_from(over.clamp(0, 30)).unwrap_or(30);
    p.base_backoff_secs
        .saturating_mul(1_i64 << shift)
        .min(p.max_backoff_secs)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = LockoutPolicy::default();
        assert_eq!(backoff(&p, 0), 30);
        assert_eq!(backoff(&p, 1), 60);
        assert_eq!(backoff(&p, 4), 480);
        assert_eq!(backoff(&p, 5), 900);
        assert_eq!(backoff(&p, 1000), 900);
    }
}
