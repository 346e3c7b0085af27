//! medvault-fhir — FHIR R4 JSON at the edge: parse, validate, categorize, extract search
//! parameters, and build OperationOutcome and Bundle resources.
//!
//! Validation is driven by HL7's own R4 StructureDefinitions, reduced by
//! `tools/gen-fhir-defs.py` to `data/r4-elements.json` and vendored (no fetch at build time).
//! This room must never touch storage or keys, and never echo element *values* in
//! error text (they may be PHI): diagnostics name paths and rules only.
//! INVARIANT: a [`Resource`] value has passed validation; nothing downstream re-checks raw JSON.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod care;
pub mod date;
mod defs;
pub mod deid;
#[cfg(test)]
mod fuzz;
mod index;
mod outcome;
pub mod privacy;
pub mod search;
mod validate;

pub use index::{
    date_interval_of, date_of, normalize_text, search_tokens, SearchToken, INDEX_VERSION,
    MIN_PREFIX,
};
pub use outcome::{capability_statement, operation_outcome, search_params, Issue, IssueCode};

use medvault_types::{Category, PatientId};
use serde_json::{Map, Value};

/// Resource types medvault serves, in CapabilityStatement order.
pub const SUPPORTED_TYPES: &[&str] = &[
    "Patient",
    "Practitioner",
    "Organization",
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "MedicationStatement",
    "Procedure",
    "Immunization",
    "DiagnosticReport",
    "CarePlan",
    "CareTeam",
    "DocumentReference",
    "Coverage",
    "Claim",
    "ExplanationOfBenefit",
    "Consent",
];

/// Largest accepted JSON nesting (serde_json itself stops at 128).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("unsupported resource type")]
    UnknownType,
    #[error("resourceType does not match the request URL")]
    TypeMismatch,
    #[error("invalid resource")]
    Invalid(Vec<Issue>),
    /// A well-formed request this server cannot process as asked (a Bundle of the wrong
    /// type, an entry without a request, …); the message says which.
    #[error("{0}")]
    Request(String),
}

impl FhirError {
    /// The OperationOutcome issues describing this error.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            FhirError::Invalid(v) => v.clone(),
            FhirError::Malformed(m) => vec![Issue::error(IssueCode::Structure, m.clone(), None)],
            FhirError::UnknownType => {
                vec![Issue::error(
                    IssueCode::NotSupported,
                    "resource type is not supported".into(),
                    None,
                )]
            }
            FhirError::Request(m) => vec![Issue::error(IssueCode::Invalid, m.clone(), None)],
            FhirError::TypeMismatch => vec![Issue::error(
                IssueCode::Invalid,
                "resourceType in the body does not match the URL".into(),
                Some("resourceType".into()),
            )],
        }
    }
}

/// A supported resource type name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResourceType(&'static str);

