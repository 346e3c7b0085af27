//! Detection over HTTP (SPEC "Detection"): staff profiles (security administrators),
//! alerts with their triage and suppressions (privacy officers). Handlers parse, call the
//! gate and render; every decision and audit record is the gate's.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use medvault_core::detect::scan::RosterEntry;
use medvault_core::detect::AlertType;
use serde::Deserialize;
use serde_json::json;

use crate::admin::QueryResult;
use crate::{as_caller, blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx};

/// `GET /api/staff` (security administrators, privacy officers).
pub(crate) async fn staff(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.staff(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "staff": list })))
}

/// `POST /api/staff/import` with a roster CSV body (security administrators).
pub(crate) async fn import_staff(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let n = blocking(move || vault.import_staff(&c, &body)).await??;
    Ok(plain_json(StatusCode::OK, json!({ "imported": n })))
}

/// `PUT /api/staff/{user}` with one profile (security administrators).
pub(crate) async fn put_staff(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(user): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let mut e: RosterEntry = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be a staff profile {\"family\",\"given\",\"address\",\"department\",\"role\",\"shift_start\",\"shift_end\",\"patient_id\",\"hired\"} (each optional; shift hours 0–23)",
        )
    })?;
    if !e.user.is_empty() && e.user != user {
        return Err(ApiError::bad_request(
            "the profile's user differs from the path",
        ));
    }
    e.user = user;
    let vault = state.vault.clone();
    blocking(move || vault.put_staff(&c, e)).await??;
    Ok(plain_json(StatusCode::OK, json!({ "saved": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertsQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    patient: Option<String>,
}

/// `GET /api/alerts[?status=&user=&patient=]` (privacy officers).
pub(crate) async fn alerts(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<AlertsQuery>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the parameters are status, user and patient"))?;
    let list = as_caller(&state, &ctx, move |v, c| {
        v.alerts(
            c,
            q.status.as_deref(),
            q.user.as_deref(),
            q.patient.as_deref(),
        )
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!({ "alerts": list })))
}

/// `GET /api/alerts/{id}` (privacy officers).
pub(crate) async fn alert(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = as_caller(&state, &ctx, move |v, c| v.alert(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(a)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: String,
    #[serde(default)]
    reason: String,
}

/// `POST /api/alerts/{id}/status {"status": "triage"|"false_positive"|"confirmed",
/// "reason"}` (privacy officers); confirming opens an incident.
pub(crate) async fn alert_status(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: StatusBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"status\": \"triage\", \"false_positive\" or \"confirmed\", \"reason\": TEXT}",
        )
    })?;
    let vault = state.vault.clone();
    let a = blocking(move || vault.set_alert_status(&c, &id, &b.status, &b.reason)).await??;
    Ok(plain_json(StatusCode::OK, json!(a)))
}

/// `GET /api/suppressions` (privacy officers).
pub(crate) async fn suppressions(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.suppressions(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "suppressions": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressionBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    patient: Option<String>,
    reason: String,
    /// Unix seconds.
    expires: i64,
}

/// `POST /api/suppressions {"type","user","patient","reason","expires"}` (privacy officers).
pub(crate) async fn add_suppression(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: SuppressionBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"type\", \"user\", \"patient\" (at least one), \"reason\": TEXT, \"expires\": UNIX SECONDS}",
        )
    })?;
    let kind = match b.kind.as_deref().filter(|k| !k.is_empty()) {
        None => None,
        Some(k) => Some(k.parse::<AlertType>().map_err(ApiError::bad_request)?),
    };
    let vault = state.vault.clone();
    let s =
        blocking(move || vault.add_suppression(&c, kind, b.user, b.patient, &b.reason, b.expires))
            .await??;
    Ok(plain_json(StatusCode::CREATED, json!(s)))
}

/// `DELETE /api/suppressions/{id}` (privacy officers): ends it now.
pub(crate) async fn end_suppression(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.end_suppression(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(s)))
}
