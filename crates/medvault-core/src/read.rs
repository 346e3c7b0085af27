//! Reading records: read, vread and history, each an audited read — the policy decision,
//! its audit record and the row fetch in one store transaction, decryption after commit.

use std::sync::Arc;

use medvault_fhir::ResourceType;
use medvault_policy::{PolicyEngine, Relationship};
use medvault_store::{AuditedRead, Payload, Sealed, StoreError, TxRead};
use medvault_types::{Action, Category, Clock, PatientId};

use std::collections::HashMap;

use medvault_policy::PrivacyFacts;

use crate::access::{ReachCache, Reacher};
use crate::privacy::{AskerParams, ChartPrivacy};
use crate::typestate::{self, permit, Disclosed, Permitted};
use crate::{
    directory_key_id, push_unique, AuditRecord, Caller, Outcome, SearchResult, Vault, VaultError,
};

/// An audited read's records and its answer.
pub(crate) type Decided<T> = (Vec<AuditRecord>, Result<T, VaultError>);

/// Rows the caller may see, and the categories disclosed and withheld.
pub(crate) type Filtered = (Vec<Permitted<Sealed>>, Vec<Category>, Vec<Category>);

/// What an audited read needs on the store's side: the caller, the policy and the clock,
/// owned, so the read can run on the store's sequencer.
pub(crate) struct ReadCtx {
    policy: Arc<PolicyEngine>,
    clock: Arc<dyn Clock>,
    caller: Caller,
    public_transparency: bool,
    /// The caller's relationship facts, and those looked up so far.
    pub(crate) reacher: Reacher,
    reached: ReachCache,
    /// Whether breaking the glass is open to the caller at all (an operation decision).
    may_break_glass: bool,
    /// Labels and consents: the tokens, the caller's consent params, and the charts'
    /// privacy rows read so far.
    index: Arc<crate::index_keys::IndexView>,
    params: AskerParams,
    charts_privacy: std::sync::Mutex<HashMap<PatientId, Arc<ChartPrivacy>>>,
}

impl ReadCtx {
    pub(crate) fn record(&self, action: &str, outcome: Outcome) -> AuditRecord {
        self.caller.record(&*self.clock, action, outcome)
    }

    fn decide(
        &self,
        action: Action,
        category: Category,
        relationship: Relationship,
    ) -> medvault_policy::Decision {
        self.decide_with(action, category, relationship, PrivacyFacts::default())
    }

    fn decide_with(
        &self,
        action: Action,
        category: Category,
        relationship: Relationship,
        privacy: PrivacyFacts,
    ) -> medvault_policy::Decision {
        let mut q = Vault::records_query(
            &self.caller,
            action,
            category,
            relationship,
            self.public_transparency,
        );
        q.privacy = privacy;
        self.policy.decide(q)
    }

    /// Whether the caller may read a chart's Patient (its demographics) as privacy decides:
    /// `Err` is the refusal to hand back (restricted), `Ok(Ok(()))` lets them on.
    pub(crate) fn read_patient(
        &self,
        tx: &dyn TxRead,
        row: &Sealed,
        rel: Relationship,
    ) -> Result<Result<(), VaultError>, StoreError> {
        let cat = Category::Demographics;
        let facts = self.facts(tx, row, cat)?;
        if facts == PrivacyFacts::default()
            || self.decide_with(Action::Read, cat, rel, facts).allowed()
        {
            return Ok(Ok(()));
        }
        Ok(Err(self.denial(Action::Read, cat, rel, facts)))
    }

    /// The privacy facts of one stored record for the caller: its labels and its
    /// patient's, and the consents of its chart (read once per chart per request).
    pub(crate) fn facts(
        &self,
        tx: &dyn TxRead,
        row: &Sealed,
        category: Category,
    ) -> Result<PrivacyFacts, StoreError> {
        let Some(p) = row.patient() else {
            return Ok(PrivacyFacts::default());
        };
        let known = self
            .charts_privacy
            .lock()
            .ok()
            .and_then(|m| m.get(p).cloned());
        let chart = match known {
            Some(c) => c,
            None => {
                let hits = tx.chart_tokens(p, &self.params.lookup())?;
                let c = Arc::new(ChartPrivacy::new(
                    &self.index.read.privacy,
                    &self.params,
                    hits,
                ));
                if let Ok(mut m) = self.charts_privacy.lock() {
                    m.insert(p.clone(), c.clone());
                }
                c
            }
        };
        Ok(chart.facts(
            &self.index.read.privacy,
            row.rtype(),
            row.id(),
            p.as_str(),
            category,
        ))
    }

    /// Whether breaking the glass is open to the caller at all.
    pub(crate) fn may_break_glass(&self) -> bool {
        self.may_break_glass
    }

