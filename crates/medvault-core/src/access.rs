//! What the policy needs to know about a caller and a chart beyond role and purpose (SPEC
//! "Access control"): the treatment relationship (a care team or an encounter, found
//! through the blind `_care` index tokens the gate writes with every CareTeam and
//! Encounter), a live break-the-glass grant, and whether the caller's training is current.
//! The facts are fetched here; the policy engine alone decides what they allow.

use std::collections::HashMap;

use medvault_fhir::care::{care_lookup, care_values};
use medvault_fhir::ResourceType;
use medvault_policy::{Asker, Query, Relationship, Target};
use medvault_store::{Charts, IndexRow, Reach, StoreError};
use medvault_types::{Action, Category, Operation, PatientId};
use serde_json::{Map, Value};

use crate::index_keys::IndexKey;
use crate::{Caller, Vault};

/// The domain of `_care` tokens in the blind index (one for CareTeam and Encounter, so one
/// lookup finds both).
const CARE_DOMAIN: &str = "care";
/// The search-index parameter of care tokens (never a FHIR search parameter: the parser
/// rejects names starting with `_` it does not know).
pub(crate) const CARE_PARAM: &str = "_care";

/// Who is asking, as the relationship lookup needs it: the caller's care tokens for today
/// and the user name its grants are under. Built once per request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reacher {
    /// Blind tokens finding the charts the caller's Practitioner is related to today.
    care: Vec<Vec<u8>>,
    /// The signed-in user (grants are per user); `None` for every other caller.
    username: Option<String>,
    /// Unix seconds.
    now: i64,
}

/// How a chart lookup is made: inside an audited read, or against the store (writes).
pub(crate) type ChartLookup<'a> = dyn Fn(&[Vec<u8>], &str, i64, Option<&PatientId>) -> Result<Vec<(PatientId, Reach)>, StoreError>
    + 'a;

fn relationship_of(r: Reach) -> Relationship {
    match r {
        Reach::Care => Relationship::Treatment,
        Reach::BreakGlass => Relationship::BreakGlass,
        Reach::Emergency => Relationship::Emergency,
        Reach::Own => Relationship::Own,
        Reach::Proxy => Relationship::Proxy,
    }
}

impl Reacher {
    /// The blind tokens finding the charts the caller's Practitioner relates to today.
    pub(crate) fn care_tokens(&self) -> &[Vec<u8>] {
        &self.care
    }

    /// The relationship of the caller to one chart (`None` for records in no chart).
    pub(crate) fn one(
        &self,
        lookup: &ChartLookup<'_>,
        patient: Option<&PatientId>,
    ) -> Result<Relationship, StoreError> {
        let (Some(p), Some(user)) = (patient, &self.username) else {
            return Ok(Relationship::None);
        };
        Ok(lookup(&self.care, user, self.now, Some(p))?
            .first()
            .map_or(Relationship::None, |(_, r)| relationship_of(*r)))
    }

    /// Every chart the caller relates to today, with the strongest relationship to each
    /// (the "my patients" list).
    pub(crate) fn all(
        &self,
        lookup: &ChartLookup<'_>,
    ) -> Result<Vec<(PatientId, Relationship)>, StoreError> {
        let Some(user) = &self.username else {
            return Ok(vec![]);
        };
        Ok(lookup(&self.care, user, self.now, None)?
            .into_iter()
            .map(|(p, r)| (p, relationship_of(r)))
            .collect())
    }

    /// Search scopes: each kind of chart the caller reaches, with the categories they may
    /// see there — treated charts, those their live grants open, their own chart and those
    /// they are a proxy for (portal accounts).
    pub(crate) fn scopes(&self, r: &Reachable) -> Vec<(Vec<String>, Charts)> {
        let Some(user) = &self.username else {
            return vec![];
        };
        let names = |v: &[Category]| v.iter().map(|c| c.as_str().to_owned()).collect();
        let links = |kinds: &[&str]| Charts::Links {
            username: user.clone(),
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
        };
        vec![
            (names(&r.treatment), Charts::Care(self.care.clone())),
            (
                names(&r.break_glass),
                Charts::Grants {
                    username: user.clone(),
                    now: self.now,
                },
            ),
            (names(&r.own), links(&["self"])),
            (names(&r.proxy), links(&["guardian", "caregiver"])),
        ]
    }
}

/// Whether a set of categories holds nothing but the staff directory (which every user
/// reads whatever the purpose).
trait DirectoryOnly {
    fn is_empty_or_directory(&self) -> bool;
}

