//! The one mapping from errors to HTTP status and FHIR OperationOutcome. The client
//! sees a stable code and a generic message; the log sees the cause (with request id).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use medvault_core::VaultError;
use medvault_fhir::{operation_outcome, FhirError, Issue, IssueCode};

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 answers).
    pub retry_after: Option<i64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            issues: vec![Issue::error(code, msg.into(), None)],
            code: None,
            retry_after: None,
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, IssueCode::Invalid, msg)
    }
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            IssueCode::Login,
            "authentication required",
        )
    }
    /// `503 sealed`: the master key is sealed until an operator runs `medvault unseal`.
    pub fn sealed() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            issues: vec![Issue::error(
                IssueCode::Transient,
                "medvault is sealed: an operator must run `medvault unseal` on the server".into(),
                None,
            )],
            code: Some("sealed"),
            retry_after: Some(5),
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueCode::NotFound, "not found")
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooLong,
            format!("request body exceeds {limit} bytes"),
        )
    }
}

impl From<medvault_fhir::FhirError> for ApiError {
    fn from(e: medvault_fhir::FhirError) -> Self {
        VaultError::Fhir(e).into()
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        use StatusCode as S;
        match e {
            VaultError::Fhir(f) => {
                let status = match f {
                    FhirError::Invalid(_) => S::UNPROCESSABLE_ENTITY,
                    _ => S::BAD_REQUEST,
                };
                ApiError {
                    status,
                    issues: f.issues(),
                    code: None,
                    retry_after: None,
                }
            }
            VaultError::BadRequest(m) => Self::new(S::BAD_REQUEST, IssueCode::Invalid, m),
            VaultError::Unprocessable(m) => {
                Self::new(S::UNPROCESSABLE_ENTITY, IssueCode::Processing, m)
            }
            VaultError::NotFound => Self::not_found(),
            VaultError::Gone => Self::new(S::GONE, IssueCode::Deleted, "resource has been deleted"),
            VaultError::Forbidden { withheld } => {
                let cats: Vec<&str> = withheld.iter().map(|c| c.as_str()).collect();
                let msg = if cats.is_empty() {
                    "access denied".to_owned()
                } else {
                    format!(
                        "access denied: your role may not see {} for this purpose of use",
                        cats.join(", ")
                    )
                };
                ApiError {
                    status: S::FORBIDDEN,
                    issues: vec![Issue::error(IssueCode::Forbidden, msg, None)],
                    code: Some("forbidden"),
                    retry_after: None,
                }
            }
            VaultError::NoRelationship { break_glass } => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    if break_glass {
                        "access denied: you have no treatment relationship (care team or recent encounter) with this patient; in an emergency, break the glass (POST /api/break-glass with the patient, a reason and a justification) for time-limited access that privacy officers review".to_owned()
                    } else {
                        "access denied: you have no treatment relationship (care team or recent encounter) with this patient".to_owned()
                    },
                    None,
                )],
                code: Some(if break_glass {
                    "break-the-glass"
                } else {
                    "no-treatment-relationship"
                }),
                retry_after: None,
            },
            VaultError::PurposeNotAllowed { declared, allowed } => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    format!(
                        "purpose of use {declared} is not one your role may declare; declare one of: {}",
                        allowed
                            .iter()
                            .map(|p| p.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None,
                )],
                code: Some("purpose-not-allowed"),
                retry_after: None,
            },
            VaultError::Duplicate(m) => ApiError::new(S::CONFLICT, IssueCode::Conflict, m),
            VaultError::SeparationOfDuties(m) => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    format!("access denied: {m}"),
                    None,
                )],
                code: Some("separation-of-duties"),
                retry_after: None,
            },
            VaultError::TrainingLapsed => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    "access denied: your required security training has lapsed; complete it (or, in a medical emergency, break the glass)".to_owned(),
                    None,
                )],
                code: Some("training-lapsed"),
                retry_after: None,
            },
            VaultError::Restricted { break_glass } => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    if break_glass {
                        "access denied: some of this patient's information is restricted; in a medical emergency, break the glass (POST /api/break-glass, reason medical-emergency) for time-limited access that privacy officers review".to_owned()
                    } else {
                        "access denied: some of this patient's information is restricted".to_owned()
                    },
                    None,
                )],
                code: Some(if break_glass { "break-the-glass" } else { "restricted" }),
                retry_after: None,
            },
            VaultError::Refused { action, rtype } => ApiError {
                status: S::FORBIDDEN,
                issues: vec![Issue::error(
                    IssueCode::Forbidden,
                    format!(
                        "access denied: your role may not {action} {rtype} for this purpose of use"
                    ),
                    None,
                )],
                code: Some("forbidden"),
                retry_after: None,
            },
            VaultError::Conflict => Self::new(
                S::CONFLICT,
                IssueCode::Conflict,
                "version conflict; read the resource and retry",
            ),
            VaultError::PreconditionFailed(why) => {
                Self::new(S::PRECONDITION_FAILED, IssueCode::Conflict, why)
            }
            VaultError::ReadOnly => ApiError {
                status: S::SERVICE_UNAVAILABLE,
                issues: vec![Issue::error(
                    IssueCode::Transient,
                    "this server runs in emergency read-only mode: records can be read but not changed until the primary is back".into(),
                    None,
                )],
                code: Some("read-only"),
                retry_after: None,
            },
            VaultError::Unauthenticated | VaultError::Identity(_) => Self::unauthenticated(),
            VaultError::Locked { retry_after } => ApiError {
                status: S::TOO_MANY_REQUESTS,
                issues: vec![Issue::error(
                    IssueCode::Throttled,
                    format!("too many failed attempts; try again in {retry_after} seconds"),
                    None,
                )],
                code: Some("locked"),
                retry_after: Some(retry_after.max(1)),
            },
            VaultError::Busy { retry_after } => ApiError {
                status: S::TOO_MANY_REQUESTS,
                issues: vec![Issue::error(
                    IssueCode::Throttled,
                    format!("the server is busy with other exports; try again in {retry_after} seconds"),
                    None,
                )],
                code: Some("busy"),
                retry_after: Some(retry_after.max(1)),
            },
            VaultError::StepUpRequired => ApiError {
                status: S::UNAUTHORIZED,
                issues: vec![Issue::error(
                    IssueCode::Login,
                    "this action needs a recently verified second factor (step-up): POST /auth/step-up/totp, /auth/step-up/recovery or /auth/step-up/webauthn/start".into(),
                    None,
                )],
                code: Some("step-up-required"),
                retry_after: None,
            },
            VaultError::AuditUnavailable => {
                tracing::error!("audit append failed; request refused (fail closed)");
                ApiError {
                    status: S::SERVICE_UNAVAILABLE,
                    issues: vec![Issue::error(
                        IssueCode::Transient,
                        "audit log unavailable; request refused".into(),
                        None,
                    )],
                    code: Some("audit-unavailable"),
                    retry_after: None,
                }
            }
            VaultError::MasterKeyUnavailable(cause) => {
                tracing::error!(%cause, "master key unavailable");
                Self::new(
                    S::SERVICE_UNAVAILABLE,
                    IssueCode::Transient,
                    "service temporarily unavailable",
                )
            }
            VaultError::Unavailable(cause) => {
                tracing::error!(%cause, "storage unavailable");
                Self::new(
                    S::SERVICE_UNAVAILABLE,
                    IssueCode::Transient,
                    "service temporarily unavailable",
                )
            }
            VaultError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    IssueCode::Exception,
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = operation_outcome(&self.issues, self.code);
        let mut r = (self.status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::FHIR_JSON),
        );
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"medvault\""),
            );
        }
        r
    }
}
