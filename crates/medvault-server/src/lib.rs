//! medvault-server — HTTPS transport: the FHIR R4 REST API and authentication
//! endpoints over axum, TLS 1.3 only (rustls), security headers on every response.
//!
//! Transport code only parses, calls the gate ([`medvault_core::Vault`]) and renders.
//! This room must never talk to the store, never log request bodies, query strings or
//! tokens, never answer in plaintext HTTP, and never turn an error's cause into a
//! response body (the client gets a generic OperationOutcome; the log gets the cause).
#![forbid(unsafe_code)]

mod admin;
mod auth;
mod bulk;
mod compliance;
mod destruction;
mod detect;
mod error;
mod fhir;
mod limits;
mod records;
mod smart;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use medvault_core::{Caller, Token, Vault, VaultError};
use medvault_fhir::IssueCode;
use medvault_types::Purpose;

pub use error::ApiError;
pub use limits::{Limits, Rate};
pub use tls::{
    certificate_not_after, load_tls_config, serve, tls_config, CertificateReloader, TlsError,
};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
pub const SESSION_COOKIE: &str = "medvault_session";

/// Server settings (from `medvault.toml`).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub max_body_bytes: usize,
    /// The URL clients reach the server at (`https://host:port`, no trailing slash): every
    /// link, `Location` and `fullUrl` is built from it, never from the request's `Host`.
    pub public_base_url: String,
    /// Reverse proxies whose `X-Forwarded-For`/`-Proto`/`-Host` headers are believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Timeouts, connection and request-rate limits.
    pub limits: Limits,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body_bytes: 8 * 1024 * 1024,
            public_base_url: "https://localhost".into(),
            trusted_proxies: vec![],
            limits: Limits::default(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub vault: Arc<Vault>,
    pub options: HttpOptions,
}

/// The peer address of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

#[derive(Debug, Clone)]
struct RequestId(String);

/// Unseals a server: checks a passphrase and opens the gate with it (the binary's).
pub type Unseal = Arc<dyn Fn(&str) -> Result<(), VaultError> + Send + Sync>;

/// The router of a sealed server (SPEC "Keys, backup, destruction": the passphrase
/// provider): every request answers `503` with the OperationOutcome code `sealed`, except
/// `GET /sys/seal-status` and `POST /sys/unseal {"passphrase"}` — accepted from the machine
/// itself (a loopback peer) only — which runs `unseal` off the async runtime and answers
/// `200` once open, `401` for a wrong passphrase.
pub fn sealed_router(unseal: Unseal) -> Router {
    async fn status() -> Response {
        plain_json(StatusCode::OK, serde_json::json!({"sealed": true}))
    }
    // The request body is read (within the 4 KiB limit) before the answer, so a client's
    // kept-alive connection stays in step.
    async fn sealed(_body: axum::body::Bytes) -> Response {
        ApiError::sealed().into_response()
    }
    // Five wrong passphrases in a row lock unsealing for a minute (each try already costs
    // an Argon2id derivation).
    let throttle: Arc<std::sync::Mutex<(u32, Option<std::time::Instant>)>> =
        Arc::new(std::sync::Mutex::new((0, None)));
    let open = move |peer: Option<Extension<Peer>>, body: axum::body::Bytes| {
        let unseal = unseal.clone();
        let throttle = throttle.clone();
        async move {
            let locked = throttle
                .lock()
                .ok()
                .and_then(|t| t.1)
                .and_then(|until| until.checked_duration_since(std::time::Instant::now()));
            if let Some(left) = locked {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    IssueCode::Throttled,
                    "too many wrong passphrases; try again in a minute",
                );
                e.retry_after = Some(i64::try_from(left.as_secs()).unwrap_or(60).max(1));
                return e.into_response();
            }
            if !peer.is_some_and(|Extension(p)| p.0.ip().is_loopback()) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    IssueCode::Forbidden,
                    "unseal from the server's own machine: medvault unseal",
                )
                .into_response();
            }
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                passphrase: String,
            }
            let Ok(b) = serde_json::from_slice::<Body>(&body) else {
                return ApiError::bad_request("body must be {\"passphrase\": TEXT}")
                    .into_response();
            };
            match tokio::task::spawn_blocking(move || unseal(&b.passphrase)).await {
                Ok(Ok(())) => plain_json(StatusCode::OK, serde_json::json!({"sealed": false})),
                Ok(Err(VaultError::Identity(_))) => {
                    if let Ok(mut t) = throttle.lock() {
                        t.0 += 1;
                        if t.0 >= 5 {
                            *t = (
                                0,
                                Some(
                                    std::time::Instant::now() + std::time::Duration::from_secs(60),
                                ),
                            );
                        }
                    }
                    tracing::warn!("unseal refused: wrong passphrase");
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        IssueCode::Login,
                        "the passphrase does not open the master key",
                    )
                    .into_response()
                }
                Ok(Err(e)) => ApiError::from(e).into_response(),
                Err(_) => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    IssueCode::Exception,
                    "internal error",
                )
                .into_response(),
            }
        }
    };
    Router::new()
        .route("/sys/seal-status", get(status))
        .route("/sys/unseal", post(open))
        .fallback(sealed)
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Builds the application router (also used in-process by tests with `oneshot`). Every
/// route also answers with a trailing slash (`/fhir/`, `/fhir/Patient/`, …): the path is
/// trimmed before routing, as FHIR clients that post transactions to `BASE/` expect.
pub fn router(state: AppState) -> Router {
    router_with_console(state, None)
}

