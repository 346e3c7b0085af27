//! `/api/destruction*` and `/api/legal-holds*` (SPEC "Keys, backup, destruction"): two-person
//! destruction of a chart with a signed certificate, and the legal holds that block it.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use crate::admin::{text, QueryResult};
use crate::{as_caller, blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    reason: String,
}

/// `POST /api/patients/{id}/destruction {"reason": CODE}` (privacy officer, step-up) →
/// `201` with the pending request.
pub(crate) async fn request(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(patient): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: RequestBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request("body must be {\"reason\": \"retention-period-ended\"|\"erasure-request\"|\"duplicate-record\"|\"court-order\"}")
    })?;
    let vault = state.vault.clone();
    let d = blocking(move || vault.request_destruction(&c, &patient, &b.reason)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(d)))
}

/// `GET /api/destruction`: every request, newest first.
pub(crate) async fn list(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.destructions(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "destructions": list })))
}

/// `POST /api/destruction/{id}/{approve|cancel}` (a second privacy officer, step-up):
/// approving destroys the chart and answers `{"status":"completed","certificate": NOTE}`.
pub(crate) async fn decide(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    match action.as_str() {
        "approve" => {
            let cert = blocking(move || vault.approve_destruction(&c, &id)).await??;
            Ok(plain_json(
                StatusCode::OK,
                json!({"status": "completed", "certificate": cert}),
            ))
        }
        "cancel" => {
            blocking(move || vault.cancel_destruction(&c, &id)).await??;
            Ok(plain_json(StatusCode::OK, json!({"status": "cancelled"})))
        }
        _ => Err(ApiError::not_found()),
    }
}

/// `GET /api/destruction/{id}/certificate`: the signed certificate (C2SP signed note,
/// `text/plain`).
pub(crate) async fn certificate(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cert = as_caller(&state, &ctx, move |v, c| v.destruction_certificate(c, &id)).await?;
    Ok(text(cert))
}

/// `GET /api/destruction/key`: the certificates' verifier key (C2SP note verifier key).
pub(crate) async fn key(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let key = as_caller(&state, &ctx, move |v, c| v.destruction_verifier_key(c)).await?;
    Ok(text(format!("{key}\n")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    matter: String,
    reason: String,
}

/// `POST /api/patients/{id}/legal-holds {"matter","reason"}` (security administrator,
/// step-up) → `201` with the hold.
pub(crate) async fn set_hold(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(patient): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: HoldBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request("body must be {\"matter\": CASE_REFERENCE, \"reason\": TEXT}")
    })?;
    let vault = state.vault.clone();
    let h = blocking(move || vault.set_legal_hold(&c, &patient, &b.matter, &b.reason)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(h)))
}

/// `POST /api/legal-holds/{id}/release` (security administrator, step-up).
pub(crate) async fn release_hold(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    blocking(move || vault.release_legal_hold(&c, &id)).await??;
    Ok(plain_json(StatusCode::OK, json!({"released": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoldsQuery {
    #[serde(default)]
    patient: Option<String>,
}

/// `GET /api/legal-holds[?patient=ID]`: holds, newest first.
pub(crate) async fn holds(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<HoldsQuery>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the only parameter is patient=ID"))?;
    let list = as_caller(&state, &ctx, move |v, c| {
        v.legal_holds(c, q.patient.as_deref())
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!({ "legal_holds": list })))
}