    /// The caller's relationship to `patient`'s chart, looked up in this transaction.
    pub(crate) fn relationship(
        &self,
        tx: &dyn TxRead,
        patient: Option<&PatientId>,
    ) -> Result<Relationship, StoreError> {
        let lookup = |t: &[Vec<u8>], u: &str, n: i64, p: Option<&PatientId>| tx.charts(t, u, n, p);
        self.reached.get(&self.reacher, &lookup, patient)
    }

    /// The error for a denied read of `category`: restricted information (labels, consent;
    /// naming neither) when only the record's privacy facts denied it; a missing treatment
    /// relationship (saying whether break-the-glass would help) when one would have allowed
    /// it; else the category withheld.
    fn denial(
        &self,
        action: Action,
        category: Category,
        rel: Relationship,
        privacy: PrivacyFacts,
    ) -> VaultError {
        if !self.caller.principal().is_none_or(|p| p.training_current) {
            let mut q = Vault::records_query(
                &self.caller,
                action,
                category,
                rel,
                self.public_transparency,
            );
            q.training_current = true;
            q.privacy = privacy;
            if self.policy.decide(q).allowed() {
                return VaultError::TrainingLapsed;
            }
        }
        if privacy != PrivacyFacts::default() && self.decide(action, category, rel).allowed() {
            let emergency = self.may_break_glass
                && self
                    .decide_with(action, category, Relationship::Emergency, privacy)
                    .allowed();
            return VaultError::Restricted {
                break_glass: emergency && rel != Relationship::Emergency,
            };
        }
        let treating = self
            .decide(action, category, Relationship::Treatment)
            .allowed();
        if rel == Relationship::None && treating {
            let break_glass = self.may_break_glass
                && self
                    .decide(action, category, Relationship::BreakGlass)
                    .allowed();
            VaultError::NoRelationship { break_glass }
        } else {
            VaultError::Forbidden {
                withheld: vec![category],
            }
        }
    }

