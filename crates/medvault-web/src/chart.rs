//! Clinicians' and patients' pages: patient search (posted, so no name reaches a URL), "my
//! patients", the chart (demographics, problems, medications, allergies, vitals with trend
//! plots, labs, notes, care plans, …) as the gate discloses it, break-the-glass from the
//! chart, and the patient portal (own record, own access report, own consents).
//!
//! What the viewer may not see is said without detail: a section their role never sees is
//! marked restricted by name (categories are not sensitive); records hidden by sensitivity
//! labels or consent raise only "some information in this chart is restricted" — no
//! count, no category.

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::{
    Access, Category, Disclosed, Relationship, ResourceType, SearchResult, VaultError,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::svg::{self, Point};
use crate::{gate, render, see_other, stepped_gate, Chrome, Signed, Web, WebError};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/patients", get(patients).post(search))
        .route("/patients/{id}", get(chart))
        .route("/patients/{id}/break-glass", post(break_glass))
        .route("/me", get(my_record))
        .route("/me/access", get(my_access))
        .route("/me/consents", get(my_consents))
}

/// A patient in a list.
pub(crate) struct PatientRow {
    pub id: String,
    pub name: String,
    pub birth_date: String,
    pub mrn: String,
    pub relationship: String,
}

#[derive(Template)]
#[template(path = "patients.html")]
struct PatientsPage {
    chrome: Chrome,
    mine: Vec<PatientRow>,
    searched: bool,
    results: Vec<PatientRow>,
    query: SearchForm,
    limited: bool,
}

/// One section of the chart.
pub(crate) struct Section {
    pub id: &'static str,
    pub title: &'static str,
    pub columns: &'static [&'static str],
    pub rows: Vec<Vec<String>>,
    /// The viewer's role never sees this category.
    pub withheld: bool,
    pub plots: Vec<String>,
}

#[derive(Template)]
#[template(path = "chart.html")]
struct ChartPage {
    chrome: Chrome,
    patient_id: String,
    name: String,
    facts: Vec<(String, String)>,
    relationship: String,
    sections: Vec<Section>,
    /// Something is hidden by labels or consent (or the whole chart is closed).
    restricted: bool,
    /// Why the chart is closed (no relationship, restricted): the page shows only this.
    closed: String,
    break_glass: bool,
    reasons: Vec<(&'static str, &'static str)>,
    /// SMART apps that can be launched from the chart: (client id, name).
    apps: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "access.html")]
pub(crate) struct AccessPage {
    pub chrome: Chrome,
    pub patient_id: String,
    pub intro: String,
    pub rows: Vec<AccessRow>,
    pub timeline: String,
}

pub(crate) struct AccessRow {
    pub time: String,
    pub who: String,
    pub role: String,
    pub action: String,
    pub outcome: String,
    pub categories: String,
    pub purpose: String,
    pub detail: String,
    /// Made under a break-the-glass grant.
    pub break_glass: bool,
}