impl ResourceType {
    pub fn parse(s: &str) -> Option<Self> {
        SUPPORTED_TYPES
            .iter()
            .find(|t| **t == s)
            .map(|t| ResourceType(t))
    }
    pub fn as_str(self) -> &'static str {
        self.0
    }
    /// Does every instance of this type belong to one patient's chart?
    pub fn is_patient_scoped(self) -> bool {
        !matches!(self.0, "Practitioner" | "Organization")
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A validated FHIR resource of a supported type.
#[derive(Clone, Debug)]
pub struct Resource {
    rtype: ResourceType,
    json: Map<String, Value>,
}

impl Resource {
    /// Parses and validates JSON bytes; `expected` is the type named by the URL, if any.
    pub fn parse(bytes: &[u8], expected: Option<ResourceType>) -> Result<Self, FhirError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| FhirError::Malformed(json_error_text(&e)))?;
        Self::from_value(v, expected)
    }

    /// Validates an already-parsed JSON value (e.g. a Bundle entry).
    pub fn from_value(v: Value, expected: Option<ResourceType>) -> Result<Self, FhirError> {
        let Value::Object(json) = v else {
            return Err(FhirError::Malformed(
                "a resource must be a JSON object".into(),
            ));
        };
        let rt = json
            .get("resourceType")
            .and_then(Value::as_str)
            .ok_or_else(|| FhirError::Malformed("missing resourceType".into()))?;
        let rtype = ResourceType::parse(rt).ok_or(FhirError::UnknownType)?;
        if let Some(e) = expected {
            if e != rtype {
                return Err(FhirError::TypeMismatch);
            }
        }
        let mut issues = validate::validate_resource(rtype.as_str(), &json);
        issues.extend(contained_issues(rtype, &json));
        if !issues.is_empty() {
            return Err(FhirError::Invalid(issues));
        }
        Ok(Resource { rtype, json })
    }

    /// Re-opens a resource this server stored itself (already validated when written).
    pub fn from_trusted(rtype: ResourceType, json: Map<String, Value>) -> Self {
        Resource { rtype, json }
    }

    pub fn rtype(&self) -> ResourceType {
        self.rtype
    }
    pub fn json(&self) -> &Map<String, Value> {
        &self.json
    }
    pub fn into_json(self) -> Map<String, Value> {
        self.json
    }
    pub fn id(&self) -> Option<&str> {
        self.json.get("id").and_then(Value::as_str)
    }

    /// Sets server-assigned id and meta (versionId, lastUpdated), keeping meta.security/tag/profile.
    pub fn stamp(&mut self, id: &str, version: u64, last_updated: &str) {
        self.json.insert("id".into(), Value::String(id.to_owned()));
        let meta = self
            .json
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = meta {
            m.insert("versionId".into(), Value::String(version.to_string()));
            m.insert("lastUpdated".into(), Value::String(last_updated.to_owned()));
        }
    }

    /// The data category this resource belongs to (the unit of least privilege).
    pub fn category(&self) -> Category {
        category_of(self.rtype, &self.json)
    }

    /// The patient whose chart holds this resource, as written in the resource.
    pub fn patient_reference(&self) -> Option<String> {
        let field = match self.rtype.as_str() {
            "Patient" => return self.id().map(|s| format!("Patient/{s}")),
            "AllergyIntolerance"
            | "Immunization"
            | "Claim"
            | "ExplanationOfBenefit"
            | "Consent" => "patient",
            "Coverage" => "beneficiary",
            "Practitioner" | "Organization" => return None,
            _ => "subject",
        };
        self.json
            .get(field)?
            .get("reference")?
            .as_str()
            .map(str::to_owned)
    }

    /// Rewrites every `reference` equal to `from` into `to` (transaction Bundles' urn:uuid).
    pub fn rewrite_references(&mut self, map: &std::collections::HashMap<String, String>) {
        fn walk(v: &mut Value, map: &std::collections::HashMap<String, String>) {
            match v {
                Value::Object(o) => {
                    for (k, child) in o.iter_mut() {
                        if k == "reference" {
                            if let Value::String(s) = child {
                                if let Some(n) = map.get(s.as_str()) {
                                    *s = n.clone();
                                }
                            }
                        } else {
                            walk(child, map);
                        }
                    }
                }
                Value::Array(a) => a.iter_mut().for_each(|x| walk(x, map)),
                _ => {}
            }
        }
        for (k, v) in self.json.iter_mut() {
            if k != "id" {
                walk(v, map);
            }
        }
    }
}

/// Validates a resource of any type in the vendored R4 definitions (including types medvault
/// produces but does not accept, such as AuditEvent).
pub fn validate_any(json: &Map<String, Value>) -> Result<(), Vec<Issue>> {
    let rt = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let issues = validate::validate_resource(rt, json);
    if issues.is_empty() {
        Ok(())
    } else {
        Err(issues)
    }
}

/// Parses `Patient/{id}` into a patient id.
pub fn patient_id_from_reference(r: &str) -> Option<PatientId> {
    let id = r.strip_prefix("Patient/")?;
    PatientId::new(id).ok()
}

fn coding_codes(v: Option<&Value>) -> Vec<String> {
    let mut out = vec![];
    let items: Vec<&Value> = match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(x) => vec![x],
        None => vec![],
    };
    for cc in items {
        if let Some(Value::Array(codings)) = cc.get("coding") {
            for c in codings {
                if let Some(code) = c.get("code").and_then(Value::as_str) {
                    out.push(code.to_owned());
                }
            }
        }
    }
    out
}

/// A contained resource (FHIR R4 §2.1.0.6 "contained") is stored, sealed and decided as part
/// of its container, so it must be of a type medvault stores and of the container's data
/// category: otherwise a role could write, or read, a category through a container it may
/// (a Condition inside a Patient would reach whoever may read demographics).
fn contained_issues(rt: ResourceType, json: &Map<String, Value>) -> Vec<Issue> {
    let Some(Value::Array(items)) = json.get("contained") else {
        return vec![];
    };
    let own = category_of(rt, json);
    let mut out = vec![];
    for (i, item) in items.iter().enumerate() {
        let inner = item
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(ResourceType::parse);
        let ok = match (inner, item.as_object()) {
            (Some(t), Some(o)) => category_of(t, o) == own,
            _ => false,
        };
        if !ok {
            out.push(Issue::error(
                IssueCode::Invalid,
                format!(
                    "a contained resource must be of a type medvault stores and of its container's data category ({}); store it as its own resource and reference it",
                    own.as_str()
                ),
                Some(format!("contained[{i}]")),
            ));
        }
    }
    out
}

/// Every data category a resource of type `rt` can belong to (what [`Resource::category`]
/// may answer for it).
pub fn categories_of_type(rt: ResourceType) -> &'static [Category] {
    match rt.as_str() {
        "Observation" => &[Category::Vitals, Category::Labs],
        "Patient" => &[Category::Demographics],
        "Consent" => &[Category::Consents],
        "Practitioner" | "Organization" => &[Category::Directory],
        "Encounter" => &[Category::Encounters],
        "DiagnosticReport" => &[Category::Labs],
        "Condition" => &[Category::Problems],
        "AllergyIntolerance" => &[Category::Allergies],
        "MedicationRequest" | "MedicationStatement" => &[Category::Medications],
        "Procedure" => &[Category::Procedures],
        "Immunization" => &[Category::Immunizations],
        "CarePlan" | "CareTeam" => &[Category::CarePlans],
        "DocumentReference" => &[Category::Notes],
        _ => &[Category::Billing],
    }
}

