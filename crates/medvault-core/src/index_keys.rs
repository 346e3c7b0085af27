//! Generations of the blind-index key, and their rotation while the servers serve (SPEC
//! "Keys, backup, destruction"; design note 0008).
//!
//! Every search token, `_care` token and privacy row is an HMAC under a key derived from the
//! blind-index root of one *generation*. Rotating it means writing every resource's tokens
//! again under a new root — while searches, care lookups and privacy filters go on, and
//! without a single moment at which a lookup could miss a row (a missing label row would
//! show a restricted record). The rotation therefore moves through phases, recorded in the
//! store so that every server follows them:
//!
//! | phase (`search.index_phase`) | lookups use | writes carry |
//! |---|---|---|
//! | `stable G` | G | G |
//! | `rotating G H` | G (every row has G tokens) | G and H |
//! | `switched G H` | H (every row has H tokens) | G and H |
//! | `stable H`, G retiring | H | H |
//!
//! Between phases the rotation waits a grace period longer than any server's lease on its
//! view ([`LEASE`]; a server re-reads the phase at most [`REFRESH`] after it changed, and an
//! audited read whose view is older than the lease, when the phase has moved meanwhile,
//! fails closed with 503), so no lookup
//! ever runs under a generation whose rows are incomplete. Writes are guarded in their own
//! transaction: each carries the generations it covers (its *writer tag*, `G`, `G+H` or
//! `H`), and the store refuses it unless `search.index_writers` lists that tag — the
//! rotation narrows that list before each re-index pass, so nothing written under a stale
//! view can slip past a pass. The passes re-index every current resource (`G+H` rows, then
//! `H` rows only), resumably from a cursor; the old root is then deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use medvault_crypto::{BlindIndexer, IndexRootKey};
use medvault_store::{Op, Store};
use serde::Serialize;

use crate::keys::{master_version, service_key, versioned_name};
use crate::privacy::PrivacyTokens;
use crate::{Vault, VaultError};

/// Meta key: the rotation phase (text; absent reads as `stable 1`).
pub(crate) const PHASE: &str = "search.index_phase";
/// Meta key: the writer tags the store accepts (comma-separated; absent reads as `1`).
pub(crate) const WRITERS: &str = "search.index_writers";
/// Meta key: the generation whose tokens are being removed after a switch.
const RETIRING: &str = "search.index_retiring";
/// Meta key: the last resource a re-index pass committed (`type/id`), for resuming.
const CURSOR: &str = "search.index_cursor";

/// How old a server's view of the phase may be before it reads it again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How old the view an audited read used may be when the read ends; older fails closed.
pub const LEASE: Duration = Duration::from_secs(4);
/// The shortest grace a rotation may wait between phases: longer than [`LEASE`].
pub const MIN_GRACE: Duration = Duration::from_secs(5);

/// The meta key of generation `g`'s root (generation 1 keeps its historic name).
pub(crate) fn root_name(g: u32) -> String {
    if g <= 1 {
        "key.index_root".to_owned()
    } else {
        format!("key.index_root.g{g}")
    }
}

/// A rotation phase, as stored in [`PHASE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Stable(u32),
    Rotating(u32, u32),
    Switched(u32, u32),
}

impl Phase {
    pub(crate) fn parse(v: Option<&[u8]>) -> Result<Phase, VaultError> {
        let Some(v) = v else {
            return Ok(Phase::Stable(1));
        };
        let text = std::str::from_utf8(v).unwrap_or("");
        let words: Vec<&str> = text.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<u32>().ok());
        match (words.first().copied(), num(1), num(2)) {
            (Some("stable"), Some(g), None) => Ok(Phase::Stable(g)),
            (Some("rotating"), Some(g), Some(h)) => Ok(Phase::Rotating(g, h)),
            (Some("switched"), Some(g), Some(h)) => Ok(Phase::Switched(g, h)),
            _ => Err(VaultError::Internal(format!(
                "unreadable blind-index phase {text:?}"
            ))),
        }
    }

    pub(crate) fn text(self) -> String {
        match self {
            Phase::Stable(g) => format!("stable {g}"),
            Phase::Rotating(g, h) => format!("rotating {g} {h}"),
            Phase::Switched(g, h) => format!("switched {g} {h}"),
        }
    }

    /// The generation lookups use.
    fn read(self) -> u32 {
        match self {
            Phase::Stable(g) | Phase::Rotating(g, _) => g,
            Phase::Switched(_, h) => h,
        }
    }

    /// The generations writes carry.
    fn write(self) -> Vec<u32> {
        match self {
            Phase::Stable(g) => vec![g],
            Phase::Rotating(g, h) | Phase::Switched(g, h) => vec![g, h],
        }
    }

    /// The generations whose roots must exist (and be re-wrapped by a master rotation).
    pub(crate) fn live(self) -> Vec<u32> {
        self.write()
    }
}