#[derive(Template)]
#[template(path = "consents.html")]
struct ConsentsPage {
    chrome: Chrome,
    rows: Vec<Vec<String>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub(crate) struct SearchForm {
    pub name: String,
    pub mrn: String,
    pub birthdate: String,
}

/// The text of a CodeableConcept: its `text`, else the first coding's display or code.
pub(crate) fn concept(v: Option<&Value>) -> String {
    let Some(v) = v else { return String::new() };
    if let Some(t) = v.get("text").and_then(Value::as_str) {
        return t.to_owned();
    }
    v.get("coding")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|c| c.get("display").or_else(|| c.get("code")))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn text(j: &Map<String, Value>, key: &str) -> String {
    j.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The first of `keys` that holds a date (or a Period's start), as `YYYY-MM-DD…`.
fn date(j: &Map<String, Value>, keys: &[&str]) -> String {
    for k in keys {
        match j.get(*k) {
            Some(Value::String(s)) => {
                return s.chars().take(16).collect::<String>().replace('T', " ")
            }
            Some(Value::Object(p)) => {
                if let Some(s) = p.get("start").and_then(Value::as_str) {
                    return s.chars().take(16).collect::<String>().replace('T', " ");
                }
            }
            _ => {}
        }
    }
    String::new()
}

/// A Quantity as `value unit`.
fn quantity(v: Option<&Value>) -> Option<(f64, String)> {
    let v = v?;
    let n = v.get("value")?.as_f64()?;
    let unit = v
        .get("unit")
        .or_else(|| v.get("code"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some((n, unit.to_owned()))
}

fn show_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e12 {
        format!("{}", n as i64)
    } else {
        format!("{n:.1}")
    }
}

/// An Observation's value for display (a quantity, a concept, a string, or components as
/// `120/80 mmHg`).
fn observation_value(j: &Map<String, Value>) -> String {
    if let Some((n, u)) = quantity(j.get("valueQuantity")) {
        return format!("{} {u}", show_number(n)).trim().to_owned();
    }
    if let Some(v) = j.get("valueCodeableConcept") {
        return concept(Some(v));
    }
    if let Some(s) = j.get("valueString").and_then(Value::as_str) {
        return s.to_owned();
    }
    if let Some(cs) = j.get("component").and_then(Value::as_array) {
        let parts: Vec<(f64, String)> = cs
            .iter()
            .filter_map(|c| quantity(c.get("valueQuantity")))
            .collect();
        if !parts.is_empty() {
            let unit = parts.first().map(|p| p.1.clone()).unwrap_or_default();
            let nums: Vec<String> = parts.iter().map(|p| show_number(p.0)).collect();
            return format!("{} {unit}", nums.join("/")).trim().to_owned();
        }
    }
    String::new()
}

/// A patient's name: `given family` of the first name, or its text.
pub(crate) fn patient_name(j: &Map<String, Value>) -> String {
    let Some(n) = j
        .get("name")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    else {
        return "(no name)".into();
    };
    if let Some(t) = n.get("text").and_then(Value::as_str) {
        return t.to_owned();
    }
    let given: Vec<&str> = n
        .get("given")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let family = n.get("family").and_then(Value::as_str).unwrap_or_default();
    let s = format!("{} {family}", given.join(" "));
    let s = s.trim();
    if s.is_empty() {
        "(no name)".into()
    } else {
        s.to_owned()
    }
}

/// The medical record number: an identifier typed `MR`, else the first identifier.
fn mrn(j: &Map<String, Value>) -> String {
    let ids = j
        .get("identifier")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let typed = ids.iter().find(|i| {
        i.pointer("/type/coding")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("code").and_then(Value::as_str) == Some("MR"))
            })
    });
    typed
        .or(ids.first())
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn relationship_text(r: Relationship) -> &'static str {
    match r {
        Relationship::Treatment => "care team or encounter",
        Relationship::BreakGlass => "break-the-glass grant",
        Relationship::Emergency => "break-the-glass (medical emergency)",
        Relationship::Own => "your own record",
        Relationship::Proxy => "you are a proxy",
        Relationship::None => "",
    }
}

pub(crate) fn patient_row(d: &Disclosed, rel: Relationship) -> Option<PatientRow> {
    let j = d.json()?;
    Some(PatientRow {
        id: d.id().to_owned(),
        name: patient_name(j),
        birth_date: text(j, "birthDate"),
        mrn: mrn(j),
        relationship: relationship_text(rel).to_owned(),
    })
}

fn patient_type() -> Result<ResourceType, WebError> {
    ResourceType::parse("Patient")
        .ok_or_else(|| WebError::Vault(VaultError::Internal("no Patient type".into())))
}

async fn patients(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    patients_page(&web, &s, SearchForm::default(), None).await
}

async fn patients_page(
    web: &Web,
    s: &Signed,
    query: SearchForm,
    found: Option<SearchResult>,
) -> Result<Response, WebError> {
    let mine = gate(web, s, |v, c| v.my_patients(c)).await?;
    let searched = found.is_some();
    let limited = found.as_ref().is_some_and(|r| r.limited_to_relationships);
    let results = found
        .map(|r| {
            r.entries
                .iter()
                .filter_map(|d| patient_row(d, Relationship::None))
                .collect()
        })
        .unwrap_or_default();
    render(&PatientsPage {
        chrome: s.chrome(web, "Patients", "/patients"),
        mine: mine
            .iter()
            .filter_map(|(d, r)| patient_row(d, *r))
            .collect(),
        searched,
        results,
        query,
        limited,
    })
}

/// `POST /patients`: the search, posted so the name never reaches a URL, a log line or the
/// browser's history. Name and family/given match ignoring case and accents (the gate's
/// string search); MRN is an identifier search; birth date takes a FHIR date.
async fn search(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<SearchForm>,
) -> Result<Response, WebError> {
    let f = SearchForm {
        name: crate::field(&f.name, 100),
        mrn: crate::field(&f.mrn, 64),
        birthdate: crate::field(&f.birthdate, 32),
    };
    let mut params = vec![("_count".to_owned(), "50".to_owned())];
    if !f.name.is_empty() {
        params.push(("name".into(), f.name.clone()));
    }
    if !f.mrn.is_empty() {
        params.push(("identifier".into(), f.mrn.clone()));
    }
    if !f.birthdate.is_empty() {
        params.push(("birthdate".into(), f.birthdate.clone()));
    }
    if params.len() == 1 {
        return Err(WebError::Form(
            "Enter a name, a medical record number or a birth date.".into(),
        ));
    }
    let rt = patient_type()?;
    let found = gate(&web, &s, move |v, c| v.search(c, rt, &params, false)).await?;
    patients_page(&web, &s, f, Some(found)).await
}

/// A Patient id as the routes accept it (FHIR id: `[A-Za-z0-9\-\.]{1,64}`).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

const SECTIONS: &[(Category, &str, &str, &[&str])] = &[
    (
        Category::Problems,
        "problems",
        "Problems",
        &["Problem", "Status", "Onset"],
    ),
    (
        Category::Medications,
        "medications",
        "Medications",
        &["Medication", "Status", "Date", "Dosage"],
    ),
    (
        Category::Allergies,
        "allergies",
        "Allergies",
        &["Substance", "Criticality", "Reaction"],
    ),
    (
        Category::Vitals,
        "vitals",
        "Vital signs",
        &["Measurement", "Value", "When"],
    ),
    (
        Category::Labs,
        "labs",
        "Laboratory results",
        &["Test", "Result", "When"],
    ),
    (Category::Notes, "notes", "Notes", &["Note", "Type", "Date"]),
    (
        Category::CarePlans,
        "care-plans",
        "Care plans",
        &["Plan", "Status", "Period"],
    ),
    (
        Category::Encounters,
        "encounters",
        "Encounters",
        &["Encounter", "Status", "When"],
    ),
    (
        Category::Procedures,
        "procedures",
        "Procedures",
        &["Procedure", "Status", "When"],
    ),
    (
        Category::Immunizations,
        "immunizations",
        "Immunizations",
        &["Vaccine", "Status", "Date"],
    ),
    (
        Category::Billing,
        "billing",
        "Billing",
        &["Document", "Status", "Date"],
    ),
];

/// One chart row for a disclosed resource.
fn row_of(d: &Disclosed) -> Option<Vec<String>> {
    let j = d.json()?;
    let status = |k: &str| match j.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => concept(Some(v)),
        _ => String::new(),
    };
    Some(match d.rtype().as_str() {
        "Condition" => vec![
            concept(j.get("code")),
            status("clinicalStatus"),
            date(j, &["onsetDateTime", "onsetPeriod", "recordedDate"]),
        ],
        "MedicationRequest" | "MedicationStatement" => vec![
            concept(j.get("medicationCodeableConcept")),
            status("status"),
            date(
                j,
                &[
                    "authoredOn",
                    "effectiveDateTime",
                    "effectivePeriod",
                    "dateAsserted",
                ],
            ),
            j.get("dosageInstruction")
                .or_else(|| j.get("dosage"))
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(|x| x.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        ],
        "AllergyIntolerance" => vec![
            concept(j.get("code")),
            text(j, "criticality"),
            j.get("reaction")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(|r| r.get("manifestation"))
                .and_then(Value::as_array)
                .and_then(|m| m.first())
                .map(|m| concept(Some(m)))
                .unwrap_or_default(),
        ],
        "Observation" => vec![
            concept(j.get("code")),
            observation_value(j),
            date(j, &["effectiveDateTime", "effectivePeriod", "issued"]),
        ],
        "DiagnosticReport" => vec![
            concept(j.get("code")),
            text(j, "conclusion"),
            date(j, &["effectiveDateTime", "effectivePeriod", "issued"]),
        ],
        "DocumentReference" => vec![
            j.get("description")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| Some(concept(j.get("type"))).filter(|t| !t.is_empty()))
                .unwrap_or_else(|| "(untitled note)".into()),
            concept(j.get("type")),
            date(j, &["date"]),
        ],
        "CarePlan" => vec![
            j.get("title")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| text(j, "description")),
            status("status"),
            date(j, &["period", "created"]),
        ],
        "Encounter" => vec![
            j.get("type")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .map(|t| concept(Some(t)))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| {
                    j.get("class")
                        .and_then(|c| c.get("display").or_else(|| c.get("code")))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                }),
            status("status"),
            date(j, &["period"]),
        ],
        "Procedure" => vec![
            concept(j.get("code")),
            status("status"),
            date(j, &["performedDateTime", "performedPeriod"]),
        ],
        "Immunization" => vec![
            concept(j.get("vaccineCode")),
            status("status"),
            date(j, &["occurrenceDateTime"]),
        ],
        "Coverage" | "Claim" | "ExplanationOfBenefit" => vec![
            format!("{} {}", d.rtype().as_str(), concept(j.get("type")).trim())
                .trim()
                .to_owned(),
            status("status"),
            date(j, &["created", "period", "billablePeriod"]),
        ],
        _ => return None,
    })
}

