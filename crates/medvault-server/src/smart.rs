//! SMART App Launch 2.0 over HTTP: the discovery document, the token endpoint's
//! `authorization_code` and `refresh_token` grants, app registration (security
//! administrators) and EHR launch, and each user's grants. The authorization endpoint and
//! its consent screen are the console's (`medvault-web`), since they need the browser's
//! session.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use medvault_core::{AppClientAuth, VaultError};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{invalid_client, oauth_error};
use crate::records::body;
use crate::{as_caller, blocking, plain_json, ApiError, AppState, Ctx};

/// The origin (`https://host:port`) of a FHIR base URL (`…/fhir`).
fn origin(fhir_base: &str) -> &str {
    fhir_base.strip_suffix("/fhir").unwrap_or(fhir_base)
}

/// `GET /.well-known/smart-configuration` and `GET /fhir/.well-known/smart-configuration`
/// (SMART App Launch 2.0 §"Discovery"): what this server offers apps.
pub(crate) async fn configuration(ctx: Ctx) -> Response {
    let o = origin(&ctx.base);
    let mut r = plain_json(
        StatusCode::OK,
        json!({
            "issuer": o,
            "authorization_endpoint": format!("{o}/oauth/authorize"),
            "token_endpoint": format!("{o}/auth/token"),
            "token_endpoint_auth_methods_supported":
                ["client_secret_basic", "client_secret_post", "private_key_jwt"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "scopes_supported": ["launch", "launch/patient", "fhirUser", "offline_access",
                "online_access", "patient/*.rs", "user/*.rs", "system/*.rs"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256"],
            "capabilities": ["launch-ehr", "launch-standalone", "client-public",
                "client-confidential-symmetric", "client-confidential-asymmetric",
                "context-ehr-patient", "context-standalone-patient", "permission-patient",
                "permission-user", "permission-offline", "permission-online", "permission-v2",
                "authorize-post"],
            "management_endpoint": format!("{o}/apps"),
        }),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The token endpoint for apps: `authorization_code` (with PKCE) and `refresh_token`.
pub(crate) async fn token(
    state: AppState,
    ctx: Ctx,
    basic: Option<(String, String)>,
    form: Vec<(String, String)>,
    grant_type: String,
) -> Result<Response, ApiError> {
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (client_id, secret) = match (basic, get("client_id"), get("client_secret")) {
        (Some((id, s)), form_id, None) => {
            if form_id.is_some_and(|f| f != id) {
                return Ok(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "client_id in the form differs from the HTTP Basic credentials",
                ));
            }
            (id, Some(s))
        }
        (None, Some(id), s) => (id, s),
        (Some(_), _, Some(_)) => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "one client authentication method per request",
            ))
        }
        (None, None, _) => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "client_id is required",
            ))
        }
    };
    let vault = state.vault.clone();
    let c = ctx.anonymous();
    let base = ctx.base.clone();
    let result = blocking(move || {
        let auth = AppClientAuth {
            client_id: &client_id,
            secret: secret.as_deref(),
        };
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        vault.app_token(&c, &auth, &grant_type, &get, &base)
    })
    .await?;
    match result {
        Ok(t) => {
            let mut r = plain_json(StatusCode::OK, serde_json::to_value(&t).unwrap_or_default());
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(r)
        }
        Err(VaultError::Unauthenticated) => Ok(invalid_client()),
        Err(VaultError::BadRequest(m)) => {
            Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &m))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewApp {
    name: String,
    redirect_uris: Vec<String>,
    #[serde(default)]
    launch_url: Option<String>,
    scope: String,
    #[serde(default)]
    confidential: bool,
}

/// `GET /api/apps`: registered apps (security administrators).
pub(crate) async fn apps(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let apps = as_caller(&state, &ctx, |v, c| v.apps(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({"apps": apps})))
}

/// `POST /api/apps`: registers an app (step-up). `201` with its `client_id` and, for a
/// confidential app, its `client_secret` (shown once).
pub(crate) async fn register(
    State(state): State<AppState>,
    ctx: Ctx,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let b: NewApp = body(
        &state,
        req,
        r#"{"name","redirect_uris":[…],"launch_url"?,"scope","confidential"?}"#,
    )
    .await?;
    let (app, secret) = as_caller(&state, &ctx, move |v, c| {
        v.register_app(
            c,
            &b.name,
            &b.redirect_uris,
            b.launch_url.as_deref(),
            &b.scope,
            b.confidential,
        )
    })
    .await?;
    let mut out = serde_json::to_value(&app).unwrap_or_default();
    if let Some(s) = secret {
        if let Some(o) = out.as_object_mut() {
            o.insert("client_secret".into(), json!(s));
        }
    }
    Ok(plain_json(StatusCode::CREATED, out))
}

/// `DELETE /api/apps/{id}`: removes an app and stops every grant to it (step-up).
pub(crate) async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    as_caller(&state, &ctx, move |v, c| v.remove_app(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!({"removed": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Launch {
    client_id: String,
    patient: String,
}

/// `POST /api/apps/launch {"client_id","patient"}`: an EHR launch; answers the URL to open
/// (the app's launch URL with `iss` and `launch`).
pub(crate) async fn launch(
    State(state): State<AppState>,
    ctx: Ctx,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let b: Launch = body(&state, req, r#"{"client_id","patient"}"#).await?;
    let base = ctx.base.clone();
    let url = as_caller(&state, &ctx, move |v, c| {
        v.launch_app(c, &b.client_id, &b.patient, &base)
    })
    .await?;
    Ok(plain_json(StatusCode::CREATED, json!({"url": url})))
}

/// `GET /api/app-grants`: the caller's live app grants.
pub(crate) async fn grants(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let g = as_caller(&state, &ctx, |v, c| v.my_app_grants(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({"grants": g})))
}

/// `DELETE /api/app-grants/{id}`: revokes one of the caller's grants at once.
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    as_caller(&state, &ctx, move |v, c| v.revoke_app_grant(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!({"revoked": true})))
}
