//! `/api/*` administration endpoints (security administrators; no PHI).

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use crate::{blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx};

pub(crate) async fn status(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let s = blocking(move || vault.status(&c)).await??;
    Ok(plain_json(StatusCode::OK, json!(s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictBody {
    patient: String,
}

pub(crate) async fn evict_key(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: EvictBody = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("body must be {\"patient\": ID}"))?;
    let vault = state.vault.clone();
    blocking(move || vault.evict_key(&c, &b.patient)).await??;
    Ok(plain_json(StatusCode::OK, json!({"evicted": true})))
}
