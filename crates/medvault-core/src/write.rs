//! Writing records: create, update and delete, each planned through the policy engine,
//! sealed under the patient's data key with blind-index tokens, and committed in one batch
//! with its audit record. Transactions (`bundle`) plan several writes into one batch.

use std::collections::HashMap;
use std::sync::Arc;

use medvault_crypto::{record_aad, DataKey, RecordCipher};
use medvault_fhir::bundle::IfNoneMatch;
use medvault_fhir::{Resource, ResourceType};
use medvault_policy::Relationship;
use medvault_store::{Expect, IndexRow, Op, Sealed, VersionRow};
use medvault_types::{Action, Category, PatientId};
use serde_json::{Map, Value};

use crate::search::Matched;
use crate::typestate::{self, permit, Draft};
use crate::{directory_key_id, AuditRecord, Caller, Disclosed, Outcome, Vault, VaultError};

/// Result of a write: where it landed, and the body if the caller may read it back.
#[derive(Debug, Clone)]
pub struct Written {
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub last_updated: String,
    pub body: Option<Disclosed>,
    pub created: bool,
    /// The data category written.
    pub category: Category,
    /// The chart written to (`None` for directory resources).
    pub patient: Option<PatientId>,
}

impl Written {
    /// The answer of a conditional create that found its match: nothing written, the
    /// existing resource returned (`200 OK`).
    pub(crate) fn found(d: Disclosed) -> Written {
        Written {
            rtype: d.rtype(),
            id: d.id().to_owned(),
            version: d.version(),
            last_updated: d.last_updated().to_owned(),
            category: d.category(),
            patient: d.patient().cloned(),
            body: Some(d),
            created: false,
        }
    }
}

/// The preconditions of a write (FHIR R4 §3.1.0.8 "Managing Resource Contention"), from
/// the `If-Match`/`If-None-Match` headers or a Bundle entry's `request.ifMatch`/
/// `request.ifNoneMatch` — one rule for both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The version the resource must be at.
    pub if_match: Option<u64>,
    /// `*` (the resource must not exist) or a version that must not be current.
    pub if_none_match: Option<IfNoneMatch>,
}

impl Precondition {
    /// Checks the preconditions against the current version of an existing resource.
    ///
    /// # Errors
    /// [`VaultError::PreconditionFailed`] saying which precondition failed.
    pub fn check(&self, current: u64) -> Result<(), VaultError> {
        if self.if_match.is_some_and(|v| v != current) {
            return Err(VaultError::PreconditionFailed(
                "If-Match does not match the current version",
            ));
        }
        match self.if_none_match {
            Some(IfNoneMatch::Any) => Err(VaultError::PreconditionFailed(
                "If-None-Match: * but the resource exists",
            )),
            Some(IfNoneMatch::Version(v)) if v == current => Err(VaultError::PreconditionFailed(
                "If-None-Match matches the current version",
            )),
            _ => Ok(()),
        }
    }
}

/// A write being assembled (one batch, all-or-nothing).
#[derive(Default)]
pub(crate) struct Plan {
    pub(crate) ops: Vec<Op>,
    pub(crate) audit: Vec<AuditRecord>,
    /// Charts this plan relates the caller to (an encounter or care team naming them).
    pub(crate) reached: Vec<PatientId>,
    /// Data keys created in this plan for new patients.
    pub(crate) new_keys: HashMap<PatientId, Arc<RecordCipher>>,
    /// The blind-index view its tokens were made under (one per plan), whose writer tag
    /// guards the commit.
    pub(crate) index_view: Option<Arc<crate::index_keys::IndexView>>,
}

