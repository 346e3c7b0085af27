//! medvault-web — the web console: server-rendered pages for clinicians, patients, privacy
//! officers and security administrators, served by `medvault serve` beside the API.
//!
//! The console is transport, like the API: it parses a form, calls the gate
//! ([`medvault_core::Vault`]) as the signed-in caller, and renders what the gate disclosed.
//! It must never talk to the store, never put PHI in a URL (searches post their query;
//! paths carry only opaque ids), never serve inline script or style (its
//! `Content-Security-Policy` forbids both), never accept a state-changing request without
//! the CSRF token of the session (or, before sign-in, of the sign-in form), and never let a
//! page with PHI be cached (`Cache-Control: no-store`, set on every answer by the server).
//!
//! # Adding a page
//! One layout (`templates/base.html`), one way to add a page:
//! 1. a template that `{% extends "base.html" %}` and a struct deriving
//!    [`askama::Template`] with a `chrome: Chrome` field;
//! 2. a handler taking [`Signed`] (the authenticated caller), calling the gate and
//!    returning [`render`]`(…)`; forms carry `<input type="hidden" name="csrf"
//!    value="{{ chrome.csrf }}">` (the guard refuses any POST without it);
//! 3. its route in that module's `routes()`, merged in [`router`];
//! 4. a [`NAV`] entry naming the roles that see it in the navigation (the policy, not the
//!    navigation, decides what they may do there).
//!
//! INVARIANT: every route but `/login*`, `/static/*` and `/session/status` authenticates
//! through [`Signed`], which goes through [`Vault::authenticate`].
#![forbid(unsafe_code)]

mod account;
mod admin;
mod apps;
mod chart;
mod compliance;
mod detect;
pub mod lifecycle;
mod privacy;
mod records;
mod signin;
mod svg;

use std::sync::Arc;

use askama::Template;
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use medvault_core::{Caller, Role, Token, Vault, VaultError};
use sha2::{Digest, Sha256};

/// The session cookie, shared with the API (`HttpOnly; Secure; SameSite=Strict`).
pub const SESSION_COOKIE: &str = "medvault_session";
/// The sign-in form's CSRF cookie (double-submit, before a session exists).
const SIGNIN_CSRF_COOKIE: &str = "medvault_signin";
/// The password step's challenge, carried to the second-factor page.
const MFA_COOKIE: &str = "medvault_mfa";

/// The console's `Content-Security-Policy`: scripts and styles from this origin only (no
/// inline script or style, no `eval`), no framing, forms post only here.
pub const CONSOLE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
base-uri 'none'; object-src 'none'";

/// Console settings (from `medvault.toml`).
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// `session.idle_timeout_secs`: the idle-logoff warning counts down from it.
    pub idle_timeout_secs: i64,
    /// `server.public_base_url` (`https://host:port`): a browser's `Origin` on a form post
    /// must be this, or the `https://` origin of the `Host` the request was sent to.
    pub public_base_url: String,
    /// The backup repository, as the server's operator reaches it (`None`: the backups page
    /// says backups are run from the command line).
    pub backups: Option<BackupDoor>,
}

/// The console's way to the backup repository (see [`lifecycle::BackupConsole`]).
#[derive(Clone)]
pub struct BackupDoor(pub Arc<dyn lifecycle::BackupConsole>);

impl std::fmt::Debug for BackupDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupDoor")
    }
}

#[derive(Clone)]
pub(crate) struct Web {
    pub(crate) vault: Arc<Vault>,
    pub(crate) options: Arc<ConsoleOptions>,
}

/// The console's router, for [`medvault_server::router_with_console`]-style composition by
/// the binary: pages, their static assets, the CSRF guard and the console's CSP.
pub fn router(vault: Arc<Vault>, options: ConsoleOptions) -> Router {
    let web = Web {
        vault,
        options: Arc::new(options),
    };
    Router::new()
        .route("/", get(home))
        .route("/static/{file}", get(asset))
        .merge(signin::routes())
        .merge(account::routes())
        .merge(chart::routes())
        .merge(privacy::routes())
        .merge(detect::routes())
        .merge(admin::routes())
        .merge(lifecycle::routes())
        .merge(records::routes())
        .merge(compliance::routes())
        .merge(apps::routes())
        .layer(axum::middleware::from_fn_with_state(
            web.options.clone(),
            csrf_guard,
        ))
        .layer(axum::middleware::from_fn(console_headers))
        .with_state(web)
}