/// [`router`] with the web console's pages (`medvault-web`) served beside the API: the
/// console owns `/` and its own paths, and every console request carries the anonymous
/// [`Caller`] (source address behind trusted proxies, request id) as a request extension,
/// so the console authenticates exactly as the API does. Security headers, the body limit
/// and the request log apply to both; the console sets its own stricter
/// `Content-Security-Policy`, which is kept.
pub fn router_with_console(state: AppState, console: Option<Router>) -> Router {
    let routes = routes(state, console);
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .map_request(trim_trailing_slash)
            .service(routes),
    )
}

/// A method the path does not support: 405 with an OperationOutcome naming it (a
/// conditional delete, `DELETE /fhir/Type?search`, is the common case), never an empty
/// body.
async fn method_not_allowed(req: Request) -> ApiError {
    let method = req.method().as_str().chars().take(16).collect::<String>();
    let path = req.uri().path();
    let what = if req.method() == axum::http::Method::DELETE
        && path
            .strip_prefix("/fhir/")
            .is_some_and(|t| medvault_fhir::ResourceType::parse(t).is_some())
    {
        "conditional delete (DELETE /fhir/Type?search) is not supported; delete by id".to_owned()
    } else {
        format!("{method} is not supported on this path")
    };
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        medvault_fhir::IssueCode::NotSupported,
        what,
    )
}

