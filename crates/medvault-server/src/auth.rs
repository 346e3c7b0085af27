//! `/auth/*`: password, second factors (TOTP, recovery code), step-up, password change,
//! the caller's sessions, logout.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use medvault_core::{Factor, Password, SessionGrant, Token, VaultError};
use medvault_fhir::IssueCode;
use serde::Deserialize;
use serde_json::json;

use crate::{
    as_caller, blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx, SESSION_COOKIE,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TotpBody {
    mfa_token: String,
    code: String,
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(b)
        .map_err(|_| ApiError::bad_request("body must be a JSON object with the documented fields"))
}

fn bad_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        IssueCode::Login,
        "invalid username or password",
    )
}

pub(crate) async fn login(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: LoginBody = parse(&body)?;
    let password = Password::new(b.password);
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let r = blocking(move || vault.login(&c, &b.username, &password)).await?;
    match r {
        Ok(ch) => Ok(plain_json(
            StatusCode::OK,
            json!({"mfa_required": true, "mfa_token": ch.mfa_token.expose(), "methods": ch.methods}),
        )),
        Err(VaultError::Unauthenticated) => Err(bad_credentials()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    current: String,
    new: String,
}

fn bad_code(e: VaultError) -> ApiError {
    match e {
        VaultError::Unauthenticated => ApiError::new(
            StatusCode::UNAUTHORIZED,
            IssueCode::Login,
            "invalid or expired code",
        ),
        other => other.into(),
    }
}

/// The session answer: token, lifetime, who, and the `HttpOnly; Secure; SameSite=Strict`
/// cookie for browsers.
pub(crate) fn session_response(grant: &SessionGrant) -> Response {
    let mut r = plain_json(
        StatusCode::OK,
        json!({"token": grant.token.expose(), "expires_in": grant.expires_in, "username": grant.principal.username.as_str(),
               "role": grant.principal.role.as_str()}),
    );
    let cookie = format!(
        "{SESSION_COOKIE}={}; HttpOnly; Secure; SameSite=Strict; Path=/",
        grant.token.expose()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn second_factor(
    state: AppState,
    ctx: Ctx,
    req: Request,
    recovery: bool,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: TotpBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let token = Token::from_client(&b.mfa_token);
    let grant = blocking(move || {
        let f = if recovery {
            Factor::Recovery(&b.code)
        } else {
            Factor::Totp(&b.code)
        };
        vault.login_factor(&c, &token, &f)
    })
    .await?
    .map_err(bad_code)?;
    Ok(session_response(&grant))
}

/// `POST /auth/mfa/totp {"mfa_token","code"}`.
pub(crate) async fn mfa_totp(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    second_factor(state, ctx, req, false).await
}

/// `POST /auth/mfa/recovery {"mfa_token","code"}`: a one-time recovery code.
pub(crate) async fn mfa_recovery(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    second_factor(state, ctx, req, true).await
}

/// `POST /auth/step-up/totp {"code"}` (and `/auth/step-up/recovery`).
async fn step_up(
    state: AppState,
    ctx: Ctx,
    req: Request,
    recovery: bool,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: CodeBody = parse(&body)?;
    let vault = state.vault.clone();
    blocking(move || {
        let f = if recovery {
            Factor::Recovery(&b.code)
        } else {
            Factor::Totp(&b.code)
        };
        vault.step_up(&c, &f)
    })
    .await?
    .map_err(bad_code)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn step_up_totp(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    step_up(state, ctx, req, false).await
}

pub(crate) async fn step_up_recovery(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    step_up(state, ctx, req, true).await
}

/// `POST /auth/password {"current","new"}`: every session ends; sign in again.
pub(crate) async fn change_password(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: PasswordBody = parse(&body)?;
    let (current, new) = (Password::new(b.current), Password::new(b.new));
    let vault = state.vault.clone();
    blocking(move || vault.change_password(&c, &current, &new))
        .await?
        .map_err(|e| match e {
            VaultError::Unauthenticated => bad_credentials(),
            other => other.into(),
        })?;
    Ok(clear_cookie(StatusCode::NO_CONTENT.into_response()))
}

/// `GET /auth/sessions`: the caller's live sessions.
pub(crate) async fn sessions(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.sessions(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "sessions": list })))
}

/// `DELETE /auth/sessions/{id}`.
pub(crate) async fn end_session(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    as_caller(&state, &ctx, move |v, c| v.end_session(c, &id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /auth/recovery-codes` (step-up): ten new codes, shown once.
pub(crate) async fn recovery_codes(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let codes = as_caller(&state, &ctx, move |v, c| v.new_recovery_codes(c)).await?;
    Ok(plain_json(
        StatusCode::OK,
        json!({ "recovery_codes": codes }),
    ))
}

fn clear_cookie(mut r: Response) -> Response {
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

pub(crate) async fn logout(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let token = ctx.token.clone().ok_or_else(ApiError::unauthenticated)?;
    let vault = state.vault.clone();
    blocking(move || vault.logout(&c, &token)).await??;
    Ok(clear_cookie(StatusCode::NO_CONTENT.into_response()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MfaTokenBody {
    mfa_token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasskeyLoginBody {
    mfa_token: String,
    credential: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedCredential {
    #[serde(default)]
    name: String,
    credential: serde_json::Value,
}

/// `{"name","credential"}`, or the credential alone as `navigator.credentials.create`
/// serializes it (then named "passkey").
#[derive(Deserialize)]
#[serde(untagged)]
enum PasskeyRegisterBody {
    Named(NamedCredential),
    Bare(serde_json::Map<String, serde_json::Value>),
}

/// `POST /auth/webauthn/register/start` (signed in, step-up): creation options.
pub(crate) async fn webauthn_register_start(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let options = as_caller(&state, &ctx, move |v, c| v.passkey_registration_start(c)).await?;
    Ok(plain_json(StatusCode::OK, options))
}

/// `POST /auth/webauthn/register/finish {"name","credential"}` (or the bare credential).
pub(crate) async fn webauthn_register_finish(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let (name, credential) = match parse::<PasskeyRegisterBody>(&body)? {
        PasskeyRegisterBody::Named(n) => (n.name, n.credential),
        PasskeyRegisterBody::Bare(m) => (String::new(), serde_json::Value::Object(m)),
    };
    let vault = state.vault.clone();
    let id = blocking(move || vault.passkey_registration_finish(&c, &name, credential)).await??;
    Ok(plain_json(StatusCode::CREATED, json!({ "id": id })))
}

/// `POST /auth/webauthn/login/start {"mfa_token"}`: request options.
pub(crate) async fn webauthn_login_start(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: MfaTokenBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let token = Token::from_client(&b.mfa_token);
    let options = blocking(move || vault.passkey_login_start(&c, &token))
        .await?
        .map_err(bad_code)?;
    Ok(plain_json(StatusCode::OK, options))
}

/// `POST /auth/webauthn/login/finish {"mfa_token","credential"}` → the session.
pub(crate) async fn webauthn_login_finish(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: PasskeyLoginBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let token = Token::from_client(&b.mfa_token);
    let grant = blocking(move || vault.passkey_login_finish(&c, &token, b.credential))
        .await?
        .map_err(bad_code)?;
    Ok(session_response(&grant))
}

/// `GET /auth/webauthn/credentials`: the caller's passkeys.
pub(crate) async fn passkeys(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.passkeys(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "passkeys": list })))
}

/// `DELETE /auth/webauthn/credentials/{id}` (step-up).
pub(crate) async fn revoke_passkey(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    as_caller(&state, &ctx, move |v, c| v.revoke_passkey(c, &id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /auth/oidc/{name}/start`: redirects the browser to the identity provider.
pub(crate) async fn oidc_start(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let url = blocking(move || vault.oidc_start(&c, &name)).await??;
    let mut r = StatusCode::FOUND.into_response();
    let v = HeaderValue::from_str(&url).map_err(|_| ApiError::not_found())?;
    r.headers_mut().insert(header::LOCATION, v);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /auth/oidc/{name}/callback?code=&state=`: the session, as `/auth/mfa/totp` answers.
pub(crate) async fn oidc_callback(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: axum::http::HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(err) = q.get("error") {
        let err: String = err
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            IssueCode::Login,
            format!("the identity provider refused the sign-in: {err}"),
        ));
    }
    let (Some(code), Some(st)) = (q.get("code").cloned(), q.get("state").cloned()) else {
        return Err(ApiError::bad_request("the callback needs code and state"));
    };
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let grant = blocking(move || vault.oidc_callback(&c, &name, &code, &st))
        .await?
        .map_err(|e| match e {
            VaultError::Unauthenticated => ApiError::new(
                StatusCode::UNAUTHORIZED,
                IssueCode::Login,
                "single sign-on failed: the identity provider's answer was refused",
            ),
            VaultError::Forbidden { .. } => ApiError::new(
                StatusCode::FORBIDDEN,
                IssueCode::Forbidden,
                "your identity provider account has no medvault role",
            ),
            other => other.into(),
        })?;
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if browser {
        return Ok(signed_in_page(&grant));
    }
    Ok(session_response(&grant))
}

/// A browser's end of single sign-on: the session cookie and a page that continues to the
/// web console. Not a redirect: the callback arrives from the identity provider's site, so
/// a redirect would still be cross-site and the `SameSite=Strict` cookie would not go with
/// it; a navigation from this page is same-site.
fn signed_in_page(grant: &SessionGrant) -> Response {
    let page = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
        <meta http-equiv=\"refresh\" content=\"0;url=/\"><title>Signed in — medvault</title></head>\
        <body><main><h1>Signed in</h1><p><a href=\"/\">Continue to medvault</a></p></main></body></html>";
    let mut r = axum::response::Html(page).into_response();
    if let Some(v) = session_response(grant).headers().get(header::SET_COOKIE) {
        r.headers_mut().insert(header::SET_COOKIE, v.clone());
    }
    r
}

/// An OAuth2 error answer (RFC 6749 §5.2).
/// RFC 6749 §5.2 `invalid_client`, with the `WWW-Authenticate` challenge it requires.
pub(crate) fn invalid_client() -> Response {
    let mut r = oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client authentication failed",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"medvault\""),
    );
    r
}

pub(crate) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut r = plain_json(
        status,
        json!({"error": error, "error_description": description}),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /auth/token` (RFC 6749 §4.4, form-encoded): `grant_type=client_credentials`,
/// optional `scope`, and the client's authentication — HTTP Basic or `client_id` +
/// `client_secret` in the form, or `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
/// with `client_assertion` (SMART Backend Services). Answers
/// `{"access_token","token_type":"bearer","expires_in","scope"}`.
pub(crate) async fn token(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            let dec = |x: &str| {
                serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={x}"))
                    .ok()
                    .and_then(|v| v.into_iter().next().map(|p| p.1))
            };
            Some((dec(id)?, dec(secret)?))
        });
    let body = body_bytes(&state, req).await?;
    let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    };
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match get("grant_type").as_deref() {
        Some("client_credentials") => {}
        Some(g @ ("authorization_code" | "refresh_token")) => {
            let g = g.to_owned();
            return crate::smart::token(state, ctx, basic, form, g).await;
        }
        None => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is required (client_credentials, authorization_code or refresh_token)",
            ))
        }
        Some(_) => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be client_credentials, authorization_code or refresh_token",
            ))
        }
    }
    // RFC 6749 §2.3: one authentication method per request.
    if let (Some((id, _)), Some(form_id)) = (&basic, get("client_id")) {
        if &form_id != id {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "client_id in the form differs from the HTTP Basic credentials",
            ));
        }
    }
    let assertion = match (get("client_assertion_type"), get("client_assertion")) {
        (Some(t), Some(a)) if t == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" => {
            Some(a)
        }
        (None, None) => None,
        _ => return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )),
    };
    let secret = basic.or_else(|| Some((get("client_id")?, get("client_secret")?)));
    let scope = get("scope");
    let token_url = format!(
        "{}/auth/token",
        ctx.base.strip_suffix("/fhir").unwrap_or(&ctx.base)
    );
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let result = blocking(move || {
        let auth = match (&assertion, &secret) {
            (Some(jwt), None) => medvault_core::ClientAuth::Assertion { jwt },
            (None, Some((id, s))) => medvault_core::ClientAuth::Secret {
                client_id: id,
                secret: s,
            },
            _ => return Err(VaultError::Unauthenticated),
        };
        vault.client_token(&c, &auth, scope.as_deref(), &token_url)
    })
    .await?;
    match result {
        Ok(g) => {
            let mut r = plain_json(
                StatusCode::OK,
                json!({"access_token": g.token.expose(), "token_type": "bearer",
                       "expires_in": g.expires_in, "scope": g.scope}),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(r)
        }
        Err(VaultError::Unauthenticated) => Ok(invalid_client()),
        Err(VaultError::BadRequest(m)) => {
            Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &m))
        }
        Err(VaultError::Locked { retry_after }) => {
            let mut r = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_client",
                &format!("too many failed attempts; try again in {retry_after} seconds"),
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Ok(r)
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    credential: serde_json::Value,
}