/// One navigation entry: the page and the roles that see it.
pub struct NavItem {
    pub path: &'static str,
    pub label: &'static str,
    pub roles: &'static [Role],
}

const CLINICAL: &[Role] = &[Role::Physician, Role::Nurse, Role::FrontDesk, Role::Billing];
const PRIVACY: &[Role] = &[Role::PrivacyOfficer, Role::Auditor];
/// Those who run or oversee the paper records and their lifecycle.
const RECORDS: &[Role] = &[
    Role::RecordsClerk,
    Role::PrivacyOfficer,
    Role::Auditor,
    Role::SecurityAdmin,
];
const RETENTION: &[Role] = &[Role::RecordsClerk, Role::PrivacyOfficer, Role::Auditor];

/// The navigation, in order; the first entry a role sees is its home page.
pub const NAV: &[NavItem] = &[
    NavItem {
        path: "/patients",
        label: "Patients",
        roles: CLINICAL,
    },
    NavItem {
        path: "/me",
        label: "My record",
        roles: &[Role::Patient],
    },
    NavItem {
        path: "/me/access",
        label: "Who looked at my record",
        roles: &[Role::Patient],
    },
    NavItem {
        path: "/me/consents",
        label: "My consents",
        roles: &[Role::Patient],
    },
    NavItem {
        path: "/privacy/alerts",
        label: "Alerts",
        roles: &[Role::PrivacyOfficer],
    },
    NavItem {
        path: "/privacy/suppressions",
        label: "Alert suppressions",
        roles: &[Role::PrivacyOfficer],
    },
    NavItem {
        path: "/privacy/reviews",
        label: "Break-the-glass reviews",
        roles: PRIVACY,
    },
    NavItem {
        path: "/privacy/patients",
        label: "Access reports",
        roles: PRIVACY,
    },
    NavItem {
        path: "/privacy/audit-events",
        label: "Audit events",
        roles: PRIVACY,
    },
    NavItem {
        path: "/privacy/integrity",
        label: "Audit log integrity",
        roles: PRIVACY,
    },
    NavItem {
        path: "/privacy/destruction",
        label: "Destruction",
        roles: PRIVACY,
    },
    NavItem {
        path: "/admin/users",
        label: "Users",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/admin/staff",
        label: "Staff profiles",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/admin/policies",
        label: "Policies",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/admin/clients",
        label: "Service clients",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/admin/legal-holds",
        label: "Legal holds",
        roles: &[Role::SecurityAdmin, Role::PrivacyOfficer, Role::Auditor],
    },
    NavItem {
        path: "/admin/keys",
        label: "Keys",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/admin/backups",
        label: "Backups",
        roles: &[Role::SecurityAdmin, Role::Auditor],
    },
    NavItem {
        path: "/admin/status",
        label: "System status",
        roles: &[Role::SecurityAdmin],
    },
    NavItem {
        path: "/records",
        label: "Paper charts",
        roles: RECORDS,
    },
    NavItem {
        path: "/records/rooms",
        label: "Storage rooms",
        roles: RECORDS,
    },
    NavItem {
        path: "/records/visitors",
        label: "Visitor log",
        roles: RECORDS,
    },
    NavItem {
        path: "/records/retention",
        label: "Retention",
        roles: RETENTION,
    },
    NavItem {
        path: "/records/destruction",
        label: "Paper destruction",
        roles: RETENTION,
    },
    NavItem {
        path: "/records/holds",
        label: "Holds on records",
        roles: RECORDS,
    },
    NavItem {
        path: "/incidents",
        label: "Incidents",
        roles: &[Role::PrivacyOfficer, Role::SecurityAdmin],
    },
    NavItem {
        path: "/privacy/requests",
        label: "Privacy requests",
        roles: &[Role::PrivacyOfficer],
    },
    NavItem {
        path: "/compliance",
        label: "Safeguards and risks",
        roles: COMPLIANCE,
    },
    NavItem {
        path: "/compliance/assets",
        label: "Devices and media",
        roles: COMPLIANCE,
    },
    NavItem {
        path: "/training",
        label: "Training",
        roles: STAFF,
    },
    NavItem {
        path: "/exports",
        label: "Exports",
        roles: &[Role::Physician, Role::Nurse, Role::Patient],
    },
    NavItem {
        path: "/apps",
        label: "Apps",
        roles: &[
            Role::Physician,
            Role::Nurse,
            Role::FrontDesk,
            Role::Billing,
            Role::Patient,
            Role::SecurityAdmin,
            Role::PrivacyOfficer,
            Role::Auditor,
            Role::RecordsClerk,
        ],
    },
    NavItem {
        path: "/account",
        label: "My account",
        roles: &[],
    },
];

