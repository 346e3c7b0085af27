//! `/api/*` administration endpoints (security administrators; no PHI).

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use medvault_core::{Password, Role};
use serde::Deserialize;
use serde_json::json;

use crate::{
    as_caller, blocking, body_bytes, caller, optional_caller, plain_json, ApiError, AppState, Ctx,
};

pub(crate) async fn status(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.status(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(s)))
}

/// `GET /api/keys/status`: master key versions and a rotation's progress (no key material).
pub(crate) async fn key_status(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let s = as_caller(&state, &ctx, move |v, c| v.key_status(c)).await?;
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

/// `GET /audit/checkpoint`: the latest signed checkpoint (C2SP signed note).
pub(crate) async fn checkpoint(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = optional_caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let note = blocking(move || vault.latest_checkpoint(&c))
        .await??
        .ok_or_else(ApiError::not_found)?;
    Ok(text(note))
}

/// `POST /audit/checkpoint`: sign a checkpoint now (privacy officers, auditors).
pub(crate) async fn checkpoint_now(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let note = blocking(move || vault.checkpoint_now(&c))
        .await??
        .ok_or_else(ApiError::not_found)?;
    Ok(text(note))
}

/// `GET /audit/key`: the checkpoint verifier key (C2SP note verifier-key form).
pub(crate) async fn key(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let c = optional_caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let key = blocking(move || vault.audit_verifier_key(&c)).await??;
    Ok(text(format!("{key}\n")))
}

pub(crate) fn text(body: String) -> Response {
    use axum::http::{header, HeaderValue};
    use axum::response::IntoResponse;
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[derive(Deserialize)]
pub(crate) struct InclusionQuery {
    index: u64,
    size: u64,
}

#[derive(Deserialize)]
pub(crate) struct ConsistencyQuery {
    old: u64,
    new: u64,
}

#[derive(Deserialize)]
pub(crate) struct EntriesQuery {
    start: u64,
    end: u64,
}

pub(crate) type QueryResult<Q> =
    Result<axum::extract::Query<Q>, axum::extract::rejection::QueryRejection>;

/// Parses the query, authenticates, and runs `f` on the gate off the async runtime.
async fn with_query<Q, T: Send + 'static>(
    state: &AppState,
    ctx: &Ctx,
    q: QueryResult<Q>,
    usage: &'static str,
    f: impl FnOnce(
            &medvault_core::Vault,
            &medvault_core::Caller,
            Q,
        ) -> Result<T, medvault_core::VaultError>
        + Send
        + 'static,
) -> Result<T, ApiError>
where
    Q: Send + 'static,
{
    let axum::extract::Query(q) = q.map_err(|_| ApiError::bad_request(usage))?;
    let c = optional_caller(state, ctx).await?;
    let vault = state.vault.clone();
    Ok(blocking(move || f(&vault, &c, q)).await??)
}

pub(crate) async fn inclusion(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<InclusionQuery>,
) -> Result<Response, ApiError> {
    let p = with_query(
        &state,
        &ctx,
        q,
        "index and size are required integers",
        |v, c, q| v.inclusion_proof(c, q.index, q.size),
    )
    .await?;
    Ok(plain_json(StatusCode::OK, json!(p)))
}

pub(crate) async fn consistency(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<ConsistencyQuery>,
) -> Result<Response, ApiError> {
    let p = with_query(
        &state,
        &ctx,
        q,
        "old and new are required integers",
        |v, c, q| v.consistency_proof(c, q.old, q.new),
    )
    .await?;
    Ok(plain_json(StatusCode::OK, json!(p)))
}

pub(crate) async fn entries(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<EntriesQuery>,
) -> Result<Response, ApiError> {
    let rows = with_query(
        &state,
        &ctx,
        q,
        "start and end are required integers",
        |v, c, q| v.audit_entries(c, q.start, q.end),
    )
    .await?;
    let entries: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(seq, commitment, leaf, rec)| json!({"index": seq, "commitment": commitment, "leaf_hash": leaf, "record": rec}))
        .collect();
    Ok(plain_json(StatusCode::OK, json!({"entries": entries})))
}

/// `GET /audit/tile/…`: C2SP tlog-tiles hash tiles and entry bundles (commitments only).
pub(crate) async fn tile(
    State(state): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let t = medvault_core::TileRef::parse(&path).ok_or_else(ApiError::not_found)?;
    let c = optional_caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let bytes = blocking(move || vault.tile(&c, t)).await??;
    use axum::http::{header, HeaderValue};
    use axum::response::IntoResponse;
    let mut r = (StatusCode::OK, bytes).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(r)
}