/// Trend plots of the vital signs: one per measurement with two or more numeric values.
fn vital_plots(entries: &[&Disclosed]) -> Vec<String> {
    let mut series: Vec<(String, String, Vec<Point>)> = vec![];
    for d in entries {
        let Some(j) = d.json() else { continue };
        if d.rtype().as_str() != "Observation" {
            continue;
        }
        let name = concept(j.get("code"));
        let when = date(j, &["effectiveDateTime", "effectivePeriod", "issued"]);
        let Some(day) = svg::day_number(&when) else {
            continue;
        };
        let Some((value, unit)) = quantity(j.get("valueQuantity")).or_else(|| {
            // Blood pressure: plot the systolic component.
            j.get("component")
                .and_then(Value::as_array)
                .and_then(|c| c.first())
                .and_then(|c| quantity(c.get("valueQuantity")))
        }) else {
            continue;
        };
        match series.iter_mut().find(|s| s.0 == name) {
            Some(s) => s.2.push(Point { day, value }),
            None => series.push((name, unit, vec![Point { day, value }])),
        }
    }
    series
        .into_iter()
        .filter(|s| s.2.len() >= 2)
        .take(6)
        .map(|(name, unit, pts)| svg::trend(&name, &unit, pts))
        .collect()
}

fn chart_sections(r: &SearchResult) -> Vec<Section> {
    SECTIONS
        .iter()
        .map(|(cat, id, title, columns)| {
            let entries: Vec<&Disclosed> =
                r.entries.iter().filter(|d| d.category() == *cat).collect();
            let mut rows: Vec<Vec<String>> = entries.iter().filter_map(|d| row_of(d)).collect();
            // Newest first where the last column is a date.
            if matches!(
                cat,
                Category::Vitals | Category::Labs | Category::Encounters | Category::Notes
            ) {
                rows.sort_by(|a, b| b.last().cmp(&a.last()));
            }
            Section {
                id,
                title,
                columns,
                rows,
                withheld: r.withheld.contains(cat),
                plots: if *cat == Category::Vitals {
                    vital_plots(&entries)
                } else {
                    vec![]
                },
            }
        })
        .collect()
}