const COMPLIANCE: &[Role] = &[Role::PrivacyOfficer, Role::SecurityAdmin, Role::Auditor];
const STAFF: &[Role] = &[
    Role::Physician,
    Role::Nurse,
    Role::FrontDesk,
    Role::Billing,
    Role::SecurityAdmin,
    Role::PrivacyOfficer,
    Role::Auditor,
    Role::RecordsClerk,
];

/// A navigation link as the layout renders it.
pub struct NavLink {
    pub href: &'static str,
    pub label: &'static str,
    pub current: bool,
}

/// What the layout needs on every signed-in page.
pub struct Chrome {
    pub title: String,
    pub user: String,
    pub role: String,
    pub nav: Vec<NavLink>,
    /// The session's CSRF token, for every form's hidden `csrf` field.
    pub csrf: String,
    /// Seconds of inactivity before the session ends (the idle warning's countdown).
    pub idle_secs: i64,
}

impl Chrome {
    /// The layout for a page before sign-in: no user, no navigation.
    pub(crate) fn public(title: &str, csrf: &str) -> Chrome {
        Chrome {
            title: title.to_owned(),
            user: String::new(),
            role: String::new(),
            nav: vec![],
            csrf: csrf.to_owned(),
            idle_secs: 0,
        }
    }
}

/// The signed-in caller of a console request.
pub struct Signed {
    pub caller: Caller,
    pub token: Token,
    pub csrf: String,
}

impl Signed {
    pub(crate) fn role(&self) -> Option<Role> {
        self.caller.role()
    }

    pub(crate) fn username(&self) -> String {
        self.caller
            .principal()
            .map(|p| p.username.as_str().to_owned())
            .unwrap_or_default()
    }

    /// The layout's context for a page titled `title` at `path`.
    pub(crate) fn chrome(&self, web: &Web, title: &str, path: &str) -> Chrome {
        let role = self.role();
        let nav = NAV
            .iter()
            .filter(|n| n.roles.is_empty() || role.is_some_and(|r| n.roles.contains(&r)))
            .map(|n| NavLink {
                href: n.path,
                label: n.label,
                current: path == n.path || path.starts_with(&format!("{}/", n.path)),
            })
            .collect();
        Chrome {
            title: title.to_owned(),
            user: self.username(),
            role: role
                .map(|r| r.as_str().replace('_', " "))
                .unwrap_or_default(),
            nav,
            csrf: self.csrf.clone(),
            idle_secs: web.options.idle_timeout_secs,
        }
    }
}

/// The CSRF token bound to a session: SHA-256 over a domain tag and the session token
/// (OWASP CSRF Prevention Cheat Sheet, synchronizer token). Knowing it reveals nothing of
/// the token; only a page rendered for the session carries it.
pub(crate) fn csrf_for(token: &Token) -> String {
    use base64::Engine;
    let mut h = Sha256::new();
    h.update(b"medvault-web csrf v1\0");
    h.update(token.expose().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|c| c.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_owned())
}

