//! Paper records and retention over HTTP (SPEC "Records lifecycle and paper records"):
//! `/api/records/*` (the chart registry, rooms, keys, badge imports, visitors, holds of
//! any scope, paper destruction) and `/api/retention/*` (schedules, the due list).
//! Handlers parse, call the gate and render; every decision and audit record is the gate's.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use medvault_core::governance::records::{HoldScope, KeyItem, Room, Schedule};
use medvault_core::{CustodyAct, FootageReview, KeyAct, NewVisitor, NewVolume, PaperRequest, Site};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::admin::{text, QueryResult};
use crate::{as_caller, blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx};

/// Reads a JSON body of shape `T`; a body that does not parse is a 400 naming why.
pub(crate) async fn body<T: DeserializeOwned>(
    state: &AppState,
    req: Request,
    shape: &str,
) -> Result<T, ApiError> {
    let bytes = body_bytes(state, req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let why = e.to_string();
        ApiError::bad_request(format!(
            "body must be {shape}: {}",
            why.chars().take(200).collect::<String>()
        ))
    })
}

/// `GET /api/records/dashboard`.
pub(crate) async fn dashboard(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let d = as_caller(&state, &ctx, move |v, c| v.records_dashboard(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(d)))
}

/// `GET /api/records/site`.
pub(crate) async fn site(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.records_site(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(s)))
}

/// `PUT /api/records/site {"perimeter_doors","closing","utc_offset","jurisdiction"}`.
pub(crate) async fn put_site(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let s: Site = body(
        &state,
        req,
        "{\"perimeter_doors\",\"closing\",\"utc_offset\",\"jurisdiction\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let s = blocking(move || vault.set_records_site(&c, s)).await??;
    Ok(plain_json(StatusCode::OK, json!(s)))
}

/// `GET /api/records/rooms`.
pub(crate) async fn rooms(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.records_rooms(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "rooms": r })))
}

/// `PUT /api/records/rooms/{id}` with a room.
pub(crate) async fn put_room(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let mut r: Room = body(
        &state,
        req,
        "a room {\"id\",\"name\",\"door\",\"authorized\",\"cabinets\",\"cameras\"}",
    )
    .await?;
    if !r.id.is_empty() && r.id != id {
        return Err(ApiError::bad_request("the room's id differs from the path"));
    }
    r.id = id;
    let vault = state.vault.clone();
    let r = blocking(move || vault.put_records_room(&c, r)).await??;
    Ok(plain_json(StatusCode::OK, json!(r)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatientQuery {
    #[serde(default)]
    patient: Option<String>,
}

/// `GET /api/records/volumes[?patient=ID]`.
pub(crate) async fn volumes(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<PatientQuery>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the only parameter is patient"))?;
    let list = as_caller(&state, &ctx, move |v, c| v.volumes(c, q.patient.as_deref())).await?;
    Ok(plain_json(StatusCode::OK, json!({ "volumes": list })))
}

/// `POST /api/records/volumes` → `201` with the volume.
pub(crate) async fn register(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let n: NewVolume = body(
        &state,
        req,
        "{\"barcode\",\"patient\",\"volume\",\"record_class\",\"room\",\"cabinet\",\"last_entry\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let v = blocking(move || vault.register_volume(&c, n)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(v)))
}

/// `GET /api/records/volumes/{barcode}` (the scanner's lookup).
pub(crate) async fn volume(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(barcode): Path<String>,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.scan_volume(c, &barcode)).await?;
    Ok(plain_json(StatusCode::OK, json!(v)))
}

/// `POST /api/records/volumes/{barcode}/custody {"act": "check-out"|"return"|"transfer"|
/// "missing"|"found", …}`.
pub(crate) async fn custody(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(barcode): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let act: CustodyAct = body(
        &state,
        req,
        "{\"act\":\"check-out\",\"to\"|\"department\",\"due\",\"retrieved_by\"} or {\"act\":\"return\",\"returned_by\"} or {\"act\":\"transfer\",\"to\"|\"department\",\"due\"} or {\"act\":\"missing\"|\"found\",\"note\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let v = blocking(move || vault.volume_custody(&c, &barcode, act)).await??;
    Ok(plain_json(StatusCode::OK, json!(v)))
}

/// `POST /api/records/badge-events` with the door system's CSV.
pub(crate) async fn badges(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let bytes = body_bytes(&state, req).await?;
    let csv = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the badge export must be UTF-8 CSV"))?;
    let vault = state.vault.clone();
    let n = blocking(move || vault.import_badge_events(&c, &csv)).await??;
    Ok(plain_json(StatusCode::OK, json!({ "imported": n })))
}

/// `GET /api/records/keys`.
pub(crate) async fn keys(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let k = as_caller(&state, &ctx, move |v, c| v.records_keys(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "keys": k })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    id: String,
    kind: String,
    room: String,
    #[serde(default)]
    cabinet: Option<String>,
}

/// `POST /api/records/keys {"id","kind","room","cabinet"}` → `201`.
pub(crate) async fn add_key(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let k: NewKey = body(
        &state,
        req,
        "{\"id\",\"kind\":\"key\"|\"combination\",\"room\",\"cabinet\"}",
    )
    .await?;
    let item = KeyItem {
        id: k.id,
        kind: k.kind,
        room: k.room,
        cabinet: k.cabinet,
        holders: vec![],
        history: vec![],
    };
    let vault = state.vault.clone();
    let k = blocking(move || vault.add_records_key(&c, item)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(k)))
}

/// `POST /api/records/keys/{id}/custody {"act": "issue","to"}|{"act":"return"}|
/// {"act":"change-combination","known_by":[…]}`.
pub(crate) async fn key_act(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let act: KeyAct = body(&state, req, "{\"act\":\"issue\",\"to\"} or {\"act\":\"return\"} or {\"act\":\"change-combination\",\"known_by\"}").await?;
    let vault = state.vault.clone();
    let k = blocking(move || vault.records_key_act(&c, &id, act)).await??;
    Ok(plain_json(StatusCode::OK, json!(k)))
}

/// `GET /api/records/footage-reviews`.
pub(crate) async fn footage(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.footage_reviews(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "reviews": r })))
}

