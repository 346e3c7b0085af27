//! Sharing pages: the SMART authorization endpoint and its consent screen, registered apps
//! (security administrators register and remove them), each user's app grants — for a
//! patient, "apps that can see my record" — revocable at once, EHR launch from a chart,
//! and the caller's bulk exports (start, follow, download once, cancel).

use askama::Template;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::{AuthorizeError, AuthorizeRequest, ExportLevel, Role, MY_PATIENTS_GROUP};
use serde::Deserialize;

use crate::{
    cookie, field, gate, render, see_other, set_cookie, stepped_gate, when, Chrome, Signed, Web,
    WebError, CONSOLE_CSP,
};

/// The authorization request a browser was sent with before it signed in: where to return
/// after sign-in (only ever a path under `/oauth/authorize`).
pub(crate) const RETURN_COOKIE: &str = "medvault_return";

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/oauth/authorize", get(authorize).post(answer))
        .route("/apps", get(apps))
        .route("/apps/register", post(register))
        .route("/apps/{id}/remove", post(remove))
        .route("/apps/grants/{id}/revoke", post(revoke))
        .route("/patients/{id}/launch", post(launch))
        .route("/exports", get(exports).post(start_export))
        .route("/exports/{id}/cancel", post(cancel_export))
        .route("/exports/{id}/{name}", get(download))
}

