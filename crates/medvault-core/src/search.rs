//! Search and `$everything` through the gate (FHIR R4 §3.1.1). Search values become
//! blind-index tokens before they reach the store; results the caller may not see are left
//! out, reported once per response, and never counted.
//!
//! - **Totals and pages count only what the caller may see**: the store tallies matches by
//!   category inside the audited read; the total is the sum over the categories the caller
//!   may search, and pages are drawn from those categories only, so neither the number of
//!   pages nor `Bundle.total` reveals what was withheld.
//! - **Pages hold still**: the first page fixes a snapshot (the audit log's length at that
//!   moment; resources created later are not in it) and every next page continues after the
//!   last key returned (keyset paging on `(rtype, id)` or `(_lastUpdated, rtype, id)`), so a
//!   page never repeats or skips an entry while others write. The continuation is an opaque
//!   cursor, bound by a MAC to the caller, the purpose of use and the query, that expires.
//! - **Dates are intervals**: `_lastUpdated` is compared in the store on UTC instants;
//!   clinical dates (blind-indexed) find candidates through the covering year, month and day
//!   tokens (`medvault_fhir::date::covering_tokens`), then are compared exactly after
//!   decryption (the *exact* path, which also serves `_sort` by a clinical date).
//! - **Chains, `_has`, `_include` and `_revinclude`** run as the caller, through the same
//!   policy as a read: none of them can reveal a resource, or that one exists, that a read
//!   would withhold.

use std::collections::HashSet;

use base64::Engine as _;
use medvault_fhir::date::{covering_tokens, format_instant, Interval};
use medvault_fhir::search::{Include, SearchRequest, SortBy};
use medvault_fhir::ResourceType;
use medvault_policy::Relationship;
use medvault_store::{Order, SearchQuery, TimeRange};
use medvault_types::{Action, Category, PatientId};
use serde_json::Value;

use crate::typestate::Permitted;
use crate::{push_unique, Caller, Disclosed, Outcome, Vault, VaultError};

/// The result of a search: the page the caller may see, what was included with it, and
/// what was withheld (named once).
#[derive(Debug, Default)]
pub struct SearchResult {
    /// Matches (search mode `match`), in order.
    pub entries: Vec<Disclosed>,
    /// Resources added by `_include`/`_revinclude` (search mode `include`).
    pub included: Vec<Disclosed>,
    pub disclosed: Vec<Category>,
    pub withheld: Vec<Category>,
    /// `Bundle.total`: matches the caller may see, over every page.
    pub total: Option<u64>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
    /// The page size used.
    pub count: usize,
    /// Parameters ignored under lenient handling, as sent.
    pub unknown: Vec<String>,
    /// Some categories searched are visible to the caller only in the charts of patients
    /// they have a treatment relationship with (or a break-the-glass grant for): matches in
    /// other charts were left out. Decided by policy alone, so it says nothing about data.
    pub limited_to_relationships: bool,
    /// `$everything` only: records of the chart in categories the caller may otherwise see
    /// were left out by their sensitivity labels or the patient's privacy consent. Says
    /// neither which, nor how many, nor why.
    pub restricted: bool,
    /// `$everything` only: the caller may break the glass for this chart (a clinical role,
    /// not already under an emergency grant).
    pub may_break_glass: bool,
    /// `$everything` only: how the caller reaches the chart (treatment, a break-the-glass
    /// grant, their own record, …).
    pub relationship: Option<Relationship>,
}

const DEFAULT_COUNT: usize = 50;
/// Most candidates the exact path (clinical date ranges, `_sort` by a clinical date)
/// decrypts for one search; more is a 400 asking to narrow the search.
pub const MAX_EXACT_CANDIDATES: usize = 10_000;
/// Most patients a chain or `_has` may resolve to.
const MAX_CHAIN_PATIENTS: usize = 1_000;
/// Rounds of `_include:iterate`.
const MAX_INCLUDE_ROUNDS: usize = 3;

fn bad(msg: impl Into<String>) -> VaultError {
    VaultError::BadRequest(msg.into())
}

/// A decoded, verified cursor.
pub(crate) struct Cursor {
    /// The audit log's length at the first page (for AuditEvent: the entry to continue
    /// below).
    pub(crate) snapshot: u64,
    /// Keyset position (fast path) — non-PHI: type, id, `_lastUpdated`.
    pub(crate) after: Option<Vec<String>>,
    /// Position within the exact path's ordered matches.
    pub(crate) offset: usize,
    /// `Bundle.total` as of the first page.
    pub(crate) total: u64,
}

/// Where a reference search parameter points, by element name(s) (FHIR R4 search
/// parameter expressions, top level).
fn reference_elements(param: &str) -> &'static [&'static str] {
    match param {
        "subject" => &["subject"],
        "patient" => &["patient", "subject", "beneficiary"],
        "encounter" => &["encounter", "context"],
        "performer" => &["performer"],
        "requester" => &["requester"],
        "practitioner" | "participant" => &["participant"],
        "general-practitioner" => &["generalPractitioner"],
        "organization" => &["managingOrganization", "organization", "serviceProvider"],
        "recorder" => &["recorder"],
        "asserter" => &["asserter"],
        "author" => &["author"],
        _ => &[],
    }
}