impl Vault {
    /// The patient (data-key owner) a resource belongs to, checked to exist.
    fn owner(&self, res: &Resource, plan: &Plan) -> Result<Option<PatientId>, VaultError> {
        if !res.rtype().is_patient_scoped() {
            return Ok(None);
        }
        let r = res.patient_reference().ok_or_else(|| {
            VaultError::Unprocessable(format!(
                "{} must reference its Patient (subject or patient)",
                res.rtype()
            ))
        })?;
        let pid = medvault_fhir::patient_id_from_reference(&r).ok_or_else(|| {
            VaultError::Unprocessable("patient reference must have the form Patient/{id}".into())
        })?;
        if res.rtype().as_str() == "Patient" || plan.new_keys.contains_key(&pid) {
            return Ok(Some(pid));
        }
        match self.store.current("Patient", pid.as_str())? {
            Some(row) if !row.deleted() => Ok(Some(pid)),
            _ => Err(VaultError::Unprocessable(
                "referenced Patient does not exist".into(),
            )),
        }
    }

    /// Plans one create/update: policy, sealing, blind indexes, audit record.
    pub(crate) fn plan_put(
        &self,
        c: &Caller,
        plan: &mut Plan,
        mut res: Resource,
        id: String,
        prior: Option<&Sealed>,
        expect: Expect,
    ) -> Result<(Written, Map<String, Value>), VaultError> {
        let rt = res.rtype();
        let creating = prior.is_none();
        let category = res.category();
        let action = if creating {
            Action::Create
        } else {
            Action::Update
        };
        let mut rec = self.record(c, action.as_str(), Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        self.may_write(c, action, rt, &id, category, prior)?;
        if rt.as_str() == "Patient" && creating {
            let pid =
                PatientId::new(&id).map_err(|_| VaultError::BadRequest("invalid id".into()))?;
            let dk = DataKey::generate();
            let (master_version, master) = self.wrapping_master()?;
            let wrapped = master.wrap_data_key(&pid, 1, &dk)?;
            plan.ops.push(Op::PutPatientKey {
                patient: pid.clone(),
                key_version: 1,
                master_version,
                wrapped,
            });
            plan.new_keys.insert(pid, Arc::new(RecordCipher::new(&dk)));
        }
        let owner = if rt.as_str() == "Patient" {
            Some(PatientId::new(&id).map_err(|_| VaultError::BadRequest("invalid id".into()))?)
        } else {
            self.owner(&res, plan)?
        };
        if let Some(p) = prior {
            if p.patient() != owner.as_ref() {
                return Err(VaultError::Unprocessable(
                    "a resource cannot move to another patient's chart".into(),
                ));
            }
        }
        let mut categories = vec![category];
        if let Some(stored) = prior.and_then(|p| p.category().parse::<Category>().ok()) {
            if stored != category {
                categories.push(stored);
            }
        }
        let rel = self.may_write_chart(c, plan, action, rt, &id, &categories, owner.as_ref())?;
        rec.break_glass = matches!(rel, Relationship::BreakGlass | Relationship::Emergency);
        if let Some(p) = prior {
            self.may_change(c, p, rel)?;
        }
        let problems = medvault_fhir::privacy::consent_problems(rt, res.json());
        if !problems.is_empty() {
            return Err(VaultError::Unprocessable(format!(
                "this consent cannot be enforced as written: {}",
                problems.join("; ")
            )));
        }
        // A clinician without a relationship may begin one — for themselves: an encounter
        // or care team they start must name them (colleagues are added by those already
        // caring for the patient).
        let care = self.care_index(&self.ix(), rt, res.json());
        let clinician = c.principal().is_some_and(|p| p.practitioner.is_some());
        // (On an update, a relationship that came only from this very resource does not
        // count: a clinician may not hand a chart to others by rewriting their own encounter.)
        let related_elsewhere = rel != Relationship::None
            && (prior.is_none() || self.related_beyond(c, owner.as_ref(), rt, &id)?);
        if clinician && !care.is_empty() && !related_elsewhere && !self.relates_caller(c, &care) {
            return Err(VaultError::Unprocessable(
                "an encounter or care team you begin must name you as a participant".into(),
            ));
        }
        if self.grants_self(c, rt, res.json()) {
            // Separation of duties: nobody records the consent that opens records to them.
            return Err(VaultError::Unprocessable(
                "a consent cannot grant access to the person recording it, and staff never grant a label to everyone: name the practitioners it grants (the patient may record a grant to everyone in the portal)".into(),
            ));
        }
        let version = prior.map(|p| p.version() + 1).unwrap_or(1);
        let now = self.now_instant();
        res.stamp(&id, version, &now);
        let key_id = owner.clone().unwrap_or_else(directory_key_id);
        let (key_version, cipher) = match plan.new_keys.get(&key_id) {
            Some(c) => (1, c.clone()),
            None => self.newest_cipher(&key_id)?,
        };
        let view = plan
            .index_view
            .get_or_insert_with(|| self.index_view())
            .clone();
        let index = self.index_rows_under(&view.write, rt, res.json());
        if let Some(p) = &owner {
            if self.relates_caller(c, &index) && !plan.reached.contains(p) {
                // A new encounter or care team naming the caller relates them to the chart
                // for the rest of this plan (a transaction that admits and charts).
                plan.reached.push(p.clone());
            }
        }
        let json = res.into_json();
        let plain = serde_json::to_vec(&json).map_err(|e| VaultError::Internal(e.to_string()))?;
        let body = cipher.seal(&record_aad(rt.as_str(), &id, version, &key_id), &plain)?;
        rec.content = Some(crate::integrity::version_digest(
            &crate::integrity::StoredVersion {
                rtype: rt.as_str(),
                id: &id,
                version,
                patient: owner.as_ref().map(PatientId::as_str),
                deleted: false,
                category: category.as_str(),
                key_version,
                body: &body,
            },
        ));
        plan.ops.push(Op::PutVersion {
            row: VersionRow {
                patient: owner.clone(),
                rtype: rt.as_str().to_owned(),
                id: id.clone(),
                version,
                last_updated: now.clone(),
                deleted: false,
                category: category.as_str().to_owned(),
                key_version,
                body,
            },
            expect,
            index,
        });
        rec.resource = Some(format!("{rt}/{id}/_history/{version}"));
        rec.patient = owner.as_ref().map(|p| p.to_string());
        rec.categories_disclosed = vec![category.to_string()];
        plan.audit.push(rec);
        let written = Written {
            rtype: rt,
            id,
            version,
            last_updated: now,
            body: None,
            created: creating,
            category,
            patient: owner.clone(),
        };
        Ok((written, json))
    }

    /// Decides a write before anything about the target is revealed: `action` on a
    /// resource of type `rt` in each of `categories` (the new body's and, for an update, the
    /// stored one's). Preconditions and conditional searches are evaluated only after this,
    /// so a caller who may not write learns nothing from a 412 or a match.
    ///
    /// # Errors
    /// [`VaultError::Refused`], the denial recorded in the audit log.
    /// A resource's search-index rows: its blind search tokens, and for a CareTeam or an
    /// Encounter the `_care` tokens of the treatment relationships it establishes.
    /// One set of rows per key in `keys` (two while the blind-index key rotates).
    pub(crate) fn index_rows_under(
        &self,
        keys: &[Arc<crate::index_keys::IndexKey>],
        rt: ResourceType,
        json: &Map<String, Value>,
    ) -> Vec<IndexRow> {
        let tokens = medvault_fhir::search_tokens(rt, json);
        let mut rows: Vec<IndexRow> = vec![];
        for k in keys {
            rows.extend(tokens.iter().map(|t| IndexRow {
                param: t.param.to_owned(),
                token: k.token(rt.as_str(), t.param, &t.value),
            }));
            rows.extend(self.care_index(k, rt, json));
            rows.extend(self.privacy_index(k, rt, json));
        }
        rows
    }

    pub(crate) fn may_write(
        &self,
        c: &Caller,
        action: Action,
        rt: ResourceType,
        target: &str,
        category: Category,
        prior: Option<&Sealed>,
    ) -> Result<(), VaultError> {
        self.scope_check(c, rt, action)?;
        let denial = |cat: Option<Category>| {
            let mut rec = self.record(c, action.as_str(), Outcome::Success);
            rec.resource = Some(format!("{rt}/{target}"));
            let lapsed = cat.is_some_and(|k| self.training_would_allow(c, action, k));
            let e = self.deny(rec, action, rt, cat);
            match (lapsed, e) {
                (true, VaultError::Refused { .. }) => VaultError::TrainingLapsed,
                (_, e) => e,
            }
        };
        let stored = match prior.map(|p| p.category().parse::<Category>()) {
            // A stored category this server does not know: default deny, recorded.
            Some(Err(_)) => return Err(denial(None)),
            Some(Ok(cat)) => Some(cat),
            None => None,
        };
        // The role's decision, as if the chart were the caller's patient's: the chart's own
        // relationship is decided once the chart is known ([`Vault::may_write_chart`]).
        for cat in std::iter::once(category).chain(stored.filter(|s| *s != category)) {
            if !self.could(c, action, cat) {
                return Err(denial(Some(cat)));
            }
        }
        Ok(())
    }

    /// Whether `c` may change (update, delete) the stored `prior`: someone whose read of it
    /// its labels or its patient's consent would refuse may not rewrite it either (else a
    /// label could be stripped, and the record read, by whoever may write the category). A
    /// role that reads nothing of the category (the importer) writes as before. A refusal
    /// is recorded, naming neither label nor category.
    pub(crate) fn may_change(
        &self,
        c: &Caller,
        prior: &Sealed,
        rel: Relationship,
    ) -> Result<(), VaultError> {
        let (Some(patient), Ok(category)) = (prior.patient(), prior.category().parse::<Category>())
        else {
            return Ok(());
        };
        // An emergency reads; it does not reclassify: a change is judged as if the grant
        // were not for an emergency.
        let rel = match rel {
            Relationship::Emergency => Relationship::BreakGlass,
            other => other,
        };
        if !self.decide(c, Action::Read, category, rel).allowed() {
            return Ok(());
        }
        let facts = self.facts_outside(
            c,
            patient,
            Some((prior.rtype(), prior.id())),
            None,
            category,
        )?;
        let mut q = Self::records_query(
            c,
            Action::Read,
            category,
            rel,
            self.options.public_transparency,
        );
        q.privacy = facts;
        if self.policy().decide(q).allowed() {
            return Ok(());
        }
        let mut rec = self.record(c, "update", Outcome::Denied);
        rec.resource = Some(format!("{}/{}", prior.rtype(), prior.id()));
        rec.patient = Some(patient.to_string());
        rec.detail = Some("restricted: the caller may not read what they would change".into());
        self.audit(vec![rec])?;
        Err(VaultError::Restricted { break_glass: false })
    }

    /// Whether `c`'s training has lapsed and current training would let them `action`
    /// records of `category` (so the refusal should say so).
    pub(crate) fn training_would_allow(
        &self,
        c: &Caller,
        action: Action,
        category: Category,
    ) -> bool {
        if c.principal().is_none_or(|p| p.training_current) {
            return false;
        }
        [Relationship::Treatment, Relationship::Own]
            .iter()
            .any(|r| {
                let mut q =
                    Self::records_query(c, action, category, *r, self.options.public_transparency);
                q.training_current = true;
                self.policy().decide(q).allowed()
            })
    }

    /// Whether `c` reaches `patient`'s chart through something other than the care
    /// resource `rt`/`id` (another care team or encounter, a grant, a portal link).
    pub(crate) fn related_beyond(
        &self,
        c: &Caller,
        patient: Option<&PatientId>,
        rt: ResourceType,
        id: &str,
    ) -> Result<bool, VaultError> {
        let Some(p) = patient else {
            return Ok(false);
        };
        let reacher = self.reacher(c);
        let mine = reacher.care_tokens();
        let others = self
            .store
            .chart_tokens(p, &[crate::access::CARE_PARAM.to_owned()])?
            .into_iter()
            .any(|h| mine.contains(&h.token) && !(h.rtype == rt.as_str() && h.id == id));
        if others {
            return Ok(true);
        }
        // Grants and links (no care tokens): the lookup without care tokens.
        let user = c.actor().to_owned();
        let now = self.clock.now().unix_timestamp();
        Ok(!self.store.charts(&[], &user, now, Some(p))?.is_empty())
    }

    /// Whether `c`'s role may `action` records of `category` in some chart it could reach
    /// (one it treats, or a portal account's own).
    pub(crate) fn could(&self, c: &Caller, action: Action, category: Category) -> bool {
        [Relationship::Treatment, Relationship::Own]
            .iter()
            .any(|r| self.decide(c, action, category, *r).allowed())
    }

    /// Decides a write of `category` (and the stored version's, if it differs) into
    /// `patient`'s chart with the caller's relationship to it; a denial is recorded, and
    /// says whether breaking the glass would help when a relationship would have allowed it.
    #[expect(clippy::too_many_arguments, reason = "one decision's inputs")]
    pub(crate) fn may_write_chart(
        &self,
        c: &Caller,
        plan: &Plan,
        action: Action,
        rt: ResourceType,
        target: &str,
        categories: &[Category],
        patient: Option<&PatientId>,
    ) -> Result<Relationship, VaultError> {
        if self.options.read_only {
            let mut rec = self.record(c, action.as_str(), Outcome::Denied);
            rec.resource = Some(format!("{rt}/{target}"));
            rec.patient = patient.map(|p| p.to_string());
            rec.detail = Some("emergency read-only mode".into());
            self.audit(vec![rec])?;
            return Err(VaultError::ReadOnly);
        }
        let rel = self.write_relationship(c, &plan.reached, patient)?;
        for cat in categories {
            if self.decide(c, action, *cat, rel).allowed() {
                continue;
            }
            let mut rec = self.record(c, action.as_str(), Outcome::Denied);
            rec.resource = Some(format!("{rt}/{target}"));
            rec.patient = patient.map(|p| p.to_string());
            rec.categories_withheld = vec![cat.to_string()];
            let treating = self
                .decide(c, action, *cat, Relationship::Treatment)
                .allowed();
            if rel == Relationship::None && treating {
                rec.detail = Some("no treatment relationship".into());
                self.audit(vec![rec])?;
                return Err(VaultError::NoRelationship {
                    break_glass: self.break_glass_would_allow(c, action, *cat),
                });
            }
            return Err(self.deny(rec, action, rt, Some(*cat)));
        }
        Ok(rel)
    }

    /// Records the denial of a write (`action` on a resource of type `rt`) and returns the
    /// error for it, which names the action and type refused (fail closed: if even the
    /// denial cannot be audited, the error says so). `category` is what the record names as
    /// withheld; `None` means the stored row's category is one this server does not know
    /// (default deny), which the record says instead.
    pub(crate) fn deny(
        &self,
        mut rec: AuditRecord,
        action: Action,
        rt: ResourceType,
        category: Option<Category>,
    ) -> VaultError {
        rec.outcome = Outcome::Denied;
        match category {
            Some(c) => rec.categories_withheld = vec![c.to_string()],
            None => rec.detail = Some("unknown stored category".into()),
        }
        match self.audit(vec![rec]) {
            Ok(()) => VaultError::Refused {
                action: action.as_str(),
                rtype: rt.as_str().to_owned(),
            },
            Err(e) => e,
        }
    }

    /// Attaches the body to a write result if the caller may read that category (the
    /// write's own audit record already names the category; this decision adds none).
    pub(crate) fn readback(
        &self,
        c: &Caller,
        mut w: Written,
        json: Map<String, Value>,
        category: Category,
    ) -> Written {
        let draft = Draft {
            rtype: w.rtype,
            id: w.id.clone(),
            version: w.version,
            last_updated: w.last_updated.clone(),
            category,
            patient: w.patient.clone(),
            json,
        };
        let mut scratch = self.record(c, "read", Outcome::Success);
        // The write was decided for this chart already; reading back what was just written
        // discloses nothing new, so the role's decision for a related chart applies.
        let rel = [Relationship::Treatment, Relationship::Own]
            .into_iter()
            .find(|r| self.decide(c, Action::Read, category, *r).allowed())
            .unwrap_or(Relationship::None);
        let read = self.decide(c, Action::Read, category, rel);
        if let Ok(p) = permit(&read, draft, &mut scratch) {
            w.body = Some(typestate::disclose(p));
        }
        w
    }

    pub(crate) fn commit_plan(&self, plan: Plan) -> Result<(), VaultError> {
        let new_keys: Vec<(PatientId, Arc<RecordCipher>)> = plan.new_keys.into_iter().collect();
        let mut ops = plan.ops;
        if let Some(v) = &plan.index_view {
            // The store refuses tokens made under a view a key rotation has moved past.
            ops.push(v.guard());
        }
        self.commit(ops, plan.audit)?;
        for (p, k) in new_keys {
            self.keys.insert(p, 1, k, true);
        }
        Ok(())
    }

    /// `POST /{type}`: the server assigns the id.
    pub fn create(&self, c: &Caller, res: Resource) -> Result<Written, VaultError> {
        let category = res.category();
        let mut plan = Plan::default();
        let id = medvault_types::random_uuid();
        let (w, json) = self.plan_put(c, &mut plan, res, id, None, Expect::Absent)?;
        self.commit_plan(plan)?;
        Ok(self.readback(c, w, json, category))
    }

    /// `POST /{type}` with `If-None-Exist: {search}` (FHIR R4 §3.1.0.8.1, conditional
    /// create): no match → created; one match → nothing written, the match returned
    /// (`created: false`); several → [`VaultError::PreconditionFailed`].
    pub fn create_if_none_exist(
        &self,
        c: &Caller,
        res: Resource,
        search: &str,
    ) -> Result<Written, VaultError> {
        self.may_write(c, Action::Create, res.rtype(), "", res.category(), None)?;
        match self.match_condition(c, res.rtype(), search, res.category())? {
            Matched::None => self.create(c, res),
            Matched::One(d) => Ok(Written::found(d)),
            Matched::Many => Err(VaultError::PreconditionFailed(
                "the If-None-Exist search matches more than one resource",
            )),
        }
    }

    /// `PUT /{type}/{id}`, honouring the preconditions (`If-Match`, `If-None-Match`).
    pub fn update(
        &self,
        c: &Caller,
        id: &str,
        res: Resource,
        pre: Precondition,
    ) -> Result<Written, VaultError> {
        let rt = res.rtype();
        match res.id() {
            Some(body_id) if body_id == id => {}
            Some(_) => {
                return Err(VaultError::BadRequest(
                    "resource id in the body does not match the URL".into(),
                ))
            }
            None => {
                return Err(VaultError::BadRequest(
                    "resource id is required in the body of an update".into(),
                ))
            }
        }
        let category = res.category();
        let prior = self.store.current(rt.as_str(), id)?;
        let prior = match prior {
            Some(p) if !p.deleted() => p,
            _ => {
                let mut rec = self.record(c, "update", Outcome::NotFound);
                rec.resource = Some(format!("{rt}/{id}"));
                self.audit(vec![rec])?;
                return Err(VaultError::NotFound);
            }
        };
        self.may_write(c, Action::Update, rt, id, category, Some(&prior))?;
        pre.check(prior.version())?;
        let mut plan = Plan::default();
        let (w, json) = self.plan_put(
            c,
            &mut plan,
            res,
            id.to_owned(),
            Some(&prior),
            Expect::Version(prior.version()),
        )?;
        match self.commit_plan(plan) {
            Err(VaultError::Conflict) if pre.if_match.is_some() => Err(
                VaultError::PreconditionFailed("If-Match does not match the current version"),
            ),
            Err(e) => Err(e),
            Ok(()) => Ok(self.readback(c, w, json, category)),
        }
    }

    /// `PUT /{type}?{search}` (FHIR R4 §3.1.0.4.2, conditional update): one match →
    /// updated (the body's id, if any, must be the match's); no match and no id in the
    /// body → created with a new id; several matches → [`VaultError::PreconditionFailed`].
    pub fn update_where(
        &self,
        c: &Caller,
        search: &str,
        res: Resource,
        pre: Precondition,
    ) -> Result<Written, VaultError> {
        let rt = res.rtype();
        self.may_write(c, Action::Update, rt, "", res.category(), None)?;
        match self.match_condition(c, rt, search, res.category())? {
            Matched::None if res.id().is_some() => Err(VaultError::BadRequest(
                "conditional update found no match and the resource has an id: update as create is not supported".into(),
            )),
            Matched::None => self.create(c, res),
            Matched::One(d) => {
                if res.id().is_some_and(|b| b != d.id()) {
                    return Err(VaultError::BadRequest(
                        "the resource id differs from the resource the conditional update found"
                            .into(),
                    ));
                }
                let mut res = res;
                res.stamp(d.id(), d.version(), d.last_updated());
                self.update(c, d.id(), res, pre)
            }
            Matched::Many => Err(VaultError::PreconditionFailed(
                "the conditional update's search matches more than one resource",
            )),
        }
    }

    pub(crate) fn plan_delete(
        &self,
        c: &Caller,
        plan: &mut Plan,
        rt: ResourceType,
        id: &str,
        pre: Precondition,
    ) -> Result<u64, VaultError> {
        let prior = self.store.current(rt.as_str(), id)?;
        let mut rec = self.record(c, "delete", Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        let Some(prior) = prior else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = prior.patient().map(|p| p.to_string());
        let Ok(category) = prior.category().parse::<Category>() else {
            return Err(self.deny(rec, Action::Delete, rt, None));
        };
        if !self.could(c, Action::Delete, category) {
            return Err(self.deny(rec, Action::Delete, rt, Some(category)));
        }
        let rel = self.may_write_chart(
            c,
            plan,
            Action::Delete,
            rt,
            id,
            &[category],
            prior.patient(),
        )?;
        self.may_change(c, &prior, rel)?;
        rec.break_glass = matches!(rel, Relationship::BreakGlass | Relationship::Emergency);
        pre.check(prior.version())?;
        if prior.deleted() {
            // Deleting what is already deleted succeeds quietly, with no new version
            // (FHIR R4 §3.1.0.7.1).
            rec.resource = Some(format!("{rt}/{id}/_history/{}", prior.version()));
            rec.detail = Some("already deleted; no new version".into());
            plan.audit.push(rec);
            return Ok(prior.version());
        }
        let version = prior.version() + 1;
        rec.resource = Some(format!("{rt}/{id}/_history/{version}"));
        rec.content = Some(crate::integrity::version_digest(
            &crate::integrity::StoredVersion {
                rtype: rt.as_str(),
                id,
                version,
                patient: prior.patient().map(PatientId::as_str),
                deleted: true,
                category: prior.category(),
                key_version: prior.key_version(),
                body: &[],
            },
        ));
        plan.ops.push(Op::PutVersion {
            row: VersionRow {
                patient: prior.patient().cloned(),
                rtype: rt.as_str().to_owned(),
                id: id.to_owned(),
                version,
                last_updated: self.now_instant(),
                deleted: true,
                category: prior.category().to_owned(),
                key_version: prior.key_version(),
                body: vec![],
            },
            expect: Expect::Version(prior.version()),
            index: vec![],
        });
        plan.audit.push(rec);
        Ok(version)
    }

    /// `DELETE /{type}/{id}`: a new, empty version; earlier versions stay sealed in history.
    pub fn delete(
        &self,
        c: &Caller,
        rt: ResourceType,
        id: &str,
        pre: Precondition,
    ) -> Result<u64, VaultError> {
        self.scope_check(c, rt, Action::Delete)?;
        let mut plan = Plan::default();
        let v = self.plan_delete(c, &mut plan, rt, id, pre)?;
        self.commit_plan(plan)?;
        Ok(v)
    }
}