/// Adds a `Set-Cookie` (`HttpOnly; Secure; SameSite=Strict`); `max_age` 0 deletes it.
pub(crate) fn set_cookie(r: &mut Response, name: &str, value: &str, path: &str, max_age: i64) {
    let age = if max_age > 0 {
        format!("; Max-Age={max_age}")
    } else if value.is_empty() {
        "; Max-Age=0".to_owned()
    } else {
        String::new()
    };
    let c = format!("{name}={value}; HttpOnly; Secure; SameSite=Strict; Path={path}{age}");
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The anonymous caller the server put on the request (source address, request id).
pub(crate) fn anonymous(parts: &Parts) -> Caller {
    parts
        .extensions
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller::anonymous(None, medvault_types::random_uuid()))
}

/// The caller before sign-in (source address, request id): an extractor that never fails.
pub(crate) struct Anon(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Anon {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Anon(anonymous(parts)))
    }
}

/// The [`NAV`] entry a path belongs to: the longest entry path that is the path itself or
/// a prefix of it ending at a `/`.
fn section_of(path: &str) -> Option<&'static NavItem> {
    NAV.iter()
        .filter(|n| {
            path == n.path
                || path
                    .strip_prefix(n.path)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|n| n.path.len())
}

/// Whether `role` may open pages under `path`: a [`NAV`] entry gates the pages under its
/// path to its roles (an entry without roles, and a path under no entry, is everyone's).
/// The policy still decides every datum; this keeps people off pages that are not theirs —
/// a form they cannot use, a step-up code asked for an action their role may not take.
pub(crate) fn page_allowed(path: &str, role: Option<Role>) -> bool {
    match section_of(path) {
        Some(n) if !n.roles.is_empty() => role.is_some_and(|r| n.roles.contains(&r)),
        _ => true,
    }
}

impl FromRequestParts<Web> for Signed {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, WebError> {
        let anon = anonymous(parts);
        let token = cookie(&parts.headers, SESSION_COOKIE)
            .map(|t| Token::from_client(&t))
            .ok_or(WebError::SignIn)?;
        let vault = web.vault.clone();
        let t = token.clone();
        let caller = blocking(move || vault.authenticate(&anon, &t, None))
            .await?
            .map_err(|e| match e {
                VaultError::Unauthenticated => WebError::SignIn,
                other => WebError::Vault(other),
            })?;
        if !page_allowed(parts.uri.path(), caller.role()) {
            return Err(WebError::NotYours);
        }
        Ok(Signed {
            caller,
            csrf: csrf_for(&token),
            token,
        })
    }
}

/// Runs blocking gate work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WebError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| WebError::Vault(VaultError::Internal("blocking task failed".into())))
}

/// Runs gate work as the signed-in caller.
pub(crate) async fn gate<T: Send + 'static>(
    web: &Web,
    s: &Signed,
    f: impl FnOnce(&Vault, &Caller) -> Result<T, VaultError> + Send + 'static,
) -> Result<T, WebError> {
    let vault = web.vault.clone();
    let c = s.caller.clone();
    Ok(blocking(move || f(&vault, &c)).await??)
}

/// The caller after a step-up: when `code` (an authenticator or recovery code) is given it
/// is verified inside the session first, and the caller is authenticated again so its
/// assurance is fresh; without one, the caller as it is (a step-up within the last five
/// minutes still counts).
async fn stepped_up(web: &Web, s: &Signed, code: &str) -> Result<Caller, WebError> {
    let code: String = code
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(64)
        .collect();
    if code.is_empty() {
        return Ok(s.caller.clone());
    }
    let vault = web.vault.clone();
    let (c, token) = (s.caller.clone(), s.token.clone());
    Ok(blocking(move || {
        let factor = if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) {
            medvault_core::Factor::Totp(&code)
        } else {
            medvault_core::Factor::Recovery(&code)
        };
        vault.step_up(&c, &factor)?;
        let anon = Caller::anonymous(c.source.clone(), c.request_id.clone());
        vault.authenticate(&anon, &token, None)
    })
    .await??)
}