/// `POST /auth/step-up/webauthn/start`: request options for a passkey step-up.
pub(crate) async fn step_up_webauthn_start(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let options = as_caller(&state, &ctx, |v, c| v.passkey_step_up_start(c)).await?;
    Ok(plain_json(StatusCode::OK, options))
}

/// `POST /auth/step-up/webauthn/finish {"credential"}`.
pub(crate) async fn step_up_webauthn_finish(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: CredentialBody = parse(&body)?;
    let vault = state.vault.clone();
    blocking(move || vault.passkey_step_up_finish(&c, b.credential))
        .await?
        .map_err(bad_code)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsernameBody {
    username: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordlessBody {
    username: String,
    ceremony: String,
    credential: serde_json::Value,
}

/// `POST /auth/webauthn/passwordless/start {"username"}` (when enabled).
pub(crate) async fn passwordless_start(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: UsernameBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let options = blocking(move || vault.passwordless_start(&c, &b.username)).await??;
    Ok(plain_json(StatusCode::OK, options))
}

/// `POST /auth/webauthn/passwordless/finish {"username","ceremony","credential"}`.
pub(crate) async fn passwordless_finish(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: PasswordlessBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let grant =
        blocking(move || vault.passwordless_finish(&c, &b.username, &b.ceremony, b.credential))
            .await?
            .map_err(|e| match e {
                VaultError::Unauthenticated => bad_credentials(),
                other => other.into(),
            })?;
    Ok(session_response(&grant))
}