/// `/fhir/Patient/?x=1` → `/fhir/Patient?x=1` (the root `/` stays).
fn trim_trailing_slash(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let pq = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_owned(),
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

fn routes(state: AppState, console: Option<Router>) -> Router {
    let outer = match console {
        Some(c) => Router::new().merge(c.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            console_origin,
        ))),
        None => Router::new().route("/", get(home)),
    };
    let api = Router::new()
        .route("/auth/login", post(auth::login))
        .route("/auth/mfa/totp", post(auth::mfa_totp))
        .route("/auth/mfa/recovery", post(auth::mfa_recovery))
        .route("/auth/step-up/totp", post(auth::step_up_totp))
        .route("/auth/step-up/recovery", post(auth::step_up_recovery))
        .route(
            "/auth/step-up/webauthn/start",
            post(auth::step_up_webauthn_start),
        )
        .route(
            "/auth/step-up/webauthn/finish",
            post(auth::step_up_webauthn_finish),
        )
        .route("/auth/password", post(auth::change_password))
        .route("/auth/sessions", get(auth::sessions))
        .route(
            "/auth/sessions/{id}",
            axum::routing::delete(auth::end_session),
        )
        .route("/auth/recovery-codes", post(auth::recovery_codes))
        .route(
            "/auth/webauthn/register/start",
            post(auth::webauthn_register_start),
        )
        .route(
            "/auth/webauthn/register/finish",
            post(auth::webauthn_register_finish),
        )
        .route(
            "/auth/webauthn/login/start",
            post(auth::webauthn_login_start),
        )
        .route(
            "/auth/webauthn/login/finish",
            post(auth::webauthn_login_finish),
        )
        .route(
            "/auth/webauthn/passwordless/start",
            post(auth::passwordless_start),
        )
        .route(
            "/auth/webauthn/passwordless/finish",
            post(auth::passwordless_finish),
        )
        .route("/auth/webauthn/credentials", get(auth::passkeys))
        .route("/auth/oidc/{name}/start", get(auth::oidc_start))
        .route("/auth/oidc/{name}/callback", get(auth::oidc_callback))
        .route(
            "/auth/webauthn/credentials/{id}",
            axum::routing::delete(auth::revoke_passkey),
        )
        .route("/auth/logout", post(auth::logout))
        .route("/auth/token", post(auth::token))
        .route(
            "/.well-known/smart-configuration",
            get(smart::configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart::configuration),
        )
        .route("/api/apps", get(smart::apps).post(smart::register))
        .route("/api/apps/launch", post(smart::launch))
        .route("/api/apps/{id}", axum::routing::delete(smart::remove))
        .route("/api/app-grants", get(smart::grants))
        .route("/api/app-grants/{id}", axum::routing::delete(smart::revoke))
        .route("/api/users", get(admin::users).post(admin::add_user))
        .route("/api/users/{name}/{action}", post(admin::user_action))
        .route("/api/status", get(admin::status))
        .route("/api/break-glass", post(admin::break_glass))
        .route("/api/break-glass/reviews", get(admin::break_glass_reviews))
        .route(
            "/api/break-glass/{id}/review",
            post(admin::review_break_glass),
        )
        .route(
            "/api/incidents",
            get(admin::incidents).post(compliance::open_incident),
        )
        .route(
            "/api/incidents/{id}",
            get(compliance::incident).post(compliance::act),
        )
        .route("/api/incidents/{id}/letter", get(compliance::letter))
        .route(
            "/api/incidents/{id}/hhs-report",
            get(compliance::hhs_report),
        )
        .route("/api/breach/assess", post(compliance::assess))
        .route(
            "/api/patients/{id}/accounting-requests",
            post(compliance::request_accounting),
        )
        .route(
            "/api/accounting-requests",
            get(compliance::accounting_requests),
        )
        .route(
            "/api/accounting-requests/{id}/extend",
            post(compliance::extend_accounting),
        )
        .route(
            "/api/accounting-requests/{id}/provided",
            post(compliance::accounting_provided),
        )
        .route("/api/assets", get(compliance::assets))
        .route(
            "/api/assets/{id}",
            axum::routing::put(compliance::put_asset),
        )
        .route("/api/training", get(compliance::training))
        .route("/api/training/mine", get(compliance::my_training))
        .route(
            "/api/training/courses/{id}",
            axum::routing::put(compliance::put_course),
        )
        .route(
            "/api/training/settings",
            axum::routing::put(compliance::training_settings),
        )
        .route("/api/training/completions", post(compliance::complete))
        .route("/api/training/phishing", post(compliance::phishing))
        .route("/api/compliance/safeguards", get(compliance::safeguards))
        .route("/api/compliance/attestations", post(compliance::attest))
        .route(
            "/api/compliance/risks/{id}",
            axum::routing::put(compliance::put_risk),
        )
        .route("/api/compliance/reviews", post(compliance::review))
        .route(
            "/api/compliance/notice",
            get(compliance::notice).put(compliance::put_notice),
        )
        .route("/api/reminders", get(compliance::reminders))
        .route(
            "/api/privacy/authorizations",
            get(compliance::authorizations).post(compliance::authorize),
        )
        .route(
            "/api/privacy/authorizations/{id}/revoke",
            post(compliance::revoke_authorization),
        )
        .route(
            "/api/privacy/npp-acknowledgements",
            get(compliance::npp_acknowledgements).post(compliance::acknowledge_npp),
        )
        .route(
            "/api/privacy/processing-activities",
            get(compliance::activities),
        )
        .route(
            "/api/privacy/processing-activities/{id}",
            axum::routing::put(compliance::put_activity),
        )
        .route(
            "/api/privacy/consents",
            get(compliance::consents).post(compliance::consent),
        )
        .route(
            "/api/privacy/consents/{id}/withdraw",
            post(compliance::withdraw),
        )
        .route(
            "/api/privacy/requests",
            get(compliance::requests).post(compliance::open_request),
        )
        .route(
            "/api/privacy/requests/{id}",
            post(compliance::act_on_request),
        )
        .route(
            "/api/privacy/requests/{id}/bundle",
            get(compliance::request_bundle),
        )
        .route("/api/staff", get(detect::staff))
        .route("/api/staff/import", post(detect::import_staff))
        .route("/api/staff/{user}", axum::routing::put(detect::put_staff))
        .route("/api/alerts", get(detect::alerts))
        .route("/api/alerts/{id}", get(detect::alert))
        .route("/api/alerts/{id}/status", post(detect::alert_status))
        .route(
            "/api/suppressions",
            get(detect::suppressions).post(detect::add_suppression),
        )
        .route(
            "/api/suppressions/{id}",
            axum::routing::delete(detect::end_suppression),
        )
        .route("/api/patients/{id}/portal-links", post(admin::link_portal))
        .route(
            "/api/patients/{id}/portal-links/{username}",
            axum::routing::delete(admin::unlink_portal),
        )
        .route(
            "/api/policies",
            get(admin::policies).put(admin::propose_policy),
        )
        .route(
            "/api/policies/{version}/approve",
            post(admin::approve_policy),
        )
        .route(
            "/audit/checkpoint",
            get(admin::checkpoint).post(admin::checkpoint_now),
        )
        .route("/audit/key", get(admin::key))
        .route("/audit/checkpoint/{size}", get(admin::checkpoint_at))
        .route("/audit/cosignature", post(admin::cosignature))
        .route("/audit/tile/{*path}", get(admin::tile))
        .route("/api/audit/proof/inclusion", get(admin::inclusion))
        .route("/api/audit/proof/consistency", get(admin::consistency))
        .route("/api/audit/entries", get(admin::entries))
        .route(
            "/api/patients/{id}/access-report",
            get(admin::access_report),
        )
        .route("/api/patients/{id}/disclosures", get(admin::disclosures))
        .route("/api/disclosures", post(admin::record_disclosure))
        .route("/api/keys/evict", post(admin::evict_key))
        .route("/api/keys/status", get(admin::key_status))
        .route("/api/patients/{id}/destruction", post(destruction::request))
        .route("/api/destruction", get(destruction::list))
        .route("/api/destruction/key", get(destruction::key))
        .route(
            "/api/destruction/{id}/certificate",
            get(destruction::certificate),
        )
        .route("/api/destruction/{id}/{action}", post(destruction::decide))
        .route(
            "/api/patients/{id}/legal-holds",
            post(destruction::set_hold),
        )
        .route("/api/legal-holds", get(destruction::holds))
        .route(
            "/api/legal-holds/{id}/release",
            post(destruction::release_hold),
        )
        .route("/api/records/dashboard", get(records::dashboard))
        .route(
            "/api/records/site",
            get(records::site).put(records::put_site),
        )
        .route("/api/records/rooms", get(records::rooms))
        .route(
            "/api/records/rooms/{id}",
            axum::routing::put(records::put_room),
        )
        .route(
            "/api/records/volumes",
            get(records::volumes).post(records::register),
        )
        .route("/api/records/volumes/{barcode}", get(records::volume))
        .route(
            "/api/records/volumes/{barcode}/custody",
            post(records::custody),
        )
        .route("/api/records/badge-events", post(records::badges))
        .route(
            "/api/records/keys",
            get(records::keys).post(records::add_key),
        )
        .route("/api/records/keys/{id}/custody", post(records::key_act))
        .route(
            "/api/records/footage-reviews",
            get(records::footage).post(records::add_footage),
        )
        .route(
            "/api/records/visitors",
            get(records::visitors).post(records::sign_in),
        )
        .route(
            "/api/records/visitors/{id}/sign-out",
            post(records::sign_out),
        )
        .route(
            "/api/records/holds",
            get(records::holds).post(records::set_hold),
        )
        .route(
            "/api/records/holds/{id}/release",
            post(records::release_hold),
        )
        .route(
            "/api/records/destruction",
            get(records::destructions).post(records::request_destruction),
        )
        .route(
            "/api/records/destruction/{id}/certificate",
            get(records::certificate),
        )
        .route(
            "/api/records/destruction/{id}/{action}",
            post(records::decide_destruction),
        )
        .route("/api/retention/due", get(records::due))
        .route(
            "/api/retention/schedules",
            get(records::schedules).post(records::propose),
        )
        .route(
            "/api/retention/schedules/{id}/approve",
            post(records::approve),
        )
        .route("/fhir/metadata", get(fhir::metadata))
        .route("/fhir/$export", get(bulk::system).post(bulk::system))
        .route(
            "/fhir/Patient/$export",
            get(bulk::patients).post(bulk::patients),
        )
        .route(
            "/fhir/Group/{id}/$export",
            get(bulk::group).post(bulk::group),
        )
        .route(
            "/fhir/$export-status/{id}",
            get(bulk::status).delete(bulk::cancel),
        )
        .route("/fhir/$export-file/{id}/{name}", get(bulk::file))
        .route("/fhir", post(fhir::transaction))
        .route(
            "/fhir/AuditEvent",
            get(fhir::audit_events)
                .post(fhir::audit_events_read_only)
                .put(fhir::audit_events_read_only),
        )
        .route(
            "/fhir/AuditEvent/{id}",
            get(fhir::audit_event)
                .put(fhir::audit_events_read_only)
                .delete(fhir::audit_events_read_only),
        )
        .route(
            "/fhir/{rtype}",
            get(fhir::search).post(fhir::create).put(fhir::update_where),
        )
        .route(
            "/fhir/{rtype}/{id}",
            get(fhir::read).put(fhir::update).delete(fhir::delete),
        )
        .route("/fhir/{rtype}/{id}/{op}", get(fhir::instance_op))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(fhir::vread))
        .with_state(state.clone());
    outer
        .merge(api)
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(json_only))
        .layer(axum::middleware::from_fn_with_state(
            (
                state.options.max_body_bytes,
                state.options.limits.body_timeout,
            ),
            read_body_first,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (
                limits::Limiter::new(&state.options.limits),
                Arc::new(state.options.trusted_proxies.clone()),
            ),
            limits::rate_limit,
        ))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Puts the anonymous [`Caller`] of a console request (its source, as [`Ctx`] decides it,
/// and its request id) into the request's extensions.
async fn console_origin(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    // The purpose header is the API's; a malformed one must not stop a page.
    parts.headers.remove("x-purpose-of-use");
    let anonymous = match Ctx::from_request_parts(&mut parts, &state).await {
        Ok(ctx) => ctx.anonymous(),
        Err(_) => Caller::anonymous(None, medvault_types::random_uuid()),
    };
    parts.extensions.insert(anonymous);
    next.run(Request::from_parts(parts, body)).await
}

/// medvault speaks FHIR JSON only: a FHIR request whose `Accept` header or `_format`
/// parameter asks for anything else (`application/fhir+xml`, `xml`, `ttl`, …) is answered
/// 406 Not Acceptable, never with JSON it did not ask for.
async fn json_only(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/fhir" || path.starts_with("/fhir/") {
        // A Bulk Data file is NDJSON (and asked for as such).
        let ndjson_ok = path.starts_with("/fhir/$export-file/");
        let json = |m: &str| {
            // (`+` arrives as a space when a client does not escape it in a query string.)
            let m = m
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let m = m.replace(' ', "+");
            matches!(
                m.as_str(),
                "application/fhir+json" | "application/json" | "application/*" | "*/*" | "json"
            ) || (ndjson_ok
                && matches!(
                    m.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ))
        };
        let format_ok = req
            .uri()
            .query()
            .filter(|q| q.contains("_format"))
            .map(|q| {
                serde_urlencoded::from_str::<Vec<(String, String)>>(q)
                    .unwrap_or_default()
                    .iter()
                    .filter(|(k, _)| k == "_format")
                    .all(|(_, v)| json(v))
            })
            .unwrap_or(true);
        let accept_ok = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let accept_ok = accept_ok.is_empty() || accept_ok.iter().any(|m| json(m));
        if !format_ok || !accept_ok {
            return ApiError::new(
                axum::http::StatusCode::NOT_ACCEPTABLE,
                medvault_fhir::IssueCode::NotSupported,
                "medvault serves FHIR JSON only (application/fhir+json)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Reads the whole request body (up to `limit` bytes) before any handler answers, so an
/// answer that needs no body — 401, 404, 415, a denial — never leaves unread bytes on the
/// connection: over HTTP/1.1 the connection stays good for the client's next request, over
/// HTTP/2 the stream ends cleanly instead of being reset. A body over the limit is a 413
/// and, over HTTP/1.1, the connection is closed (the rest of the body is not read).
async fn read_body_first(
    axum::extract::State((limit, timeout)): axum::extract::State<(usize, std::time::Duration)>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let read = match declared {
        Some(n) if n > limit => None,
        // A body trickled in slower than the limit allows (slow-loris): 408, and the
        // connection is closed.
        _ => match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
            Ok(r) => r.ok(),
            Err(_) => {
                let mut res = ApiError::new(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    medvault_fhir::IssueCode::Timeout,
                    "the request body did not arrive in time",
                )
                .into_response();
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return res;
            }
        },
    };
    match read {
        Some(bytes) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        None => {
            let mut res = ApiError::too_large(limit).into_response();
            if parts.version <= axum::http::Version::HTTP_11 {
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        }
    }
}

async fn home() -> Html<&'static str> {
    Html(include_str!("home.html"))
}

/// Request id, security headers on every response, and one log line per request
/// (method, path and status only: no query strings, bodies or tokens).
async fn security_headers(mut req: Request, next: Next) -> Response {
    let id = medvault_types::random_uuid();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().chars().take(200).collect::<String>();
    let mut res = next.run(req).await;
    // An extractor's own rejection (a path segment that is not UTF-8, a malformed query) is
    // plain text from the framework: every error answer is an OperationOutcome instead.
    let plain_text = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if res.status().is_client_error() && plain_text {
        res = ApiError::new(
            res.status(),
            medvault_fhir::IssueCode::Invalid,
            "the request's path or parameters are malformed",
        )
        .into_response();
    }
    tracing::info!(request_id = %id, %method, %path, status = res.status().as_u16(), "request");
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=63072000; includeSubDomains",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::PRAGMA, "no-cache");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // The console asks for `same-origin` (so its form posts carry their true `Origin`,
    // which it checks); every other answer sends no referrer at all.
    if !h.contains_key(header::REFERRER_POLICY) {
        set(h, header::REFERRER_POLICY, "no-referrer");
    }
    // The console's pages set their own policy (they load their scripts); every other
    // answer gets the strictest.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(
            h,
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        );
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    res
}

/// Request context every handler gets: request id, peer, declared purpose of use.
pub(crate) struct Ctx {
    pub request_id: String,
    pub source: Option<String>,
    pub purpose: Option<Purpose>,
    pub token: Option<Token>,
    /// The FHIR base URL (`{public_base_url}/fhir`) links are built from.
    pub base: String,
    /// False for a state-changing request authenticated by the session cookie that a
    /// browser did not mark as coming from this site (cross-site request forgery).
    pub same_site: bool,
}

/// The client's address: the connection's peer, or — when the peer is one of `trusted`
/// proxies — the address its `X-Forwarded-For` names. What audit records, lockout and the
/// rate limits all key on.
pub(crate) fn source_address(
    ext: &axum::http::Extensions,
    headers: &HeaderMap,
    trusted: &[std::net::IpAddr],
) -> Option<std::net::IpAddr> {
    let peer = ext.get::<Peer>().map(|p| p.0.ip())?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    forwarded(headers, "x-forwarded-for")
        .and_then(|v| v.parse::<std::net::IpAddr>().ok())
        .or(Some(peer))
}

/// A forwarded header value from a trusted proxy, if it is a plausible host or scheme.
fn forwarded<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let v = h.get(name)?.to_str().ok()?;
    let v = v.split(',').next()?.trim();
    (!v.is_empty()
        && v.len() < 256
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
    .then_some(v)
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let peer = parts.extensions.get::<Peer>().map(|p| p.0.ip());
        let trusted = peer.is_some_and(|p| state.options.trusted_proxies.contains(&p));
        // Behind a trusted proxy, the client and the URL it used are the proxy's to tell;
        // from anyone else, X-Forwarded-* is ignored (a client must not choose its own
        // source address or the host written into links).
        let source = source_address(
            &parts.extensions,
            &parts.headers,
            &state.options.trusted_proxies,
        )
        .map(|ip| ip.to_string());
        let mut public = state.options.public_base_url.clone();
        if trusted {
            if let Some(host) = forwarded(&parts.headers, "x-forwarded-host") {
                let proto = match forwarded(&parts.headers, "x-forwarded-proto") {
                    Some("http") => "http",
                    _ => "https",
                };
                public = format!("{proto}://{host}");
            }
        }
        let purpose = match parts.headers.get("x-purpose-of-use") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<Purpose>().ok())
                    .ok_or_else(|| ApiError::bad_request("unknown X-Purpose-Of-Use code"))?,
            ),
        };
        let (token, by_cookie) = match bearer(&parts.headers) {
            Some((t, c)) => (Some(t), c),
            None => (None, false),
        };
        let same_site = !by_cookie
            || parts.method.is_safe()
            || same_origin(&parts.headers, &state.options.public_base_url);
        Ok(Ctx {
            request_id,
            source,
            purpose,
            token,
            base: format!("{public}/fhir"),
            same_site,
        })
    }
}

