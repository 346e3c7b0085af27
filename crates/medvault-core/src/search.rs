//! Search and `$everything` through the gate. Search values become blind-index tokens
//! before they reach the store; results the caller may not see are left out and named.

use medvault_fhir::{normalize_text, ResourceType, MIN_PREFIX};
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

fn bad(msg: impl Into<String>) -> VaultError {
    VaultError::BadRequest(msg.into())
}

fn date_value(param: &str, v: &str) -> Result<String, VaultError> {
    let v = v.strip_prefix("eq").unwrap_or(v);
    let ok_shape = matches!(v.len(), 4 | 7 | 10)
        && v.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !ok_shape {
        if v.len() > 2
            && v.get(..2)
                .is_some_and(|p| ["ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"].contains(&p))
        {
            return Err(bad(format!(
                "`{param}` supports equality on YYYY, YYYY-MM or YYYY-MM-DD; range prefixes are not available on blind-indexed dates"
            )));
        }
        return Err(bad(format!(
            "`{param}` must be YYYY, YYYY-MM or YYYY-MM-DD"
        )));
    }
    Ok(v.to_owned())
}

impl Vault {
    fn build_query(
        &self,
        rt: ResourceType,
        params: &[(String, String)],
    ) -> Result<(SearchQuery, Vec<String>), VaultError> {
        let mut q = SearchQuery {
            rtype: Some(rt.as_str().to_owned()),
            limit: DEFAULT_COUNT,
            ..Default::default()
        };
        let allowed = medvault_fhir::search_params(rt.as_str());
        let mut names = vec![];
        for (k, v) in params {
            let (name, modifier) = match k.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (k.as_str(), None),
            };
            if modifier.is_some() {
                return Err(bad(format!("search modifier on `{name}` is not supported")));
            }
            names.push(name.to_owned());
            match name {
                "_count" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| bad("_count must be a non-negative integer"))?;
                    q.limit = n.clamp(1, self.options.max_page_size);
                }
                "_offset" => {
                    q.offset = v
                        .parse()
                        .map_err(|_| bad("_offset must be a non-negative integer"))?
                }
                "_format" if v == "json" || v.contains("fhir+json") => {}
                "_id" => {
                    for id in v.split(',') {
                        if !medvault_types::is_fhir_id(id) {
                            return Err(bad("_id must be a valid id"));
                        }
                        q.ids.push(id.to_owned());
                    }
                }
                "_lastUpdated" => {
                    let (cmp, at) = match v.get(..2) {
                        Some("ge") => (Some(Cmp::Ge), v.get(2..).unwrap_or("")),
                        Some("gt") => (Some(Cmp::Gt), v.get(2..).unwrap_or("")),
                        Some("le") => (Some(Cmp::Le), v.get(2..).unwrap_or("")),
                        Some("lt") => (Some(Cmp::Lt), v.get(2..).unwrap_or("")),
                        Some("eq") => (None, v.get(2..).unwrap_or("")),
                        _ => (None, v.as_str()),
                    };
                    if at.len() < 4
                        || !at
                            .bytes()
                            .all(|b| b.is_ascii_digit() || b"-:T.Z+".contains(&b))
                    {
                        return Err(bad("_lastUpdated must be a FHIR date or dateTime"));
                    }
                    match cmp {
                        Some(c) => q.last_updated.push((c, at.to_owned())),
                        None => {
                            q.last_updated.push((Cmp::Ge, at.to_owned()));
                            q.last_updated.push((Cmp::Lt, format!("{at}\u{7f}")));
                        }
                    }
                }
                "patient" | "subject" if allowed.contains(&name) => {
                    let id = v.strip_prefix("Patient/").unwrap_or(v);
                    let pid = PatientId::new(id)
                        .map_err(|_| bad("patient must be Patient/{id} or an id"))?;
                    if q.patient.as_ref().is_some_and(|p| *p != pid) {
                        return Err(bad("conflicting patient parameters"));
                    }
                    q.patient = Some(pid);
                }
                p if allowed.contains(&p) => {
                    let param: &'static str =
                        allowed.iter().copied().find(|a| *a == p).unwrap_or("");
                    let mut tokens = vec![];
                    for value in v.split(',') {
                        let norm = match param {
                            "name" | "family" | "given" => {
                                let n = normalize_text(value);
                                if n.chars().count() < MIN_PREFIX {
                                    return Err(bad(format!(
                                        "`{param}` needs at least {MIN_PREFIX} characters"
                                    )));
                                }
                                n
                            }
                            "birthdate" | "date" => date_value(param, value)?,
                            _ => {
                                if value.is_empty() {
                                    return Err(bad(format!("`{param}` needs a value")));
                                }
                                value.strip_prefix('|').unwrap_or(value).to_owned()
                            }
                        };
                        tokens.push(self.indexer.token(rt.as_str(), param, &norm).to_vec());
                    }
                    q.tokens.push((param.to_owned(), tokens));
                }
                other => {
                    return Err(bad(format!(
                        "unknown or unsupported search parameter `{}`",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        names.sort();
        names.dedup();
        Ok((q, names))
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
            rec.categories_disclosed = disclosed.iter().map(|c| c.to_string()).collect();
            rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
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
            rec.categories_disclosed = disclosed.iter().map(|c| c.to_string()).collect();
            rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
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