/// Runs a step-up action: `code` verified first ([`stepped_up`]), then `f` as the caller
/// with its fresh assurance. What every form behind a step-up does.
pub(crate) async fn stepped_gate<T: Send + 'static>(
    web: &Web,
    s: &Signed,
    code: &str,
    f: impl FnOnce(&Vault, &Caller) -> Result<T, VaultError> + Send + 'static,
) -> Result<T, WebError> {
    let c = stepped_up(web, s, code).await?;
    let vault = web.vault.clone();
    Ok(blocking(move || f(&vault, &c)).await??)
}

/// Why a console request did not get its page.
#[derive(Debug)]
pub enum WebError {
    /// Not signed in (or the session ended): back to the sign-in page.
    SignIn,
    /// The gate refused or failed.
    Vault(VaultError),
    /// A form the console could not use (400), with what to fix.
    Form(String),
    /// The request's CSRF token is missing or wrong (403).
    Csrf,
    /// A page of another role's section (403; see [`page_allowed`]).
    NotYours,
}

impl From<VaultError> for WebError {
    fn from(e: VaultError) -> Self {
        WebError::Vault(e)
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: &'static str,
    message: String,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        use StatusCode as S;
        let (status, title, message) = match self {
            WebError::SignIn => return Redirect::to("/login").into_response(),
            WebError::Csrf => (
                S::FORBIDDEN,
                "Request refused",
                "This form expired or did not come from this site. Go back, reload the page and try again.".to_owned(),
            ),
            WebError::Form(m) => (S::BAD_REQUEST, "Please check the form", m),
            WebError::NotYours => (
                S::FORBIDDEN,
                "Not permitted",
                "This page belongs to another role's work. Your pages are in the menu.".to_owned(),
            ),
            WebError::Vault(e) => match e {
                VaultError::NotFound | VaultError::Gone => (
                    S::NOT_FOUND,
                    "Not found",
                    "There is nothing here, or nothing you may see.".to_owned(),
                ),
                VaultError::StepUpRequired => (
                    S::UNAUTHORIZED,
                    "Confirm it is you",
                    "This action needs your authenticator code (entered within the last five minutes). Go back and enter it with the form.".to_owned(),
                ),
                VaultError::Unauthenticated => (
                    S::UNAUTHORIZED,
                    "Not accepted",
                    "The code or credential was not accepted.".to_owned(),
                ),
                VaultError::Locked { retry_after } => (
                    S::TOO_MANY_REQUESTS,
                    "Too many attempts",
                    format!("Too many failed attempts: try again in {retry_after} seconds."),
                ),
                VaultError::Busy { retry_after } => (
                    S::TOO_MANY_REQUESTS,
                    "Busy",
                    format!("The server is busy with other exports: try again in {retry_after} seconds."),
                ),
                e @ (VaultError::Forbidden { .. }
                | VaultError::NoRelationship { .. }
                | VaultError::Restricted { .. }
                | VaultError::Refused { .. }
                | VaultError::PurposeNotAllowed { .. }
                | VaultError::SeparationOfDuties(_)
                | VaultError::TrainingLapsed) => (S::FORBIDDEN, "Not permitted", capitalize(&e.to_string())),
                e @ (VaultError::BadRequest(_) | VaultError::Fhir(_)) => {
                    (S::BAD_REQUEST, "Please check the form", capitalize(&e.to_string()))
                }
                VaultError::Unprocessable(m) => (S::UNPROCESSABLE_ENTITY, "Please check the form", capitalize(&m)),
                e @ (VaultError::Duplicate(_) | VaultError::Conflict) => {
                    (S::CONFLICT, "Already done", capitalize(&e.to_string()))
                }
                VaultError::PreconditionFailed(m) => (S::PRECONDITION_FAILED, "Changed meanwhile", capitalize(m)),
                VaultError::ReadOnly => (
                    S::SERVICE_UNAVAILABLE,
                    "Read-only",
                    "This server runs in emergency read-only mode while the main system is down: charts can be read, not changed.".to_owned(),
                ),
                VaultError::AuditUnavailable
                | VaultError::Unavailable(_)
                | VaultError::MasterKeyUnavailable(_) => (
                    S::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    "medvault cannot record this access in its audit log right now, so it refused it. Try again shortly.".to_owned(),
                ),
                e @ (VaultError::Identity(_) | VaultError::Internal(_)) => {
                    tracing::error!(cause = %e, "console request failed");
                    (S::INTERNAL_SERVER_ERROR, "Something went wrong", "The request failed; it has been logged.".to_owned())
                }
            },
        };
        let page = ErrorPage { title, message };
        let mut r = match page.render() {
            Ok(html) => Html(html).into_response(),
            Err(_) => title.into_response(),
        };
        *r.status_mut() = status;
        r
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A page that shows secrets once (a new user's password, a TOTP enrollment, recovery
/// codes, a client secret): `items` as a list of (label, value), `codes` one per line.
#[derive(Template)]
#[template(path = "secret.html")]
pub(crate) struct SecretPage {
    pub chrome: Chrome,
    pub intro: String,
    pub items: Vec<(String, String)>,
    pub codes: Vec<String>,
}

/// A form whose only field is the step-up code.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct CodeForm {
    pub code: String,
}

/// A JSON error for the console's scripts (they show `error`).
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Renders a page (200).
pub(crate) fn render<T: Template>(t: &T) -> Result<Response, WebError> {
    t.render()
        .map(|h| Html(h).into_response())
        .map_err(|e| WebError::Vault(VaultError::Internal(format!("template: {e}"))))
}

/// `303 See Other` to `to` (after a form post).
pub(crate) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// `/`: the signed-in user's home (the first page their role has), else sign-in.
async fn home(
    axum::extract::State(web): axum::extract::State<Web>,
    headers: HeaderMap,
    s: Option<Signed>,
) -> Response {
    let Some(s) = s else {
        return see_other("/login");
    };
    // Signed in on the way to approving an app: back to its authorization request.
    if let Some(r) = apps::return_after_sign_in(&headers) {
        return r;
    }
    let role = s.role();
    let to = NAV
        .iter()
        .find(|n| role.is_some_and(|r| n.roles.contains(&r)))
        .map_or("/account", |n| n.path);
    // Reminders on sign-in: what is due (training, deadlines) before the first page.
    if let Some(page) = compliance::reminders_or(&web, &s, to).await {
        return page;
    }
    see_other(to)
}

impl axum::extract::OptionalFromRequestParts<Web> for Signed {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Option<Self>, WebError> {
        match <Signed as FromRequestParts<Web>>::from_request_parts(parts, web).await {
            Ok(s) => Ok(Some(s)),
            Err(WebError::SignIn) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The console's static files: its stylesheet and the two scripts the platform requires
/// (the WebAuthn ceremony, the idle-logoff warning). Compiled in; nothing is read from disk.
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind): (&'static str, &'static str) = match file.as_str() {
        "console.css" => (
            include_str!("../static/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_str!("../static/console.js"),
            "text/javascript; charset=utf-8",
        ),
        "passkey.js" => (
            include_str!("../static/passkey.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return WebError::Vault(VaultError::NotFound).into_response(),
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

/// The console's own `Content-Security-Policy` and `Referrer-Policy` on every answer (the
/// server adds the rest: HSTS, `nosniff`, `no-store`, `X-Frame-Options`).
async fn console_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    // A page may only widen `form-action` (the consent screen, to the app it answers).
    let own = r
        .headers()
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("default-src 'self'; script-src 'self'"));
    if !own {
        r.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONSOLE_CSP),
        );
    }
    // Under `no-referrer` a browser sends `Origin: null` with every form post (Fetch
    // §3.1, "append a request Origin header"), which would leave nothing to check;
    // `same-origin` sends the real origin here and no referrer anywhere else.
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// The CSRF guard: every request that is not a safe method carries the token of the page
/// that made it — a form's `csrf` field, or the `X-CSRF-Token` header from the console's
/// scripts — and it must match: the session's ([`csrf_for`]) on signed-in pages, the
/// sign-in cookie's on `/login*`. A browser's `Sec-Fetch-Site: cross-site`, and an `Origin`
/// that is not this server's ([`same_origin`]), are refused outright. Nothing runs, and
/// nothing changes, unless all hold.
async fn csrf_guard(
    axum::extract::State(options): axum::extract::State<Arc<ConsoleOptions>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method().is_safe() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let cross_site = parts
        .headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site");
    // The server read the body already (bounded by its limit).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return WebError::Csrf.into_response();
    };
    let expected = if parts.uri.path().starts_with("/login") {
        cookie(&parts.headers, SIGNIN_CSRF_COOKIE)
    } else {
        cookie(&parts.headers, SESSION_COOKIE).map(|t| csrf_for(&Token::from_client(&t)))
    };
    let sent = match parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
    {
        Some(h) => Some(h.to_owned()),
        None => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|f| f.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v)),
    };
    let ok = match (expected, sent) {
        (Some(e), Some(s)) => constant_time_eq(e.as_bytes(), s.as_bytes()),
        _ => false,
    };
    if cross_site || !ok || !same_origin(&parts, &options.public_base_url) {
        return WebError::Csrf.into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Whether a request's `Origin` (when the browser sent one) is this server: the configured
/// public URL, or `https://` and the `Host` (or HTTP/2 authority) it was sent to. OWASP CSRF
/// Prevention Cheat Sheet, "Verifying Origin with standard headers"; `Origin: null` (a
/// sandboxed or privacy-redirected context) is not this server.
fn same_origin(parts: &Parts, public_base_url: &str) -> bool {
    let Some(origin) = parts.headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
    origin == public_base_url.trim_end_matches('/')
        || host.is_some_and(|h| origin == format!("https://{h}"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC` (empty for 0 or out of range).
pub(crate) fn when(secs: i64) -> String {
    if secs <= 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// A form field: trimmed, at most `max` characters.
pub(crate) fn field(v: &str, max: usize) -> String {
    v.trim().chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_differ_per_session_and_hide_the_token() {
        let a = Token::from_client("session-a");
        let b = Token::from_client("session-b");
        assert_ne!(csrf_for(&a), csrf_for(&b));
        assert_eq!(csrf_for(&a), csrf_for(&Token::from_client("session-a")));
        assert!(!csrf_for(&a).contains("session-a"));
    }

    #[test]
    fn every_nav_entry_is_a_console_path() {
        for n in NAV {
            assert!(
                n.path.starts_with('/') && !n.path.ends_with('/'),
                "{}",
                n.path
            );
        }
        assert!(
            NAV.iter().any(|n| n.roles.is_empty()),
            "every role has a page"
        );
    }

    #[test]
    fn the_navigation_gates_the_pages_under_it() {
        use Role::*;
        assert!(page_allowed("/admin/users/x/disable", Some(SecurityAdmin)));
        assert!(!page_allowed("/admin/users/x/disable", Some(Nurse)));
        assert!(!page_allowed("/admin/users", Some(PrivacyOfficer)));
        assert!(page_allowed("/privacy/reviews/1", Some(Auditor)));
        assert!(!page_allowed("/privacy/patients", Some(Nurse)));
        assert!(!page_allowed("/patients/abc", Some(SecurityAdmin)));
        assert!(!page_allowed("/patients", Some(Patient)));
        assert!(page_allowed("/me/access", Some(Patient)));
        assert!(!page_allowed("/me", Some(Physician)));
        // Everyone's: My account, sign-out, the session clock; and no prefix confusion.
        assert!(page_allowed("/account/passkeys/start", Some(Nurse)));
        assert!(page_allowed("/logout", Some(Patient)));
        assert!(page_allowed("/patientsx", Some(Patient)));
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
