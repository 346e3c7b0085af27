//! Sign-in: password, then a second factor (TOTP, a recovery code or a passkey), or single
//! sign-on through a configured OpenID provider; sign-out; the idle-logoff clock.
//!
//! The password step's challenge travels to the second-factor page in an `HttpOnly`
//! cookie scoped to `/login`, never in a URL or a page. Before a session exists, forms are
//! protected by a double-submit token (a random `HttpOnly` cookie the form repeats).

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use medvault_core::{Factor, Password, SessionGrant, Token, VaultError};
use serde::Deserialize;
use serde_json::json;

use crate::{
    blocking, cookie, json_error, render, see_other, set_cookie, Anon, Chrome, Signed, Web,
    WebError, MFA_COOKIE, SESSION_COOKIE, SIGNIN_CSRF_COOKIE,
};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/login/mfa", get(mfa_page).post(mfa))
        .route("/login/passkey/start", post(passkey_start))
        .route("/login/passkey/finish", post(passkey_finish))
        .route("/logout", post(logout))
        .route("/session/status", get(status))
        .route("/session/keepalive", post(keepalive))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    notice: String,
    error: String,
    sso: Vec<String>,
}

#[derive(Template)]
#[template(path = "mfa.html")]
struct MfaPage {
    chrome: Chrome,
    error: String,
    passkey: bool,
}

/// The sign-in form's CSRF value: the request's cookie, or a new one to set.
fn signin_csrf(h: &HeaderMap) -> (String, bool) {
    match cookie(h, SIGNIN_CSRF_COOKIE) {
        Some(v) if v.len() >= 32 => (v, false),
        _ => {
            use base64::Engine;
            use rand::RngCore;
            let mut b = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut b);
            (
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
                true,
            )
        }
    }
}

#[derive(Deserialize)]
struct Reason {
    reason: Option<String>,
}

async fn login_page(
    State(web): State<Web>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<Reason>,
) -> Result<Response, WebError> {
    let notice = match q.reason.as_deref() {
        Some("idle") => "You were signed out after a period of inactivity.",
        Some("ended") => "Your session has ended. Please sign in again.",
        Some("signed-out") => "You have signed out.",
        _ => "",
    };
    login_form(&web, &headers, notice, "", StatusCode::OK)
}