    /// The decision and audit record for reading one stored version. A category this
    /// server does not know is a recorded denial (default deny), not an error.
    pub(crate) fn decide_one(
        &self,
        tx: &dyn TxRead,
        rt: ResourceType,
        id: &str,
        row: Option<Sealed>,
        action: &str,
    ) -> Result<Decided<Permitted<Sealed>>, StoreError> {
        let mut rec = self.record(action, Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        let Some(row) = row else {
            rec.outcome = Outcome::NotFound;
            return Ok((vec![rec], Err(VaultError::NotFound)));
        };
        // INVARIANT: a SMART app launched with a chart reaches that chart alone; another
        // chart's record is unknown to it (404), as for a record it may not know exists.
        if self.caller.outside_launch(row.patient()) {
            rec.outcome = Outcome::NotFound;
            rec.detail = Some("outside the app's launch chart".into());
            return Ok((vec![rec], Err(VaultError::NotFound)));
        }
        rec.resource = Some(format!("{rt}/{id}/_history/{}", row.version()));
        rec.patient = row.patient().map(|p| p.to_string());
        let Ok(category) = row.category().parse::<Category>() else {
            rec.outcome = Outcome::Denied;
            rec.detail = Some("unknown stored category".into());
            return Ok((vec![rec], Err(VaultError::Forbidden { withheld: vec![] })));
        };
        let rel = self.relationship(tx, row.patient())?;
        let facts = self.facts(tx, &row, category)?;
        let decision = self.decide_with(Action::Read, category, rel, facts);
        Ok(match permit(&decision, row, &mut rec) {
            Err(_) => {
                rec.categories_withheld = vec![category.to_string()];
                let e = self.denial(Action::Read, category, rel, facts);
                // The deciding policies (the forbids that denied; none is a default deny).
                let why = match decision.policies() {
                    [] => "policy=default-deny".to_owned(),
                    ids => format!("policy={}", ids.join(",")),
                };
                rec.detail = Some(match e {
                    VaultError::NoRelationship { .. } => format!("no treatment relationship {why}"),
                    VaultError::Restricted { .. } => format!("restricted {why}"),
                    _ => why,
                });
                (vec![rec], Err(e))
            }
            Ok(p) if p.get().deleted() => {
                rec.outcome = Outcome::NotFound;
                rec.detail = Some("deleted".into());
                (vec![rec], Err(VaultError::Gone))
            }
            Ok(p) => {
                rec.categories_disclosed = vec![category.to_string()];
                rec.break_glass = matches!(rel, Relationship::BreakGlass | Relationship::Emergency);
                rec.detail = Some(format!("policy={}", decision.policies().join(",")));
                (vec![rec], Ok(p))
            }
        })
    }

    /// Splits rows into those the caller may see and the categories disclosed and withheld
    /// (an unknown category is withheld as the most restrictive one, default deny), and
    /// names both in `rec`, the request's record.
    /// Each row is decided with the caller's relationship to its chart; a row reached under
    /// break-the-glass flags the record.
    pub(crate) fn filter(
        &self,
        tx: &dyn TxRead,
        rows: Vec<Sealed>,
        action: Action,
        rec: &mut AuditRecord,
    ) -> Result<Filtered, StoreError> {
        let (mut allowed, mut disclosed, mut withheld) = (vec![], vec![], vec![]);
        let mut break_glass = false;
        for row in rows {
            // Another chart than a SMART app's launch chart: not there for it at all.
            if self.caller.outside_launch(row.patient()) {
                continue;
            }
            let Ok(cat) = row.category().parse::<Category>() else {
                push_unique(&mut withheld, Category::Notes);
                continue;
            };
            let rel = self.relationship(tx, row.patient())?;
            let facts = self.facts(tx, &row, cat)?;
            match permit(&self.decide_with(action, cat, rel, facts), row, rec) {
                Ok(p) => {
                    push_unique(&mut disclosed, cat);
                    break_glass |=
                        matches!(rel, Relationship::BreakGlass | Relationship::Emergency);
                    allowed.push(p);
                }
                Err(_) => push_unique(&mut withheld, cat),
            }
        }
        // The request's record names the categories; its outcome is the caller's to set.
        rec.outcome = Outcome::Success;
        rec.break_glass |= break_glass;
        rec.categories_disclosed = disclosed.iter().map(|c| c.to_string()).collect();
        rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
        Ok((allowed, disclosed, withheld))
    }
}

impl Vault {
    /// Runs an audited read: `f` runs inside the store transaction that appends the audit
    /// records it returns, so the read and its record commit together; nothing comes back
    /// unless they did (fail closed).
    pub(crate) fn audited_read<T: Send + 'static>(
        &self,
        c: &Caller,
        f: impl FnOnce(
                &ReadCtx,
                &dyn TxRead,
            ) -> Result<(Vec<AuditRecord>, Result<T, VaultError>), StoreError>
            + Send
            + 'static,
    ) -> Result<T, VaultError> {
        let may_break_glass = self
            .policy()
            .decide(medvault_policy::Query::operation(
                c.asker(),
                medvault_types::Operation::BreakGlass,
                c.purpose,
                false,
            ))
            .allowed();
        let index = self.index_view();
        let lease = index.clone();
        let cx = ReadCtx {
            policy: self.policy(),
            clock: self.clock.clone(),
            caller: c.clone(),
            public_transparency: self.options.public_transparency,
            reacher: self.reacher(c),
            reached: ReachCache::default(),
            may_break_glass,
            params: crate::privacy::asker_params(&index.read, c),
            index,
            charts_privacy: Default::default(),
        };
        let read: AuditedRead = Box::new(move |tx: &dyn TxRead| {
            let (recs, out) = f(&cx, tx)?;
            let leaves = recs.iter().map(AuditRecord::to_leaf).collect();
            Ok((leaves, Box::new(out) as Payload))
        });
        match self.store.audited(read) {
            Ok(p) => match p.downcast::<Result<T, VaultError>>() {
                // Lookups under a view a rotation has moved past could have missed rows.
                Ok(out) => lease.check_lease(&self.store).and(*out),
                Err(_) => Err(VaultError::Internal(
                    "audited read returned the wrong type".into(),
                )),
            },
            Err(StoreError::Unavailable(m)) => Err(VaultError::Unavailable(m)),
            Err(StoreError::Injected("read")) => Err(VaultError::Unavailable("read".into())),
            Err(e) => {
                tracing::error!(cause = %e, "audited read failed; request refused");
                Err(VaultError::AuditUnavailable)
            }
        }
    }

    /// Opens a permitted row with its owner's data key.
    pub(crate) fn open_permitted(&self, row: Permitted<Sealed>) -> Result<Disclosed, VaultError> {
        let key_id = row
            .get()
            .patient()
            .cloned()
            .unwrap_or_else(directory_key_id);
        let cipher = match row.get().deleted() {
            true => None,
            false => Some(self.cipher_at(&key_id, row.get().key_version())?),
        };
        Ok(typestate::open(row, cipher.as_deref(), &key_id)?)
    }