pub(crate) async fn access_report(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let pid = id.clone();
    let rows = blocking(move || vault.access_report(&c, &pid)).await??;
    Ok(plain_json(
        StatusCode::OK,
        json!({"patient": id, "accesses": rows}),
    ))
}

pub(crate) async fn disclosures(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let pid = id.clone();
    let rows = blocking(move || vault.disclosures(&c, &pid)).await??;
    Ok(plain_json(
        StatusCode::OK,
        json!({"patient": id, "window_years": 6, "disclosures": rows}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisclosureBody {
    patient: String,
    recipient: String,
    purpose: String,
    #[serde(default)]
    categories: Vec<String>,
    /// Who received it: name and address (sealed under the patient's key).
    #[serde(default)]
    recipient_name: Option<String>,
    /// What was disclosed, briefly (sealed under the patient's key).
    #[serde(default)]
    description: Option<String>,
}

pub(crate) async fn record_disclosure(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: DisclosureBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"patient\", \"recipient\", \"purpose\", \"categories\", \"recipient_name\", \"description\"}",
        )
    })?;
    let vault = state.vault.clone();
    let index = blocking(move || {
        let text = medvault_core::DisclosureText {
            recipient_name: b.recipient_name,
            description: b.description,
        };
        vault.record_disclosure(
            &c,
            &b.patient,
            &b.recipient,
            &b.purpose,
            &b.categories,
            &text,
        )
    })
    .await??;
    Ok(plain_json(
        StatusCode::CREATED,
        json!({"audit_index": index}),
    ))
}

/// `GET /audit/checkpoint/{size}`: a stored checkpoint with its witness cosignatures.
pub(crate) async fn checkpoint_at(
    State(state): State<AppState>,
    axum::extract::Path(size): axum::extract::Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let size: u64 = size
        .parse()
        .map_err(|_| ApiError::bad_request("size must be a number"))?;
    let c = optional_caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let note = blocking(move || vault.checkpoint_at(&c, size))
        .await??
        .ok_or_else(ApiError::not_found)?;
    Ok(text(note))
}

/// `POST /audit/cosignature`: a witness returns the checkpoint with its cosignature.
pub(crate) async fn cosignature(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let note = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("the note must be UTF-8 text"))?;
    let vault = state.vault.clone();
    let added = blocking(move || vault.add_cosignatures(&c, &note)).await??;
    Ok(plain_json(
        StatusCode::OK,
        json!({"cosignatures_added": added}),
    ))
}