/// A writer tag: the generations a write's tokens cover, joined by `+`.
fn writer_tag(gens: &[u32]) -> String {
    gens.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("+")
}

/// One generation's keys: the blind indexer and the privacy tokens computed from it.
pub(crate) struct IndexKey {
    pub(crate) generation: u32,
    pub(crate) blind: BlindIndexer,
    pub(crate) privacy: PrivacyTokens,
}

impl IndexKey {
    fn new(generation: u32, root: &IndexRootKey) -> Self {
        let blind = BlindIndexer::new(root);
        IndexKey {
            generation,
            privacy: PrivacyTokens::new(&blind),
            blind,
        }
    }

    /// The blind token of `value` for `param` in `scope`, as stored.
    pub(crate) fn token(&self, scope: &str, param: &str, value: &str) -> Vec<u8> {
        self.blind.token(scope, param, value).to_vec()
    }
}

/// A server's view of the phase: the key lookups use, the keys writes carry, and the tag
/// the store checks writes against.
pub(crate) struct IndexView {
    phase: Phase,
    pub(crate) read: Arc<IndexKey>,
    pub(crate) write: Vec<Arc<IndexKey>>,
    pub(crate) writer: String,
    fetched: Instant,
}

impl IndexView {
    /// The store-side guard of a write carrying this view's tokens.
    pub(crate) fn guard(&self) -> Op {
        Op::RequireMetaListed {
            key: WRITERS.into(),
            member: self.writer.clone(),
            absent: "1".into(),
        }
    }

    /// Fails closed when this view is older than [`LEASE`] and the phase has moved since
    /// (a rotation may have moved on twice, and lookups under it could miss rows). Phases
    /// only move forward, so finding the same phase again means it never changed; a slow
    /// request is not refused for being slow.
    pub(crate) fn check_lease(&self, store: &Arc<dyn Store>) -> Result<(), VaultError> {
        if self.fetched.elapsed() <= LEASE {
            return Ok(());
        }
        match store.meta(PHASE).ok().map(|v| Phase::parse(v.as_deref())) {
            Some(Ok(now)) if now == self.phase => Ok(()),
            _ => Err(VaultError::Unavailable(
                "the search index key changed during the request; retry".into(),
            )),
        }
    }
}

/// The gate's index keys: the current view, and every generation unwrapped so far.
pub(crate) struct IndexKeys {
    view: RwLock<Arc<IndexView>>,
    keys: Mutex<HashMap<u32, Arc<IndexKey>>>,
}

impl IndexKeys {
    /// Reads the phase and unwraps the roots it needs (creating generation 1's on a new
    /// store).
    pub(crate) fn open(
        store: &Arc<dyn Store>,
        ring: &medvault_crypto::Keyring,
    ) -> Result<Self, VaultError> {
        let keys = Mutex::new(HashMap::new());
        let view = load_view(store, ring, &keys)?;
        Ok(IndexKeys {
            view: RwLock::new(Arc::new(view)),
            keys,
        })
    }
}

fn load_key(
    store: &Arc<dyn Store>,
    ring: &medvault_crypto::Keyring,
    keys: &Mutex<HashMap<u32, Arc<IndexKey>>>,
    g: u32,
) -> Result<Arc<IndexKey>, VaultError> {
    if let Some(k) = keys.lock().ok().and_then(|m| m.get(&g).cloned()) {
        return Ok(k);
    }
    let current = master_version(store)?;
    let root = service_key(
        store,
        ring,
        current,
        &root_name(g),
        |m| {
            if g <= 1 {
                Ok(m.wrap_index_root(&IndexRootKey::generate())?)
            } else {
                // Only a rotation creates a later generation, before any phase names it.
                Err(VaultError::Internal(format!(
                    "blind-index root of generation {g} is missing"
                )))
            }
        },
        |m, w| Ok(m.unwrap_index_root(w)?),
    )?;
    let k = Arc::new(IndexKey::new(g, &root));
    if let Ok(mut m) = keys.lock() {
        m.insert(g, k.clone());
    }
    Ok(k)
}