impl DirectoryOnly for Vec<Category> {
    fn is_empty_or_directory(&self) -> bool {
        self.iter().all(|c| *c == Category::Directory)
    }
}

/// Relationships looked up during one request, by chart.
#[derive(Default)]
pub(crate) struct ReachCache(std::sync::Mutex<HashMap<PatientId, Relationship>>);

impl ReachCache {
    pub(crate) fn get(
        &self,
        reacher: &Reacher,
        lookup: &ChartLookup<'_>,
        patient: Option<&PatientId>,
    ) -> Result<Relationship, StoreError> {
        let Some(p) = patient else {
            return Ok(Relationship::None);
        };
        if let Some(r) = self.0.lock().ok().and_then(|m| m.get(p).copied()) {
            return Ok(r);
        }
        let r = reacher.one(lookup, Some(p))?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(p.clone(), r);
        }
        Ok(r)
    }
}

/// The categories a caller may act on, by how the chart is reached: everywhere (`open`),
/// in charts with a treatment relationship, and in charts under a break-the-glass grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reachable {
    pub open: Vec<Category>,
    pub treatment: Vec<Category>,
    pub break_glass: Vec<Category>,
    /// A portal account's own chart, and charts it is a proxy for.
    pub own: Vec<Category>,
    pub proxy: Vec<Category>,
}

impl Reachable {
    /// Every category visible somewhere.
    pub(crate) fn any(&self) -> Vec<Category> {
        let mut out = self.open.clone();
        for c in self
            .treatment
            .iter()
            .chain(&self.break_glass)
            .chain(&self.own)
            .chain(&self.proxy)
        {
            if !out.contains(c) {
                out.push(*c);
            }
        }
        out
    }
    /// Whether some of `categories` is visible only within reached charts.
    pub(crate) fn chart_scoped(&self, categories: &[Category]) -> bool {
        self.treatment
            .iter()
            .chain(&self.break_glass)
            .chain(&self.own)
            .chain(&self.proxy)
            .any(|c| !self.open.contains(c) && categories.contains(c))
    }
}

/// One decision explained: allowed or not, and the `@id`s of the deciding policies (the
/// permits for an allow, the forbids that denied; none for a default deny).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    pub allowed: bool,
    pub policies: Vec<String>,
}

impl Vault {
    /// Explains whether `c` may `action` records of `category` in a chart reached through
    /// `relationship`, evaluating the policies afresh (no cache): what `medvault policy
    /// test` and the benchmark's policy row use. Records nothing; decides nothing.
    pub fn explain(
        &self,
        c: &Caller,
        action: Action,
        category: Category,
        relationship: Relationship,
    ) -> Explanation {
        let d = self.policy().decide_fresh(Self::records_query(
            c,
            action,
            category,
            relationship,
            self.options.public_transparency,
        ));
        Explanation {
            allowed: d.allowed(),
            policies: d.policies().to_vec(),
        }
    }

    /// Whether `c` may `action` records of `category` in a chart reached through
    /// `relationship` — the decision as the gate makes it on every request (cached per
    /// query in the engine). Records nothing.
    pub fn decision(
        &self,
        c: &Caller,
        action: Action,
        category: Category,
        relationship: Relationship,
    ) -> bool {
        self.decide(c, action, category, relationship).allowed()
    }

    /// The relationship facts of `c` at this moment.
    pub(crate) fn reacher(&self, c: &Caller) -> Reacher {
        let now = self.clock.now();
        let Some(p) = c
            .principal()
            .filter(|_| matches!(c.asker(), Asker::User(_) | Asker::App { .. }))
        else {
            return Reacher::default();
        };
        let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let k = self.ix();
        let care = match &p.practitioner {
            Some(id) => care_lookup(id, now_ms)
                .iter()
                .map(|v| k.token(CARE_DOMAIN, CARE_PARAM, v))
                .collect(),
            None => vec![],
        };
        Reacher {
            care,
            username: Some(p.username.as_str().to_owned()),
            now: now.unix_timestamp(),
        }
    }

    /// The `_care` index rows of a CareTeam or Encounter (none for other types).
    pub(crate) fn care_index(
        &self,
        k: &IndexKey,
        rt: ResourceType,
        json: &Map<String, Value>,
    ) -> Vec<IndexRow> {
        care_values(rt, json)
            .iter()
            .map(|v| IndexRow {
                param: CARE_PARAM.to_owned(),
                token: k.token(CARE_DOMAIN, CARE_PARAM, v),
            })
            .collect()
    }

