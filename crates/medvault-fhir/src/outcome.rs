//! OperationOutcome and CapabilityStatement.

use serde_json::{json, Value};

/// FHIR issue-type codes medvault uses (http://hl7.org/fhir/issue-type), plus medvault's
/// stable error codes carried in `details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    CodeInvalid,
    Security,
    Login,
    Forbidden,
    Suppressed,
    Processing,
    NotSupported,
    Duplicate,
    NotFound,
    Deleted,
    TooLong,
    TooCostly,
    Conflict,
    Exception,
    Transient,
    Throttled,
    /// An expected response or input did not arrive in time.
    Timeout,
    Informational,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Suppressed => "suppressed",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::TooLong => "too-long",
            IssueCode::TooCostly => "too-costly",
            IssueCode::Conflict => "conflict",
            IssueCode::Exception => "exception",
            IssueCode::Transient => "transient",
            IssueCode::Throttled => "throttled",
            IssueCode::Timeout => "timeout",
            IssueCode::Informational => "informational",
        }
    }
}

/// One OperationOutcome issue. `diagnostics` never carries element values.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: &'static str,
    pub code: IssueCode,
    pub diagnostics: String,
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: IssueCode, diagnostics: String, expression: Option<String>) -> Self {
        Issue {
            severity: "error",
            code,
            diagnostics,
            expression,
        }
    }
    pub fn info(code: IssueCode, diagnostics: String) -> Self {
        Issue {
            severity: "information",
            code,
            diagnostics,
            expression: None,
        }
    }
    pub fn warning(code: IssueCode, diagnostics: String) -> Self {
        Issue {
            severity: "warning",
            code,
            diagnostics,
            expression: None,
        }
    }
}

/// An OperationOutcome resource; `medvault_code` is a stable code for clients (e.g. `step-up-required`).
pub fn operation_outcome(issues: &[Issue], medvault_code: Option<&str>) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = serde_json::Map::new();
            v.insert("severity".into(), json!(i.severity));
            v.insert("code".into(), json!(i.code.as_str()));
            v.insert("diagnostics".into(), json!(i.diagnostics));
            if let Some(e) = &i.expression {
                v.insert("expression".into(), json!([e]));
            }
            if let Some(c) = medvault_code {
                v.insert(
                    "details".into(),
                    json!({"coding": [{"system": "https://medvault.dev/error", "code": c}]}),
                );
            }
            Value::Object(v)
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

/// Search parameters each type supports (beyond `_id`, `_lastUpdated`, `_count`).
pub fn search_params(rt: &str) -> &'static [&'static str] {
    match rt {
        "Patient" => &["identifier", "name", "family", "given", "birthdate"],
        "Practitioner" => &["identifier", "name", "family", "given"],
        "Organization" => &["identifier", "name"],
        "Observation" | "DiagnosticReport" | "Condition" => &[
            "patient",
            "subject",
            "identifier",
            "code",
            "category",
            "date",
            "status",
        ],
        "Encounter"
        | "CarePlan"
        | "DocumentReference"
        | "MedicationRequest"
        | "MedicationStatement" => &[
            "patient",
            "subject",
            "identifier",
            "code",
            "category",
            "date",
            "status",
        ],
        _ => &["patient", "identifier", "code", "date", "status"],
    }
}

/// The server's CapabilityStatement.
/// The `_include` values a search on `t` follows (CapabilityStatement `searchInclude`).
fn include_params(t: &str) -> Vec<String> {
    let mut out = vec!["*".to_owned()];
    let params: &[&str] = match t {
        "Patient" => &["organization", "general-practitioner"],
        "Practitioner" | "Organization" => &[],
        "Encounter" => &["subject", "patient", "practitioner"],
        "Observation" | "DiagnosticReport" => &["subject", "patient", "encounter", "performer"],
        "MedicationRequest" => &["subject", "patient", "encounter", "requester"],
        "Condition" => &["subject", "patient", "encounter", "asserter", "recorder"],
        "AllergyIntolerance" | "Immunization" => &["patient", "recorder"],
        "DocumentReference" => &["subject", "patient", "author", "encounter"],
        "Coverage" | "Claim" | "ExplanationOfBenefit" => &["patient"],
        _ => &["subject", "patient", "encounter"],
    };
    out.extend(params.iter().map(|p| format!("{t}:{p}")));
    out
}