/// CSRF defence for cookie-authenticated state changes (OWASP CSRF Prevention Cheat
/// Sheet, "Fetch Metadata" and "Verifying Origin"): the browser says the request comes
/// from this site (`Sec-Fetch-Site: same-origin`), or its `Origin` is this server's (the
/// `Host` it was sent to, or the configured public URL). A request with neither is
/// refused: scripts and API clients authenticate with `Authorization: Bearer`.
fn same_origin(h: &HeaderMap, public_base_url: &str) -> bool {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return site == "same-origin";
    }
    let Some(origin) = get("origin") else {
        return false;
    };
    let host_origin = get("host").map(|host| format!("https://{host}"));
    origin == public_base_url.trim_end_matches('/') || host_origin.as_deref() == Some(origin)
}

/// The token a request presents: `Authorization: Bearer` (false) or the session cookie
/// (true).
fn bearer(h: &HeaderMap) -> Option<(Token, bool)> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Some((Token::from_client(rest.trim()), false));
        }
        return None;
    }
    for c in h.get_all(header::COOKIE) {
        let Ok(s) = c.to_str() else { continue };
        for part in s.split(';') {
            if let Some((k, v)) = part.trim().split_once('=') {
                if k == SESSION_COOKIE && !v.is_empty() {
                    return Some((Token::from_client(v), true));
                }
            }
        }
    }
    None
}