const REASONS: &[(&str, &str)] = &[
    ("medical-emergency", "Medical emergency"),
    ("patient-unable-to-consent", "Patient unable to consent"),
    ("continuity-of-care", "Continuity of care"),
    (
        "care-relationship-not-yet-recorded",
        "Care relationship not yet recorded",
    ),
];

/// The chart of `id` as the gate discloses it to `s`, at `path`.
async fn chart_page(web: &Web, s: &Signed, id: String, path: &str) -> Result<Response, WebError> {
    if !valid_id(&id) {
        return Err(WebError::Vault(VaultError::NotFound));
    }
    let pid = id.clone();
    let (out, apps) = gate(web, s, move |v, c| {
        let apps = v
            .launchable_apps(c)?
            .into_iter()
            .map(|a| (a.client_id, a.name))
            .collect::<Vec<_>>();
        match v.everything(c, &pid, &[]) {
            Ok(r) => Ok((Ok(r), apps)),
            Err(e @ (VaultError::NoRelationship { .. } | VaultError::Restricted { .. })) => {
                Ok((Err(e), apps))
            }
            Err(e) => Err(e),
        }
    })
    .await?;
    let mut page = ChartPage {
        chrome: s.chrome(web, "Chart", path),
        patient_id: id.clone(),
        name: String::new(),
        facts: vec![],
        relationship: String::new(),
        sections: vec![],
        restricted: false,
        closed: String::new(),
        break_glass: false,
        reasons: REASONS.to_vec(),
        apps,
    };
    match out {
        Err(VaultError::NoRelationship { break_glass }) => {
            page.closed = "You have no treatment relationship with this patient: no care team or encounter links you to this chart.".into();
            page.break_glass = break_glass;
        }
        Err(VaultError::Restricted { break_glass }) => {
            page.closed = "This chart is restricted.".into();
            page.restricted = true;
            page.break_glass = break_glass;
        }
        Err(e) => return Err(e.into()),
        Ok(r) => {
            if let Some(p) = r
                .entries
                .iter()
                .find(|d| d.rtype().as_str() == "Patient" && d.id() == id)
                .and_then(|d| d.json())
            {
                page.name = patient_name(p);
                page.facts = vec![
                    ("Medical record number".into(), mrn(p)),
                    ("Birth date".into(), text(p, "birthDate")),
                    ("Gender".into(), text(p, "gender")),
                ];
                if let Some(a) = p
                    .get("address")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                {
                    let city = a.get("city").and_then(Value::as_str).unwrap_or_default();
                    let state = a.get("state").and_then(Value::as_str).unwrap_or_default();
                    page.facts.push((
                        "Address".into(),
                        format!("{city} {state}").trim().to_owned(),
                    ));
                }
                if let Some(t) = p
                    .get("telecom")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .and_then(|t| t.get("value"))
                    .and_then(Value::as_str)
                {
                    page.facts.push(("Contact".into(), t.to_owned()));
                }
                page.facts.retain(|(_, v)| !v.is_empty());
            }
            page.restricted = r.restricted;
            page.break_glass = r.restricted && r.may_break_glass;
            page.sections = chart_sections(&r);
            page.relationship = r
                .relationship
                .map(|x| relationship_text(x).to_owned())
                .unwrap_or_default();
        }
    }
    if !page.name.is_empty() {
        page.chrome.title = format!("Chart: {}", page.name);
    }
    render(&page)
}

