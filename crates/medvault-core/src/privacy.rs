//! Security labels and patient-privacy consents through the gate (SPEC "Access control").
//! The facts are blind rows of the search index, written with the resource that carries
//! them, so nothing about them is stored in plaintext:
//!
//! - `_label`: one row per restricting label on a resource, token `HMAC(label)`;
//! - `_deny.{actor}` / `_grant.{actor}` on a patient-privacy Consent: what it denies (a
//!   category's token, everything's token, or a label's token) and which labels it grants,
//!   `{actor}` being a MAC tag of the Practitioner named (or of everyone) — so a search can
//!   match a label row against a grant of the same token in the same chart.
//!
//! The gate reads a chart's rows once per request (reads, `$everything`, includes) and
//! hands the policy three facts per record ([`PrivacyFacts`]); searches apply the same
//! rules inside the query ([`Privacy`]), so totals and pages never count what a read
//! would refuse. The policy alone decides what the facts mean.

use std::collections::HashMap;

use medvault_fhir::privacy::{
    consent_rules, labels, ANYONE, PSYCHOTHERAPY_NOTES, RESTRICTING_LABELS, WITHHELD_FROM_PATIENT,
};
use medvault_fhir::ResourceType;
use medvault_policy::PrivacyFacts;
use medvault_store::{Charts, IndexHit, IndexRow, Privacy};
use medvault_types::Category;
use serde_json::{Map, Value};

use crate::index_keys::IndexKey;
use crate::{Caller, Vault, VaultError};
use medvault_types::PatientId;

const LABEL_PARAM: &str = "_label";

/// The tokens of every label, category and "everything", computed once per gate.
pub(crate) struct PrivacyTokens {
    labels: Vec<(&'static str, Vec<u8>)>,
    categories: Vec<(Category, Vec<u8>)>,
    everything: Vec<u8>,
}

impl PrivacyTokens {
    pub(crate) fn new(indexer: &medvault_crypto::BlindIndexer) -> Self {
        PrivacyTokens {
            labels: RESTRICTING_LABELS
                .iter()
                .chain(std::iter::once(&WITHHELD_FROM_PATIENT))
                .map(|l| (*l, indexer.token("label", LABEL_PARAM, l).to_vec()))
                .collect(),
            categories: Category::ALL
                .iter()
                .map(|c| (*c, indexer.token("consent", "_target", c.as_str()).to_vec()))
                .collect(),
            everything: indexer.token("consent", "_target", ANYONE).to_vec(),
        }
    }

    fn label(&self, code: &str) -> Option<&[u8]> {
        self.labels
            .iter()
            .find(|(l, _)| *l == code)
            .map(|(_, t)| t.as_slice())
    }

    fn label_of(&self, token: &[u8]) -> Option<&'static str> {
        self.labels
            .iter()
            .find(|(_, t)| t == token)
            .map(|(l, _)| *l)
    }

    fn category(&self, c: Category) -> Option<&[u8]> {
        self.categories
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, t)| t.as_slice())
    }
}

/// The consent params naming one caller: theirs (by Practitioner) and everyone's.
#[derive(Debug, Clone, Default)]
pub(crate) struct AskerParams {
    pub deny: Vec<String>,
    pub grant: Vec<String>,
}

impl AskerParams {
    /// Every param a chart lookup needs.
    pub(crate) fn lookup(&self) -> Vec<String> {
        let mut v = vec![LABEL_PARAM.to_owned()];
        v.extend(self.deny.iter().cloned());
        v.extend(self.grant.iter().cloned());
        v
    }
}

