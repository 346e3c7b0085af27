//! Verification of a whole audit log: every entry recomputed into the Merkle tree and its
//! tiles, every stored checkpoint's signature and root checked, every stored tile compared
//! (RFC 6962 / RFC 9162 trees, C2SP tlog-checkpoint, signed-note and tlog-tiles).
//!
//! The log is read through [`LogSource`], which the gate implements over its store, so this
//! room stays free of storage. Reading is spread over every core (each reader hashes its
//! own chunks); the calling thread folds them into the tree in order.

use std::collections::{BTreeMap, HashMap};

use crate::merkle::Hash;
use crate::note::{parse_checkpoint, NoteVerifier};
use crate::tiles::{self, hashes_from_bytes, Tiles};
use crate::AuditRecord;

/// The log could not be read (not a verdict about its contents).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Called with `(seq, leaf hash, canonical record)` for each entry scanned; returning false
/// stops the scan.
pub type EntryVisitor<'a> = dyn FnMut(u64, &[u8], &[u8]) -> bool + 'a;

/// What verification reads of a log. Implemented by the gate over its store; any
/// read-only view of entries, checkpoints and tiles will do (a test's in-memory log, say).
pub trait LogSource: Sync {
    /// Number of entries.
    fn size(&self) -> Result<u64, VerifyError>;
    /// Calls `f(seq, leaf hash, record)` for entries `start <= seq < end`, in order,
    /// stopping when `f` returns false.
    fn scan(&self, start: u64, end: u64, f: &mut EntryVisitor<'_>) -> Result<(), VerifyError>;
    /// Every stored signed checkpoint `(size, note)`.
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, VerifyError>;
    /// Stored hash tiles of `level` with `start <= index < end`: `(index, hashes)`.
    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, VerifyError>;
}

/// The outcome of recomputing the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditVerdict {
    /// Every entry is present, in sequence, canonical, and matches its leaf hash.
    Intact {
        size: u64,
        root: [u8; 32],
        checkpoints: usize,
    },
    /// The first entry found wrong, and what is wrong with it.
    Broken { index: u64, problem: String },
}

/// Entries read per chunk (a whole number of tiles, so chunks start at tile boundaries).
pub const CHUNK: u64 = 256 * 256;

/// Recomputes every leaf hash, the Merkle tree and its tiles from the whole log and checks
/// every stored checkpoint (signed by `verifier_key` for `origin`, C2SP note verifier-key
/// form) and every stored hash tile. Reports the first entry (or range) found wrong;
/// `progress(done, total)` is called as entries are folded in. Entries no checkpoint covers
/// yet are also checked to be canonical records; covered ones are when their checkpoint
/// does not match, to name the entry.
///
/// # Errors
/// [`VerifyError`] when the log cannot be read, or the key does not parse.
pub fn verify(
    log: &dyn LogSource,
    verifier_key: &str,
    origin: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<AuditVerdict, VerifyError> {
    Verifier {
        log,
        verifier_key,
        origin,
    }
    .run(progress)
}

struct Verifier<'a> {
    log: &'a dyn LogSource,
    verifier_key: &'a str,
    origin: &'a str,
}