/// Runs blocking gate work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| {
        tracing::error!("blocking task failed");
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            medvault_fhir::IssueCode::Exception,
            "internal error",
        )
    })
}

impl Ctx {
    /// The request as a caller not (yet) signed in: its source and id.
    pub(crate) fn anonymous(&self) -> Caller {
        Caller::anonymous(self.source.clone(), self.request_id.clone())
    }
}

/// A request's credentials, checked for presence and origin but not yet against the
/// store: [`PendingCaller::resolve`] authenticates inside the handler's own blocking task,
/// so a request makes one trip off the async runtime instead of two (the hot FHIR
/// handlers).
pub(crate) struct PendingCaller {
    anonymous: Caller,
    token: medvault_core::Token,
    purpose: Option<Purpose>,
}

impl PendingCaller {
    /// As [`caller`], on the blocking side.
    pub(crate) fn resolve(&self, vault: &Vault) -> Result<Caller, medvault_core::VaultError> {
        vault.authenticate(&self.anonymous, &self.token, self.purpose)
    }
}

/// The request's credentials for [`PendingCaller::resolve`]: `401` without a token, `403`
/// for a cross-site cookie-authenticated change.
pub(crate) fn pending_caller(ctx: &Ctx) -> Result<PendingCaller, ApiError> {
    let token = ctx.token.clone().ok_or_else(ApiError::unauthenticated)?;
    if !ctx.same_site {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            medvault_fhir::IssueCode::Security,
            "cross-site request refused: a cookie-authenticated change must come from this site (or use Authorization: Bearer)",
        ));
    }
    Ok(PendingCaller {
        anonymous: ctx.anonymous(),
        token,
        purpose: ctx.purpose,
    })
}