fn load_view(
    store: &Arc<dyn Store>,
    ring: &medvault_crypto::Keyring,
    keys: &Mutex<HashMap<u32, Arc<IndexKey>>>,
) -> Result<IndexView, VaultError> {
    let phase = Phase::parse(store.meta(PHASE)?.as_deref())?;
    let write = phase
        .write()
        .into_iter()
        .map(|g| load_key(store, ring, keys, g))
        .collect::<Result<Vec<_>, _>>()?;
    let read = load_key(store, ring, keys, phase.read())?;
    Ok(IndexView {
        phase,
        read,
        writer: writer_tag(&phase.write()),
        write,
        fetched: Instant::now(),
    })
}

/// `keys status`: the blind-index key's generation and any rotation under way.
#[derive(Debug, Clone, Serialize)]
pub struct IndexKeyStatus {
    /// The generation lookups use.
    pub generation: u32,
    /// `stable`, `rotating` (re-indexing under the next generation), `switched` (lookups
    /// moved to it) or `retiring` (removing the old generation's tokens).
    pub phase: &'static str,
    /// The generation being rotated to, while a rotation is under way (or stopped).
    pub rotating_to: Option<u32>,
    /// The old generation whose tokens are still being removed.
    pub retiring: Option<u32>,
}

/// What an index key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct IndexRotationReport {
    pub from_generation: u32,
    pub to_generation: u32,
    /// Resource re-indexings by this run, counted once per pass (a full rotation re-indexes
    /// each resource twice).
    pub reindexed: u64,
    /// Whether this run resumed a rotation that had stopped.
    pub resumed: bool,
}

impl Vault {
    /// This server's view of the index phase, read again when older than [`REFRESH`]. If
    /// the store cannot be read, the old view is kept: its lease runs out and reads under
    /// it fail closed, and the store refuses writes under it once it is out of date.
    pub(crate) fn index_view(&self) -> Arc<IndexView> {
        let v = match self.index.view.read() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if v.fetched.elapsed() < REFRESH {
            return v;
        }
        match load_view(&self.store, &self.keyring, &self.index.keys) {
            Ok(new) => {
                if new.phase != v.phase {
                    tracing::info!(
                        phase = new.phase.text(),
                        "blind-index phase changed; following it"
                    );
                }
                let new = Arc::new(new);
                if let Ok(mut w) = self.index.view.write() {
                    *w = new.clone();
                }
                new
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the blind-index phase; keeping the old view");
                v
            }
        }
    }

    /// The key lookups use now.
    pub(crate) fn ix(&self) -> Arc<IndexKey> {
        self.index_view().read.clone()
    }

    /// The blind-index generation and rotation state (part of `keys status`).
    pub(crate) fn index_key_status(&self) -> Result<IndexKeyStatus, VaultError> {
        let phase = Phase::parse(self.store.meta(PHASE)?.as_deref())?;
        let retiring = meta_gen(&self.store, RETIRING)?;
        Ok(match phase {
            Phase::Stable(g) => IndexKeyStatus {
                generation: g,
                phase: if retiring.is_some() {
                    "retiring"
                } else {
                    "stable"
                },
                rotating_to: None,
                retiring,
            },
            Phase::Rotating(g, h) => IndexKeyStatus {
                generation: g,
                phase: "rotating",
                rotating_to: Some(h),
                retiring: None,
            },
            Phase::Switched(g, h) => IndexKeyStatus {
                generation: h,
                phase: "switched",
                rotating_to: Some(h),
                retiring: Some(g),
            },
        })
    }

    /// The generations whose roots a master key rotation must re-wrap.
    pub(crate) fn live_index_generations(&self) -> Result<Vec<u32>, VaultError> {
        let phase = Phase::parse(self.store.meta(PHASE)?.as_deref())?;
        let mut gens = phase.live();
        if let Some(r) = meta_gen(&self.store, RETIRING)? {
            if !gens.contains(&r) {
                gens.push(r);
            }
        }
        Ok(gens)
    }

