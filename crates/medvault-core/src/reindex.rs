//! Rebuilding the blind index when its normalization changes (`medvault_fhir::INDEX_VERSION`;
//! version 2 made string search accent-insensitive and added date precision markers). Run
//! when the gate opens a store indexed under an older version: every current resource is
//! opened under the Cedar decision for the server's own `index.rebuild` operation (nothing
//! is disclosed), its tokens recomputed, and replaced in batches, each batch committed with
//! its audit record. Resumable: a crash leaves the old version number, and the next start
//! re-indexes again (replacing tokens is idempotent).

use medvault_fhir::{ResourceType, INDEX_VERSION};
use medvault_store::{Op, Order, SearchQuery};
use medvault_types::Operation;

use crate::typestate::permit;
use crate::{Caller, LocalOperator, Outcome, Vault, VaultError};

const META_KEY: &str = "search.index_version";
const BATCH: usize = 500;

impl Vault {
    /// The index version the store was built under (1 when never recorded).
    fn index_version(&self) -> Result<u32, VaultError> {
        Ok(self
            .store
            .meta(META_KEY)?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(1))
    }

    /// Re-indexes every current resource if the store's index is older than this
    /// server's; returns how many resources were re-indexed.
    ///
    /// # Errors
    /// Storage, decryption or audit failures (the version stays old; the next start
    /// resumes).
    pub(crate) fn reindex_if_needed(&self, op: &LocalOperator) -> Result<usize, VaultError> {
        if self.index_version()? >= INDEX_VERSION {
            return Ok(0);
        }
        let c = Caller::system(op, "reindex");
        let decision = self.decide_operation(&c, Operation::Reindex);
        let mut after: Option<Vec<String>> = None;
        let mut done = 0usize;
        let mut conflicts = 0;
        loop {
            let page = self.store.search(&SearchQuery {
                order: Order::Id,
                after: after.clone(),
                limit: BATCH,
                ..Default::default()
            })?;
            let Some(last) = page.rows.last() else { break };
            let next = vec![last.rtype().to_owned(), last.id().to_owned()];
            let more = page.more;
            let mut rec = self.record(&c, Operation::Reindex.as_str(), Outcome::Success);
            let mut ops = Vec::with_capacity(page.rows.len());
            for row in page.rows {
                let Some(rt) = ResourceType::parse(row.rtype()) else {
                    continue;
                };
                let (id, version) = (row.id().to_owned(), row.version());
                let Ok(p) = permit(&decision, row, &mut rec) else {
                    return Err(VaultError::Internal(
                        "policy does not permit the index rebuild".into(),
                    ));
                };
                let d = self.open_permitted(p)?;
                let Some(json) = d.json() else { continue };
                let index = self.index_rows(rt, json);
                ops.push(Op::ReplaceIndex {
                    rtype: rt.as_str().to_owned(),
                    id,
                    version,
                    index,
                });
            }
            let n = ops.len();
            rec.detail = Some(format!("resources={n} index_version={INDEX_VERSION}"));
            match self.commit(ops, vec![rec]) {
                Ok(_) => {
                    done += n;
                    after = Some(next);
                }
                // Someone wrote one of these meanwhile: read the page again.
                Err(VaultError::Conflict | VaultError::NotFound) if conflicts < 10 => {
                    conflicts += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            if !more {
                break;
            }
        }
        let mut rec = self.record(&c, Operation::Reindex.as_str(), Outcome::Success);
        rec.detail = Some(format!(
            "complete: resources={done} index_version={INDEX_VERSION}"
        ));
        self.commit(
            vec![Op::PutMeta {
                key: META_KEY.into(),
                value: INDEX_VERSION.to_string().into_bytes(),
            }],
            vec![rec],
        )?;
        if done > 0 {
            tracing::info!(
                resources = done,
                version = INDEX_VERSION,
                "search index rebuilt"
            );
        }
        Ok(done)
    }
}
