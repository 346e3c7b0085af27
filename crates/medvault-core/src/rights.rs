//! Individuals' rights and the permissions behind disclosures (issue 16; rules in
//! `medvault_governance::rights`): HIPAA authorizations checked when a disclosure needs
//! one, the Notice of Privacy Practices acknowledgement, GDPR processing activities (the
//! Art. 30 record) and consent with withdrawal, and data-subject requests — access (the
//! patient's record as a FHIR Bundle), rectification, restriction, erasure through the
//! destruction workflow where retention law allows it (a recorded refusal where it does
//! not), portability and objection — each with its clock. Privacy officers only
//! (`privacy.requests`); every act audited; free text sealed.

use medvault_governance::rights::{self, Authorization, ProcessingActivity, RequestClock};
use medvault_types::{Operation, PatientId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Caller, Outcome, Vault, VaultError};

const AUTHORIZATION: &str = "privacy.authorization";
const NPP: &str = "privacy.npp-acknowledgement";
const ACTIVITY: &str = "privacy.processing-activity";
const CONSENT: &str = "privacy.processing-consent";
const REQUEST: &str = "privacy.rights-request";

fn bad(e: impl std::fmt::Display) -> VaultError {
    VaultError::BadRequest(e.to_string())
}

fn day(field: &str, v: &str) -> Result<time::Date, VaultError> {
    medvault_governance::retention::date(field, v).map_err(bad)
}

/// A Notice of Privacy Practices acknowledgement (or the good-faith effort when the
/// patient would not sign, 164.520(c)(2)(ii)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NppAcknowledgement {
    pub patient: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// `signed`, `electronic`, or `refused` (the good-faith effort documented).
    pub method: String,
    #[serde(default)]
    pub notice_version: String,
}

/// Consent to one processing activity, and its withdrawal (GDPR Art. 7(3)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessingConsent {
    pub id: String,
    pub patient: String,
    pub activity: String,
    pub given: String,
    #[serde(default)]
    pub withdrawn: Option<String>,
}

/// A data-subject request and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RightsRequest {
    pub id: String,
    pub patient: String,
    pub kind: String,
    pub jurisdiction: String,
    pub received: String,
    #[serde(flatten)]
    pub clock: RequestClock,
    #[serde(default)]
    pub extended_to: Option<String>,
    /// `open`, `fulfilled`, `refused`.
    pub status: String,
    /// What was done, or why it was refused.
    #[serde(default)]
    pub outcome: Option<String>,
    /// For an erasure carried out: the destruction request it opened.
    #[serde(default)]
    pub destruction: Option<String>,
}

/// A new data-subject request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRightsRequest {
    pub patient: String,
    pub kind: String,
    pub received: String,
    #[serde(default)]
    pub jurisdiction: Option<String>,
}

/// What a privacy officer does to a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum RightsAction {
    /// The one extension, with the reason given to the individual.
    Extend { reason: String },
    /// Done: what was done (an erasure runs the destruction workflow, or records the
    /// refusal retention law imposes).
    Fulfil {
        #[serde(default)]
        note: String,
    },
    /// Refused, with the reason given to the individual.
    Refuse { reason: String },
}

impl Vault {
    fn patient_exists(&self, patient: &str) -> Result<PatientId, VaultError> {
        let pid = PatientId::new(patient.trim()).map_err(|_| bad("invalid patient id"))?;
        if self.store.patient_key(&pid)?.is_none() {
            return Err(VaultError::NotFound);
        }
        Ok(pid)
    }