/// The tag naming `actor` in consent params (`_deny.{tag}`), under one index key.
fn actor_tag(k: &IndexKey, actor: &str) -> String {
    let t = k.blind.token("consent", "_actor", actor);
    t.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

impl Vault {
    /// The privacy rows of a resource: its restricting labels, and a Consent's rules.
    pub(crate) fn privacy_index(
        &self,
        k: &IndexKey,
        rt: ResourceType,
        json: &Map<String, Value>,
    ) -> Vec<IndexRow> {
        let t = &k.privacy;
        let mut rows: Vec<IndexRow> = labels(json)
            .into_iter()
            .filter_map(|l| t.label(l))
            .map(|token| IndexRow {
                param: LABEL_PARAM.to_owned(),
                token: token.to_vec(),
            })
            .collect();
        for (deny, actor, target) in consent_rules(rt, json) {
            let token = match target.strip_prefix("label:") {
                Some(code) => match t.label(code) {
                    Some(x) => x.to_vec(),
                    None => continue,
                },
                None if target == ANYONE => t.everything.clone(),
                None => match target.parse::<Category>().ok().and_then(|c| t.category(c)) {
                    Some(x) => x.to_vec(),
                    None => continue,
                },
            };
            let kind = if deny { "_deny" } else { "_grant" };
            rows.push(IndexRow {
                param: format!("{kind}.{}", actor_tag(k, &actor)),
                token,
            });
        }
        rows
    }

    /// Whether a Consent written by `c` would grant a label to `c` (naming their
    /// Practitioner, or everyone when they have one).
    pub(crate) fn grants_self(
        &self,
        c: &Caller,
        rt: ResourceType,
        json: &Map<String, Value>,
    ) -> bool {
        // Staff never record a grant to everyone (it would include them); a clinician never
        // one naming themselves. The patient (portal) and the importer may.
        let staff = c.role().is_some_and(|r| {
            !matches!(
                r,
                medvault_types::Role::Patient | medvault_types::Role::Importer
            )
        });
        let me = c.principal().and_then(|p| p.practitioner.as_deref());
        consent_rules(rt, json).iter().any(|(deny, actor, _)| {
            !deny && ((actor == ANYONE && staff) || Some(actor.as_str()) == me)
        })
    }

    /// The privacy facts, for `c`, of a record of `patient`'s chart carrying `own` labels,
    /// read outside an audited read (deciding a write, checking an earlier version).
    pub(crate) fn facts_outside(
        &self,
        c: &Caller,
        patient: &PatientId,
        own: Option<(&str, &str)>,
        labels_of_content: Option<&[&'static str]>,
        category: Category,
    ) -> Result<PrivacyFacts, VaultError> {
        let view = self.index_view();
        let k = &view.read;
        let params = asker_params(k, c);
        let hits = self.store.chart_tokens(patient, &params.lookup())?;
        view.check_lease(&self.store)?;
        let chart = ChartPrivacy::new(&k.privacy, &params, hits);
        Ok(match (labels_of_content, own) {
            (Some(l), _) => chart.facts_for(&k.privacy, l, patient.as_str(), category),
            (None, Some((rtype, id))) => {
                chart.facts(&k.privacy, rtype, id, patient.as_str(), category)
            }
            (None, None) => chart.facts_for(&k.privacy, &[], patient.as_str(), category),
        })
    }

    /// Whether an opened record's own labels (an earlier version's may differ from what the
    /// index holds) refuse it to `c`.
    pub(crate) fn version_restricted(
        &self,
        c: &Caller,
        d: &crate::Disclosed,
    ) -> Result<bool, VaultError> {
        let (Some(patient), Some(json)) = (d.patient(), d.json()) else {
            return Ok(false);
        };
        let own = labels(json);
        if own.is_empty() {
            return Ok(false);
        }
        let rel = self.write_relationship(c, &[], Some(patient))?;
        let facts = self.facts_outside(c, patient, None, Some(&own), d.category())?;
        let mut q = Self::records_query(
            c,
            medvault_types::Action::Read,
            d.category(),
            rel,
            self.options.public_transparency,
        );
        q.privacy = facts;
        Ok(!self.policy().decide(q).allowed())
    }

    /// The privacy clauses of `c`'s searches with `charts` exempt: consents yield there,
    /// and of the labels only psychotherapy notes need a grant (a chart under a medical
    /// emergency; a patient's own chart in the portal).
    pub(crate) fn exempt_privacy_scope(&self, c: &Caller, charts: Charts) -> Privacy {
        let k = self.ix();
        let mut p = privacy_scope(&k, c);
        let unopened = [PSYCHOTHERAPY_NOTES, WITHHELD_FROM_PATIENT]
            .iter()
            .filter_map(|l| k.privacy.label(l))
            .map(<[u8]>::to_vec)
            .collect();
        p.exempt = Some((charts, unopened));
        p
    }

    /// The privacy clauses of `c`'s searches across charts: a portal account's own chart
    /// is exempt (psychotherapy notes aside).
    pub(crate) fn search_privacy(&self, c: &Caller) -> Privacy {
        match (c.role(), c.principal()) {
            (Some(medvault_types::Role::Patient), Some(p)) => self.exempt_privacy_scope(
                c,
                Charts::Links {
                    username: p.username.as_str().to_owned(),
                    kinds: vec!["self".into()],
                },
            ),
            _ => privacy_scope(&self.ix(), c),
        }
    }

    /// The privacy clauses of `c`'s searches.
    pub(crate) fn privacy_scope(&self, c: &Caller) -> Privacy {
        privacy_scope(&self.ix(), c)
    }
}

/// The consent params naming `c` under one index key: their Practitioner's, and everyone's.
pub(crate) fn asker_params(k: &IndexKey, c: &Caller) -> AskerParams {
    let mut who = vec![actor_tag(k, ANYONE)];
    if let Some(p) = c.principal().and_then(|p| p.practitioner.as_deref()) {
        who.push(actor_tag(k, p));
    }
    AskerParams {
        deny: who.iter().map(|w| format!("_deny.{w}")).collect(),
        // No grant reaches the portal: a patient reads their own labelled records by
        // policy (relationship "self"), a proxy never does, psychotherapy notes never.
        grant: match c.role() {
            Some(medvault_types::Role::Patient) => vec![],
            _ => who.iter().map(|w| format!("_grant.{w}")).collect(),
        },
    }
}

/// The privacy clauses of `c`'s searches, every token under one index key.
fn privacy_scope(k: &IndexKey, c: &Caller) -> Privacy {
    let p = asker_params(k, c);
    let t = &k.privacy;
    Privacy {
        deny_params: p.deny,
        grant_params: p.grant,
        category_tokens: t
            .categories
            .iter()
            .filter(|(c, _)| *c != Category::Consents)
            .map(|(c, tok)| (c.as_str().to_owned(), tok.clone()))
            .collect(),
        everything_token: t.everything.clone(),
        exempt: None,
        ignored_labels: match c.role() {
            Some(medvault_types::Role::Patient) => vec![],
            _ => t
                .label(WITHHELD_FROM_PATIENT)
                .map(|x| vec![x.to_vec()])
                .unwrap_or_default(),
        },
    }
}

/// One chart's privacy rows, as they bear on one caller.
pub(crate) struct ChartPrivacy {
    /// Labels by (type, id), the patient's own included (type `Patient`).
    labels: HashMap<(String, String), Vec<&'static str>>,
    denied: Vec<Vec<u8>>,
    granted: Vec<Vec<u8>>,
}

impl ChartPrivacy {
    pub(crate) fn new(tokens: &PrivacyTokens, params: &AskerParams, hits: Vec<IndexHit>) -> Self {
        let mut out = ChartPrivacy {
            labels: HashMap::new(),
            denied: vec![],
            granted: vec![],
        };
        for h in hits {
            if h.param == LABEL_PARAM {
                if let Some(l) = tokens.label_of(&h.token) {
                    out.labels.entry((h.rtype, h.id)).or_default().push(l);
                }
            } else if params.deny.contains(&h.param) {
                out.denied.push(h.token);
            } else if params.grant.contains(&h.param) {
                out.granted.push(h.token);
            }
        }
        out
    }

    /// The facts of one record of this chart (its current version's labels).
    pub(crate) fn facts(
        &self,
        tokens: &PrivacyTokens,
        rtype: &str,
        id: &str,
        patient: &str,
        category: Category,
    ) -> PrivacyFacts {
        let own = self
            .labels
            .get(&(rtype.to_owned(), id.to_owned()))
            .cloned()
            .unwrap_or_default();
        self.facts_for(tokens, &own, patient, category)
    }

    /// The facts of a record of this chart carrying `own` labels (an earlier version's, read
    /// from its content).
    pub(crate) fn facts_for(
        &self,
        tokens: &PrivacyTokens,
        own: &[&'static str],
        patient: &str,
        category: Category,
    ) -> PrivacyFacts {
        let mut f = PrivacyFacts::default();
        let own = Some(own);
        let chart = self
            .labels
            .get(&("Patient".to_owned(), patient.to_owned()))
            .map(Vec::as_slice);
        let cat = tokens.category(category).unwrap_or_default();
        // A consent never hides the consents themselves (they must stay manageable).
        f.consent_denied = category != Category::Consents
            && self
                .denied
                .iter()
                .any(|t| t.as_slice() == cat || *t == tokens.everything);
        for l in own.into_iter().chain(chart).flatten() {
            if *l == WITHHELD_FROM_PATIENT {
                // Restricts only the portal, whatever any consent says.
                f.withheld_from_patient = true;
                continue;
            }
            let token = tokens.label(l).unwrap_or_default();
            if self.denied.iter().any(|t| t.as_slice() == token) {
                f.consent_denied = true;
            }
            if !self.granted.iter().any(|t| t.as_slice() == token) {
                if *l == PSYCHOTHERAPY_NOTES {
                    f.psychotherapy = true;
                } else {
                    f.restricted = true;
                }
            }
        }
        f
    }
}