    /// Opens rows an audited read permitted, in order, leaving out the records of charts
    /// shredded since they were read (their keys are gone; [`Vault::shredded`]).
    pub(crate) fn open_all(
        &self,
        rows: Vec<Permitted<Sealed>>,
    ) -> Result<Vec<Disclosed>, VaultError> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let patient = r.get().patient().cloned();
            match self.open_permitted(r) {
                Ok(d) => out.push(d),
                Err(VaultError::NotFound) if self.shredded(patient.as_ref())? => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Whether `patient`'s chart has been crypto-shredded: it has no data key left. Its
    /// records may still be stored, as ciphertext nobody can open, until the rows are
    /// removed ([`Op::RemoveShredded`](medvault_store::Op::RemoveShredded)); a read that
    /// meets one leaves it out.
    ///
    /// # Errors
    /// Storage failures.
    pub(crate) fn shredded(&self, patient: Option<&PatientId>) -> Result<bool, VaultError> {
        Ok(match patient {
            Some(p) => self.store.patient_key(p)?.is_none(),
            None => false,
        })
    }

    /// `GET /{type}/{id}`.
    pub fn read(&self, c: &Caller, rt: ResourceType, id: &str) -> Result<Disclosed, VaultError> {
        self.scope_check(c, rt, Action::Read)?;
        let id = id.to_owned();
        let row = self.audited_read(c, move |cx, tx| {
            let row = tx.current(rt.as_str(), &id)?;
            cx.decide_one(tx, rt, &id, row, "read")
        })?;
        self.open_permitted(row)
    }

    /// `GET /{type}/{id}/_history/{vid}`.
    pub fn vread(
        &self,
        c: &Caller,
        rt: ResourceType,
        id: &str,
        version: u64,
    ) -> Result<Disclosed, VaultError> {
        self.scope_check(c, rt, Action::Read)?;
        let id = id.to_owned();
        let row = self.audited_read(c, move |cx, tx| {
            let row = tx.version(rt.as_str(), &id, version)?;
            cx.decide_one(tx, rt, &id, row, "vread")
        })?;
        let d = self.open_permitted(row)?;
        // An earlier version carries its own labels (the index holds the current one's).
        if self.version_restricted(c, &d)? {
            let mut rec = self.record(c, "vread", Outcome::Denied);
            rec.resource = Some(format!("{rt}/{}/_history/{version}", d.id()));
            rec.patient = d.patient().map(|p| p.to_string());
            rec.detail = Some("restricted: the version's own labels".into());
            self.audit(vec![rec])?;
            return Err(VaultError::Restricted { break_glass: false });
        }
        Ok(d)
    }

    /// `GET /{type}/{id}/_history`: every version the caller may see, newest first.
    pub fn history(
        &self,
        c: &Caller,
        rt: ResourceType,
        id: &str,
    ) -> Result<SearchResult, VaultError> {
        self.scope_check(c, rt, Action::Read)?;
        let id = id.to_owned();
        let (rows, disclosed, withheld) = self.audited_read(c, move |cx, tx| {
            let rows = tx.history(rt.as_str(), &id)?;
            let mut rec = cx.record("history", Outcome::Success);
            rec.resource = Some(format!("{rt}/{id}"));
            if rows.is_empty() {
                rec.outcome = Outcome::NotFound;
                return Ok((vec![rec], Err(VaultError::NotFound)));
            }
            rec.patient = rows
                .first()
                .and_then(|r| r.patient())
                .map(|p| p.to_string());
            let patient = rows.first().and_then(|r| r.patient()).cloned();
            // The current version's privacy facts: what a refusal of the history is about.
            let facts = match rows.first() {
                Some(r) => match r.category().parse::<Category>() {
                    Ok(cat) => cx.facts(tx, r, cat)?,
                    Err(_) => PrivacyFacts::default(),
                },
                None => PrivacyFacts::default(),
            };
            let (allowed, disclosed, withheld) = cx.filter(tx, rows, Action::Read, &mut rec)?;
            if allowed.is_empty() {
                rec.outcome = Outcome::Denied;
                let rel = cx.relationship(tx, patient.as_ref())?;
                let e = match withheld.first() {
                    Some(cat) => cx.denial(Action::Read, *cat, rel, facts),
                    None => VaultError::Forbidden { withheld },
                };
                return Ok((vec![rec], Err(e)));
            }
            Ok((vec![rec], Ok((allowed, disclosed, withheld))))
        })?;
        let mut entries = self.open_all(rows)?;
        // Earlier versions carry their own labels (the index holds the current one's).
        let before = entries.len();
        let mut kept = vec![];
        for d in entries.drain(..) {
            if !self.version_restricted(c, &d)? {
                kept.push(d);
            }
        }
        let entries = kept;
        if entries.len() < before {
            let mut rec = self.record(c, "history", Outcome::Denied);
            rec.resource = Some(format!("{rt}"));
            rec.detail = Some(format!(
                "restricted: {} version(s) withheld by their own labels",
                before - entries.len()
            ));
            self.audit(vec![rec])?;
            if entries.is_empty() {
                return Err(VaultError::Restricted { break_glass: false });
            }
        }
        Ok(SearchResult {
            entries,
            disclosed,
            withheld,
            ..Default::default()
        })
    }
}