impl Verifier<'_> {
    /// Recomputes every leaf hash, the Merkle tree and its tiles from the whole audit log,
    /// streaming it (every core reads and hashes its own chunks; this thread folds them into
    /// the tree in order), and checks
    /// every stored checkpoint (its signature, and that the tree of that size still has the
    /// signed root) and every stored hash tile. Reports the first entry (or range) found
    /// wrong. Entries no checkpoint covers yet are also checked to be canonical records;
    /// covered ones are when their checkpoint does not match, to name the entry.
    fn run(&self, progress: &dyn Fn(u64, u64)) -> Result<AuditVerdict, VerifyError> {
        let verifier =
            NoteVerifier::parse(self.verifier_key).map_err(|e| VerifyError(e.to_string()))?;
        let mut checkpoints: Vec<(u64, Hash)> = vec![];
        for (size, note) in self.log.checkpoints()? {
            let parsed = verifier
                .verify(&note)
                .and_then(parse_checkpoint)
                .ok()
                .filter(|(origin, s, _)| origin == self.origin && *s == size);
            match parsed {
                Some((_, s, root)) => checkpoints.push((s, root)),
                None => {
                    let problem = format!(
                        "the checkpoint of size {size} is not validly signed by this log's key"
                    );
                    return Ok(AuditVerdict::Broken {
                        index: size,
                        problem,
                    });
                }
            }
        }
        checkpoints.sort_by_key(|c| c.0);
        let covered = checkpoints.last().map(|c| c.0).unwrap_or(0);
        let total = self.log.size()?;
        // Every core reads and hashes its own chunks (chunk k on reader k mod R); this thread
        // takes them in order and folds them into the tree.
        let readers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8) as u64;
        let chunks = total.div_ceil(CHUNK);
        std::thread::scope(|scope| {
            let mut inbox = vec![];
            for r in 0..readers {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Scanned, VerifyError>>(1);
                inbox.push(rx);
                let spawned = std::thread::Builder::new()
                    .name("audit-verify".into())
                    .spawn_scoped(scope, move || {
                        let mut k = r;
                        while k < chunks {
                            let from = k * CHUNK;
                            let scanned = self.scan_chunk(from, (from + CHUNK).min(total), covered);
                            let failed = scanned.is_err();
                            if tx.send(scanned).is_err() || failed {
                                return;
                            }
                            k += readers;
                        }
                    });
                if spawned.is_err() {
                    return Err(VerifyError("cannot start a verification thread".into()));
                }
            }
            self.fold_chunks(&inbox, &checkpoints, covered, total, progress)
        })
    }

    /// Reads entries `[from, to)` and hashes them: leaves, the roots of complete level-0
    /// tiles (`from` is a tile boundary), and the first thing wrong, if any.
    fn scan_chunk(&self, from: u64, to: u64, covered: u64) -> Result<Scanned, VerifyError> {
        let mut leaves: Vec<Hash> = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0));
        let mut problem: Option<(u64, String)> = None;
        let mut expected = from;
        self.log.scan(from, to, &mut |seq, stored, record| {
            if seq != expected {
                problem = Some((
                    expected,
                    format!("entry is missing (the next stored entry is {seq})"),
                ));
                return false;
            }
            let leaf = crate::record_leaf(record);
            if stored != leaf.as_slice() {
                problem = Some((seq, "record does not match its leaf hash".into()));
                return false;
            }
            if seq >= covered && !is_canonical(record) {
                problem = Some((seq, "not a canonical audit record".into()));
                return false;
            }
            leaves.push(leaf);
            expected += 1;
            true
        })?;
        if problem.is_none() && expected < to {
            problem = Some((expected, "entry is missing".into()));
        }
        let roots = leaves
            .chunks(tiles::WIDTH)
            .filter(|c| c.len() == tiles::WIDTH)
            .map(tiles::perfect_root)
            .collect();
        Ok(Scanned {
            leaves,
            roots,
            problem,
        })
    }

    fn fold_chunks(
        &self,
        inbox: &[std::sync::mpsc::Receiver<Result<Scanned, VerifyError>>],
        checkpoints: &[(u64, Hash)],
        covered: u64,
        total: u64,
        progress: &dyn Fn(u64, u64),
    ) -> Result<AuditVerdict, VerifyError> {
        let mut next_cp = checkpoints.iter().peekable();
        let mut last_good: u64 = 0;
        let mut tree = Tiles::new();
        let mut k = 0usize;
        while tree.size() < total {
            let got = inbox
                .get(k % inbox.len().max(1))
                .ok_or_else(|| VerifyError("no audit reader".into()))?
                .recv();
            k += 1;
            let Ok(scanned) = got else {
                return Err(VerifyError("audit reader stopped".into()));
            };
            let Scanned {
                leaves,
                roots,
                problem,
            } = scanned?;
            if let Some((index, problem)) = problem {
                // Entries before it in this chunk are fine, but checkpoints among them are
                // still checked first, so the earliest evidence is reported.
                let good = usize::try_from(index - tree.size()).unwrap_or(0);
                let v = self.fold(
                    &mut tree,
                    leaves.get(..good).unwrap_or(&leaves),
                    &roots,
                    &mut next_cp,
                    &mut last_good,
                )?;
                return Ok(v.unwrap_or(AuditVerdict::Broken { index, problem }));
            }
            if leaves.is_empty() {
                return Ok(AuditVerdict::Broken {
                    index: tree.size(),
                    problem: "entry is missing".into(),
                });
            }
            let before = tree.size();
            let mut updates: BTreeMap<(u32, u64), Vec<Hash>> = BTreeMap::new();
            if let Some(v) = self.fold_into(
                &mut tree,
                &leaves,
                &roots,
                &mut next_cp,
                &mut last_good,
                &mut updates,
            )? {
                return Ok(v);
            }
            debug_assert_eq!(tree.size(), before + leaves.len() as u64);
            if let Some(v) = self.compare_tiles(&updates, covered)? {
                return Ok(v);
            }
            progress(tree.size(), total);
        }
        if let Some(&&(size, _)) = next_cp.peek() {
            let problem = format!("the log was truncated: a signed checkpoint covers {size} entries, the log has {total}");
            return Ok(AuditVerdict::Broken {
                index: total,
                problem,
            });
        }
        Ok(AuditVerdict::Intact {
            size: tree.size(),
            root: tree.root(),
            checkpoints: checkpoints.len(),
        })
    }

    fn fold(
        &self,
        tree: &mut Tiles,
        leaves: &[Hash],
        roots: &[Hash],
        next_cp: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, Hash)>>,
        last_good: &mut u64,
    ) -> Result<Option<AuditVerdict>, VerifyError> {
        let mut ignored = BTreeMap::new();
        self.fold_into(tree, leaves, roots, next_cp, last_good, &mut ignored)
    }

    /// Folds a chunk's leaves into the tree in order (its level-0 tile roots precomputed),
    /// stopping at every checkpoint size on the way to compare the signed root.
    fn fold_into(
        &self,
        tree: &mut Tiles,
        leaves: &[Hash],
        roots: &[Hash],
        next_cp: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, Hash)>>,
        last_good: &mut u64,
        updates: &mut BTreeMap<(u32, u64), Vec<Hash>>,
    ) -> Result<Option<AuditVerdict>, VerifyError> {
        let first_tile = tree.size() / tiles::WIDTH as u64;
        let level0_root = |i: u64| {
            i.checked_sub(first_tile)
                .and_then(|k| roots.get(usize::try_from(k).ok()?).copied())
        };
        let mut rest = leaves;
        while !rest.is_empty() {
            let stop = match next_cp.peek() {
                Some(&&(size, _)) if size > tree.size() => usize::try_from(size - tree.size())
                    .unwrap_or(usize::MAX)
                    .min(rest.len()),
                _ => rest.len(),
            };
            let (now, later) = rest.split_at(stop);
            for (level, index, hashes) in tree.append_with(now.iter().copied(), &level0_root) {
                updates.insert((level, index), hashes);
            }
            rest = later;
            while let Some(&&(size, root)) = next_cp.peek() {
                if size != tree.size() {
                    break;
                }
                if tree.root() != root {
                    return self.diagnose(*last_good, size).map(Some);
                }
                *last_good = size;
                next_cp.next();
            }
        }
        Ok(None)
    }

    /// Entries `[from, to)` do not give the root signed at `to`: name a non-canonical
    /// entry among them if there is one, else the range.
    fn diagnose(&self, from: u64, to: u64) -> Result<AuditVerdict, VerifyError> {
        let mut bad: Option<u64> = None;
        self.log.scan(from, to, &mut |seq, _, record| {
            if is_canonical(record) {
                return true;
            }
            bad = Some(seq);
            false
        })?;
        if let Some(index) = bad {
            return Ok(AuditVerdict::Broken {
                index,
                problem: "not a canonical audit record".into(),
            });
        }
        let problem = format!(
            "entries {from}..{to} do not match the checkpoint signed at size {to} (edited, reordered or replaced)"
        );
        Ok(AuditVerdict::Broken {
            index: from,
            problem,
        })
    }

    /// Compares recomputed tiles with the stored ones: each stored tile must agree with the
    /// recomputed hashes, and every tile the latest checkpoint (`covered` entries) needs must
    /// be there, or proofs would be served from a tree other than the log.
    fn compare_tiles(
        &self,
        updates: &BTreeMap<(u32, u64), Vec<Hash>>,
        covered: u64,
    ) -> Result<Option<AuditVerdict>, VerifyError> {
        let mut by_level: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for &(level, index) in updates.keys() {
            let e = by_level.entry(level).or_insert((index, index));
            e.0 = e.0.min(index);
            e.1 = e.1.max(index);
        }
        for (level, (lo, hi)) in by_level {
            let stored: HashMap<u64, Vec<u8>> =
                self.log.tiles(level, lo, hi + 1)?.into_iter().collect();
            for index in lo..=hi {
                let Some(computed) = updates.get(&(level, index)) else {
                    continue;
                };
                let need = tiles::count_at(covered, level)
                    .saturating_sub(index * tiles::WIDTH as u64)
                    .min(computed.len() as u64) as usize;
                let first_leaf = |pos: u64| ((index * tiles::WIDTH as u64) + pos) << (8 * level);
                let got = stored
                    .get(&index)
                    .map(|b| hashes_from_bytes(b))
                    .unwrap_or_default();
                if let Some(pos) = computed.iter().zip(&got).position(|(a, b)| a != b) {
                    return Ok(Some(AuditVerdict::Broken {
                        index: first_leaf(pos as u64),
                        problem: format!(
                            "stored hash tile {level}/{index} does not match the entries (tiles altered)"
                        ),
                    }));
                }
                if got.len() < need {
                    return Ok(Some(AuditVerdict::Broken {
                        index: first_leaf(got.len() as u64),
                        problem: format!(
                            "stored hash tile {level}/{index} is missing or cut short"
                        ),
                    }));
                }
            }
        }
        Ok(None)
    }
}

fn is_canonical(record: &[u8]) -> bool {
    matches!(AuditRecord::from_canonical(record), Ok(r) if r.canonical() == record)
}

/// One chunk of the log, read and hashed.
struct Scanned {
    leaves: Vec<Hash>,
    /// Roots of the chunk's complete level-0 tiles, in order.
    roots: Vec<Hash>,
    /// The first entry found wrong in the chunk (leaves stop before it).
    problem: Option<(u64, String)>,
}
