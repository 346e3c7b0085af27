//! Resource limits: request rates per source address and per token (token buckets), the
//! limits' configuration, and the middleware answering `429 Too Many Requests` with
//! `Retry-After` (RFC 6585 §4, RFC 9110 §10.2.3).
//!
//! Connection-level limits (TLS handshake, header and body read timeouts, concurrent
//! connections) are applied by [`crate::serve`] and [`crate::read_body_first`] from the
//! same [`Limits`].

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiError;

/// A sustained rate and the burst allowed above it (a token bucket of `burst` tokens
/// refilled at `per_sec`). `per_sec == 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_sec: f64,
    /// Requests allowed at once after a quiet spell (at least 1).
    pub burst: f64,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        per_sec: 0.0,
        burst: 0.0,
    };

    fn is_off(self) -> bool {
        self.per_sec <= 0.0
    }
}

/// The server's resource limits (`[limits]` in `medvault.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this of the connection becoming ready for
    /// them (so it is also how long an idle keep-alive HTTP/1.1 connection is kept).
    pub header_timeout: Duration,
    /// A request's body must arrive within this (else `408`, connection closed).
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one ends.
    pub max_connections: usize,
    /// Requests per source address (the client's, behind a trusted proxy).
    pub per_address: Rate,
    /// Requests per bearer token or session.
    pub per_token: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            // nginx's client_header_timeout; also how long an idle keep-alive connection
            // stays open (clients reusing a pooled connection rarely wait longer).
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: 4096,
            // Far above a person's pace and an interface engine's usual one: the limits stop
            // floods and runaway clients; reading too much is detection's to judge.
            per_address: Rate {
                per_sec: 1000.0,
                burst: 2000.0,
            },
            per_token: Rate {
                per_sec: 500.0,
                burst: 1000.0,
            },
        }
    }
}

/// Buckets are kept in this many independently locked shards.
const SHARDS: usize = 16;
/// A shard holding more buckets than this forgets the full (idle) ones.
const SHARD_CAPACITY: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets for one kind of key.
struct Buckets<K> {
    rate: Rate,
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: Rate) -> Self {
        Buckets {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token for `key` at `now`: `Ok` or the wait until one is available.
    fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let burst = self.rate.burst.max(1.0);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let shard = (h.finish() % SHARDS as u64) as usize;
        let Some(lock) = self.shards.get(shard) else {
            return Ok(());
        };
        let mut map = match lock.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= SHARD_CAPACITY && !map.contains_key(key) {
            let rate = self.rate.per_sec;
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            // Still full of busy keys (a flood from very many addresses): memory stays
            // bounded; this shard's keys start again with full buckets.
            if map.len() >= SHARD_CAPACITY {
                map.clear();
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate.per_sec;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - b.tokens) / self.rate.per_sec,
            ))
        }
    }
}

/// The request-rate limiter of one server.
pub(crate) struct Limiter {
    addresses: Buckets<IpAddr>,
    tokens: Buckets<Vec<u8>>,
}

impl Limiter {
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Limiter {
            addresses: Buckets::new(limits.per_address),
            tokens: Buckets::new(limits.per_token),
        })
    }

    /// One request from `address` carrying `token` (its hash): `Err(wait)` when either is
    /// over its rate.
    fn admit(&self, address: Option<IpAddr>, token: Option<Vec<u8>>) -> Result<(), Duration> {
        let now = Instant::now();
        if let Some(a) = address {
            self.addresses.take(&network_of(a), now)?;
        }
        if let Some(t) = token {
            self.tokens.take(&t, now)?;
        }
        Ok(())
    }
}

/// The key an address is limited under: an IPv4 address, or an IPv6 address's /64 (one
/// subscriber's network: a client holds a whole /64 and could otherwise take a new address
/// for every request).
fn network_of(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => a,
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
    }
}

/// `429` with `Retry-After` (whole seconds, at least 1) and an OperationOutcome.
fn throttled(wait: Duration) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as i64;
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        medvault_fhir::IssueCode::Throttled,
        format!("too many requests; try again in {secs} seconds"),
    );
    e.retry_after = Some(secs);
    e.into_response()
}

/// Middleware: every request counts against its source address and its token.
pub(crate) async fn rate_limit(
    axum::extract::State((limiter, trusted)): axum::extract::State<(
        Arc<Limiter>,
        Arc<Vec<IpAddr>>,
    )>,
    req: Request,
    next: Next,
) -> Response {
    let address = crate::source_address(req.extensions(), req.headers(), &trusted);
    let token = crate::bearer(req.headers()).map(|(t, _)| t.hash());
    match limiter.admit(address, token) {
        Ok(()) => next.run(req).await,
        Err(wait) => throttled(wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let b = Buckets::new(Rate {
            per_sec: 10.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.take(&1u8, t0).is_ok());
        }
        let wait = b.take(&1u8, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        assert!(b.take(&2u8, t0).is_ok());
        // A tenth of a second later one more request is allowed, then not.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(&1u8, t1).is_ok());
        assert!(b.take(&1u8, t1).is_err());
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(network_of(a), network_of(b));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(network_of(v4), v4);
    }

    #[test]
    fn an_off_limit_admits_everything() {
        let b = Buckets::new(Rate::OFF);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert!(b.take(&1u8, t0).is_ok());
        }
    }

    #[test]
    fn idle_buckets_are_forgotten_when_a_shard_is_full() {
        let b = Buckets::new(Rate {
            per_sec: 1000.0,
            burst: 1.0,
        });
        let t0 = Instant::now();
        for k in 0..(SHARD_CAPACITY * SHARDS * 2) as u32 {
            let _ = b.take(&k, t0);
        }
        let later = t0 + Duration::from_secs(1);
        let _ = b.take(&u32::MAX, later);
        let total: usize = b.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= SHARD_CAPACITY * SHARDS, "{total}");
    }
}