pub fn capability_statement(version: &str, date: &str) -> Value {
    let resources: Vec<Value> = crate::SUPPORTED_TYPES
        .iter()
        .map(|t| {
            let mut params = vec![
                json!({"name": "_id", "type": "token"}),
                json!({"name": "_lastUpdated", "type": "date"}),
                json!({"name": "_count", "type": "number"}),
                json!({"name": "_sort", "type": "special", "documentation": "_id, _lastUpdated, or a date parameter; - for descending"}),
                json!({"name": "_summary", "type": "special"}),
                json!({"name": "_elements", "type": "special"}),
            ];
            for p in search_params(t) {
                let ty = match *p {
                    "patient" | "subject" => "reference",
                    "name" | "family" | "given" => "string",
                    "birthdate" | "date" => "date",
                    _ => "token",
                };
                params.push(json!({"name": p, "type": ty}));
            }
            params.push(json!({"name": "_has", "type": "special",
                "documentation": "On Patient: _has:{Type}:patient|subject:{param} for the patient-compartment types"}));
            let interactions: Vec<Value> = ["read", "vread", "update", "delete", "history-instance", "create", "search-type"]
                .iter()
                .map(|c| json!({"code": c}))
                .collect();
            // Conditional interactions (FHIR R4 §3.1.0.8): If-None-Exist and ifNoneExist,
            // PUT Type?search, If-None-Match/If-Modified-Since on read; If-Match and
            // If-None-Match on update and in transaction entries.
            let mut r = json!({"type": t, "versioning": "versioned-update", "readHistory": true, "updateCreate": false,
                "conditionalCreate": true, "conditionalUpdate": true, "conditionalRead": "full-support",
                "conditionalDelete": "not-supported",
                "interaction": interactions, "searchParam": params,
                "searchInclude": include_params(t)
});
            if let (true, Some(o)) = (*t == "Patient", r.as_object_mut()) {
                o.insert("searchRevInclude".into(), json!(["Observation:subject", "Observation:patient", "Condition:subject",
                    "Encounter:subject", "MedicationRequest:subject", "AllergyIntolerance:patient", "Immunization:patient",
                    "DiagnosticReport:subject", "Procedure:patient", "DocumentReference:subject"]));
            }
            if let (true, Some(o)) = (*t == "Patient", r.as_object_mut()) {
                o.insert(
                    "operation".into(),
                    json!([{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                           {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]),
                );
            }
            r
        })
        .collect();
    let mut resources = resources;
    // The audit log as AuditEvents: searched by privacy officers and auditors, never written.
    resources.push(
        json!({"type": "AuditEvent", "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": "patient", "type": "reference"}, {"name": "agent", "type": "reference"},
            {"name": "date", "type": "date"}, {"name": "action", "type": "token"},
            {"name": "_count", "type": "number"}, {"name": "_offset", "type": "number"}]}),
    );
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        // cpb-14: an instance statement describes the implementation it is.
        "kind": "instance",
        "implementation": {"description": "medvault secure electronic medical records server"},
        "software": {"name": "medvault", "version": version},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {"cors": false, "description": "HTTPS only. People: password plus a second factor (TOTP, recovery code or WebAuthn passkey), or OpenID Connect single sign-on (/auth/oidc/{name}/start); bearer session tokens. Apps: SMART App Launch 2.0 (/.well-known/smart-configuration; authorization code with PKCE, patient/ and user/ read scopes, EHR and standalone launch). Systems: OAuth2 client credentials at /auth/token (client secret or private_key_jwt, SMART v2 system scopes). Bulk Data: Group/my-patients/$export, Patient/$export, $export.",
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "OAuth"}]},
                            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]},
            "resource": resources,
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
            "interaction": [{"code": "transaction"}]
        }]
    })
}