async fn chart(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    chart_page(&web, &s, id, "/patients").await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BreakGlassForm {
    reason: String,
    justification: String,
    code: String,
}

/// `POST /patients/{id}/break-glass`: reason, justification and a step-up code; then the
/// chart, under the time-boxed grant the privacy officer will review.
async fn break_glass(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<BreakGlassForm>,
) -> Result<Response, WebError> {
    if !valid_id(&id) {
        return Err(WebError::Vault(VaultError::NotFound));
    }
    if f.justification.trim().chars().count() > 2000 {
        return Err(WebError::Form(
            "The justification is longer than 2,000 characters: shorten it.".into(),
        ));
    }
    let justification = crate::field(&f.justification, 2000);
    let reason = crate::field(&f.reason, 64);
    let pid = id.clone();
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.break_glass(c, &pid, &reason, &justification)
    })
    .await?;
    Ok(see_other(&format!("/patients/{id}")))
}

/// The portal account's own chart (else the first it is a proxy for).
async fn own_chart(web: &Web, s: &Signed) -> Result<Option<String>, WebError> {
    let mine = gate(web, s, |v, c| v.my_patients(c)).await?;
    // Only a portal account's own or proxied chart: staff have no "my record" here, and
    // must not open (and be audited reading) a patient's chart by visiting it.
    Ok(mine
        .iter()
        .find(|(_, r)| *r == Relationship::Own)
        .or_else(|| mine.iter().find(|(_, r)| *r == Relationship::Proxy))
        .map(|(d, _)| d.id().to_owned()))
}