/// Authenticates the request's token into a signed-in [`Caller`].
pub(crate) async fn caller(state: &AppState, ctx: &Ctx) -> Result<Caller, ApiError> {
    let pending = pending_caller(ctx)?;
    let vault = state.vault.clone();
    Ok(blocking(move || pending.resolve(&vault)).await??)
}

/// Runs gate work as the signed-in caller, off the async runtime: what most `/auth` and
/// `/api` handlers are, around their parsing and rendering.
pub(crate) async fn as_caller<T: Send + 'static>(
    state: &AppState,
    ctx: &Ctx,
    f: impl FnOnce(&Vault, &Caller) -> Result<T, medvault_core::VaultError> + Send + 'static,
) -> Result<T, ApiError> {
    let c = caller(state, ctx).await?;
    let vault = state.vault.clone();
    Ok(blocking(move || f(&vault, &c)).await??)
}

/// The signed-in caller if the request carries a token (which must then be valid), else
/// the anonymous caller (whom the policies may allow the public transparency reads).
pub(crate) async fn optional_caller(state: &AppState, ctx: &Ctx) -> Result<Caller, ApiError> {
    if ctx.token.is_none() {
        return Ok(ctx.anonymous());
    }
    caller(state, ctx).await
}

/// Reads a request body up to the configured limit (413 beyond it).
pub(crate) async fn body_bytes(
    state: &AppState,
    req: Request,
) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.options.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

pub(crate) fn with_peer(r: Router, peer: SocketAddr) -> Router {
    r.layer(Extension(Peer(peer)))
}

/// A plain `application/json` response (auth and admin endpoints).
pub(crate) fn plain_json(status: axum::http::StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, serde_json::to_vec(&v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn json_response(status: axum::http::StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (status, serde_json::to_vec(body).unwrap_or_default()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}
