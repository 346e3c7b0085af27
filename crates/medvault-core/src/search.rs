//! Search and `$everything` through the gate. Search values become blind-index tokens
//! before they reach the store; results the caller may not see are left out and named.

use medvault_fhir::search::Bound;
use medvault_fhir::ResourceType;
use medvault_store::{Cmp, SearchQuery};
use medvault_types::{Action, Category, PatientId};

use crate::{Caller, Disclosed, Outcome, Vault, VaultError};

/// Entries the caller may see, and the categories that were withheld.
#[derive(Debug, Default)]
pub struct SearchResult {
    pub entries: Vec<Disclosed>,
    pub disclosed: Vec<Category>,
    pub withheld: Vec<Category>,
    pub more: bool,
    pub offset: usize,
    pub count: usize,
}

const DEFAULT_COUNT: usize = 50;

impl Vault {
    /// The store query for a parsed search: each parameter's values become blind-index
    /// tokens (the values themselves never reach the store or the log).
    fn build_query(
        &self,
        rt: ResourceType,
        params: &[(String, String)],
    ) -> Result<(SearchQuery, Vec<String>), VaultError> {
        let s = medvault_fhir::search::parse(rt, params)?;
        let q = SearchQuery {
            rtype: Some(rt.as_str().to_owned()),
            patient: s.patient,
            ids: s.ids,
            tokens: s
                .params
                .into_iter()
                .map(|(param, values)| {
                    let tokens = values
                        .iter()
                        .map(|v| self.indexer.token(rt.as_str(), param, v).to_vec())
                        .collect();
                    (param.to_owned(), tokens)
                })
                .collect(),
            last_updated: s
                .last_updated
                .into_iter()
                .map(|(b, at)| {
                    let cmp = match b {
                        Bound::Ge => Cmp::Ge,
                        Bound::Gt => Cmp::Gt,
                        Bound::Le => Cmp::Le,
                        Bound::Lt => Cmp::Lt,
                    };
                    (cmp, at)
                })
                .collect(),
            categories: vec![],
            limit: s
                .count
                .map(|n| n.clamp(1, self.options.max_page_size))
                .unwrap_or(DEFAULT_COUNT),
            offset: s.offset,
        };
        Ok((q, s.names))
    }

    /// `GET /{type}?…`.
    pub fn search(
        &self,
        c: &Caller,
        rt: ResourceType,
        params: &[(String, String)],
    ) -> Result<SearchResult, VaultError> {
        let (q, names) = self.build_query(rt, params)?;
        let (offset, count) = (q.offset, q.limit);
        let (rows, disclosed, withheld, more) = self.audited_read(c, move |cx, tx| {
            let page = tx.search(&q)?;
            let matched = page.rows.len();
            let mut rec = cx.record("search", Outcome::Success);
            let (rows, disclosed, withheld) = cx.filter(page.rows, Action::Search, &mut rec);
            rec.resource = Some(rt.as_str().to_owned());
            rec.patient = q.patient.as_ref().map(|p| p.to_string());
            rec.detail = Some(format!(
                "params={} matched={matched} returned={}",
                names.join(","),
                rows.len()
            ));
            let mut recs = vec![];
            // One record per patient whose chart appears in the results, so "who looked at
            // my record" and the accounting of disclosures see searches too.
            if q.patient.is_none() {
                let mut patients: Vec<&str> = vec![];
                for p in rows.iter().filter_map(|r| r.get().patient()) {
                    if !patients.contains(&p.as_str()) {
                        patients.push(p.as_str());
                    }
                }
                for p in patients {
                    let mut r = rec.resalted();
                    r.patient = Some(p.to_owned());
                    recs.push(r);
                }
            }
            recs.insert(0, rec);
            Ok((recs, Ok((rows, disclosed, withheld, page.more))))
        })?;
        let entries = self.open_all(rows)?;
        Ok(SearchResult {
            entries,
            disclosed,
            withheld,
            more,
            offset,
            count,
        })
    }

    /// `GET /Patient/{id}/$everything`: the chart, less what the caller may not see.
    pub fn everything(&self, c: &Caller, patient: &str) -> Result<SearchResult, VaultError> {
        let patient = patient.to_owned();
        let (rows, disclosed, withheld) = self.audited_read(c, move |cx, tx| {
            let mut rec = cx.record("everything", Outcome::Success);
            rec.resource = Some(format!("Patient/{patient}"));
            let Ok(pid) = PatientId::new(&patient) else {
                rec.outcome = Outcome::NotFound;
                return Ok((vec![rec], Err(VaultError::NotFound)));
            };
            rec.patient = Some(pid.to_string());
            match tx.current("Patient", pid.as_str())? {
                Some(r) if !r.deleted() => {}
                _ => {
                    rec.outcome = Outcome::NotFound;
                    return Ok((vec![rec], Err(VaultError::NotFound)));
                }
            }
            let page = tx.search(&SearchQuery {
                patient: Some(pid),
                limit: 100_000,
                ..Default::default()
            })?;
            let (rows, disclosed, withheld) = cx.filter(page.rows, Action::Read, &mut rec);
            if rows.is_empty() && !withheld.is_empty() {
                rec.outcome = Outcome::Denied;
                return Ok((vec![rec], Err(VaultError::Forbidden { withheld })));
            }
            Ok((vec![rec], Ok((rows, disclosed, withheld))))
        })?;
        let entries = self.open_all(rows)?;
        let count = entries.len();
        Ok(SearchResult {
            entries,
            disclosed,
            withheld,
            more: false,
            offset: 0,
            count,
        })
    }
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
    /// `PUT Type?search`) as the caller, through the same policy and audit as any search.
    /// A match the caller may not see makes the answer unknowable to them: refused, rather
    /// than a duplicate created or a hidden resource overwritten.
    pub(crate) fn match_condition(
        &self,
        c: &Caller,
        rt: ResourceType,
        query: &str,
    ) -> Result<Matched, VaultError> {
        let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|_| VaultError::BadRequest("malformed conditional search".into()))?;
        params.retain(|(k, _)| k != "_count" && k != "_offset");
        if params.is_empty() {
            return Err(VaultError::BadRequest(
                "a conditional search needs at least one parameter".into(),
            ));
        }
        params.push(("_count".into(), "2".into()));
        let mut r = self.search(c, rt, &params)?;
        if !r.withheld.is_empty() {
            return Err(VaultError::Forbidden {
                withheld: r.withheld,
            });
        }
        Ok(match (r.entries.len(), r.more) {
            (0, _) => Matched::None,
            (1, false) => Matched::One(r.entries.remove(0)),
            _ => Matched::Many,
        })
    }
}