    /// Whether an index rotation is under way (or stopped part-way).
    pub(crate) fn index_rotation_pending(&self) -> Result<bool, VaultError> {
        let s = self.index_key_status()?;
        Ok(s.phase != "stable")
    }

    /// `medvault keys rotate --index`: moves the blind index to a new root generation while
    /// the servers serve, or resumes a rotation that stopped. `wait(grace)` is called
    /// between phases (the caller sleeps); `progress(pass, done, total)` after each batch of
    /// each re-index pass (pass 1 writes both generations' tokens, pass 2 the new one's
    /// alone).
    ///
    /// # Errors
    /// Denied; a master key rotation under way (finish it first); `grace` shorter than
    /// [`MIN_GRACE`]; storage, decryption and audit failures (the phase stays recorded and
    /// the next run resumes).
    pub fn rotate_index_key(
        &self,
        c: &crate::Caller,
        batch: usize,
        grace: Duration,
        wait: &dyn Fn(Duration),
        progress: &dyn Fn(u8, u64, u64),
    ) -> Result<IndexRotationReport, VaultError> {
        if grace < MIN_GRACE {
            return Err(VaultError::BadRequest(format!(
                "the grace between phases must be at least {} s (servers hold their view of the index key for up to {} s)",
                MIN_GRACE.as_secs(),
                LEASE.as_secs()
            )));
        }
        let Some(mut rec) = self.operate(c, medvault_types::Operation::KeysRotate, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if self.master_rotation_pending()? {
            return Err(VaultError::Unprocessable(
                "a master key rotation is under way: run `medvault keys rotate` to finish it first"
                    .into(),
            ));
        }
        let mut phase = Phase::parse(self.store.meta(PHASE)?.as_deref())?;
        let retiring = meta_gen(&self.store, RETIRING)?;
        let resumed = !matches!(phase, Phase::Stable(_)) || retiring.is_some();
        let (from, to) = match (phase, retiring) {
            (Phase::Stable(g), None) => (g, g.saturating_add(1)),
            (Phase::Rotating(g, h) | Phase::Switched(g, h), _) => (g, h),
            (Phase::Stable(h), Some(g)) => (g, h),
        };
        let mut reindexed = 0u64;
        if let (Phase::Stable(_), None) = (phase, retiring) {
            // The new root, stored before any phase names it.
            let name = root_name(to);
            let current = master_version(&self.store)?;
            service_key(
                &self.store,
                &self.keyring,
                current,
                &name,
                |m| Ok(m.wrap_index_root(&IndexRootKey::generate())?),
                |m, w| Ok(m.unwrap_index_root(w)?),
            )?;
            rec.detail = Some(format!("index started from=g{from} to=g{to}"));
            phase = Phase::Rotating(from, to);
            self.commit(
                vec![
                    put_meta(PHASE, &phase.text()),
                    put_meta(WRITERS, &format!("{from},{from}+{to}")),
                    Op::DeleteMeta { key: CURSOR.into() },
                ],
                vec![rec],
            )
            .map_err(crate::audit_failed)?;
        }
        let both = format!("{from}+{to}");
        if let Phase::Rotating(..) = phase {
            if self.store.meta(WRITERS)?.as_deref() != Some(both.as_bytes()) {
                // Every server starts writing both generations' tokens within the grace;
                // then writes carrying the old one alone are refused.
                wait(grace);
                self.commit(vec![put_meta(WRITERS, &both)], vec![])?;
            }
            let keys = vec![
                load_key(&self.store, &self.keyring, &self.index.keys, from)?,
                load_key(&self.store, &self.keyring, &self.index.keys, to)?,
            ];
            reindexed += self.reindex_pass(c, &keys, &both, batch, &|d, t| progress(1, d, t))?;
            phase = Phase::Switched(from, to);
            let mut rec = self.record(c, "keys.rotate", crate::Outcome::Success);
            rec.detail = Some(format!("index switched lookups to=g{to}"));
            self.commit(
                vec![
                    put_meta(PHASE, &phase.text()),
                    Op::DeleteMeta { key: CURSOR.into() },
                ],
                vec![rec],
            )
            .map_err(crate::audit_failed)?;
        }
        if let Phase::Switched(..) = phase {
            // Lookups move to the new generation within the grace; only then may writes
            // stop carrying the old one.
            wait(grace);
            phase = Phase::Stable(to);
            self.commit(
                vec![
                    put_meta(PHASE, &phase.text()),
                    put_meta(WRITERS, &format!("{both},{to}")),
                    put_meta(RETIRING, &from.to_string()),
                ],
                vec![],
            )?;
        }
        // Retiring: once every server writes the new generation alone, remove the old
        // one's tokens and root.
        let only = to.to_string();
        if self.store.meta(WRITERS)?.as_deref() != Some(only.as_bytes()) {
            wait(grace);
            self.commit(vec![put_meta(WRITERS, &only)], vec![])?;
        }
        let keys = vec![load_key(&self.store, &self.keyring, &self.index.keys, to)?];
        reindexed += self.reindex_pass(c, &keys, &only, batch, &|d, t| progress(2, d, t))?;
        let mut ops = vec![
            Op::DeleteMeta {
                key: RETIRING.into(),
            },
            Op::DeleteMeta { key: CURSOR.into() },
        ];
        let top = master_version(&self.store)?;
        for v in 1..=top {
            ops.push(Op::DeleteMeta {
                key: versioned_name(&root_name(from), v),
            });
        }
        let mut rec = self.record(c, "keys.rotate", crate::Outcome::Success);
        rec.detail = Some(format!(
            "index completed from=g{from} to=g{to} reindexed={reindexed}; old root deleted"
        ));
        self.commit(ops, vec![rec]).map_err(crate::audit_failed)?;
        if let Ok(mut m) = self.index.keys.lock() {
            m.remove(&from);
        }
        Ok(IndexRotationReport {
            from_generation: from,
            to_generation: to,
            reindexed,
            resumed,
        })
    }
}

fn put_meta(key: &str, value: &str) -> Op {
    Op::PutMeta {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

fn meta_gen(store: &Arc<dyn Store>, key: &str) -> Result<Option<u32>, VaultError> {
    Ok(store
        .meta(key)?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.trim().parse().ok()))
}

/// The resume point of a re-index pass, as stored in [`CURSOR`].
pub(crate) fn cursor(store: &Arc<dyn Store>) -> Result<Option<Vec<String>>, VaultError> {
    Ok(store
        .meta(CURSOR)?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| {
            s.split_once('/')
                .map(|(t, i)| vec![t.to_owned(), i.to_owned()])
        }))
}

/// The op recording a re-index pass's resume point.
pub(crate) fn put_cursor(rtype: &str, id: &str) -> Op {
    put_meta(CURSOR, &format!("{rtype}/{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_and_write_the_generations_of_the_table() {
        for (text, read, write) in [
            ("stable 1", 1, vec![1]),
            ("rotating 1 2", 1, vec![1, 2]),
            ("switched 1 2", 2, vec![1, 2]),
            ("stable 2", 2, vec![2]),
        ] {
            let p = Phase::parse(Some(text.as_bytes())).unwrap();
            assert_eq!(p.text(), text);
            assert_eq!((p.read(), p.write()), (read, write), "{text}");
        }
        assert_eq!(Phase::parse(None).unwrap(), Phase::Stable(1));
        assert!(Phase::parse(Some(b"rotating 1")).is_err());
        assert_eq!(writer_tag(&[1, 2]), "1+2");
    }

    /// A read that outlived its lease is refused only if the phase moved meanwhile.
    #[test]
    fn an_old_view_fails_closed_only_when_the_phase_moved() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            medvault_store::SqliteStore::open(&dir.path().join("db")).unwrap();
        let key = Arc::new(IndexKey::new(1, &IndexRootKey::generate()));
        let view = |age: Duration| IndexView {
            phase: Phase::Stable(1),
            read: key.clone(),
            write: vec![key.clone()],
            writer: "1".into(),
            fetched: Instant::now().checked_sub(age).unwrap(),
        };
        assert!(view(Duration::ZERO).check_lease(&store).is_ok());
        assert!(
            view(LEASE * 2).check_lease(&store).is_ok(),
            "slow, same phase"
        );
        store
            .commit(medvault_store::WriteBatch {
                ops: vec![put_meta(PHASE, "rotating 1 2")],
                audit: vec![],
            })
            .unwrap();
        assert!(
            view(Duration::ZERO).check_lease(&store).is_ok(),
            "within the lease"
        );
        assert!(matches!(
            view(LEASE * 2).check_lease(&store),
            Err(VaultError::Unavailable(_))
        ));
    }
}
