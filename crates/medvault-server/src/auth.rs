//! `/auth/*`: password, TOTP second factor, logout.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use medvault_core::{Password, Token, VaultError};
use medvault_fhir::IssueCode;
use serde::Deserialize;
use serde_json::json;

use crate::{blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx, SESSION_COOKIE};

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

pub(crate) async fn mfa_totp(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, req).await?;
    let b: TotpBody = parse(&body)?;
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let token = Token::from_client(&b.mfa_token);
    let grant = blocking(move || vault.login_totp(&c, &token, &b.code))
        .await?
        .map_err(|e| match e {
            VaultError::Unauthenticated => ApiError::new(
                StatusCode::UNAUTHORIZED,
                IssueCode::Login,
                "invalid or expired code",
            ),
            other => other.into(),
        })?;
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
    Ok(r)
}

pub(crate) async fn logout(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let token = ctx.token.clone().ok_or_else(ApiError::unauthenticated)?;
    let vault = state.vault.clone();
    blocking(move || vault.logout(&c, &token)).await??;
    let mut r = StatusCode::NO_CONTENT.into_response();
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}