fn login_form(
    web: &Web,
    headers: &HeaderMap,
    notice: &str,
    error: &str,
    status: StatusCode,
) -> Result<Response, WebError> {
    let (csrf, new) = signin_csrf(headers);
    let page = LoginPage {
        chrome: Chrome::public("Sign in", &csrf),
        notice: notice.to_owned(),
        error: error.to_owned(),
        sso: web.vault.oidc_provider_names(),
    };
    let mut r = render(&page)?;
    *r.status_mut() = status;
    if new {
        set_cookie(&mut r, SIGNIN_CSRF_COOKIE, &csrf, "/login", 0);
    }
    Ok(r)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login(
    State(web): State<Web>,
    Anon(anon): Anon,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Result<Response, WebError> {
    let username = crate::field(&f.username, 128);
    let password = Password::new(f.password);
    let vault = web.vault.clone();
    match blocking(move || vault.login(&anon, &username, &password)).await? {
        Ok(ch) => {
            let mut r = see_other("/login/mfa");
            let value = format!("{}|{}", ch.mfa_token.expose(), ch.methods.join(","));
            set_cookie(&mut r, MFA_COOKIE, &value, "/login", 300);
            Ok(r)
        }
        Err(VaultError::Unauthenticated) => login_form(
            &web,
            &headers,
            "",
            "The user name or password is not right.",
            StatusCode::UNAUTHORIZED,
        ),
        Err(VaultError::Locked { retry_after }) => login_form(
            &web,
            &headers,
            "",
            &format!("Too many failed attempts: try again in {retry_after} seconds."),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        Err(e) => Err(e.into()),
    }
}

/// The password step's challenge and its second-factor methods.
fn challenge(h: &HeaderMap) -> Option<(Token, Vec<String>)> {
    let v = cookie(h, MFA_COOKIE)?;
    let (t, m) = v.split_once('|').unwrap_or((v.as_str(), ""));
    Some((
        Token::from_client(t),
        m.split(',')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

async fn mfa_page(headers: HeaderMap) -> Result<Response, WebError> {
    mfa_form(&headers, "", StatusCode::OK)
}

fn mfa_form(headers: &HeaderMap, error: &str, status: StatusCode) -> Result<Response, WebError> {
    let Some((_, methods)) = challenge(headers) else {
        return Ok(see_other("/login"));
    };
    let (csrf, new) = signin_csrf(headers);
    let page = MfaPage {
        chrome: Chrome::public("Second factor", &csrf),
        error: error.to_owned(),
        passkey: methods.iter().any(|m| m == "webauthn"),
    };
    let mut r = render(&page)?;
    *r.status_mut() = status;
    if new {
        set_cookie(&mut r, SIGNIN_CSRF_COOKIE, &csrf, "/login", 0);
    }
    Ok(r)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MfaForm {
    method: String,
    code: String,
}

/// The signed-in answer: the session cookie (as the API sets it), the challenge cookie
/// gone, and on to `to`.
fn signed_in(grant: &SessionGrant, mut r: Response) -> Response {
    set_cookie(&mut r, SESSION_COOKIE, grant.token.expose(), "/", 0);
    set_cookie(&mut r, MFA_COOKIE, "", "/login", 0);
    r
}

async fn mfa(
    State(web): State<Web>,
    Anon(anon): Anon,
    headers: HeaderMap,
    Form(f): Form<MfaForm>,
) -> Result<Response, WebError> {
    let Some((mfa_token, _)) = challenge(&headers) else {
        return Ok(see_other("/login?reason=ended"));
    };
    let code: String = f
        .code
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(64)
        .collect();
    let recovery = f.method == "recovery";
    let vault = web.vault.clone();
    let out = blocking(move || {
        let factor = if recovery {
            Factor::Recovery(&code)
        } else {
            Factor::Totp(&code)
        };
        vault.login_factor(&anon, &mfa_token, &factor)
    })
    .await?;
    match out {
        Ok(grant) => Ok(signed_in(&grant, see_other("/"))),
        Err(VaultError::Unauthenticated) => mfa_form(
            &headers,
            "That code was not accepted. Codes work once; wait for the next one if you just used it. After three wrong codes, start again with your password.",
            StatusCode::UNAUTHORIZED,
        ),
        Err(VaultError::Locked { retry_after }) => mfa_form(
            &headers,
            &format!("Too many failed attempts: try again in {retry_after} seconds."),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        Err(e) => Err(e.into()),
    }
}

async fn passkey_start(State(web): State<Web>, Anon(anon): Anon, headers: HeaderMap) -> Response {
    let Some((mfa_token, _)) = challenge(&headers) else {
        return json_error(StatusCode::UNAUTHORIZED, "sign in with your password first");
    };
    let vault = web.vault.clone();
    match blocking(move || vault.passkey_login_start(&anon, &mfa_token)).await {
        Ok(Ok(options)) => Json(options).into_response(),
        _ => json_error(
            StatusCode::UNAUTHORIZED,
            "no passkey is registered for this account, or the sign-in expired",
        ),
    }
}

async fn passkey_finish(
    State(web): State<Web>,
    Anon(anon): Anon,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, WebError> {
    let Some((mfa_token, _)) = challenge(&headers) else {
        return Ok(json_error(
            StatusCode::UNAUTHORIZED,
            "sign in with your password first",
        ));
    };
    let Ok(credential) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(json_error(StatusCode::BAD_REQUEST, "malformed credential"));
    };
    let vault = web.vault.clone();
    match blocking(move || vault.passkey_login_finish(&anon, &mfa_token, credential)).await? {
        Ok(grant) => Ok(signed_in(
            &grant,
            Json(json!({ "location": "/" })).into_response(),
        )),
        Err(VaultError::Locked { retry_after }) => Ok(json_error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many failed attempts: try again in {retry_after} seconds"),
        )),
        Err(_) => Ok(json_error(
            StatusCode::UNAUTHORIZED,
            "the passkey was not accepted",
        )),
    }
}

async fn logout(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let token = s.token.clone();
    crate::gate(&web, &s, move |v, c| v.logout(c, &token)).await?;
    let mut r = see_other("/login?reason=signed-out");
    set_cookie(&mut r, SESSION_COOKIE, "", "/", 0);
    Ok(r)
}

/// `GET /session/status`: `{"remaining": seconds}` while the session lives, else 401 —
/// what the idle-logoff script polls. It never extends the session.
async fn status(State(web): State<Web>, headers: HeaderMap) -> Response {
    let Some(t) = cookie(&headers, SESSION_COOKIE) else {
        return json_error(StatusCode::UNAUTHORIZED, "signed out");
    };
    let vault = web.vault.clone();
    match blocking(move || vault.session_remaining(&Token::from_client(&t))).await {
        Ok(Ok(Some(left))) => Json(json!({ "remaining": left })).into_response(),
        _ => json_error(StatusCode::UNAUTHORIZED, "signed out"),
    }
}

/// `POST /session/keepalive`: "stay signed in" from the idle warning (a request, so it
/// counts as activity).
async fn keepalive(_s: Signed) -> Response {
    StatusCode::NO_CONTENT.into_response()
}