/// Every `Type/id` reference under `v`.
fn collect_refs(v: &Value, out: &mut Vec<(ResourceType, String)>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                if k == "reference" {
                    if let Some((t, id)) = child.as_str().and_then(|s| s.split_once('/')) {
                        if let (Some(rt), true) =
                            (ResourceType::parse(t), medvault_types::is_fhir_id(id))
                        {
                            out.push((rt, id.to_owned()));
                        }
                    }
                } else {
                    collect_refs(child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// The query a cursor is bound to: `path?params` as sent, less `_cursor`.
pub(crate) fn cursor_query(path: &str, params: &[(String, String)]) -> String {
    let query: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "_cursor").collect();
    format!(
        "{path}?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    )
}

fn key_of(order: Order, rtype: &str, id: &str, last_updated: &str) -> Vec<String> {
    match order {
        Order::Id => vec![rtype.to_owned(), id.to_owned()],
        Order::LastUpdated | Order::LastUpdatedDesc => {
            vec![last_updated.to_owned(), rtype.to_owned(), id.to_owned()]
        }
    }
}

impl Vault {
    fn now_ms(&self) -> i64 {
        i64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
    }

    /// The categories of `types` outside `visible`: what a response about those types
    /// never shows this caller, whatever the data.
    fn never_visible(&self, visible: &[Category], types: &[ResourceType]) -> Vec<Category> {
        let mut out = vec![];
        for t in types {
            for cat in medvault_fhir::categories_of_type(*t) {
                if !visible.contains(cat) {
                    push_unique(&mut out, *cat);
                }
            }
        }
        out
    }

    fn cursor_parts<'a>(c: &'a Caller, query: &'a str) -> [&'a [u8]; 3] {
        [
            c.actor().as_bytes(),
            c.purpose.as_str().as_bytes(),
            query.as_bytes(),
        ]
    }

    /// Issues a cursor: `base64url(snapshot|expiry|offset|key…) . base64url(tag)`.
    pub(crate) fn seal_cursor(&self, c: &Caller, query: &str, cur: &Cursor) -> String {
        let expires = self.clock.now().unix_timestamp()
            + i64::try_from(self.options.cursor_ttl_secs).unwrap_or(i64::MAX / 2);
        let mut fields = vec![
            cur.snapshot.to_string(),
            expires.to_string(),
            cur.offset.to_string(),
            cur.total.to_string(),
        ];
        fields.extend(cur.after.clone().unwrap_or_default());
        let body = fields.join("\n");
        let [a, b, q] = Self::cursor_parts(c, query);
        let tag = self.cursor_mac.tag(&[body.as_bytes(), a, b, q]);
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}", e.encode(body), e.encode(tag))
    }

    /// The cursor continuing after the last of `entries` in `order`.
    fn keyset_cursor(
        &self,
        c: &Caller,
        query: &str,
        snapshot: u64,
        total: u64,
        order: Order,
        entries: &[Disclosed],
    ) -> String {
        let after = entries
            .last()
            .map(|d| key_of(order, d.rtype().as_str(), d.id(), d.last_updated()));
        self.seal_cursor(
            c,
            query,
            &Cursor {
                snapshot,
                after,
                offset: 0,
                total,
            },
        )
    }

    /// Verifies and decodes a cursor for this caller and query.
    pub(crate) fn open_cursor(
        &self,
        c: &Caller,
        query: &str,
        token: &str,
    ) -> Result<Cursor, VaultError> {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let refused = || {
            bad("the paging cursor is invalid, expired, or belongs to another search or user; search again")
        };
        let (body, tag) = token.split_once('.').ok_or_else(refused)?;
        let body = e.decode(body).map_err(|_| refused())?;
        let tag = e.decode(tag).map_err(|_| refused())?;
        let [a, b, q] = Self::cursor_parts(c, query);
        if !self.cursor_mac.verify(&[&body, a, b, q], &tag) {
            return Err(refused());
        }
        let body = String::from_utf8(body).map_err(|_| refused())?;
        let mut f = body.split('\n');
        let snapshot = f.next().and_then(|x| x.parse().ok()).ok_or_else(refused)?;
        let expires: i64 = f.next().and_then(|x| x.parse().ok()).ok_or_else(refused)?;
        let offset = f.next().and_then(|x| x.parse().ok()).ok_or_else(refused)?;
        let total = f.next().and_then(|x| x.parse().ok()).ok_or_else(refused)?;
        if self.clock.now().unix_timestamp() >= expires {
            return Err(refused());
        }
        let key: Vec<String> = f.map(str::to_owned).collect();
        Ok(Cursor {
            snapshot,
            after: (!key.is_empty()).then_some(key),
            offset,
            total,
        })
    }

    /// Ids of the resources of `rt` matching `params` that the caller may see (or, with
    /// `patients_of`, the charts they belong to): the sub-search of a chain or `_has`,
    /// itself an audited search.
    fn sub_search(
        &self,
        c: &Caller,
        rt: ResourceType,
        params: Vec<(String, String)>,
        patients_of: bool,
    ) -> Result<Vec<String>, VaultError> {
        let mut p = params;
        p.push(("_count".into(), MAX_CHAIN_PATIENTS.to_string()));
        let r = self.search_capped(c, rt, &p, true, MAX_CHAIN_PATIENTS)?;
        if r.next.is_some() {
            return Err(bad(format!(
                "a chained search matched more than {MAX_CHAIN_PATIENTS} resources; narrow it"
            )));
        }
        let mut out = vec![];
        for d in &r.entries {
            let id = if patients_of {
                d.patient().map(|p| p.to_string())
            } else {
                Some(d.id().to_owned())
            };
            if let Some(id) = id {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// `GET /{type}?…` (FHIR R4 §3.1.1). `strict` is `Prefer: handling=strict`.
    ///
    /// # Errors
    /// `BadRequest` for a malformed or (strict) unknown parameter, an invalid or expired
    /// cursor, or an exact search with too many candidates; storage and audit failures.
    pub fn search(
        &self,
        c: &Caller,
        rt: ResourceType,
        params: &[(String, String)],
        strict: bool,
    ) -> Result<SearchResult, VaultError> {
        self.search_capped(c, rt, params, strict, self.options.max_page_size)
    }

    /// [`Vault::search`] with the page-size ceiling `cap` (the configured maximum for
    /// clients; larger for the gate's own sub-searches of chains and `_has`).
    fn search_capped(
        &self,
        c: &Caller,
        rt: ResourceType,
        params: &[(String, String)],
        strict: bool,
        cap: usize,
    ) -> Result<SearchResult, VaultError> {
        self.scope_check(c, rt, Action::Search)?;
        // Lapsed training: say so, rather than answer with an empty page.
        if medvault_fhir::categories_of_type(rt)
            .iter()
            .any(|k| *k != Category::Directory && self.training_would_allow(c, Action::Search, *k))
            && !self.has_live_grant(c, None)?
        {
            let mut rec = self.record(c, "search", Outcome::Denied);
            rec.resource = Some(rt.as_str().to_owned());
            rec.detail = Some("training lapsed".into());
            self.audit(vec![rec])?;
            return Err(VaultError::TrainingLapsed);
        }
        if c.client_scopes().is_some_and(|s| !s.reads_everything())
            && params.iter().any(|(k, _)| {
                k.starts_with("_include")
                    || k.starts_with("_revinclude")
                    || k.starts_with("_has")
                    || k.contains('.')
            })
        {
            // Included, chained and reverse-chained resources are of other types, which the
            // policy's categories cannot tell apart from the scoped ones.
            return Err(VaultError::BadRequest(
                "_include, _revinclude, _has and chains need a system/*.rs scope".into(),
            ));
        }
        let s = medvault_fhir::search::parse(rt, params, strict)?;
        let query = cursor_query(rt.as_str(), params);
        let cursor = match &s.cursor {
            Some(t) => Some(self.open_cursor(c, &query, t)?),
            None => None,
        };
        let cursor_snapshot = cursor.as_ref().map(|c| c.snapshot);
        // Chains and _has narrow the search to charts (or Patients) the caller may see.
        let mut patients: Option<Vec<String>> = None;
        let mut ids: Option<Vec<String>> = (!s.ids.is_empty()).then(|| s.ids.clone());
        let intersect = |acc: &mut Option<Vec<String>>, found: Vec<String>| {
            *acc = Some(match acc.take() {
                None => found,
                Some(prev) => prev.into_iter().filter(|x| found.contains(x)).collect(),
            });
        };
        for ch in &s.chains {
            let found = self.sub_search(
                c,
                patient_type(),
                vec![(ch.param.clone(), ch.value.clone())],
                false,
            )?;
            intersect(&mut patients, found);
        }
        for h in &s.has {
            let found =
                self.sub_search(c, h.rtype, vec![(h.param.clone(), h.value.clone())], true)?;
            intersect(&mut ids, found);
        }
        // A SMART app launched with a chart searches that chart alone (the directory
        // aside), so totals and pages count only what it may reach.
        if let Some(l) = c.launch_patient() {
            if medvault_fhir::categories_of_type(rt) != [Category::Directory] {
                intersect(&mut patients, vec![l.as_str().to_owned()]);
            }
        }
        let (order, exact_sort) = match s.sort {
            None | Some((SortBy::Id, false)) => (Order::Id, None),
            Some((SortBy::Id, true)) => (Order::Id, Some((SortBy::Id, true))),
            Some((SortBy::LastUpdated, false)) => (Order::LastUpdated, None),
            Some((SortBy::LastUpdated, true)) => (Order::LastUpdatedDesc, None),
            Some((by @ SortBy::Date(_), desc)) => (Order::Id, Some((by, desc))),
        };
        let exact = !s.dates.is_empty() || exact_sort.is_some();
        let now = self.now_ms();
        let k = self.ix();
        let mut tokens: Vec<(String, Vec<Vec<u8>>)> = s
            .params
            .iter()
            .map(|(param, values)| {
                let t = values
                    .iter()
                    .map(|v| k.token(rt.as_str(), param, v))
                    .collect();
                ((*param).to_owned(), t)
            })
            .collect();
        // Candidates per date parameter: the union over a parameter's values (OR), then
        // the intersection over its repetitions (AND: `date=ge…&date=lt…` is one range),
        // covered by blind tokens.
        let mut spans: Vec<(&str, Vec<Interval>)> = vec![];
        for (param, values) in &s.dates {
            let union: Vec<Interval> = values
                .iter()
                .map(|v| {
                    v.candidates(now).unwrap_or(Interval {
                        start: i64::MIN,
                        end: i64::MAX,
                    })
                })
                .collect();
            match spans.iter_mut().find(|(p, _)| p == param) {
                // AND with a single-interval union narrows it; a multi-value OR is kept as
                // its own constraint.
                Some((_, prev)) if prev.len() == 1 && union.len() == 1 => {
                    if let (Some(a), Some(b)) = (prev.first_mut(), union.first()) {
                        a.start = a.start.max(b.start);
                        a.end = a.end.min(b.end);
                    }
                }
                _ => spans.push((param, union)),
            }
        }
        for (param, union) in spans {
            let mut t: Vec<Vec<u8>> = vec![];
            for span in union {
                for value in covering_tokens(span) {
                    t.push(k.token(rt.as_str(), param, &value));
                }
            }
            t.sort();
            t.dedup();
            tokens.push((param.to_owned(), t));
        }
        let count = if s.summary == medvault_fhir::search::Summary::Count {
            0
        } else {
            s.count.unwrap_or(DEFAULT_COUNT).min(cap)
        };
        let nothing =
            patients.as_ref().is_some_and(Vec::is_empty) || ids.as_ref().is_some_and(Vec::is_empty);
        let q = SearchQuery {
            privacy: Some(self.search_privacy(c)),
            rtype: Some(rt.as_str().to_owned()),
            patient: s.patient.clone(),
            patients: patients
                .unwrap_or_default()
                .iter()
                .filter_map(|p| PatientId::new(p).ok())
                .collect(),
            ids: ids.unwrap_or_default(),
            tokens,
            last_updated: s
                .last_updated
                .iter()
                .map(|d| {
                    let (from, to, outside) = d.instant_range(now);
                    TimeRange {
                        from: from.map(format_instant),
                        to: to.map(format_instant),
                        outside,
                    }
                })
                .collect(),
            categories: vec![],
            created_before: cursor_snapshot,
            order,
            after: cursor.as_ref().and_then(|c| c.after.clone()),
            limit: if exact { MAX_EXACT_CANDIDATES } else { count },
            offset: if cursor.is_some() || exact {
                0
            } else {
                s.offset
            },
            ..Default::default()
        };
        let reach = self.reachable(c, Action::Search);
        let visible = reach.any();
        let seen_by_caller = visible.clone();
        let hidden = self.never_visible(&visible, &[rt]);
        let chart_scoped = reach.chart_scoped(medvault_fhir::categories_of_type(rt));
        let cursor_total = cursor.as_ref().map(|c| c.total);
        let offset = if cursor.is_some() || exact {
            0
        } else {
            s.offset
        };
        let names = s.names.join(",");
        let patient = s.patient.as_ref().map(|p| p.to_string());
        let (rows, disclosed, withheld, total, more, snapshot, limited) = self.audited_read(c, move |cx, tx| {
            let mut rec = cx.record("search", Outcome::Success);
            rec.resource = Some(rt.as_str().to_owned());
            rec.patient = patient;
            // The first page fixes the snapshot: the log's length in this transaction.
            let mut q = q;
            let snapshot = *q.created_before.get_or_insert(tx.audit_len());
            if nothing {
                rec.detail = Some(format!("params={names} matched=0 returned=0"));
                return Ok((vec![rec], Ok((vec![], vec![], vec![], 0, false, snapshot, chart_scoped))));
            }
            let mut page_q = q.clone();
            let cat_names = |v: &[Category]| v.iter().map(|c| c.as_str().to_owned()).collect::<Vec<_>>();
            if let (true, Some(p)) = (chart_scoped, &page_q.patient) {
                // One chart: what the caller may see there, by their relationship to it.
                let rel = cx.relationship(tx, Some(p))?;
                let mut cats = reach.open.clone();
                cats.extend(match rel {
                    Relationship::Treatment => reach.treatment.clone(),
                    Relationship::BreakGlass | Relationship::Emergency => reach.break_glass.clone(),
                    Relationship::Own => reach.own.clone(),
                    Relationship::Proxy => reach.proxy.clone(),
                    Relationship::None => vec![],
                });
                if cats.is_empty() {
                    // Nothing visible: no category at all (an empty list means "any").
                    cats.push(Category::Directory);
                    page_q.rtype = Some("-".into());
                }
                page_q.categories = cat_names(&cats);
            } else if chart_scoped {
                // Categories visible only in some charts: searched within the charts the
                // caller reaches (resolved inside the query), by how they reach them.
                page_q.categories = cat_names(&reach.open);
                page_q.scopes = cx.reacher.scopes(&reach);
            } else {
                page_q.categories = cat_names(&visible);
            }
            let page = if (count == 0 && !exact) || visible.is_empty() {
                Default::default()
            } else {
                tx.search(&page_q)?
            };
            // The total: carried by the cursor; or, when this first page holds every match,
            // counted from it; otherwise tallied over the visible categories.
            let total = match cursor_total {
                Some(t) => t,
                None if count > 0 && !page.more && (offset == 0 || !page.rows.is_empty()) => {
                    u64::try_from(offset + page.rows.len()).unwrap_or(u64::MAX)
                }
                None if visible.is_empty() => 0,
                None => {
                    let mut tq = page_q.clone();
                    tq.after = None;
                    tx.tally(&tq)?.iter().map(|(_, n)| n).sum()
                }
            };
            // What was actually withheld, for the audit record only (the caller's notice is
            // the policy's): probed only where the caller's role cannot see some category of
            // the type.
            let mut withheld: Vec<Category> = vec![];
            if !hidden.is_empty() {
                let mut wq = q;
                wq.categories = hidden.iter().map(|c| c.as_str().to_owned()).collect();
                for (cat, _) in tx.tally(&wq)? {
                    if let Ok(k) = cat.parse::<Category>() {
                        push_unique(&mut withheld, k);
                    }
                }
            }
            if exact && page.more {
                rec.outcome = Outcome::Success;
                rec.detail = Some(format!("params={names} refused: too many candidates"));
                return Ok((
                    vec![rec],
                    Err(bad(format!(
                        "this search has more than {MAX_EXACT_CANDIDATES} candidates to compare by date; narrow it (for example by patient)"
                    ))),
                ));
            }
            let (rows, disclosed, _) = cx.filter(tx, page.rows, Action::Search, &mut rec)?;
            rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
            rec.detail = Some(format!(
                "params={names} matched={total} returned={}{}",
                rows.len(),
                if exact { " (candidates before exact date comparison)" } else { "" }
            ));
            let mut recs = vec![];
            // One record per patient whose chart appears in the results, so "who looked at
            // my record" and the accounting of disclosures see searches too.
            if page_q.patient.is_none() && !exact {
                let mut seen: Vec<&str> = vec![];
                for p in rows.iter().filter_map(|r| r.get().patient()) {
                    if !seen.contains(&p.as_str()) {
                        seen.push(p.as_str());
                    }
                }
                for p in seen {
                    let mut r = rec.resalted();
                    r.patient = Some(p.to_owned());
                    recs.push(r);
                }
            }
            recs.insert(0, rec);
            // The notice that results are limited to reached charts: always, unless the search
            // names one chart the caller reaches (then nothing of it was left out for want
            // of a relationship). Either way it depends on the caller's relationships, which
            // are theirs to know, never on what the charts hold.
            let limited = chart_scoped
                && match &page_q.patient {
                    Some(p) => cx.relationship(tx, Some(p))? == Relationship::None,
                    None => true,
                };
            Ok((recs, Ok((rows, disclosed, withheld, total, page.more, snapshot, limited))))
        })?;
        // The notice names what the caller's role may never see among the types this
        // response could hold — decided by policy alone, never by the data, so whether it
        // appears answers nothing about any chart.
        let _ = withheld;
        let mut types = vec![rt];
        if !s.include.is_empty() {
            types.extend(
                medvault_fhir::SUPPORTED_TYPES
                    .iter()
                    .filter_map(|t| ResourceType::parse(t)),
            );
        }
        types.extend(s.revinclude.iter().map(|i| i.source));
        let mut result = SearchResult {
            disclosed,
            withheld: self.never_visible(&seen_by_caller, &types),
            count,
            unknown: s.unknown.clone(),
            limited_to_relationships: limited,
            ..Default::default()
        };
        if exact {
            let mut entries = self.open_all(rows)?;
            entries.retain(|d| date_matches(d, &s, now));
            if let Some((by, desc)) = exact_sort {
                sort_exact(&mut entries, by, desc);
            }
            // In the store's order, pages continue after the last key (the candidates were
            // read after it), as in the fast path; sorted by a clinical date, by position.
            let keyset = exact_sort.is_none();
            let start = match &cursor {
                Some(cur) if !keyset => cur.offset,
                Some(_) => 0,
                None => s.offset,
            };
            let matched = entries.len();
            let total = cursor
                .as_ref()
                .map_or(u64::try_from(matched).unwrap_or(u64::MAX), |c| c.total);
            result.total = Some(total);
            let end = start.saturating_add(count).min(matched);
            let page: Vec<Disclosed> = entries.drain(start.min(end)..end).collect();
            if matched > end && count > 0 {
                result.next = Some(if keyset {
                    self.keyset_cursor(c, &query, snapshot, total, order, &page)
                } else {
                    self.seal_cursor(
                        c,
                        &query,
                        &Cursor {
                            snapshot,
                            after: None,
                            offset: end,
                            total,
                        },
                    )
                });
            }
            // The per-patient records of what was returned (the request's record, written
            // with the read, named the candidates).
            let mut recs = vec![];
            let mut seen: Vec<String> = vec![];
            for p in page.iter().filter_map(|d| d.patient()) {
                if s.patient.is_none() && !seen.contains(&p.to_string()) {
                    seen.push(p.to_string());
                    let mut r = self.record(c, "search", Outcome::Success);
                    r.resource = Some(rt.as_str().to_owned());
                    r.patient = Some(p.to_string());
                    recs.push(r);
                }
            }
            if !recs.is_empty() {
                self.audit(recs)?;
            }
            result.entries = page;
        } else {
            result.total = Some(total);
            result.entries = self.open_all(rows)?;
            if more && count > 0 {
                result.next =
                    Some(self.keyset_cursor(c, &query, snapshot, total, order, &result.entries));
            }
        }
        self.add_includes(c, &s, &mut result)?;
        Ok(result)
    }

    /// `_include` and `_revinclude` (FHIR R4 §3.1.1.5.4), each fetched through the policy
    /// as a read: what the caller may not read is left out (its category withheld).
    fn add_includes(
        &self,
        c: &Caller,
        s: &SearchRequest,
        r: &mut SearchResult,
    ) -> Result<(), VaultError> {
        if s.include.is_empty() && s.revinclude.is_empty() {
            return Ok(());
        }
        // Checked before anything is fetched, so the answer never depends on the matches.
        for inc in &s.include {
            if inc.param != "*" && reference_elements(&inc.param).is_empty() {
                return Err(bad(format!(
                    "_include: `{}` is not a reference parameter medvault follows",
                    inc.param.chars().take(40).collect::<String>()
                )));
            }
        }
        for inc in &s.revinclude {
            if !["patient", "subject"].contains(&inc.param.as_str())
                || !inc.source.is_patient_scoped()
                || inc.source.as_str() == "Patient"
            {
                return Err(bad(format!(
                    "_revinclude={}:{} is not supported (the patient-compartment types by patient or subject are)",
                    inc.source,
                    inc.param.chars().take(40).collect::<String>()
                )));
            }
        }
        let mut have: HashSet<(String, String)> = r
            .entries
            .iter()
            .map(|d| (d.rtype().as_str().to_owned(), d.id().to_owned()))
            .collect();
        let mut frontier: Vec<usize> = (0..r.entries.len()).collect();
        let mut from_included = false;
        for round in 0..MAX_INCLUDE_ROUNDS {
            let sources: Vec<&Disclosed> = frontier
                .iter()
                .filter_map(|&i| {
                    if from_included {
                        r.included.get(i)
                    } else {
                        r.entries.get(i)
                    }
                })
                .collect();
            let mut wanted: Vec<(ResourceType, String)> = vec![];
            for inc in s.include.iter().filter(|i| round == 0 || i.iterate) {
                for d in sources.iter().filter(|d| d.rtype() == inc.source) {
                    let Some(j) = d.json() else { continue };
                    let mut refs = vec![];
                    if inc.param == "*" {
                        collect_refs(&Value::Object(j.clone()), &mut refs);
                    } else {
                        let elements = reference_elements(&inc.param);
                        if elements.is_empty() {
                            return Err(bad(format!(
                                "_include: `{}` is not a reference parameter medvault follows",
                                inc.param.chars().take(40).collect::<String>()
                            )));
                        }
                        for e in elements {
                            if let Some(v) = j.get(*e) {
                                collect_refs(v, &mut refs);
                            }
                        }
                    }
                    for (t, id) in refs {
                        if inc.target.is_none_or(|x| x == t)
                            && have.insert((t.as_str().to_owned(), id.clone()))
                        {
                            wanted.push((t, id));
                        }
                    }
                }
            }
            let mut ignored = vec![];
            let mut found = self.fetch_refs(c, wanted, &mut ignored)?;
            // _revinclude: resources of a patient-compartment type pointing at the Patients.
            if round == 0 {
                for inc in &s.revinclude {
                    found.extend(self.revinclude(c, inc, &sources, &mut have, &mut ignored)?);
                }
            }
            if found.is_empty() {
                break;
            }
            let first = r.included.len();
            r.included.extend(found);
            frontier = (first..r.included.len()).collect();
            from_included = true;
            if !s.include.iter().any(|i| i.iterate) {
                break;
            }
        }
        Ok(())
    }

    fn revinclude(
        &self,
        c: &Caller,
        inc: &Include,
        sources: &[&Disclosed],
        have: &mut HashSet<(String, String)>,
        withheld: &mut Vec<Category>,
    ) -> Result<Vec<Disclosed>, VaultError> {
        // (`add_includes` checked `inc` before anything was fetched.)
        let patients: Vec<PatientId> = sources
            .iter()
            .filter(|d| d.rtype().as_str() == "Patient")
            .filter_map(|d| PatientId::new(d.id()).ok())
            .collect();
        if patients.is_empty() {
            return Ok(vec![]);
        }
        let q = SearchQuery {
            privacy: Some(self.search_privacy(c)),
            rtype: Some(inc.source.as_str().to_owned()),
            patients,
            limit: MAX_EXACT_CANDIDATES,
            ..Default::default()
        };
        let (rows, w) = self.audited_read(c, move |cx, tx| {
            let page = tx.search(&q)?;
            let mut rec = cx.record("search", Outcome::Success);
            rec.resource = Some(format!(
                "{}?_revinclude",
                q.rtype.clone().unwrap_or_default()
            ));
            let (rows, _, withheld) = cx.filter(tx, page.rows, Action::Read, &mut rec)?;
            // One record per chart whose records were included, as for any search.
            let mut patients: Vec<String> = rows
                .iter()
                .filter_map(|r| r.get().patient().map(|p| p.to_string()))
                .collect();
            patients.sort();
            patients.dedup();
            let mut recs: Vec<_> = patients
                .into_iter()
                .map(|p| {
                    let mut r = rec.resalted();
                    r.patient = Some(p);
                    r
                })
                .collect();
            recs.insert(0, rec);
            Ok((recs, Ok((rows, withheld))))
        })?;
        w.into_iter().for_each(|x| push_unique(withheld, x));
        let rows: Vec<Permitted<medvault_store::Sealed>> = rows
            .into_iter()
            .filter(|p| have.insert((p.get().rtype().to_owned(), p.get().id().to_owned())))
            .collect();
        self.open_all(rows)
    }

    /// Reads referenced resources as the caller, in one audited read; those the caller
    /// may not read are left out and their categories added to `withheld`.
    fn fetch_refs(
        &self,
        c: &Caller,
        wanted: Vec<(ResourceType, String)>,
        withheld: &mut Vec<Category>,
    ) -> Result<Vec<Disclosed>, VaultError> {
        if wanted.is_empty() {
            return Ok(vec![]);
        }
        let (rows, w) = self.audited_read(c, move |cx, tx| {
            let mut found = vec![];
            for (t, id) in &wanted {
                if let Some(row) = tx.current(t.as_str(), id)? {
                    if !row.deleted() {
                        found.push(row);
                    }
                }
            }
            let mut rec = cx.record("read", Outcome::Success);
            rec.resource = Some("_include".into());
            let mut patients: Vec<String> = found
                .iter()
                .filter_map(|r| r.patient().map(|p| p.to_string()))
                .collect();
            patients.sort();
            patients.dedup();
            let (rows, _, withheld) = cx.filter(tx, found, Action::Read, &mut rec)?;
            let mut recs = vec![];
            for p in patients {
                let mut r = rec.resalted();
                r.patient = Some(p);
                recs.push(r);
            }
            recs.insert(0, rec);
            Ok((recs, Ok((rows, withheld))))
        })?;
        w.into_iter().for_each(|x| push_unique(withheld, x));
        self.open_all(rows)
    }

    /// `GET /Patient/{id}/$everything` (FHIR R4 Patient-everything): the chart, less what
    /// the caller may not see, with the Practitioners and Organizations its resources
    /// reference (Location and Medication would be included too, but medvault does not
    /// store those types). `_since` (instant), `_type` (types, comma
    /// separated) and `_count` (page size, continued by `_cursor`) as the operation defines.
    pub fn everything(
        &self,
        c: &Caller,
        patient: &str,
        params: &[(String, String)],
    ) -> Result<SearchResult, VaultError> {
        self.everything_tagged(c, patient, params, None)
    }

    /// [`Vault::everything`], recorded as a bulk export's read of the chart when `export`
    /// is given (action `export`, its detail naming the job and the recipient); the
    /// export has already limited `_type` to what a scoped client may read.
    pub(crate) fn everything_tagged(
        &self,
        c: &Caller,
        patient: &str,
        params: &[(String, String)],
        export: Option<&crate::bulk::ExportTag>,
    ) -> Result<SearchResult, VaultError> {
        let (action, tag_detail) = match export {
            Some(t) => ("export", Some(t.detail.clone())),
            None => ("everything", None),
        };
        if c.outside_launch(PatientId::new(patient).ok().as_ref()) {
            let mut rec = self.record(c, action, Outcome::NotFound);
            rec.resource = Some(format!("Patient/{patient}"));
            rec.detail = Some("outside the app's launch chart".into());
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        }
        if export.is_none() && c.client_scopes().is_some_and(|s| !s.reads_everything()) {
            return Err(VaultError::Refused {
                action: "read",
                rtype: "Patient/$everything (it needs a system/*.rs scope)".into(),
            });
        }
        let mut since = None;
        let mut types: Vec<String> = vec![];
        let mut count = None;
        let mut cursor_token = None;
        for (k, v) in params {
            match k.as_str() {
                "_since" => {
                    since = Some(
                        medvault_fhir::date::parse(v)
                            .map_err(|m| bad(format!("_since {m}")))?
                            .start,
                    )
                }
                "_type" => {
                    for t in v.split(',') {
                        let rt = ResourceType::parse(t).ok_or_else(|| {
                            bad(format!(
                                "_type: unsupported resource type `{}`",
                                t.chars().take(40).collect::<String>()
                            ))
                        })?;
                        types.push(rt.as_str().to_owned());
                    }
                }
                "_count" => {
                    count = Some(
                        v.parse::<usize>()
                            .map_err(|_| bad("_count must be a non-negative integer"))?
                            .min(self.options.max_page_size),
                    )
                }
                "_cursor" => cursor_token = Some(v.clone()),
                "_format" => {}
                other => {
                    return Err(bad(format!(
                        "$everything does not support `{}` (_since, _type and _count are)",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        let query = cursor_query(&format!("Patient/{patient}/$everything"), params);
        let cursor = match &cursor_token {
            Some(t) => Some(self.open_cursor(c, &query, t)?),
            None => None,
        };
        let cursor_snapshot = cursor.as_ref().map(|c| c.snapshot);
        // Without `_count`, a page of `max_page_size` with a `next` link: a chart of tens of
        // thousands of records is never decrypted and serialized whole for one request.
        let limit = count.unwrap_or(self.options.max_page_size);
        let patient = patient.to_owned();
        if Category::ALL
            .iter()
            .any(|k| *k != Category::Directory && self.training_would_allow(c, Action::Read, *k))
            && !self.has_live_grant(c, Some(&patient))?
        {
            let mut rec = self.record(c, action, Outcome::Denied);
            rec.resource = Some(format!("Patient/{patient}"));
            rec.detail = Some("training lapsed".into());
            self.audit(vec![rec])?;
            return Err(VaultError::TrainingLapsed);
        }
        let reach = self.reachable(c, Action::Read);
        let privacy = self.privacy_scope(c);
        let emergency_privacy = PatientId::new(&patient)
            .ok()
            .map(|p| self.exempt_privacy_scope(c, medvault_store::Charts::Patients(vec![p])));
        let visible = reach.any();
        let all_types: Vec<ResourceType> = medvault_fhir::SUPPORTED_TYPES
            .iter()
            .filter_map(|t| ResourceType::parse(t))
            .collect();
        // As for searches: the notice is the policy's, not the chart's.
        let never = self.never_visible(&visible, &all_types);
        let (
            rows,
            disclosed,
            withheld,
            total,
            more,
            snapshot,
            (restricted, may_break_glass, relationship),
        ) = self.audited_read(c, move |cx, tx| {
            let snapshot = cursor_snapshot.unwrap_or(tx.audit_len());
            let mut rec = cx.record(action, Outcome::Success);
            rec.resource = Some(format!("Patient/{patient}"));
            rec.detail = tag_detail;
            let Ok(pid) = PatientId::new(&patient) else {
                rec.outcome = Outcome::NotFound;
                return Ok((vec![rec], Err(VaultError::NotFound)));
            };
            rec.patient = Some(pid.to_string());
            let patient_row = match tx.current("Patient", pid.as_str())? {
                Some(r) if !r.deleted() => r,
                _ => {
                    rec.outcome = Outcome::NotFound;
                    return Ok((vec![rec], Err(VaultError::NotFound)));
                }
            };
            // The chart as the caller reaches it: without a relationship, a clinician
            // is told so (and whether breaking the glass would help), not handed a
            // chart silently cut down to demographics.
            let rel = cx.relationship(tx, Some(&pid))?;
            let mut visible = reach.open.clone();
            match rel {
                Relationship::Treatment => visible.extend(reach.treatment.iter().copied()),
                Relationship::BreakGlass | Relationship::Emergency => {
                    visible.extend(reach.break_glass.iter().copied())
                }
                Relationship::Own => visible.extend(reach.own.iter().copied()),
                Relationship::Proxy => visible.extend(reach.proxy.iter().copied()),
                Relationship::None if !reach.own.is_empty() || !reach.proxy.is_empty() => {
                    // A portal account and a chart it is not linked to.
                    rec.outcome = Outcome::Denied;
                    return Ok((vec![rec], Err(VaultError::Forbidden { withheld: vec![] })));
                }
                Relationship::None if !reach.treatment.is_empty() => {
                    rec.outcome = Outcome::Denied;
                    rec.detail = Some("no treatment relationship".into());
                    let break_glass = !reach.break_glass.is_empty() && cx.may_break_glass();
                    return Ok((vec![rec], Err(VaultError::NoRelationship { break_glass })));
                }
                Relationship::None => {}
            }
            // A chart restricted as a whole (its Patient labelled, or consent denying
            // the demographics) is refused as such, not returned empty.
            if let Err(e) = cx.read_patient(tx, &patient_row, rel)? {
                rec.outcome = Outcome::Denied;
                rec.detail = Some("restricted".into());
                return Ok((vec![rec], Err(e)));
            }
            let mut q = SearchQuery {
                privacy: Some(match (rel, emergency_privacy) {
                    (Relationship::Emergency | Relationship::Own, Some(e)) => e,
                    _ => privacy,
                }),
                patient: Some(pid),
                created_before: Some(snapshot),
                last_updated: since
                    .map(|s| {
                        vec![TimeRange {
                            from: Some(format_instant(s)),
                            to: None,
                            outside: false,
                        }]
                    })
                    .unwrap_or_default(),
                after: cursor.and_then(|c| c.after),
                limit,
                ..Default::default()
            };
            q.types = types;
            let mut total = 0u64;
            let mut withheld = vec![];
            for (cat, n) in tx.tally(&q)? {
                match cat.parse::<Category>() {
                    Ok(k) if visible.contains(&k) => total += n,
                    Ok(k) => push_unique(&mut withheld, k),
                    Err(_) => push_unique(&mut withheld, Category::Notes),
                }
            }
            // Whether the privacy rows hid anything the caller's role would see: one
            // more tally without them (the answer is a flag, never the difference).
            let restricted = if q.privacy.is_some() && !visible.is_empty() {
                let mut unfiltered = q.clone();
                unfiltered.privacy = None;
                let mut all = 0u64;
                for (cat, n) in tx.tally(&unfiltered)? {
                    if cat.parse::<Category>().is_ok_and(|k| visible.contains(&k)) {
                        all += n;
                    }
                }
                all > total
            } else {
                false
            };
            let may_break_glass = cx.may_break_glass() && rel != Relationship::Emergency;
            q.categories = visible.iter().map(|c| c.as_str().to_owned()).collect();
            let page = if visible.is_empty() || limit == 0 {
                Default::default()
            } else {
                tx.search(&q)?
            };
            let (rows, disclosed, _) = cx.filter(tx, page.rows, Action::Read, &mut rec)?;
            rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
            Ok((
                vec![rec],
                Ok((
                    rows,
                    disclosed,
                    withheld,
                    total,
                    page.more,
                    snapshot,
                    (restricted, may_break_glass, rel),
                )),
            ))
        })?;
        let _ = withheld;
        let mut result = SearchResult {
            entries: if count == Some(0) {
                vec![]
            } else {
                self.open_all(rows)?
            },
            disclosed,
            withheld: never,
            total: Some(total),
            count: limit,
            restricted,
            may_break_glass,
            relationship: Some(relationship),
            ..Default::default()
        };
        if more && count != Some(0) {
            result.next =
                Some(self.keyset_cursor(c, &query, snapshot, total, Order::Id, &result.entries));
        }
        // The directory resources the chart references, read through the policy.
        let mut have: HashSet<(String, String)> = result
            .entries
            .iter()
            .map(|d| (d.rtype().as_str().to_owned(), d.id().to_owned()))
            .collect();
        let mut wanted = vec![];
        for d in &result.entries {
            let mut refs = vec![];
            if let Some(j) = d.json() {
                collect_refs(&Value::Object(j.clone()), &mut refs);
            }
            for (t, id) in refs {
                if matches!(
                    t.as_str(),
                    "Practitioner" | "Organization" | "Location" | "Medication"
                ) && have.insert((t.as_str().to_owned(), id.clone()))
                {
                    wanted.push((t, id));
                }
            }
        }
        let mut ignored = vec![];
        result.included = self.fetch_refs(c, wanted, &mut ignored)?;
        Ok(result)
    }
}

fn patient_type() -> ResourceType {
    ResourceType::parse("Patient").unwrap_or_else(unreachable_type)
}

#[expect(clippy::panic, reason = "Patient is always a supported type")]
fn unreachable_type() -> ResourceType {
    panic!("Patient is not a supported type")
}

/// Whether a decrypted resource satisfies every date parameter exactly.
fn date_matches(d: &Disclosed, s: &SearchRequest, now: i64) -> bool {
    let Some(j) = d.json() else { return false };
    s.dates.iter().all(|(param, values)| {
        let Some(target) = medvault_fhir::date_interval_of(d.rtype(), param, j) else {
            return false;
        };
        values.iter().any(|q| q.matches(target, now))
    })
}

fn sort_exact(entries: &mut [Disclosed], by: SortBy, desc: bool) {
    let key = |d: &Disclosed| -> (Option<i64>, String) {
        let v = match by {
            SortBy::Date(param) => d
                .json()
                .and_then(|j| medvault_fhir::date_of(d.rtype(), param, j))
                .and_then(|v| medvault_fhir::date::parse(v).ok())
                .map(|i| i.start),
            _ => None,
        };
        (v, d.id().to_owned())
    };
    entries.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        // Resources without the date go last either way.
        let o = match (ka.0, kb.0) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => return std::cmp::Ordering::Less,
            (None, Some(_)) => return std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        let o = o.then_with(|| ka.1.cmp(&kb.1));
        if desc {
            o.reverse()
        } else {
            o
        }
    });
}

/// What the search of a conditional create or update found (FHIR R4 §3.1.0.8, §3.1.0.4.2).
#[derive(Debug)]
pub(crate) enum Matched {
    None,
    One(Disclosed),
    Many,
}

impl Vault {
    /// Runs the search of a conditional interaction (`If-None-Exist`, `ifNoneExist`,
    /// `PUT Type?search`) as the caller, through the same policy and audit as any search,
    /// after the write itself was authorized ([`Vault::may_write`]). It needs search access
    /// to the category written (decided by policy alone, refused before any search), and it
    /// matches only what the caller may see: a match they may not see neither refuses the
    /// request nor changes its answer, so the answer reveals nothing they could not search.
    pub(crate) fn match_condition(
        &self,
        c: &Caller,
        rt: ResourceType,
        query: &str,
        category: Category,
    ) -> Result<Matched, VaultError> {
        if !self.reachable(c, Action::Search).any().contains(&category) {
            // A refusal is recorded like any other (the write's own decision was allowed).
            let mut rec = self.record(c, "search", Outcome::Success);
            rec.resource = Some(rt.as_str().to_owned());
            rec.detail = Some("conditional write: no search access".into());
            return Err(self.deny(rec, Action::Search, rt, Some(category)));
        }
        let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|_| VaultError::BadRequest("malformed conditional search".into()))?;
        params.retain(|(k, _)| k != "_count" && k != "_offset" && k != "_cursor");
        if params.is_empty() {
            return Err(VaultError::BadRequest(
                "a conditional search needs at least one parameter".into(),
            ));
        }
        params.push(("_count".into(), "2".into()));
        let mut r = self.search(c, rt, &params, true)?;
        Ok(match (r.entries.len(), r.next.is_some()) {
            (0, _) => Matched::None,
            (1, false) => Matched::One(r.entries.remove(0)),
            _ => Matched::Many,
        })
    }
}