    /// Whether `rows` (a resource's index) relate the caller to its chart today.
    pub(crate) fn relates_caller(&self, c: &Caller, rows: &[IndexRow]) -> bool {
        let r = self.reacher(c);
        rows.iter()
            .any(|x| x.param == CARE_PARAM && r.care.contains(&x.token))
    }

    /// The relationship of `c` to `patient`'s chart, for a write: a chart this very plan
    /// relates the caller to (a new encounter naming them) counts.
    pub(crate) fn write_relationship(
        &self,
        c: &Caller,
        reached_in_plan: &[PatientId],
        patient: Option<&PatientId>,
    ) -> Result<Relationship, StoreError> {
        if patient.is_some_and(|p| reached_in_plan.contains(p)) {
            return Ok(Relationship::Treatment);
        }
        let store = self.store.clone();
        let lookup =
            move |t: &[Vec<u8>], u: &str, n: i64, p: Option<&PatientId>| store.charts(t, u, n, p);
        self.reacher(c).one(&lookup, patient)
    }

    /// The Cedar query for `c` acting on records of `category` reached through `rel`.
    pub(crate) fn records_query(
        c: &Caller,
        action: Action,
        category: Category,
        relationship: Relationship,
        public_transparency: bool,
    ) -> Query {
        Query {
            asker: c.asker(),
            target: Target::Records(action, category),
            purpose: c.purpose,
            public_transparency,
            relationship,
            training_current: c.principal().is_none_or(|p| p.training_current),
            privacy: medvault_policy::PrivacyFacts::default(),
        }
    }

    /// Whether `c` could be let in by breaking the glass where `category` is denied.
    pub(crate) fn break_glass_would_allow(
        &self,
        c: &Caller,
        action: Action,
        category: Category,
    ) -> bool {
        let q = Query::operation(c.asker(), Operation::BreakGlass, c.purpose, false);
        self.policy().decide(q).allowed()
            && self
                .policy()
                .decide(Self::records_query(
                    c,
                    action,
                    category,
                    Relationship::BreakGlass,
                    false,
                ))
                .allowed()
    }

    /// The purposes of use `c`'s role may declare: those under which the policy allows it
    /// anything (a record action on some category, or an operation of the gate).
    pub(crate) fn purposes_of(&self, c: &Caller) -> Vec<medvault_types::Purpose> {
        // Purpose of use is about records: a purpose counts when it opens some category of
        // some chart to the role; a role that opens no records under any purpose (the
        // administrators) may declare any, for it changes nothing.
        let opens: Vec<medvault_types::Purpose> = medvault_types::Purpose::ALL
            .iter()
            .copied()
            .filter(|p| {
                let mut as_p = c.clone();
                as_p.purpose = *p;
                [Action::Read, Action::Search, Action::Create, Action::Update]
                    .iter()
                    .any(|a| !self.reachable(&as_p, *a).any().is_empty_or_directory())
            })
            .collect();
        if opens.is_empty() {
            medvault_types::Purpose::ALL.to_vec()
        } else {
            opens
        }
    }

    /// The categories `c` may `action`, by how the chart is reached: decided by policy
    /// alone, remembered per (role, purpose of use, training).
    pub(crate) fn reachable(&self, c: &Caller, action: Action) -> Reachable {
        let training = c.principal().is_none_or(|p| p.training_current);
        let key = (c.role(), c.purpose, training, action);
        if c.client_scopes().is_none() {
            if let Ok(cache) = self.reachable.lock() {
                if let Some(v) = cache.get(&key) {
                    return v.clone();
                }
            }
        }
        let with = |rel| -> Vec<Category> {
            Category::ALL
                .iter()
                .copied()
                .filter(|cat| {
                    self.policy()
                        .decide(Self::records_query(
                            c,
                            action,
                            *cat,
                            rel,
                            self.options.public_transparency,
                        ))
                        .allowed()
                })
                .collect()
        };
        let open = with(Relationship::None);
        let but_open = |v: Vec<Category>| -> Vec<Category> {
            v.into_iter().filter(|x| !open.contains(x)).collect()
        };
        let own = but_open(with(Relationship::Own));
        let proxy = but_open(with(Relationship::Proxy));
        let v = Reachable {
            own,
            proxy,
            treatment: with(Relationship::Treatment)
                .into_iter()
                .filter(|x| !open.contains(x))
                .collect(),
            break_glass: with(Relationship::BreakGlass)
                .into_iter()
                .filter(|x| !open.contains(x))
                .collect(),
            open,
        };
        if c.client_scopes().is_none() {
            if let Ok(mut cache) = self.reachable.lock() {
                cache.insert(key, v.clone());
            }
        }
        v
    }
}