async fn my_record(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    match own_chart(&web, &s).await? {
        Some(id) => chart_page(&web, &s, id, "/me").await,
        None => Err(WebError::Vault(VaultError::NotFound)),
    }
}

pub(crate) fn access_rows(report: &[Access]) -> Vec<AccessRow> {
    report
        .iter()
        .map(|a| AccessRow {
            time: a
                .time
                .chars()
                .take(19)
                .collect::<String>()
                .replace('T', " "),
            who: a.who.clone(),
            role: a.role.clone().unwrap_or_default().replace('_', " "),
            action: a.action.clone(),
            outcome: format!("{:?}", a.outcome).to_lowercase(),
            categories: a.categories.join(", "),
            purpose: a.purpose.clone().unwrap_or_default(),
            detail: a.detail.clone().unwrap_or_default(),
            break_glass: a.break_glass,
        })
        .collect()
}

/// The access timeline: accesses per day.
pub(crate) fn timeline(report: &[Access]) -> String {
    let mut days: Vec<(String, u32)> = vec![];
    for a in report {
        let d: String = a.time.chars().take(10).collect();
        match days.iter_mut().find(|x| x.0 == d) {
            Some(x) => x.1 += 1,
            None => days.push((d, 1)),
        }
    }
    days.sort();
    svg::per_day("Accesses per day", &days)
}

async fn my_access(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let Some(id) = own_chart(&web, &s).await? else {
        return Err(WebError::Vault(VaultError::NotFound));
    };
    let pid = id.clone();
    let report = gate(&web, &s, move |v, c| v.access_report(c, &pid)).await?;
    render(&AccessPage {
        chrome: s.chrome(&web, "Who looked at my record", "/me/access"),
        patient_id: id,
        intro: "Every time someone opened, searched or changed your record, newest first. Ask the privacy office about anything you do not recognise.".into(),
        timeline: timeline(&report),
        rows: access_rows(&report),
    })
}

async fn my_consents(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let Some(id) = own_chart(&web, &s).await? else {
        return Err(WebError::Vault(VaultError::NotFound));
    };
    let rt = ResourceType::parse("Consent")
        .ok_or_else(|| WebError::Vault(VaultError::Internal("no Consent type".into())))?;
    let params = vec![("patient".to_owned(), format!("Patient/{id}"))];
    let r = gate(&web, &s, move |v, c| v.search(c, rt, &params, false)).await?;
    let rows = r
        .entries
        .iter()
        .filter_map(|d| {
            let j = d.json()?;
            let provision = j.get("provision");
            let kind = provision
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("permit");
            let nested = provision
                .and_then(|p| p.get("provision"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            let t = x.get("type").and_then(Value::as_str).unwrap_or("");
                            let what: Vec<String> = x
                                .get("securityLabel")
                                .or_else(|| x.get("class"))
                                .and_then(Value::as_array)
                                .map(|l| {
                                    l.iter()
                                        .filter_map(|c| {
                                            c.get("display")
                                                .or_else(|| c.get("code"))
                                                .and_then(Value::as_str)
                                                .map(str::to_owned)
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            format!("{t} {}", what.join(", ")).trim().to_owned()
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            Some(vec![
                text(j, "status"),
                kind.to_owned(),
                nested,
                date(j, &["dateTime"]),
            ])
        })
        .collect();
    render(&ConsentsPage {
        chrome: s.chrome(&web, "My consents", "/me/consents"),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blood_pressure_shows_both_components() {
        let j = json!({"component": [
            {"valueQuantity": {"value": 120, "unit": "mmHg"}},
            {"valueQuantity": {"value": 80, "unit": "mmHg"}}
        ]});
        let m = j.as_object().cloned().unwrap_or_default();
        assert_eq!(observation_value(&m), "120/80 mmHg");
    }

    #[test]
    fn patient_ids_in_paths_are_fhir_ids() {
        assert!(valid_id("abc-123.x"));
        assert!(!valid_id("../etc"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(65)));
    }
}