    /// `POST /api/privacy/authorizations`: records a HIPAA authorization (or an IRB
    /// waiver) for a patient.
    ///
    /// # Errors
    /// Denied; `BadRequest` for bad dates, kind, description; `NotFound` for no chart.
    pub fn put_authorization(
        &self,
        c: &Caller,
        mut a: Authorization,
    ) -> Result<Authorization, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "authorization".into(),
            |rec| {
                let pid = self.patient_exists(&a.patient)?;
                rec.patient = Some(pid.as_str().to_owned());
                a.check(self.now().date()).map_err(bad)?;
                if !medvault_audit::accounting::RECIPIENT_KINDS.contains(&a.recipient.as_str()) {
                    return Err(bad(format!(
                        "recipient must be one of {}",
                        medvault_audit::accounting::RECIPIENT_KINDS.join(", ")
                    )));
                }
                a.purpose
                    .parse::<medvault_types::Purpose>()
                    .map_err(|_| bad("unknown purpose of use code"))?;
                a.patient = pid.as_str().to_owned();
                a.id = medvault_types::random_uuid();
                a.revoked = None;
                rec.detail = Some(format!(
                    "authorization={} kind={} expires={}",
                    a.id, a.kind, a.expires
                ));
                let op = self.put(AUTHORIZATION, &a.id, "active", &a.patient, &a)?;
                Ok((vec![op], vec![], a))
            },
        )
    }

    /// `POST /api/privacy/authorizations/{id}/revoke` (164.508(b)(5)).
    ///
    /// # Errors
    /// Denied; `NotFound`; `Duplicate` when already revoked.
    pub fn revoke_authorization(&self, c: &Caller, id: &str) -> Result<Authorization, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            format!(
                "authorization={} revoke",
                id.chars().take(64).collect::<String>()
            ),
            |rec| {
                let mut a: Authorization = self
                    .row(AUTHORIZATION, id.trim())?
                    .ok_or(VaultError::NotFound)?;
                rec.patient = Some(a.patient.clone());
                if a.revoked.is_some() {
                    return Err(VaultError::Duplicate(
                        "the authorization was already revoked".into(),
                    ));
                }
                a.revoked = Some(medvault_governance::breach::day(self.now().date()));
                let op = self.put(AUTHORIZATION, &a.id, "revoked", &a.patient, &a)?;
                Ok((vec![op], vec![], a))
            },
        )
    }

    /// `GET /api/privacy/authorizations[?patient=ID]`.
    ///
    /// # Errors
    /// Denied.
    pub fn authorizations(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<Vec<Authorization>, VaultError> {
        self.comply_read(c, Operation::PrivacyRequests, "authorizations")?;
        let v: Vec<Authorization> = self.rows(AUTHORIZATION)?;
        Ok(v.into_iter()
            .filter(|a| patient.is_none_or(|p| a.patient == p))
            .collect())
    }

    /// The authorization on file that covers a disclosure needing one, if any
    /// (`basis=authorization:ID` or `basis=irb_waiver:ID` for the audit detail).
    pub(crate) fn disclosure_basis(
        &self,
        patient: &str,
        recipient: &str,
        purpose: &str,
    ) -> Result<Option<String>, VaultError> {
        if !rights::needs_authorization(recipient, purpose) {
            return Ok(None);
        }
        let today = self.now().date();
        let v: Vec<Authorization> = self.rows(AUTHORIZATION)?;
        match v.iter().find(|a| a.patient == patient && a.covers(recipient, purpose, today)) {
            Some(a) => Ok(Some(format!("basis={}:{}", a.kind, a.id))),
            None => Err(VaultError::Unprocessable(
                "this disclosure needs a HIPAA authorization (45 CFR 164.508) or an IRB waiver (164.512(i)) on file for the patient, covering this recipient and purpose, in force today".into(),
            )),
        }
    }

    /// `POST /api/privacy/npp-acknowledgements`.
    ///
    /// # Errors
    /// Denied; `BadRequest`; `NotFound`.
    pub fn acknowledge_npp(
        &self,
        c: &Caller,
        mut a: NppAcknowledgement,
    ) -> Result<NppAcknowledgement, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "npp acknowledgement".into(),
            |rec| {
                let pid = self.patient_exists(&a.patient)?;
                rec.patient = Some(pid.as_str().to_owned());
                let d = day("date", &a.date)?;
                if d > self.now().date() {
                    return Err(bad("`date` is in the future"));
                }
                if !matches!(a.method.trim(), "signed" | "electronic" | "refused") {
                    return Err(bad("`method` is signed, electronic or refused"));
                }
                a.patient = pid.as_str().to_owned();
                a.date = medvault_governance::breach::day(d);
                a.method = a.method.trim().to_owned();
                rec.detail = Some(format!("npp acknowledgement method={}", a.method));
                let op = self.put(
                    NPP,
                    &medvault_types::random_uuid(),
                    &a.method,
                    &a.patient,
                    &a,
                )?;
                Ok((vec![op], vec![], a))
            },
        )
    }

    /// `GET /api/privacy/npp-acknowledgements?patient=ID`.
    ///
    /// # Errors
    /// Denied.
    pub fn npp_acknowledgements(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<Vec<NppAcknowledgement>, VaultError> {
        self.comply_read(c, Operation::PrivacyRequests, "npp acknowledgements")?;
        let v: Vec<NppAcknowledgement> = self.rows(NPP)?;
        Ok(v.into_iter()
            .filter(|a| patient.is_none_or(|p| a.patient == p))
            .collect())
    }

    /// `PUT /api/privacy/processing-activities/{id}`: an entry of the Art. 30 record.
    ///
    /// # Errors
    /// Denied; `BadRequest`.
    pub fn put_processing_activity(
        &self,
        c: &Caller,
        mut a: ProcessingActivity,
    ) -> Result<ProcessingActivity, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "processing activity".into(),
            |rec| {
                a.check().map_err(bad)?;
                if a.id.trim().is_empty()
                    || !a
                        .id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(bad("`id` must be letters, digits, `-` or `_`"));
                }
                rec.detail = Some(format!(
                    "processing activity={} basis={}",
                    a.id, a.lawful_basis
                ));
                let op = self.put(ACTIVITY, &a.id, "active", "", &a)?;
                Ok((vec![op], vec![], a))
            },
        )
    }

    /// `GET /api/privacy/processing-activities`: the Art. 30 record.
    ///
    /// # Errors
    /// Denied.
    pub fn processing_activities(&self, c: &Caller) -> Result<Vec<ProcessingActivity>, VaultError> {
        self.comply_read(
            c,
            Operation::PrivacyRequests,
            "record of processing activities",
        )?;
        self.rows(ACTIVITY)
    }

    /// `POST /api/privacy/consents {"patient","activity","given"}`: consent to an activity
    /// whose lawful basis is consent.
    ///
    /// # Errors
    /// Denied; `BadRequest` (unknown activity, one not based on consent, bad date);
    /// `NotFound`.
    pub fn record_processing_consent(
        &self,
        c: &Caller,
        patient: &str,
        activity: &str,
        given: &str,
    ) -> Result<ProcessingConsent, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "processing consent".into(),
            |rec| {
                let pid = self.patient_exists(patient)?;
                rec.patient = Some(pid.as_str().to_owned());
                let a: ProcessingActivity = self
                    .row(ACTIVITY, activity.trim())?
                    .ok_or_else(|| bad("no such processing activity"))?;
                if a.lawful_basis != "consent" {
                    return Err(bad(format!(
                        "activity {} rests on {}, not consent",
                        a.id, a.lawful_basis
                    )));
                }
                let d = day("given", given)?;
                if d > self.now().date() {
                    return Err(bad("`given` is in the future"));
                }
                let pc = ProcessingConsent {
                    id: medvault_types::random_uuid(),
                    patient: pid.as_str().to_owned(),
                    activity: a.id,
                    given: medvault_governance::breach::day(d),
                    withdrawn: None,
                };
                rec.detail = Some(format!(
                    "processing consent={} activity={}",
                    pc.id, pc.activity
                ));
                let op = self.put(CONSENT, &pc.id, "given", &pc.patient, &pc)?;
                Ok((vec![op], vec![], pc))
            },
        )
    }

    /// `POST /api/privacy/consents/{id}/withdraw` (Art. 7(3)): as easy as giving it.
    ///
    /// # Errors
    /// Denied; `NotFound`; `Duplicate` when already withdrawn.
    pub fn withdraw_processing_consent(
        &self,
        c: &Caller,
        id: &str,
    ) -> Result<ProcessingConsent, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            format!(
                "processing consent={} withdraw",
                id.chars().take(64).collect::<String>()
            ),
            |rec| {
                let mut pc: ProcessingConsent =
                    self.row(CONSENT, id.trim())?.ok_or(VaultError::NotFound)?;
                rec.patient = Some(pc.patient.clone());
                if pc.withdrawn.is_some() {
                    return Err(VaultError::Duplicate(
                        "the consent was already withdrawn".into(),
                    ));
                }
                pc.withdrawn = Some(medvault_governance::breach::day(self.now().date()));
                let op = self.put(CONSENT, &pc.id, "withdrawn", &pc.patient, &pc)?;
                Ok((vec![op], vec![], pc))
            },
        )
    }

    /// `GET /api/privacy/consents[?patient=ID]`.
    ///
    /// # Errors
    /// Denied.
    pub fn processing_consents(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<Vec<ProcessingConsent>, VaultError> {
        self.comply_read(c, Operation::PrivacyRequests, "processing consents")?;
        let v: Vec<ProcessingConsent> = self.rows(CONSENT)?;
        Ok(v.into_iter()
            .filter(|a| patient.is_none_or(|p| a.patient == p))
            .collect())
    }

    /// `POST /api/privacy/requests`: a data-subject request, with its clock.
    ///
    /// # Errors
    /// Denied; `BadRequest`; `NotFound`.
    pub fn open_rights_request(
        &self,
        c: &Caller,
        n: NewRightsRequest,
    ) -> Result<RightsRequest, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "rights request".into(),
            |rec| {
                let pid = self.patient_exists(&n.patient)?;
                rec.patient = Some(pid.as_str().to_owned());
                let j = n
                    .jurisdiction
                    .as_deref()
                    .unwrap_or("HIPAA")
                    .trim()
                    .to_ascii_uppercase();
                let clock =
                    rights::request_clock(n.kind.trim(), &n.received, &j, self.now().date())
                        .map_err(bad)?;
                let r = RightsRequest {
                    id: medvault_types::random_uuid(),
                    patient: pid.as_str().to_owned(),
                    kind: n.kind.trim().to_owned(),
                    jurisdiction: j,
                    received: n.received.trim().to_owned(),
                    clock,
                    extended_to: None,
                    status: "open".into(),
                    outcome: None,
                    destruction: None,
                };
                rec.detail = Some(format!(
                    "rights request={} kind={} due={}",
                    r.id, r.kind, r.clock.due
                ));
                let op = self.put(REQUEST, &r.id, &r.status, &r.patient, &r)?;
                Ok((vec![op], vec![], r))
            },
        )
    }

    /// `GET /api/privacy/requests`: every data-subject request, soonest due first.
    ///
    /// # Errors
    /// Denied.
    pub fn rights_requests(&self, c: &Caller) -> Result<Vec<RightsRequest>, VaultError> {
        self.comply_read(c, Operation::PrivacyRequests, "rights requests")?;
        let mut v: Vec<RightsRequest> = self.rows(REQUEST)?;
        v.sort_by(|a, b| {
            a.extended_to
                .as_ref()
                .unwrap_or(&a.clock.due)
                .cmp(b.extended_to.as_ref().unwrap_or(&b.clock.due))
        });
        Ok(v)
    }

    /// `POST /api/privacy/requests/{id}` with a [`RightsAction`]. Fulfilling an erasure
    /// asks for the chart's destruction (a second privacy officer approves it) when the
    /// retention rules make it eligible and no hold stops it; otherwise the refusal and
    /// the rule are recorded on the request (GDPR Art. 17(3)(b), (c)).
    ///
    /// # Errors
    /// Denied; `NotFound`; `BadRequest`; `Duplicate` for a closed request or a second
    /// extension.
    pub fn act_on_rights_request(
        &self,
        c: &Caller,
        id: &str,
        action: RightsAction,
    ) -> Result<RightsRequest, VaultError> {
        let mut r: RightsRequest = self.row(REQUEST, id.trim())?.ok_or(VaultError::NotFound)?;
        // An erasure's retention check and destruction request are the gate's own audited acts.
        let erasure = if matches!(action, RightsAction::Fulfil { .. })
            && r.kind == "erasure"
            && r.status == "open"
        {
            let due = self.retention_due(c, None)?;
            let item = due
                .into_iter()
                .find(|d| d.medium == "electronic" && d.patient == r.patient);
            Some(match item {
                Some(i) if i.verdict.destroy_eligible && i.holds.is_empty() => {
                    match self.request_destruction(c, &r.patient, "erasure-request") {
                        Ok(d) => Ok(d.id),
                        Err(e @ (VaultError::Duplicate(_) | VaultError::StepUpRequired)) => return Err(e),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Some(i) if !i.holds.is_empty() => Err(format!("the chart is under hold ({}); it is kept", i.holds.join(", "))),
                Some(i) => Err(format!(
                    "retention law requires keeping the chart{} ({}): erasure refused under GDPR Art. 17(3)(b)/(c)",
                    i.verdict.retain_until.map(|d| format!(" until {d}")).unwrap_or_default(),
                    i.verdict.rule
                )),
                None => Err("no electronic chart to erase".into()),
            })
        } else {
            None
        };
        self.comply(c, Operation::PrivacyRequests, format!("rights request={}", id.chars().take(64).collect::<String>()), |rec| {
            rec.patient = Some(r.patient.clone());
            if r.status != "open" {
                return Err(VaultError::Duplicate(format!("the request is already {}", r.status)));
            }
            let text = |f: &str, v: &str| {
                let t = v.trim();
                if t.is_empty() || t.chars().count() > 2000 {
                    return Err(bad(format!("`{f}` must be 1–2000 characters")));
                }
                Ok(t.to_owned())
            };
            match action {
                RightsAction::Extend { reason } => {
                    let reason = text("reason", &reason)?;
                    if r.extended_to.is_some() {
                        return Err(VaultError::Duplicate("the deadline may be extended once".into()));
                    }
                    r.extended_to = Some(rights::extended(&r.clock).map_err(bad)?);
                    r.outcome = Some(format!("extended: {reason}"));
                }
                RightsAction::Refuse { reason } => {
                    r.status = "refused".into();
                    r.outcome = Some(text("reason", &reason)?);
                }
                RightsAction::Fulfil { note } => match erasure {
                    Some(Ok(destruction)) => {
                        r.status = "fulfilled".into();
                        r.outcome = Some(format!("destruction {destruction} requested; a second privacy officer approves it"));
                        r.destruction = Some(destruction);
                    }
                    Some(Err(why)) => {
                        r.status = "refused".into();
                        r.outcome = Some(why);
                    }
                    None => {
                        r.status = "fulfilled".into();
                        r.outcome = Some(if note.trim().is_empty() { "done".into() } else { text("note", &note)? });
                    }
                },
            }
            rec.detail = Some(format!("rights request={} kind={} status={}", r.id, r.kind, r.status));
            let op = self.put(REQUEST, &r.id, &r.status, &r.patient, &r)?;
            Ok((vec![op], vec![], r.clone()))
        })
    }

    /// `GET /api/privacy/requests/{id}/bundle`: the patient's record as a FHIR `collection`
    /// Bundle (the right of access, 164.524; GDPR Art. 15 and 20), every resource's newest
    /// version; the read is audited as disclosed to the individual.
    ///
    /// # Errors
    /// Denied; `NotFound`; `BadRequest` for a request that is not an open access or
    /// portability request.
    pub fn rights_access_bundle(&self, c: &Caller, id: &str) -> Result<Value, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::PrivacyRequests, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let r: RightsRequest = self.row(REQUEST, id.trim())?.ok_or(VaultError::NotFound)?;
        rec.patient = Some(r.patient.clone());
        if !matches!(r.kind.as_str(), "access" | "portability") {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!(
                "rights request={} bundle refused: a {} request",
                r.id, r.kind
            ));
            self.audit(vec![rec])?;
            return Err(bad("only an access or portability request gets the record"));
        }
        let pid = PatientId::new(&r.patient).map_err(|_| bad("invalid patient id"))?;
        let rows = self.store.chart_versions(&pid)?;
        let mut newest: std::collections::BTreeMap<(String, String), medvault_store::Sealed> =
            std::collections::BTreeMap::new();
        for row in rows {
            let k = (row.rtype().to_owned(), row.id().to_owned());
            if newest.get(&k).is_none_or(|o| o.version() < row.version()) {
                newest.insert(k, row);
            }
        }
        let decision = self.decide_operation(c, Operation::PrivacyRequests);
        let mut permitted = vec![];
        let mut cats = std::collections::BTreeSet::new();
        for (_, row) in newest.into_iter().filter(|(_, r)| !r.deleted()) {
            cats.insert(row.category().to_owned());
            match crate::typestate::permit(&decision, row, &mut rec) {
                Ok(p) => permitted.push(p),
                Err(_) => {
                    self.audit(vec![rec])?;
                    return Err(VaultError::Forbidden { withheld: vec![] });
                }
            }
        }
        let entries: Vec<Value> = self
            .open_all(permitted)?
            .into_iter()
            .filter_map(|d| {
                d.json()
                    .map(|j| serde_json::json!({"resource": Value::Object(j.clone())}))
            })
            .collect();
        rec.purpose = Some("PATRQT".into());
        rec.categories_disclosed = cats.into_iter().collect();
        rec.detail = Some(format!(
            "rights request={} record provided to the individual: {} resources",
            r.id,
            entries.len()
        ));
        self.audit(vec![rec])?;
        Ok(serde_json::json!({
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": medvault_types::fhir_instant(self.now()),
            "total": entries.len(),
            "entry": entries,
        }))
    }
}