/// The FHIR base apps are told (`aud`, `iss`).
fn fhir_base(web: &Web) -> String {
    format!("{}/fhir", web.options.public_base_url.trim_end_matches('/'))
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct AuthorizeForm {
    response_type: String,
    client_id: String,
    redirect_uri: String,
    scope: String,
    state: String,
    aud: String,
    code_challenge: String,
    code_challenge_method: String,
    launch: String,
    decision: String,
}

impl AuthorizeForm {
    fn request(&self) -> AuthorizeRequest {
        let f = |v: &str, n: usize| v.chars().take(n).collect::<String>();
        AuthorizeRequest {
            response_type: f(&self.response_type, 20),
            client_id: f(&self.client_id, 100),
            redirect_uri: f(&self.redirect_uri, 500),
            scope: f(&self.scope, 2000),
            state: f(&self.state, 600),
            aud: f(&self.aud, 500),
            code_challenge: f(&self.code_challenge, 200),
            code_challenge_method: f(&self.code_challenge_method, 20),
            launch: (!self.launch.is_empty()).then(|| f(&self.launch, 200)),
        }
    }

    /// The request's parameters, carried through the consent form.
    fn hidden(&self) -> Vec<(String, String)> {
        let r = self.request();
        [
            ("response_type", r.response_type),
            ("client_id", r.client_id),
            ("redirect_uri", r.redirect_uri),
            ("scope", r.scope),
            ("state", r.state),
            ("aud", r.aud),
            ("code_challenge", r.code_challenge),
            ("code_challenge_method", r.code_challenge_method),
            ("launch", r.launch.unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

#[derive(Template)]
#[template(path = "consent.html")]
struct ConsentPage {
    chrome: Chrome,
    app: String,
    patient: Option<String>,
    explained: Vec<String>,
    dropped: String,
    hidden: Vec<(String, String)>,
}

/// The origin of a URL (`https://host[:port]`), for the consent page's `form-action`.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?']).next()?;
    (!host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
    .then(|| format!("{scheme}://{host}"))
}

fn authorize_failure(e: AuthorizeError) -> Result<Response, WebError> {
    match e {
        AuthorizeError::Page(m) => Err(WebError::Form(m)),
        AuthorizeError::Redirect(url) => Ok(see_other(&url)),
    }
}

/// `GET /oauth/authorize`: the consent screen (after sign-in, to which a browser without a
/// session is sent first).
async fn authorize(
    State(web): State<Web>,
    s: Option<Signed>,
    RawQuery(raw): RawQuery,
    Query(f): Query<AuthorizeForm>,
) -> Result<Response, WebError> {
    let Some(s) = s else {
        // Sign in first, then come back here (the request is not PHI; it stays in an
        // HttpOnly cookie for this site only).
        let back = format!("/oauth/authorize?{}", raw.unwrap_or_default());
        let mut r = see_other("/login");
        if back.len() <= 3000 {
            set_cookie(&mut r, RETURN_COOKIE, &urlencode(&back), "/", 600);
        }
        return Ok(r);
    };
    let req = f.request();
    let base = fhir_base(&web);
    let consent = gate(&web, &s, move |v, c| Ok(v.authorize_app(c, &req, &base))).await?;
    let consent = match consent {
        Ok(c) => c,
        Err(e) => return authorize_failure(e),
    };
    let mut r = render(&ConsentPage {
        chrome: s.chrome(&web, "Approve an app", "/apps"),
        app: consent.app.name.clone(),
        patient: consent.patient.clone(),
        explained: consent.explained.clone(),
        dropped: consent.dropped.join(" "),
        hidden: f.hidden(),
    })?;
    // The answer redirects to the app: the page's form-action must allow its origin.
    if let Some(o) = origin_of(&f.redirect_uri) {
        let csp = CONSOLE_CSP.replace("form-action 'self'", &format!("form-action 'self' {o}"));
        if let Ok(v) = HeaderValue::from_str(&csp) {
            r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
        }
    }
    Ok(r)
}

/// `POST /oauth/authorize`: the user's answer; back to the app with a code or
/// `access_denied`.
async fn answer(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<AuthorizeForm>,
) -> Result<Response, WebError> {
    let req = f.request();
    let base = fhir_base(&web);
    let approve = f.decision == "approve";
    let out = gate(&web, &s, move |v, c| {
        Ok(v.answer_app(c, &req, &base, approve))
    })
    .await?;
    match out {
        Ok(url) => Ok(see_other(&url)),
        Err(e) => authorize_failure(e),
    }
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)])
        .unwrap_or_default()
        .trim_start_matches("v=")
        .to_owned()
}

/// After sign-in: the authorization request the browser came with, if any (and the
/// cookie is cleared).
pub(crate) fn return_after_sign_in(h: &axum::http::HeaderMap) -> Option<Response> {
    let v = cookie(h, RETURN_COOKIE)?;
    let back: String = serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={v}"))
        .ok()?
        .into_iter()
        .next()?
        .1;
    // Only ever back to the authorization endpoint of this site.
    if !back.starts_with("/oauth/authorize?") {
        return None;
    }
    let mut r = see_other(&back);
    set_cookie(&mut r, RETURN_COOKIE, "", "/", 0);
    Some(r)
}

struct GrantRow {
    id: String,
    app: String,
    scopes: String,
    patient: String,
    created: String,
    expires: String,
}

struct AppRow {
    client_id: String,
    name: String,
    client_type: String,
    scopes: String,
    redirect_uris: String,
    launch_url: String,
}

#[derive(Template)]
#[template(path = "apps.html")]
struct AppsPage {
    chrome: Chrome,
    notice: String,
    patient: bool,
    admin: bool,
    grants: Vec<GrantRow>,
    apps: Vec<AppRow>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Done {
    done: String,
}

/// `GET /apps`: the caller's grants; for security administrators, the registered apps.
async fn apps(
    State(web): State<Web>,
    s: Signed,
    Query(q): Query<Done>,
) -> Result<Response, WebError> {
    let admin = s.role() == Some(Role::SecurityAdmin);
    let (grants, apps) = gate(&web, &s, move |v, c| {
        let g = v.my_app_grants(c)?;
        let a = if admin { v.apps(c)? } else { vec![] };
        Ok((g, a))
    })
    .await?;
    let notice = match q.done.as_str() {
        "revoked" => "Revoked: the app's access ended now.",
        "removed" => "App removed: every grant to it ended now.",
        _ => "",
    };
    render(&AppsPage {
        chrome: s.chrome(&web, "Apps", "/apps"),
        notice: notice.into(),
        patient: s.role() == Some(Role::Patient),
        admin,
        grants: grants
            .into_iter()
            .map(|g| GrantRow {
                id: g.id,
                app: g.app,
                scopes: g.scopes.join(" "),
                patient: g.patient.unwrap_or_default(),
                created: when(g.created),
                expires: when(g.expires),
            })
            .collect(),
        apps: apps
            .into_iter()
            .map(|a| AppRow {
                client_id: a.client_id,
                name: a.name,
                client_type: a.client_type.into(),
                scopes: a.scopes.join(" "),
                redirect_uris: a.redirect_uris.join(" "),
                launch_url: a.launch_url.unwrap_or_default(),
            })
            .collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RegisterForm {
    name: String,
    redirect_uris: String,
    launch_url: String,
    scope: String,
    confidential: String,
    code: String,
}

/// `POST /apps/register` (security administrators, step-up): the client id (and a
/// confidential app's secret) shown once.
async fn register(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RegisterForm>,
) -> Result<Response, WebError> {
    let uris: Vec<String> = f
        .redirect_uris
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| field(l, 500))
        .collect();
    let (name, scope, launch) = (
        field(&f.name, 80),
        field(&f.scope, 2000),
        field(&f.launch_url, 500),
    );
    let confidential = f.confidential == "on";
    let (app, secret) = stepped_gate(&web, &s, &f.code, move |v, c| {
        v.register_app(
            c,
            &name,
            &uris,
            (!launch.is_empty()).then_some(launch.as_str()),
            &scope,
            confidential,
        )
    })
    .await?;
    let mut items = vec![("Client id".into(), app.client_id.clone())];
    if let Some(secret) = secret {
        items.push(("Client secret".into(), secret));
    }
    render(&crate::SecretPage {
        chrome: s.chrome(&web, "App registered", "/apps"),
        intro: "Give these to the app's developer; this page will not show a secret again.".into(),
        items,
        codes: vec![],
    })
}

/// `POST /apps/{id}/remove` (security administrators, step-up).
async fn remove(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<crate::CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |v, c| v.remove_app(c, &id)).await?;
    Ok(see_other("/apps?done=removed"))
}

/// `POST /apps/grants/{id}/revoke`: one of the caller's grants, at once.
async fn revoke(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.revoke_app_grant(c, &id)).await?;
    Ok(see_other("/apps?done=revoked"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LaunchForm {
    client_id: String,
}

#[derive(Template)]
#[template(path = "launch.html")]
struct LaunchPage {
    chrome: Chrome,
    app: String,
    url: String,
}

/// `POST /patients/{id}/launch`: an EHR launch from a chart. Answers a page with the link
/// to the app (a form may only post here; the app is opened by the user's click).
async fn launch(
    State(web): State<Web>,
    s: Signed,
    Path(pid): Path<String>,
    Form(f): Form<LaunchForm>,
) -> Result<Response, WebError> {
    let base = fhir_base(&web);
    let client = field(&f.client_id, 100);
    let (url, name) = gate(&web, &s, move |v, c| {
        let name = v
            .launchable_apps(c)?
            .into_iter()
            .find(|a| a.client_id == client)
            .map(|a| a.name)
            .unwrap_or_default();
        Ok((v.launch_app(c, &client, &pid, &base)?, name))
    })
    .await?;
    render(&LaunchPage {
        chrome: s.chrome(&web, "Open an app", "/patients"),
        app: name,
        url,
    })
}

struct JobRow {
    id: String,
    started: String,
    level: String,
    purpose: String,
    deidentified: String,
    state: String,
    progress: String,
    /// (file name, resources, downloaded)
    files: Vec<(String, u64, bool)>,
}

#[derive(Template)]
#[template(path = "exports.html")]
struct ExportsPage {
    chrome: Chrome,
    notice: String,
    /// A patient exports their own record.
    patient: bool,
    jobs: Vec<JobRow>,
}

/// `GET /exports`: the caller's running and past exports.
async fn exports(
    State(web): State<Web>,
    s: Signed,
    Query(q): Query<Done>,
) -> Result<Response, WebError> {
    let jobs = gate(&web, &s, |v, c| v.exports(c)).await?;
    let notice = match q.done.as_str() {
        "started" => "Export started: it appears below; reload to follow it.",
        "cancelled" => "Export cancelled and its files deleted.",
        _ => "",
    };
    render(&ExportsPage {
        chrome: s.chrome(&web, "Exports", "/exports"),
        notice: notice.into(),
        patient: s.role() == Some(Role::Patient),
        jobs: jobs
            .into_iter()
            .map(|j| JobRow {
                id: j.id,
                started: j.transaction_time,
                level: j.level,
                purpose: j.purpose,
                deidentified: j.deidentified.unwrap_or_default(),
                progress: format!("{}/{}", j.done, j.total),
                state: j.state,
                files: j
                    .output
                    .into_iter()
                    .map(|o| (o.name, o.count, o.downloaded))
                    .collect(),
            })
            .collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExportForm {
    types: String,
    code: String,
}

/// `POST /exports`: starts a `Group/my-patients` export (step-up).
async fn start_export(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<ExportForm>,
) -> Result<Response, WebError> {
    let types: String = f
        .types
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(1000)
        .collect();
    let request = format!("{}/Group/{MY_PATIENTS_GROUP}/$export", fhir_base(&web));
    let id = stepped_gate(&web, &s, &f.code, move |v, c| {
        let params = if types.is_empty() {
            vec![]
        } else {
            vec![("_type".to_owned(), types)]
        };
        v.export_kickoff(
            c,
            ExportLevel::Group(MY_PATIENTS_GROUP.into()),
            &params,
            &request,
        )
    })
    .await?;
    let vault = web.vault.clone();
    tokio::task::spawn_blocking(move || vault.run_export(&id));
    Ok(see_other("/exports?done=started"))
}

/// `POST /exports/{id}/cancel`.
async fn cancel_export(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.cancel_export(c, &id)).await?;
    Ok(see_other("/exports?done=cancelled"))
}

/// `GET /exports/{id}/{name}`: one NDJSON file, once.
async fn download(
    State(web): State<Web>,
    s: Signed,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, WebError> {
    if !name.ends_with(".ndjson") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
        return Err(WebError::Vault(medvault_core::VaultError::NotFound));
    }
    let n = name.clone();
    let bytes = gate(&web, &s, move |v, c| v.export_file(c, &id, &n)).await?;
    let mut r = bytes.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}
