//! Rebuilding the blind index when its normalization changes (`medvault_fhir::INDEX_VERSION`;
//! version 2 made string search accent-insensitive and added date precision markers). Run
//! when the gate opens a store indexed under an older version: every current resource is
//! opened under the Cedar decision for the server's own `index.rebuild` operation (nothing
//! is disclosed), its tokens recomputed, and replaced in batches, each batch committed with
//! its audit record. Resumable: a crash leaves the old version number, and the next start
//! re-indexes again (replacing tokens is idempotent). The same pass serves a rotation of the
//! blind-index key (`index_keys.rs`).

use std::sync::Arc;

use medvault_fhir::{ResourceType, INDEX_VERSION};
use medvault_store::{Op, Order, SearchQuery};
use medvault_types::Operation;

use crate::index_keys::IndexKey;
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
        let view = self.index_view();
        let done = self.reindex_all(&c, &view.write, &view.writer, None, BATCH, &|_, _| {})?;
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
        Ok(usize::try_from(done).unwrap_or(usize::MAX))
    }

    /// One pass of a blind-index key rotation: every current resource's tokens under
    /// `keys`, each batch guarded by `writer` and committed with its resume point.
    pub(crate) fn reindex_pass(
        &self,
        c: &Caller,
        keys: &[Arc<IndexKey>],
        writer: &str,
        batch: usize,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, VaultError> {
        let from = crate::index_keys::cursor(&self.store)?;
        self.reindex_all(c, keys, writer, Some(from), batch, progress)
    }

    /// Replaces the index rows of every current resource (after `resume`'s cursor, when
    /// given, recording the cursor with each batch) with rows under `keys`, in batches each
    /// committed with its audit record and guarded by the writer tag `writer`.
    fn reindex_all(
        &self,
        c: &Caller,
        keys: &[Arc<IndexKey>],
        writer: &str,
        resume: Option<Option<Vec<String>>>,
        batch: usize,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, VaultError> {
        let decision = self.decide_operation(c, Operation::Reindex);
        let tracked = resume.is_some();
        let mut after: Option<Vec<String>> = resume.flatten();
        let total: u64 = self.store.census()?.values().sum();
        let mut done = 0u64;
        let mut conflicts = 0;
        let guard = Op::RequireMetaListed {
            key: crate::index_keys::WRITERS.into(),
            member: writer.to_owned(),
            absent: "1".into(),
        };
        progress(0, total);
        loop {
            let page = self.store.search(&SearchQuery {
                order: Order::Id,
                after: after.clone(),
                limit: batch.max(1),
                ..Default::default()
            })?;
            let Some(last) = page.rows.last() else { break };
            let next = vec![last.rtype().to_owned(), last.id().to_owned()];
            let more = page.more;
            let mut rec = self.record(c, Operation::Reindex.as_str(), Outcome::Success);
            let mut ops = Vec::with_capacity(page.rows.len() + 2);
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
                let patient = p.get().patient().cloned();
                let d = match self.open_permitted(p) {
                    Ok(d) => d,
                    // A chart shredded meanwhile: its rows are removed, not re-indexed.
                    Err(VaultError::NotFound) if self.shredded(patient.as_ref())? => continue,
                    Err(e) => return Err(e),
                };
                let Some(json) = d.json() else { continue };
                let index = self.index_rows_under(keys, rt, json);
                ops.push(Op::ReplaceIndex {
                    rtype: rt.as_str().to_owned(),
                    id,
                    version,
                    index,
                });
            }
            let n = u64::try_from(ops.len()).unwrap_or(0);
            ops.push(guard.clone());
            if tracked {
                if let [t, i] = next.as_slice() {
                    ops.push(crate::index_keys::put_cursor(t, i));
                }
            }
            let gens: Vec<String> = keys.iter().map(|k| k.generation.to_string()).collect();
            rec.detail = Some(format!(
                "resources={n} index_version={INDEX_VERSION} generations={}",
                gens.join("+")
            ));
            match self.commit(ops, vec![rec]) {
                Ok(_) => {
                    done += n;
                    after = Some(next);
                    progress(done.min(total.max(done)), total.max(done));
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
        Ok(done)
    }
}