/// `GET /api/users`: every account (security administrators).
pub(crate) async fn users(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.users(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "users": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    username: String,
    role: String,
    #[serde(default)]
    password: Option<String>,
}

/// `POST /api/users {"username","role","password"?}` (step-up): the new user's one-time
/// secrets, as `medvault user add --json` prints them.
pub(crate) async fn add_user(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: NewUserBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request("body must be {\"username\", \"role\", \"password\" (optional)}")
    })?;
    let role: Role = b
        .role
        .parse()
        .map_err(|_| ApiError::bad_request("unknown role"))?;
    let vault = state.vault.clone();
    let password = b.password.map(Password::new);
    let u = blocking(move || vault.add_user(&c, &b.username, role, password)).await??;
    Ok(plain_json(
        StatusCode::CREATED,
        json!({"username": u.username.as_str(), "role": u.role.as_str(), "password": u.password.expose(),
               "totp_secret": u.totp_secret, "totp_uri": u.totp_uri, "recovery_codes": u.recovery_codes,
               "practitioner_id": u.practitioner_id}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainingBody {
    current: bool,
}

/// `POST /api/users/{name}/{disable|enable|unlock|mfa-reset|role|training}` (step-up).
pub(crate) async fn user_action(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((name, action)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let who = name.clone();
    let done = match action.as_str() {
        "disable" | "enable" => {
            let off = action == "disable";
            blocking(move || vault.set_user_disabled(&c, &name, off)).await??;
            json!({"username": who, "disabled": off})
        }
        "unlock" => {
            blocking(move || vault.unlock_user(&c, &name)).await??;
            json!({"username": who, "unlocked": true})
        }
        "role" => {
            let b: RoleBody = serde_json::from_slice(&body)
                .map_err(|_| ApiError::bad_request("body must be {\"role\": ROLE}"))?;
            let role: Role = b
                .role
                .parse()
                .map_err(|_| ApiError::bad_request("unknown role"))?;
            blocking(move || vault.set_user_role(&c, &name, role)).await??;
            json!({"username": who, "role": role.as_str()})
        }
        "training" => {
            let b: TrainingBody = serde_json::from_slice(&body)
                .map_err(|_| ApiError::bad_request("body must be {\"current\": true|false}"))?;
            blocking(move || vault.set_user_training(&c, &name, b.current)).await??;
            json!({"username": who, "training_current": b.current})
        }
        "mfa-reset" => {
            let e = blocking(move || vault.reset_mfa(&c, &name)).await??;
            json!({"totp_secret": e.totp_secret, "totp_uri": e.totp_uri, "recovery_codes": e.recovery_codes})
        }
        _ => return Err(ApiError::not_found()),
    };
    Ok(plain_json(StatusCode::OK, done))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlassBody {
    patient: String,
    reason: String,
    justification: String,
}

/// `POST /api/break-glass {"patient","reason","justification"}` (step-up): `201` with the
/// grant, or `200` with `suppressed` when the caller already treats the patient.
pub(crate) async fn break_glass(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: BreakGlassBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"patient\": ID, \"reason\": CODE, \"justification\": TEXT}",
        )
    })?;
    let vault = state.vault.clone();
    let g =
        blocking(move || vault.break_glass(&c, &b.patient, &b.reason, &b.justification)).await??;
    let status = if g.id.is_some() && g.suppressed.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(plain_json(status, json!(g)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReviewsQuery {
    #[serde(default)]
    status: Option<String>,
}

/// `GET /api/break-glass/reviews[?status=pending|all]` (privacy officers; default pending).
pub(crate) async fn break_glass_reviews(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<ReviewsQuery>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the only parameter is status=pending|all"))?;
    let pending = match q.status.as_deref() {
        None | Some("pending") => true,
        Some("all") => false,
        Some(_) => return Err(ApiError::bad_request("status must be pending or all")),
    };
    let list = as_caller(&state, &ctx, move |v, c| v.break_glass_reviews(c, pending)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "reviews": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    outcome: String,
    #[serde(default)]
    note: String,
}

/// `POST /api/break-glass/{id}/review {"outcome": "appropriate"|"inappropriate", "note"}`.
pub(crate) async fn review_break_glass(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: ReviewBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"outcome\": \"appropriate\" or \"inappropriate\", \"note\": TEXT}",
        )
    })?;
    let vault = state.vault.clone();
    let v = blocking(move || vault.review_break_glass(&c, &id, &b.outcome, &b.note)).await??;
    Ok(plain_json(StatusCode::OK, json!(v)))
}

/// `GET /api/incidents` (privacy officers).
pub(crate) async fn incidents(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.incidents(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "incidents": list })))
}

/// `GET /api/policies`: every version (the built-in set is version 0) with its status.
pub(crate) async fn policies(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let list = as_caller(&state, &ctx, move |v, c| v.policies(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "policies": list })))
}

/// `PUT /api/policies` with the Cedar text as the body (step-up): proposes a version.
pub(crate) async fn propose_policy(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("the policy set must be UTF-8 Cedar text"))?;
    let vault = state.vault.clone();
    let version = blocking(move || vault.propose_policy(&c, &text)).await??;
    Ok(plain_json(
        StatusCode::CREATED,
        json!({"version": version, "status": "proposed"}),
    ))
}

/// `POST /api/policies/{version}/approve` (step-up; a security administrator other than
/// the proposer).
pub(crate) async fn approve_policy(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let version: i64 = version
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(ApiError::not_found)?;
    let vault = state.vault.clone();
    blocking(move || vault.approve_policy(&c, version)).await??;
    Ok(plain_json(
        StatusCode::OK,
        json!({"version": version, "status": "active"}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalLinkBody {
    username: String,
    relationship: String,
    evidence: String,
}

/// `POST /api/patients/{id}/portal-links {"username","relationship","evidence"}` (front
/// desk, step-up): links a patient portal account after identity proofing.
pub(crate) async fn link_portal(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let body = body_bytes(&state, req).await?;
    let b: PortalLinkBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "body must be {\"username\", \"relationship\": \"self\"|\"guardian\"|\"caregiver\", \"evidence\"}",
        )
    })?;
    let vault = state.vault.clone();
    let (who, rel) = (b.username.clone(), b.relationship.clone());
    let patient = id.clone();
    blocking(move || vault.link_portal(&c, &id, &b.username, &b.relationship, &b.evidence))
        .await??;
    Ok(plain_json(
        StatusCode::CREATED,
        json!({"username": who, "patient": patient, "relationship": rel}),
    ))
}

/// `DELETE /api/patients/{id}/portal-links/{username}` (front desk, step-up).
pub(crate) async fn unlink_portal(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((id, username)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    blocking(move || vault.unlink_portal(&c, &id, &username)).await??;
    Ok(plain_json(StatusCode::OK, json!({"unlinked": true})))
}