fn category_of(rt: ResourceType, json: &Map<String, Value>) -> Category {
    match rt.as_str() {
        "Patient" => Category::Demographics,
        "Consent" => Category::Consents,
        "Practitioner" | "Organization" => Category::Directory,
        "Encounter" => Category::Encounters,
        "Observation" => {
            let cats = coding_codes(json.get("category"));
            if cats.iter().any(|c| c == "vital-signs") {
                Category::Vitals
            } else {
                Category::Labs
            }
        }
        "DiagnosticReport" => Category::Labs,
        "Condition" => Category::Problems,
        "AllergyIntolerance" => Category::Allergies,
        "MedicationRequest" | "MedicationStatement" => Category::Medications,
        "Procedure" => Category::Procedures,
        "Immunization" => Category::Immunizations,
        "CarePlan" | "CareTeam" => Category::CarePlans,
        "DocumentReference" => Category::Notes,
        _ => Category::Billing,
    }
}

fn json_error_text(e: &serde_json::Error) -> String {
    use serde_json::error::Category as C;
    let what = match e.classify() {
        C::Io => "could not read body",
        C::Syntax => "syntax error",
        C::Data => "unexpected value",
        C::Eof => "unexpected end of input",
    };
    let msg = e.to_string();
    if msg.contains("recursion limit") {
        return "JSON nesting too deep".into();
    }
    format!("{what} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Resource, FhirError> {
        Resource::parse(v.to_string().as_bytes(), None)
    }

    fn codes(e: FhirError) -> Vec<String> {
        e.issues().into_iter().map(|i| i.diagnostics).collect()
    }

    #[test]
    fn accepts_a_realistic_observation() {
        let r = parse(json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-01T10:00:00Z",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            "component": [{"code": {"text": "x"}, "valueString": "y"}],
            "_status": {"extension": [{"url": "http://example.org/x", "valueBoolean": true}]}
        }))
        .unwrap();
        assert_eq!(r.category(), Category::Vitals);
        assert_eq!(r.patient_reference().as_deref(), Some("Patient/p1"));
    }

    #[test]
    fn rejects_unknown_elements_and_wrong_types() {
        let e = parse(json!({"resourceType": "Patient", "nmae": []})).unwrap_err();
        assert!(codes(e)[0].contains("unknown element"));
        let e = parse(json!({"resourceType": "Patient", "birthDate": "1980-13-01"})).unwrap_err();
        assert!(codes(e)[0].contains("date"));
        let e = parse(json!({"resourceType": "Patient", "active": "yes"})).unwrap_err();
        assert!(codes(e)[0].contains("boolean"));
        let e = parse(json!({"resourceType": "Patient", "gender": "mail"})).unwrap_err();
        assert!(codes(e)[0].contains("value set"));
        let e = parse(json!({"resourceType": "Patient", "name": {"family": "x"}})).unwrap_err();
        assert!(codes(e)[0].contains("array"));
        let e = parse(json!({"resourceType": "Observation", "code": {"text": "x"}})).unwrap_err();
        assert!(codes(e).iter().any(|d| d.contains("required")));
        let e = parse(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueString": "a", "valueBoolean": true}),
        )
        .unwrap_err();
        assert!(codes(e)[0].contains("one of"));
        let e = parse(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/../../etc"}}),
        )
        .unwrap_err();
        assert!(codes(e)[0].contains("reference"));
        assert!(matches!(
            parse(json!({"resourceType": "Basic"})),
            Err(FhirError::UnknownType)
        ));
        assert!(matches!(
            Resource::parse(
                br#"{"resourceType":"Patient"}"#,
                ResourceType::parse("Observation")
            ),
            Err(FhirError::TypeMismatch)
        ));
    }

    #[test]
    fn errors_never_echo_values() {
        let e =
            parse(json!({"resourceType": "Patient", "birthDate": "CANARY-SECRET"})).unwrap_err();
        assert!(!format!("{:?}", e.issues()).contains("CANARY"));
    }

    #[test]
    fn deep_nesting_is_a_clean_error() {
        let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        assert!(matches!(
            Resource::parse(deep.as_bytes(), None),
            Err(FhirError::Malformed(_))
        ));
        let mut v = json!({"url": "http://x"});
        for _ in 0..100 {
            v = json!({"url": "http://x", "extension": [v]});
        }
        let e = parse(json!({"resourceType": "Patient", "extension": [v]})).unwrap_err();
        assert!(matches!(e, FhirError::Malformed(_) | FhirError::Invalid(_)));
    }

    #[test]
    fn every_supported_type_has_definitions() {
        for t in SUPPORTED_TYPES {
            assert!(defs::defs().is_resource(t), "{t}");
        }
    }
}