/// `POST /api/records/footage-reviews {"room","incident","from","to","finding"}` → `201`.
pub(crate) async fn add_footage(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let r: FootageReview = body(
        &state,
        req,
        "{\"room\",\"incident\",\"from\",\"to\",\"finding\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let r = blocking(move || vault.log_footage_review(&c, r)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(r)))
}

/// `GET /api/records/visitors`.
pub(crate) async fn visitors(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.visitors(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "visitors": v })))
}

/// `POST /api/records/visitors` → `201` with the visitor and their flags.
pub(crate) async fn sign_in(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let n: NewVisitor = body(
        &state,
        req,
        "{\"name\",\"identity\",\"identity_checked\",\"host\",\"purpose\",\"escort\",\"room\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let v = blocking(move || vault.sign_in_visitor(&c, n)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(v)))
}

/// `POST /api/records/visitors/{id}/sign-out`.
pub(crate) async fn sign_out(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.sign_out_visitor(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(v)))
}

/// `GET /api/records/holds`.
pub(crate) async fn holds(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let h = as_caller(&state, &ctx, move |v, c| v.records_holds(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "holds": h })))
}

#[derive(Deserialize)]
struct HoldBody {
    #[serde(flatten)]
    scope: HoldScope,
    matter: String,
    reason: String,
}

/// `POST /api/records/holds {"scope": "patient"|"record_class"|"volume", "target",
/// "matter", "reason"}` → `201`.
pub(crate) async fn set_hold(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let shape =
        "{\"scope\":\"patient\"|\"record_class\"|\"volume\",\"target\",\"matter\",\"reason\"}";
    let v: serde_json::Value = body(&state, req, shape).await?;
    // `deny_unknown_fields` does not combine with the flattened scope: checked here.
    if let Some(k) = v.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["scope", "target", "matter", "reason"].contains(&k.as_str()))
    }) {
        return Err(ApiError::bad_request(format!(
            "body must be {shape}: unknown field `{}`",
            k.chars().take(40).collect::<String>()
        )));
    }
    let b: HoldBody = serde_json::from_value(v)
        .map_err(|e| ApiError::bad_request(format!("body must be {shape}: {e}")))?;
    let vault = state.vault.clone();
    let h = blocking(move || vault.set_records_hold(&c, b.scope, &b.matter, &b.reason)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(h)))
}

/// `POST /api/records/holds/{id}/release`.
pub(crate) async fn release_hold(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    as_caller(&state, &ctx, move |v, c| v.release_records_hold(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "released": true })))
}

/// `GET /api/records/destruction`.
pub(crate) async fn destructions(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let d = as_caller(&state, &ctx, move |v, c| v.paper_destructions(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "destructions": d })))
}

/// `POST /api/records/destruction {"volumes","reason","method","vendor","witness","date"}`
/// → `201` with the pending request.
pub(crate) async fn request_destruction(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let r: PaperRequest = body(
        &state,
        req,
        "{\"volumes\",\"reason\",\"method\",\"vendor\",\"witness\",\"date\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let d = blocking(move || vault.request_paper_destruction(&c, r)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(d)))
}

/// `POST /api/records/destruction/{id}/{approve|cancel}`.
pub(crate) async fn decide_destruction(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    match action.as_str() {
        "approve" => {
            let cert = blocking(move || vault.approve_paper_destruction(&c, &id)).await??;
            Ok(plain_json(
                StatusCode::OK,
                json!({"status": "completed", "certificate": cert}),
            ))
        }
        "cancel" => {
            blocking(move || vault.cancel_paper_destruction(&c, &id)).await??;
            Ok(plain_json(StatusCode::OK, json!({"status": "cancelled"})))
        }
        _ => Err(ApiError::not_found()),
    }
}

/// `GET /api/records/destruction/{id}/certificate` (`text/plain`, a C2SP signed note).
pub(crate) async fn certificate(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cert = as_caller(&state, &ctx, move |v, c| v.paper_certificate(c, &id)).await?;
    Ok(text(cert))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DueQuery {
    #[serde(default)]
    jurisdiction: Option<String>,
}

/// `GET /api/retention/due[?jurisdiction=J]`.
pub(crate) async fn due(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<DueQuery>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the only parameter is jurisdiction"))?;
    let list = as_caller(&state, &ctx, move |v, c| {
        v.retention_due(c, q.jurisdiction.as_deref())
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!({ "due": list })))
}

/// `GET /api/retention/schedules`.
pub(crate) async fn schedules(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.retention_schedules(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "schedules": s })))
}

/// `POST /api/retention/schedules` with a schedule → `201` (proposed).
pub(crate) async fn propose(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let s: Schedule = body(
        &state,
        req,
        "{\"jurisdiction\",\"record_class\",\"years\",\"until_age\",\"citation\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let s = blocking(move || vault.propose_schedule(&c, s)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(s)))
}

/// `POST /api/retention/schedules/{id}/approve` (a second person).
pub(crate) async fn approve(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.approve_schedule(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(s)))
}
