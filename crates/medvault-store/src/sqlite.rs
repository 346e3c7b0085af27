//! SQLite backend: one database in WAL mode; a single writer thread group-commits
//! batches (each inside its own SAVEPOINT, so one batch's failure never touches
//! another's), and a pool of read connections serves reads concurrently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use medvault_types::PatientId;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row};

use crate::writer::{fail_all, Done, Job, Sequencer, Writer};
use crate::*;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
CREATE TABLE patient_keys (
    patient_id TEXT NOT NULL, key_version INTEGER NOT NULL, wrapped BLOB NOT NULL,
    PRIMARY KEY (patient_id, key_version)) STRICT;
CREATE TABLE resource_versions (
    rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, patient_id TEXT,
    last_updated TEXT NOT NULL, deleted INTEGER NOT NULL, category TEXT NOT NULL,
    key_version INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (rtype, id, version)) STRICT, WITHOUT ROWID;
CREATE TABLE resource_current (
    rtype TEXT NOT NULL, id TEXT NOT NULL, patient_id TEXT, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, last_updated TEXT NOT NULL, category TEXT NOT NULL,
    PRIMARY KEY (rtype, id)) STRICT, WITHOUT ROWID;
CREATE INDEX resource_current_patient ON resource_current (patient_id, rtype);
CREATE INDEX resource_current_updated ON resource_current (rtype, last_updated);
CREATE TABLE search_index (
    rtype TEXT NOT NULL, param TEXT NOT NULL, token BLOB NOT NULL, id TEXT NOT NULL, patient_id TEXT,
    PRIMARY KEY (rtype, param, token, id)) STRICT, WITHOUT ROWID;
CREATE INDEX search_index_resource ON search_index (rtype, id);
CREATE TABLE users (
    username TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    totp_secret_wrapped BLOB NOT NULL, totp_last_step INTEGER NOT NULL, disabled INTEGER NOT NULL,
    failed_logins INTEGER NOT NULL, created TEXT NOT NULL, practitioner_id TEXT) STRICT;
CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY, kind TEXT NOT NULL, username TEXT NOT NULL,
    created INTEGER NOT NULL, last_seen INTEGER NOT NULL, expires INTEGER NOT NULL) STRICT;
CREATE INDEX sessions_user ON sessions (username);
-- The audit log: append-only, dense sequence numbers, canonical records (leaves of the Merkle log).
CREATE TABLE audit_log (seq INTEGER PRIMARY KEY, leaf_hash BLOB NOT NULL, record BLOB NOT NULL) STRICT;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER versions_no_update BEFORE UPDATE ON resource_versions BEGIN SELECT RAISE(ABORT, 'versions are immutable'); END;
"#,
    r#"
CREATE TABLE audit_checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL) STRICT;
"#,
    r#"
-- Merkle hash tiles (C2SP tlog-tiles, height 8), each at its newest width; a tile only grows.
CREATE TABLE audit_tiles (level INTEGER NOT NULL, idx INTEGER NOT NULL, hashes BLOB NOT NULL,
    PRIMARY KEY (level, idx)) STRICT, WITHOUT ROWID;
CREATE TRIGGER audit_tiles_grow BEFORE UPDATE ON audit_tiles
    WHEN length(NEW.hashes) < length(OLD.hashes) OR substr(NEW.hashes, 1, length(OLD.hashes)) != OLD.hashes
    BEGIN SELECT RAISE(ABORT, 'a hash tile only grows'); END;
CREATE TRIGGER audit_tiles_no_delete BEFORE DELETE ON audit_tiles BEGIN SELECT RAISE(ABORT, 'hash tiles are append-only'); END;
"#,
    r#"
-- The audit sequence number of the batch that created each resource: a search's snapshot
-- (resources created before the audit log had N entries). Existing resources: 0.
ALTER TABLE resource_current ADD COLUMN created_seq INTEGER NOT NULL DEFAULT 0;
"#,
    IDENTITY_MIGRATION,
    ACCESS_MIGRATION,
    DESTRUCTION_MIGRATION,
    r#"
-- Master key rotation: which master key version wraps each data key (existing: version 1).
ALTER TABLE patient_keys ADD COLUMN master_version INTEGER NOT NULL DEFAULT 1;
CREATE INDEX patient_keys_master ON patient_keys (master_version);
"#,
    GOVERNANCE_MIGRATION,
];

/// The records a privacy or security officer's program keeps (detection alerts,
/// suppressions, staff profiles): a body sealed by the gate where it may hold PHI.
const GOVERNANCE_MIGRATION: &str = r#"
CREATE TABLE governance (kind TEXT NOT NULL, id TEXT NOT NULL, at INTEGER NOT NULL,
    status TEXT NOT NULL, subject TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (kind, id)) STRICT, WITHOUT ROWID;
CREATE INDEX governance_at ON governance (kind, at);
"#;

/// Destruction (SPEC "Keys, backup, destruction"): legal holds and two-person destruction
/// requests. Neither holds PHI in the clear (a hold's reason is sealed).
const DESTRUCTION_MIGRATION: &str = r#"
CREATE TABLE legal_holds (id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, matter TEXT NOT NULL,
    reason BLOB NOT NULL, set_by TEXT NOT NULL, set_at INTEGER NOT NULL, released_by TEXT NOT NULL,
    released_at INTEGER NOT NULL) STRICT;
CREATE INDEX legal_holds_patient ON legal_holds (patient_id, released_at);
CREATE TABLE destructions (id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, reason TEXT NOT NULL,
    status TEXT NOT NULL, requested_by TEXT NOT NULL, requested_at INTEGER NOT NULL,
    approved_by TEXT NOT NULL, approved_at INTEGER NOT NULL, records TEXT NOT NULL,
    audit_seq INTEGER NOT NULL, checkpoint INTEGER NOT NULL) STRICT;
CREATE INDEX destructions_patient ON destructions (patient_id, status);
CREATE INDEX break_glass_patient ON break_glass (patient_id);
CREATE INDEX portal_links_patient ON portal_links (patient_id);
"#;

/// Access control beyond roles: break-the-glass grants and their reviews, the incidents an
/// inappropriate use opens, and the training gate. (Treatment relationships live in the
/// search index, as blind `_care` tokens of CareTeam and Encounter rows.)
const ACCESS_MIGRATION: &str = r#"
CREATE TABLE break_glass (id TEXT PRIMARY KEY, username TEXT NOT NULL, patient_id TEXT NOT NULL,
    reason TEXT NOT NULL, justification BLOB NOT NULL, created INTEGER NOT NULL, expires INTEGER NOT NULL,
    outcome TEXT NOT NULL, reviewed_by TEXT NOT NULL, reviewed_at INTEGER NOT NULL, note BLOB NOT NULL,
    incident TEXT NOT NULL) STRICT;
CREATE INDEX break_glass_user ON break_glass (username, expires);
-- A chart's privacy rows (labels, consent rules), found by patient.
CREATE INDEX search_index_chart ON search_index (patient_id, param);
CREATE TABLE incidents (id TEXT PRIMARY KEY, opened_at INTEGER NOT NULL, status TEXT NOT NULL,
    body TEXT NOT NULL) STRICT;
CREATE TABLE portal_links (username TEXT NOT NULL, patient_id TEXT NOT NULL, kind TEXT NOT NULL,
    evidence TEXT NOT NULL, linked_by TEXT NOT NULL, linked_at INTEGER NOT NULL,
    PRIMARY KEY (username, patient_id)) STRICT, WITHOUT ROWID;
CREATE TABLE policies (version INTEGER PRIMARY KEY, text TEXT NOT NULL, proposed_by TEXT NOT NULL,
    proposed_at INTEGER NOT NULL, status TEXT NOT NULL, approved_by TEXT NOT NULL,
    approved_at INTEGER NOT NULL) STRICT;
ALTER TABLE users ADD COLUMN training_current INTEGER NOT NULL DEFAULT 1;
"#;

/// Identity state that must hold across servers: the login throttle's failure counters,
/// credentials beyond the password (passkeys, recovery codes, service clients), and what
/// sessions need for step-up, attempt limits and listing.
const IDENTITY_MIGRATION: &str = r#"
CREATE TABLE login_throttle (key BLOB PRIMARY KEY, subject BLOB NOT NULL, failures INTEGER NOT NULL,
    window_start INTEGER NOT NULL, last_failure INTEGER NOT NULL) STRICT, WITHOUT ROWID;
CREATE INDEX login_throttle_subject ON login_throttle (subject);
CREATE TABLE credentials (kind TEXT NOT NULL, id BLOB NOT NULL, username TEXT NOT NULL, name TEXT NOT NULL,
    data BLOB NOT NULL, created INTEGER NOT NULL, last_used INTEGER NOT NULL,
    PRIMARY KEY (kind, id)) STRICT, WITHOUT ROWID;
CREATE INDEX credentials_user ON credentials (username, kind);
ALTER TABLE sessions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN mfa_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN method TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN last_login INTEGER NOT NULL DEFAULT 0;
"#;

/// Read connections kept per store.
const MAX_READERS: usize = 16;

struct ReaderPool {
    idle: Vec<Connection>,
    open: usize,
}

/// The embedded default backend.
pub struct SqliteStore {
    path: PathBuf,
    writer: Writer,
    readers: Mutex<ReaderPool>,
    reader_free: Condvar,
    /// The WAL checkpointer: its stop signal (dropped to stop it) and thread.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// How often the WAL is checkpointed into the database file, off the writer thread.
const WAL_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Copies the WAL into the database file (`PRAGMA wal_checkpoint(PASSIVE)`: it never
/// blocks the writer or readers) every [`WAL_CHECKPOINT_EVERY`] on its own connection and
/// thread, so the commit that crosses SQLite's auto-checkpoint threshold no longer pays for
/// the copy and its fsync inside the group commit (a fifth of the writer's time under a
/// write load). Stops when the returned sender is dropped.
fn spawn_checkpointer(
    path: &Path,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), StoreError> {
    let c = open(path, true)?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("medvault-wal".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(WAL_CHECKPOINT_EVERY)
            {
                let _ = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok((tx, handle))
}

fn open(path: &Path, write: bool) -> Result<Connection, StoreError> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let c = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    // temp_store=MEMORY: no sort or index spill files on disk (law 1 covers temp files too).
    // Every commit makes each *other* connection discard its page cache (WAL), and every
    // PHI read commits an audit entry; so audited reads run on the writer connection, whose
    // cache survives its own commits, and it gets the large cache.
    let cache = if write { "-262144" } else { "-16384" };
    c.execute_batch(&format!(
        "PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY; PRAGMA cache_size={cache};"
    ))?;
    if write {
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA secure_delete=ON;",
        )?;
    }
    c.set_prepared_statement_cache_capacity(64);
    Ok(c)
}

/// Loads a dump on `c` in one transaction (see [`Store::load`]).
fn load_on(c: &mut Connection, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
    use crate::dump::{Decoder, Item, Value};
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let audit: i64 = tx.query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))?;
    let meta: i64 = tx.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0))?;
    crate::dump::must_be_empty(audit, meta)?;
    // Secondary indexes are built once the rows are in (a sort each) rather than kept
    // up to date row by row: dropped here, created again before the commit.
    let indexes: Vec<(String, String)> = tx
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, _) in &indexes {
        tx.execute_batch(&format!("DROP INDEX \"{}\"", name.replace('"', "")))?;
    }
    let mut dec = Decoder::new(input);
    {
        let mut st: Option<rusqlite::CachedStatement<'_>> = None;
        loop {
            match dec.next()? {
                Item::Table(t) => {
                    st = Some(tx.prepare_cached(&crate::dump::insert_sql(t).replace('$', "?"))?);
                }
                Item::Row(row) => {
                    let Some(st) = st.as_mut() else {
                        return Err(StoreError::Backend("a dump row before its table".into()));
                    };
                    for (i, v) in row.iter().enumerate() {
                        let at = i + 1;
                        match v {
                            Value::Null => st.raw_bind_parameter(at, rusqlite::types::Null)?,
                            Value::Int(x) => st.raw_bind_parameter(at, x)?,
                            Value::Text(x) => st.raw_bind_parameter(at, x)?,
                            Value::Bytes(x) => st.raw_bind_parameter(at, x)?,
                            Value::Bool(x) => st.raw_bind_parameter(at, i64::from(*x))?,
                        }
                    }
                    st.raw_execute()?;
                }
                Item::Image(_) => {
                    return Err(StoreError::Backend(
                        "a page image restores only into a new SQLite file (SqliteStore::restore)"
                            .into(),
                    ))
                }
                Item::End => break,
            }
        }
    }
    for (_, sql) in &indexes {
        tx.execute_batch(sql)?;
    }
    tx.commit()?;
    Ok(dec.stats)
}

/// Restores a page image to a temporary SQLite file and hands `load` a logical dump of it
/// (how a SQLite snapshot reaches PostgreSQL). The files hold what the image held —
/// ciphertext and wrapped keys — and are deleted on return.
///
/// # Errors
/// The image is malformed or cut; storage failures; `load`'s own.
pub(crate) fn through_logical_dump(
    image: &mut dyn std::io::Read,
    load: &mut dyn FnMut(&mut dyn std::io::Read) -> Result<DumpStats, StoreError>,
) -> Result<DumpStats, StoreError> {
    let io = |e: std::io::Error| StoreError::Backend(format!("restore: {e}"));
    let dir = tempfile::Builder::new()
        .prefix("medvault-restore-")
        .tempdir()
        .map_err(io)?;
    let path = dir.path().join("image.db");
    SqliteStore::restore(&path, image)?;
    let store = SqliteStore::open(&path)?;
    // The logical dump goes through a file beside it (a rare path: one backend's snapshot
    // restored into the other).
    let logical = dir.path().join("logical.dump");
    {
        let f = std::fs::File::create(&logical).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        store.dump(&mut w)?;
        std::io::Write::flush(&mut w).map_err(io)?;
    }
    drop(store);
    let f = std::fs::File::open(&logical).map_err(io)?;
    load(&mut std::io::BufReader::with_capacity(1 << 20, f))
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Removes a database file and its WAL and shared-memory files, where they exist.
fn remove_database_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}

/// Builds a restored database at `tmp` from a logical dump: no journal, the file held
/// exclusively (the caller discards it if this fails).
fn restore_rows(tmp: &Path, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
    {
        let mut c = open(tmp, true)?;
        migrate(&mut c)?;
    }
    let mut c = open(tmp, true)?;
    c.execute_batch(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA locking_mode=EXCLUSIVE; PRAGMA cache_size=-1048576; PRAGMA threads=2;",
    )?;
    let stats = load_on(&mut c, input)?;
    c.execute_batch("PRAGMA locking_mode=NORMAL; PRAGMA journal_mode=WAL;")?;
    Ok(stats)
}

/// Builds a restored database at `tmp` from a page image: the pages written back (around
/// the page cache where the file system allows: [`crate::direct`]) and synced, the schema
/// brought up to date, and the tables a dump leaves out emptied.
fn restore_image(tmp: &Path, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
    use crate::dump::{Decoder, Item, TABLES};
    let io = |e: std::io::Error| StoreError::Backend(format!("restore: {e}"));
    let mut d = Decoder::new(input);
    let Item::Image(h) = d.next()? else {
        return Err(StoreError::Backend("not a medvault page image".into()));
    };
    let mut w = crate::direct::RestoreFile::create(tmp).map_err(io)?;
    d.pages(&h, &mut w)?;
    let f = w.finish().map_err(io)?;
    f.sync_all().map_err(io)?;
    let mut c = open(tmp, true)?;
    let schema: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if usize::try_from(schema).map_or(true, |v| v > MIGRATIONS.len()) {
        return Err(StoreError::Backend(format!(
            "the snapshot's schema ({schema}) is newer than this medvault's ({}): restore it with the version that took it",
            MIGRATIONS.len()
        )));
    }
    migrate(&mut c)?;
    let tables: Vec<String> = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for t in tables
        .iter()
        .filter(|t| !TABLES.iter().any(|d| d.name == t.as_str()))
    {
        c.execute_batch(&format!("DELETE FROM \"{}\"", t.replace('"', "")))?;
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    drop(c);
    Ok(DumpStats {
        bytes: d.stats.bytes,
        ..h.stats
    })
}

/// Current, non-deleted resources per FHIR type, read on `c`.
fn census_on(c: &Connection) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
    let mut st = c.prepare_cached(crate::dump::CENSUS_SQL)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .map(|(t, n)| (t, n.max(0).unsigned_abs()))
        .collect())
}

fn migrate(c: &mut Connection) -> Result<(), StoreError> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let have: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, m) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(have).unwrap_or(0))
    {
        tx.execute_batch(m)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let mut w = open(path, true)?;
        migrate(&mut w)?;
        // The checkpointer thread copies the WAL back; commits never do it themselves.
        w.execute_batch("PRAGMA wal_autocheckpoint=0;")?;
        let checkpointer = spawn_checkpointer(path)?;
        let writer = Writer::start("medvault-sqlite-writer", SqliteSequencer(w))?;
        Ok(Arc::new(SqliteStore {
            path: path.to_owned(),
            writer,
            readers: Mutex::new(ReaderPool {
                idle: Vec::new(),
                open: 0,
            }),
            reader_free: Condvar::new(),
            checkpointer: Mutex::new(Some(checkpointer)),
        }))
    }

    /// Restores a snapshot (a page image or a logical dump) into the database file at
    /// `path`, refused (`Exists`) if a store there holds data. The restore is built under
    /// a temporary name beside `path` (`….restoring`) and renamed into place only once it is
    /// whole and on disk, so a restore cut short (even by kill -9) leaves no database at
    /// `path`. A page image is written back page by page; a logical dump is loaded with no
    /// journal and the file held exclusively. Either way the file is left in WAL mode, and
    /// what a dump leaves out (sessions, sign-in throttles) is not revived.
    ///
    /// # Errors
    /// `Exists`; the snapshot is malformed or cut, or from a newer schema; storage failures.
    pub fn restore(path: &Path, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
        if path.exists() {
            let c = open(path, true)?;
            let count = |t: &str| -> Result<i64, StoreError> {
                let has: i64 = c.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [t],
                    |r| r.get(0),
                )?;
                if has == 0 {
                    return Ok(0);
                }
                Ok(c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?)
            };
            crate::dump::must_be_empty(count("audit_log")?, count("meta")?)?;
        }
        let tmp = with_suffix(path, ".restoring");
        remove_database_files(&tmp);
        let mut first = [0u8; 1];
        input
            .read_exact(&mut first)
            .map_err(|_| StoreError::Backend("not a medvault dump: empty".into()))?;
        let mut input = std::io::Read::chain(&first[..], input);
        let built = if first == [crate::dump::IMAGE_TAG] {
            restore_image(&tmp, &mut input)
        } else {
            restore_rows(&tmp, &mut input)
        };
        let stats = match built {
            Ok(s) => s,
            Err(e) => {
                remove_database_files(&tmp);
                return Err(e);
            }
        };
        remove_database_files(path);
        let io = |e: std::io::Error| StoreError::Backend(format!("restore: {e}"));
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(stats)
    }

    /// Runs `f` on a pooled read connection; at most [`MAX_READERS`] exist, and callers
    /// beyond that wait for one to come back rather than opening more.
    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let poisoned = || StoreError::Backend("reader pool poisoned".into());
        let conn = {
            let mut pool = self.readers.lock().map_err(|_| poisoned())?;
            loop {
                if let Some(c) = pool.idle.pop() {
                    break Some(c);
                }
                if pool.open < MAX_READERS {
                    pool.open += 1;
                    break None;
                }
                pool = self.reader_free.wait(pool).map_err(|_| poisoned())?;
            }
        };
        let conn = match conn {
            Some(c) => c,
            None => match open(&self.path, false) {
                Ok(c) => c,
                Err(e) => {
                    if let Ok(mut pool) = self.readers.lock() {
                        pool.open -= 1;
                    }
                    self.reader_free.notify_one();
                    return Err(e);
                }
            },
        };
        let out = f(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            pool.idle.push(conn);
        }
        self.reader_free.notify_one();
        out
    }

    /// Stops the writer after draining queued batches (also done on drop).
    pub fn close(&self) {
        self.writer.close();
        let running = match self.checkpointer.lock() {
            Ok(mut c) => c.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some((stop, thread)) = running {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// SQLite's dialect of the group commit: one IMMEDIATE transaction per group, each batch
/// with changes inside its own SAVEPOINT, audit sequence numbers from the log's end.
struct SqliteSequencer(Connection);

impl Sequencer for SqliteSequencer {
    fn commit_group(&mut self, group: Vec<Job>) {
        commit_group(&mut self.0, group);
    }
}

struct TxConn<'a>(&'a Connection, u64);

impl TxRead for TxConn<'_> {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
        q_current(self.0, rtype, id)
    }
    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError> {
        q_version(self.0, rtype, id, version)
    }
    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
        q_history(self.0, rtype, id)
    }
    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        q_search(self.0, q)
    }
    fn tally(&self, q: &SearchQuery) -> Result<Vec<(String, u64)>, StoreError> {
        q_tally(self.0, q)
    }
    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError> {
        q_charts(self.0, care_tokens, username, now, patient)
    }
    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError> {
        q_chart_tokens(self.0, patient, params)
    }
    fn audit_len(&self) -> u64 {
        self.1
    }
}

fn commit_group(c: &mut Connection, group: Vec<Job>) {
    let tx = match c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(t) => t,
        Err(e) => return fail_all(group, || StoreError::Backend(e.to_string())),
    };
    let next = tx
        .prepare_cached("SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_log")
        .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)));
    let mut next_seq: u64 = match next {
        Ok(n) => u64::try_from(n).unwrap_or(0),
        Err(e) => return fail_all(group, || StoreError::Backend(e.to_string())),
    };
    let mut done = Vec::with_capacity(group.len());
    for job in group {
        match job {
            Job::Read(f, reply) => {
                let r = f(&TxConn(&tx, next_seq)).and_then(|(audit, payload)| {
                    append_audit(&tx, &audit, &mut next_seq)?;
                    Ok(payload)
                });
                done.push(Done::Read(reply, r));
            }
            Job::Batch(batch, reply) => {
                let start_seq = next_seq;
                let r = (|| -> Result<Committed, StoreError> {
                    // A batch of audit entries alone cannot fail short of an I/O error, which
                    // fails the whole group anyway; only batches with changes need a savepoint.
                    if batch.ops.is_empty() {
                        return apply(&tx, &batch, &mut next_seq);
                    }
                    tx.prepare_cached("SAVEPOINT batch")?.execute([])?;
                    match apply(&tx, &batch, &mut next_seq) {
                        Ok(c) => {
                            tx.prepare_cached("RELEASE batch")?.execute([])?;
                            Ok(c)
                        }
                        Err(e) => {
                            tx.prepare_cached("ROLLBACK TO batch")?.execute([])?;
                            tx.prepare_cached("RELEASE batch")?.execute([])?;
                            Err(e)
                        }
                    }
                })();
                if r.is_err() {
                    next_seq = start_seq;
                }
                done.push(Done::Batch(reply, r));
            }
        }
    }
    match tx.commit() {
        Ok(()) => done.into_iter().for_each(Done::send),
        Err(e) => {
            let e = e.to_string();
            done.into_iter()
                .for_each(|d| d.fail(StoreError::Backend(e.clone())));
        }
    }
}

fn conflict_or(e: rusqlite::Error, on_unique: StoreError) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            on_unique
        }
        _ => e.into(),
    }
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    b: &WriteBatch,
    next_seq: &mut u64,
) -> Result<Committed, StoreError> {
    for op in &b.ops {
        match op {
            Op::PutVersion { row, expect, index } => {
                let cur: Option<(i64, bool)> = tx
                    .prepare_cached("SELECT version, deleted FROM resource_current WHERE rtype = ?1 AND id = ?2")?
                    .query_row(params![row.rtype, row.id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let ok = match (expect, cur) {
                    (Expect::Absent, None) => true,
                    (Expect::Absent, Some(_)) => return Err(StoreError::Exists),
                    (Expect::Version(v), Some((cv, false))) => i64::try_from(*v).ok() == Some(cv),
                    (Expect::Live, Some((_, false))) => true,
                    (_, None) | (_, Some((_, true))) => return Err(StoreError::NotFound),
                };
                if !ok {
                    return Err(StoreError::Conflict);
                }
                let pid = row.patient.as_ref().map(PatientId::as_str);
                let version = i64::try_from(row.version).map_err(|_| StoreError::Conflict)?;
                tx.prepare_cached(
                    "INSERT INTO resource_versions (rtype, id, version, patient_id, last_updated, deleted, category, key_version, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![row.rtype, row.id, version, pid, row.last_updated, row.deleted, row.category, row.key_version, row.body])
                .map_err(|e| conflict_or(e, StoreError::Conflict))?;
                let created_seq = i64::try_from(*next_seq).unwrap_or(i64::MAX);
                tx.prepare_cached(
                    "INSERT INTO resource_current (rtype, id, patient_id, version, deleted, last_updated, category, created_seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version, deleted = excluded.deleted,
                       last_updated = excluded.last_updated, category = excluded.category, patient_id = excluded.patient_id",
                )?
                .execute(params![row.rtype, row.id, pid, version, row.deleted, row.last_updated, row.category, created_seq])?;
                if cur.is_some() {
                    tx.prepare_cached("DELETE FROM search_index WHERE rtype = ?1 AND id = ?2")?
                        .execute(params![row.rtype, row.id])?;
                }
                let mut ins = tx.prepare_cached(
                    "INSERT OR IGNORE INTO search_index (rtype, param, token, id, patient_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for ix in index {
                    ins.execute(params![row.rtype, ix.param, ix.token, row.id, pid])?;
                }
            }
            Op::PutPatientKey {
                patient,
                key_version,
                master_version,
                wrapped,
            } => {
                tx.prepare_cached("INSERT INTO patient_keys (patient_id, key_version, master_version, wrapped) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![patient.as_str(), key_version, master_version, wrapped])
                    .map_err(|e| conflict_or(e, StoreError::Exists))?;
            }
            Op::PutMetaOnce { key, value } => {
                tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute(params![key, value])
                    .map_err(|e| conflict_or(e, StoreError::Exists))?;
            }
            Op::PutMeta { key, value } => {
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute(params![key, value])?;
            }
            Op::DeleteMeta { key } => {
                tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                    .execute(params![key])?;
            }
            Op::RequireMetaListed {
                key,
                member,
                absent,
            } => {
                let v: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                    .query_row(params![key], |r| r.get(0))
                    .optional()?;
                crate::meta_lists(v.as_deref(), absent, member)?;
            }
            Op::AddCosignature { size, line } => {
                let size = i64::try_from(*size).map_err(|_| StoreError::Conflict)?;
                tx.prepare_cached("UPDATE audit_checkpoints SET note = note || ?2 WHERE size = ?1 AND instr(note, ?2) = 0")?
                    .execute(params![size, line])?;
            }
            Op::PutTile {
                level,
                index,
                hashes,
            } => {
                let index = i64::try_from(*index).map_err(|_| StoreError::Conflict)?;
                let stored: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT hashes FROM audit_tiles WHERE level = ?1 AND idx = ?2")?
                    .query_row(params![level, index], |r| r.get(0))
                    .optional()?;
                if tile_grows(stored.as_deref(), hashes)? {
                    tx.prepare_cached(
                        "INSERT INTO audit_tiles (level, idx, hashes) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes",
                    )?
                    .execute(params![level, index, hashes])?;
                }
            }
            Op::ReplaceIndex {
                rtype,
                id,
                version,
                index,
            } => {
                let cur: Option<(i64, Option<String>)> = tx
                    .prepare_cached(
                        "SELECT version, patient_id FROM resource_current WHERE rtype = ?1 AND id = ?2",
                    )?
                    .query_row(params![rtype, id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((cv, pid)) = cur else {
                    return Err(StoreError::NotFound);
                };
                if i64::try_from(*version).ok() != Some(cv) {
                    return Err(StoreError::Conflict);
                }
                tx.prepare_cached("DELETE FROM search_index WHERE rtype = ?1 AND id = ?2")?
                    .execute(params![rtype, id])?;
                let mut ins = tx.prepare_cached(
                    "INSERT OR IGNORE INTO search_index (rtype, param, token, id, patient_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for ix in index {
                    ins.execute(params![rtype, ix.param, ix.token, id, pid])?;
                }
            }
            Op::PutCheckpoint { size, note } => {
                let size = i64::try_from(*size).map_err(|_| StoreError::Conflict)?;
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO audit_checkpoints (size, note) VALUES (?1, ?2)",
                )?
                .execute(params![size, note])?;
            }
            other => {
                for st in crate::sql::identity(other).unwrap_or_default() {
                    let n = tx
                        .prepare_cached(&st.sql.replace('$', "?"))?
                        .execute(params_from_iter(sqlite_args(st.args)))
                        .map_err(|e| conflict_or(e, StoreError::Exists))?;
                    if st.must == crate::sql::Must::Touch && n == 0 {
                        return Err(StoreError::Conflict);
                    }
                }
            }
        }
    }
    let seqs = append_audit(tx, &b.audit, next_seq)?;
    Ok(Committed { audit_seqs: seqs })
}

fn append_audit(
    tx: &Connection,
    audit: &[AuditEntry],
    next_seq: &mut u64,
) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::with_capacity(audit.len());
    let mut ins =
        tx.prepare_cached("INSERT INTO audit_log (seq, leaf_hash, record) VALUES (?1, ?2, ?3)")?;
    for (leaf, record) in audit {
        let seq = i64::try_from(*next_seq)
            .map_err(|_| StoreError::Backend("audit sequence overflow".into()))?;
        ins.execute(params![seq, leaf, record])?;
        seqs.push(*next_seq);
        *next_seq += 1;
    }
    Ok(seqs)
}

use crate::sql::{
    Columns, BREAK_GLASS_COLS, CREDENTIAL_COLS, DESTRUCTION_COLS, GOVERNANCE_COLS, INCIDENT_COLS,
    LEGAL_HOLD_COLS, POLICY_COLS, PORTAL_LINK_COLS, SESSION_COLS, THROTTLE_COLS, USER_COLS,
    VERSION_COLS,
};

impl Columns for Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn patient(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }
    fn bytes(&self, i: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(i)
    }
}

fn version_row(r: &Row<'_>) -> rusqlite::Result<Sealed> {
    crate::sql::sealed(r)
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRow> {
    crate::sql::user(r)
}

fn q_current(c: &Connection, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
    {
        {
            Ok(c.prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM resource_current c JOIN resource_versions v
                 ON v.rtype = c.rtype AND v.id = c.id AND v.version = c.version WHERE c.rtype = ?1 AND c.id = ?2"
            ))?
            .query_row(params![rtype, id], version_row)
            .optional()?)
        }
    }
}

fn q_version(
    c: &Connection,
    rtype: &str,
    id: &str,
    version: u64,
) -> Result<Option<Sealed>, StoreError> {
    let Ok(version) = i64::try_from(version) else {
        return Ok(None);
    };
    {
        Ok(c.prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM resource_versions v WHERE v.rtype = ?1 AND v.id = ?2 AND v.version = ?3"
            ))?
            .query_row(params![rtype, id, version], version_row)
            .optional()?)
    }
}

fn q_history(c: &Connection, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
    {
        let mut st = c.prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM resource_versions v WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC"
            ))?;
        let rows = st
            .query_map(params![rtype, id], version_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

fn sqlite_args(args: Vec<crate::sql::Arg>) -> Vec<rusqlite::types::Value> {
    args.into_iter()
        .map(|a| match a {
            crate::sql::Arg::Text(s) => s.into(),
            crate::sql::Arg::Bytes(b) => b.into(),
            crate::sql::Arg::Int(i) => i.into(),
            crate::sql::Arg::Bool(b) => i64::from(b).into(),
            crate::sql::Arg::Null => rusqlite::types::Value::Null,
        })
        .collect()
}

fn q_chart_tokens(
    c: &Connection,
    patient: &PatientId,
    params: &[String],
) -> Result<Vec<IndexHit>, StoreError> {
    let (sql, args) = crate::sql::chart_tokens(patient, params, crate::sql::Dialect::Sqlite);
    let args = sqlite_args(args);
    let mut st = c.prepare_cached(&sql)?;
    let rows = st
        .query_map(params_from_iter(args.iter()), |r| {
            Ok(IndexHit {
                rtype: r.get(0)?,
                id: r.get(1)?,
                param: r.get(2)?,
                token: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn q_charts(
    c: &Connection,
    care_tokens: &[Vec<u8>],
    username: &str,
    now: i64,
    patient: Option<&PatientId>,
) -> Result<Vec<(PatientId, Reach)>, StoreError> {
    let (sql, args) = crate::sql::charts(
        care_tokens,
        username,
        now,
        patient,
        crate::sql::Dialect::Sqlite,
    );
    let args = sqlite_args(args);
    let mut st = c.prepare_cached(&sql)?;
    let rows = st
        .query_map(params_from_iter(args.iter()), |r| {
            Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::sql::fold_charts(rows))
}

fn q_tally(c: &Connection, q: &SearchQuery) -> Result<Vec<(String, u64)>, StoreError> {
    let Some((sql, args)) =
        crate::sql::search(q, crate::sql::Dialect::Sqlite, crate::sql::Select::Tally)
    else {
        return Ok(vec![]);
    };
    let args = sqlite_args(args);
    let mut st = c.prepare_cached(&sql)?;
    let rows = st
        .query_map(params_from_iter(args.iter()), |r| {
            Ok((
                r.get::<_, String>(0)?,
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn q_search(c: &Connection, q: &SearchQuery) -> Result<SearchPage, StoreError> {
    let Some((sql, args)) =
        crate::sql::search(q, crate::sql::Dialect::Sqlite, crate::sql::Select::Rows)
    else {
        return Ok(SearchPage::default());
    };
    let args = sqlite_args(args);
    let mut st = c.prepare_cached(&sql)?;
    let mut rows = st
        .query_map(params_from_iter(args.iter()), version_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let more = rows.len() > q.limit;
    rows.truncate(q.limit);
    Ok(SearchPage { rows, more })
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        self.writer.commit(batch)
    }

    fn audited(&self, read: AuditedRead) -> Result<Payload, StoreError> {
        self.writer.audited(read)
    }

    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
        self.with_reader(|c| q_current(c, rtype, id))
    }

    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError> {
        self.with_reader(|c| q_version(c, rtype, id, version))
    }

    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
        self.with_reader(|c| q_history(c, rtype, id))
    }

    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.with_reader(|c| q_search(c, q))
    }

    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, StoreError> {
        let size = size.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT size, note FROM audit_checkpoints WHERE ?1 IS NULL OR size = ?1 ORDER BY size DESC LIMIT 1",
            )?
            .query_row(params![size], |r| Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get::<_, String>(1)?)))
            .optional()?)
        })
    }

    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let s = i64::try_from(start).unwrap_or(i64::MAX);
        let e = i64::try_from(end).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT idx, hashes FROM audit_tiles WHERE level = ?1 AND idx >= ?2 AND idx < ?3 ORDER BY idx",
            )?;
            let rows = st
                .query_map(params![level, s, e], |r| {
                    Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let idx: Vec<i64> = indexes
            .iter()
            .filter_map(|&i| i64::try_from(i).ok())
            .collect();
        if idx.is_empty() {
            return Ok(vec![]);
        }
        // One statement for the handful of tiles a proof needs (`json_each` binds the list).
        let list = serde_json::to_string(&idx).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.with_reader(|c| {
            let mut st = c.prepare_cached(
                "SELECT idx, hashes FROM audit_tiles WHERE level = ?1 AND idx IN (SELECT value FROM json_each(?2)) ORDER BY idx",
            )?;
            let rows = st
                .query_map(params![level, list], |r| {
                    Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        self.with_reader(|c| {
            let mut st =
                c.prepare_cached("SELECT size, note FROM audit_checkpoints ORDER BY size")?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        r.get::<_, String>(1)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn patient_key(&self, patient: &PatientId) -> Result<Option<WrappedKey>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT key_version, master_version, wrapped FROM patient_keys WHERE patient_id = ?1 ORDER BY key_version DESC LIMIT 1",
            )?
            .query_row(params![patient.as_str()], |r| {
                Ok(WrappedKey {
                    key_version: r.get(0)?,
                    master_version: r.get(1)?,
                    wrapped: r.get(2)?,
                })
            })
            .optional()?)
        })
    }

    fn dump(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        use crate::dump::{Cell, Encoder, Kind, TABLES};
        use rusqlite::types::ValueRef;
        self.with_reader(|c| {
            // One read transaction: every table from the same WAL snapshot, read through a
            // memory map (no copy per page into SQLite's cache).
            c.execute_batch("PRAGMA mmap_size=17179869184; BEGIN")?;
            let mut enc = Encoder::new(out);
            let result = (|| {
                for t in TABLES {
                    enc.table(t)?;
                    let mut st = c.prepare(&crate::dump::select_sql(t, false))?;
                    let mut rows = st.query([])?;
                    while let Some(r) = rows.next()? {
                        // On the stack: no allocation per row.
                        let mut cells = [Cell::Null; 24];
                        for ((i, (_, k)), cell) in t.cols.iter().enumerate().zip(cells.iter_mut()) {
                            let v = r.get_ref(i)?;
                            *cell = match (k, v) {
                                (_, ValueRef::Null) => Cell::Null,
                                (Kind::Bool, ValueRef::Integer(x)) => Cell::Bool(x != 0),
                                (Kind::Int, ValueRef::Integer(x)) => Cell::Int(x),
                                (Kind::Text | Kind::OptText | Kind::Patient, ValueRef::Text(x)) => {
                                    Cell::Text(x)
                                }
                                (Kind::Bytes, ValueRef::Blob(x)) => Cell::Bytes(x),
                                _ => {
                                    return Err(StoreError::Backend(format!(
                                        "{}: column {i} has an unexpected type",
                                        t.name
                                    )))
                                }
                            };
                        }
                        let Some(row) = cells.get(..t.cols.len()) else {
                            return Err(StoreError::Backend(format!(
                                "{}: too many columns",
                                t.name
                            )));
                        };
                        enc.row(row)?;
                    }
                }
                Ok::<(), StoreError>(())
            })();
            let _ = c.execute_batch("COMMIT; PRAGMA mmap_size=0");
            result?;
            enc.end()
        })
    }

    fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        use crate::dump::{ImageHeader, TABLES};
        let imaged = self.with_reader(|c| {
            // One read transaction: the counts and every page from the same WAL snapshot,
            // the pages read through a memory map (no copy per page into SQLite's cache).
            c.execute_batch("PRAGMA mmap_size=17179869184; BEGIN")?;
            let result = (|| {
                let mut stats = DumpStats::default();
                for t in TABLES {
                    let n: i64 =
                        c.query_row(&format!("SELECT COUNT(*) FROM {}", t.name), [], |r| {
                            r.get(0)
                        })?;
                    // As a logical dump counts: tables with rows.
                    if n > 0 {
                        stats
                            .rows
                            .insert(t.name.to_owned(), u64::try_from(n).unwrap_or(0));
                    }
                }
                stats.audit_entries = stats.rows.get("audit_log").copied().unwrap_or(0);
                stats.resources = census_on(c)?;
                stats.newest_write =
                    c.query_row("SELECT MAX(last_updated) FROM resource_versions", [], |r| {
                        r.get(0)
                    })?;
                let page_size: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                let pages: u64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                // Without the `sqlite_dbpage` table (a SQLite built without it) there is
                // no page image: the logical dump is taken instead.
                let Ok(mut st) = c.prepare("SELECT pgno, data FROM sqlite_dbpage('main')") else {
                    return Ok(None);
                };
                let mut h = ImageHeader {
                    page_size,
                    pages,
                    stats,
                };
                let header = h.encode()?;
                let io = |e: std::io::Error| StoreError::Backend(format!("dump stream: {e}"));
                // Each page goes to `out` straight from SQLite's buffer: one copy, into the
                // stream's own buffer.
                out.write_all(&header).map_err(io)?;
                let mut rows = st.query([])?;
                let mut next: u64 = 1;
                while let Some(r) = rows.next()? {
                    let pgno: u64 = r.get(0)?;
                    let data = r.get_ref(1)?.as_blob().map_err(|e| {
                        StoreError::Backend(format!("page image: page {pgno}: {e}"))
                    })?;
                    if pgno != next || data.len() != page_size as usize {
                        return Err(StoreError::Backend(format!(
                            "page image: page {pgno} out of order or of {} bytes",
                            data.len()
                        )));
                    }
                    next += 1;
                    out.write_all(data).map_err(io)?;
                }
                if next != pages + 1 {
                    return Err(StoreError::Backend(format!(
                        "page image: {} of {pages} pages read",
                        next - 1
                    )));
                }
                out.write_all(b"E").map_err(io)?;
                out.flush().map_err(io)?;
                h.stats.bytes = header.len() as u64 + u64::from(page_size) * pages + 1;
                Ok(Some(h.stats))
            })();
            let _ = c.execute_batch("COMMIT; PRAGMA mmap_size=0");
            result
        })?;
        match imaged {
            Some(stats) => Ok(stats),
            None => self.dump(out),
        }
    }

    fn load(&self, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
        let mut c = open(&self.path, true)?;
        // A load fills a fresh database in one transaction; if it is cut short the restore
        // is discarded, so it need not wait for the disk at each page.
        c.execute_batch("PRAGMA synchronous=OFF; PRAGMA cache_size=-1048576;")?;
        load_on(&mut c, input)
    }

    fn purge_deleted(&self) -> Result<bool, StoreError> {
        let c = open(&self.path, true)?;
        let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        Ok(busy == 0)
    }

    fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        self.with_reader(census_on)
    }

    fn chart_versions(&self, patient: &PatientId) -> Result<Vec<Sealed>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {VERSION_COLS} FROM resource_versions v {}",
                crate::sql::CHART_VERSIONS_SQL.replace('$', "?")
            ))?;
            let rows = st
                .query_map(params![patient.as_str()], version_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn patient_keys(&self, patient: &PatientId) -> Result<Vec<WrappedKey>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&crate::sql::PATIENT_KEYS_SQL.replace('$', "?"))?;
            let rows = st
                .query_map(params![patient.as_str()], |r| {
                    Ok(WrappedKey {
                        key_version: r.get(0)?,
                        master_version: r.get(1)?,
                        wrapped: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn keys_wrapped_below(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(PatientId, WrappedKey)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&crate::sql::KEYS_BELOW_SQL.replace('$', "?"))?;
            let rows = st
                .query_map(
                    params![master_version, i64::try_from(limit).unwrap_or(i64::MAX)],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            WrappedKey {
                                key_version: r.get(1)?,
                                master_version: r.get(2)?,
                                wrapped: r.get(3)?,
                            },
                        ))
                    },
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows
                .into_iter()
                .filter_map(|(p, k)| PatientId::new(&p).ok().map(|p| (p, k)))
                .collect())
        })
    }

    fn master_key_census(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(crate::sql::MASTER_CENSUS_SQL)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows
                .into_iter()
                .map(|(v, n)| (v, n.max(0).unsigned_abs()))
                .collect())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()?)
        })
    }

    fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {USER_COLS} FROM users WHERE username = ?1"
            ))?
            .query_row(params![username], user_row)
            .optional()?)
        })
    }

    fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.with_reader(|c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {USER_COLS} FROM users ORDER BY username"))?;
            let rows = st.query_map([], user_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn session(&self, token_hash: &[u8]) -> Result<Option<SessionRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE token_hash = ?1"
            ))?
            .query_row(params![token_hash], |r| crate::sql::session(r))
            .optional()?)
        })
    }

    fn sessions_of(&self, username: &str) -> Result<Vec<SessionRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE username = ?1 ORDER BY created DESC"
            ))?;
            let rows = st
                .query_map(params![username], |r| crate::sql::session(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn throttle(&self, keys: &[Vec<u8>]) -> Result<Vec<ThrottleRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {THROTTLE_COLS} FROM login_throttle WHERE key = ?1"
            ))?;
            let mut out = vec![];
            for k in keys {
                if let Some(r) = st
                    .query_row(params![k], |r| crate::sql::throttle(r))
                    .optional()?
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn credential(&self, kind: &str, id: &[u8]) -> Result<Option<CredentialRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLS} FROM credentials WHERE kind = ?1 AND id = ?2"
            ))?
            .query_row(params![kind, id], |r| crate::sql::credential(r))
            .optional()?)
        })
    }

    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError> {
        self.with_reader(|c| q_charts(c, care_tokens, username, now, patient))
    }

    fn break_glass(&self) -> Result<Vec<BreakGlassRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {BREAK_GLASS_COLS} FROM break_glass ORDER BY created DESC, id"
            ))?;
            let rows = st
                .query_map([], |r| crate::sql::break_glass(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.into_iter().flatten().collect())
        })
    }

    fn legal_holds(&self, patient: Option<&PatientId>) -> Result<Vec<LegalHoldRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {LEGAL_HOLD_COLS} FROM legal_holds WHERE ?1 IS NULL OR patient_id = ?1 ORDER BY set_at DESC, id"
            ))?;
            let rows = st
                .query_map(params![patient.map(PatientId::as_str)], |r| {
                    crate::sql::legal_hold(r)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.into_iter().flatten().collect())
        })
    }

    fn destructions(&self) -> Result<Vec<DestructionRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DESTRUCTION_COLS} FROM destructions ORDER BY requested_at DESC, id"
            ))?;
            let rows = st
                .query_map([], |r| crate::sql::destruction(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.into_iter().flatten().collect())
        })
    }

    fn chart_census(&self, patient: &PatientId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&crate::sql::CENSUS_SQL.replace('$', "?"))?;
            let rows = st
                .query_map(params![patient.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows
                .into_iter()
                .map(|(t, a, b)| (t, a.max(0).unsigned_abs(), b.max(0).unsigned_abs()))
                .collect())
        })
    }

    fn portal_links(&self, username: &str) -> Result<Vec<PortalLinkRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {PORTAL_LINK_COLS} FROM portal_links WHERE username = ?1 ORDER BY linked_at, patient_id"
            ))?;
            let rows = st
                .query_map(params![username], |r| crate::sql::portal_link(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.into_iter().flatten().collect())
        })
    }

    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError> {
        self.with_reader(|c| q_chart_tokens(c, patient, params))
    }

    fn policies(&self) -> Result<Vec<PolicyRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {POLICY_COLS} FROM policies ORDER BY version DESC"
            ))?;
            let rows = st
                .query_map([], |r| crate::sql::policy(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn incidents(&self) -> Result<Vec<IncidentRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {INCIDENT_COLS} FROM incidents ORDER BY opened_at DESC, id"
            ))?;
            let rows = st
                .query_map([], |r| crate::sql::incident(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn governance(&self, kind: &str) -> Result<Vec<GovernanceRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {GOVERNANCE_COLS} FROM governance WHERE kind = ?1 ORDER BY at DESC, id"
            ))?;
            let rows = st
                .query_map(params![kind], |r| crate::sql::governance(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn governance_record(&self, kind: &str, id: &str) -> Result<Option<GovernanceRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {GOVERNANCE_COLS} FROM governance WHERE kind = ?1 AND id = ?2"
            ))?;
            let mut rows = st.query_map(params![kind, id], |r| crate::sql::governance(r))?;
            Ok(rows.next().transpose()?)
        })
    }

    fn credentials(&self, username: &str, kind: &str) -> Result<Vec<CredentialRow>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLS} FROM credentials WHERE username = ?1 AND kind = ?2 ORDER BY created, id"
            ))?;
            let rows = st
                .query_map(params![username, kind], |r| crate::sql::credential(r))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        self.with_reader(|c| {
            let n: i64 = c
                .prepare_cached("SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_log")?
                .query_row([], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn audit_range(&self, start: u64, end: u64) -> Result<Vec<AuditRow>, StoreError> {
        let s = i64::try_from(start).unwrap_or(i64::MAX);
        let e = i64::try_from(end).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            let mut st = c.prepare_cached("SELECT seq, leaf_hash, record FROM audit_log WHERE seq >= ?1 AND seq < ?2 ORDER BY seq")?;
            let rows = st
                .query_map(params![s, e], |r| {
                    let seq: i64 = r.get(0)?;
                    Ok(AuditRow { seq: u64::try_from(seq).unwrap_or(0), leaf_hash: r.get(1)?, record: r.get(2)? })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn audit_scan(&self, start: u64, end: u64, f: &mut AuditVisitor<'_>) -> Result<(), StoreError> {
        let s = i64::try_from(start).unwrap_or(i64::MAX);
        let e = i64::try_from(end).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            // Long scans read pages through a memory map instead of a copy per page; the
            // pooled connection goes back to plain reads afterwards.
            c.pragma_update(None, "mmap_size", 1i64 << 40)?;
            let scanned = (|| {
                let mut st = c.prepare_cached("SELECT seq, leaf_hash, record FROM audit_log WHERE seq >= ?1 AND seq < ?2 ORDER BY seq")?;
                let mut rows = st.query(params![s, e])?;
                while let Some(r) = rows.next()? {
                    let bad = |e: rusqlite::types::FromSqlError| StoreError::Backend(e.to_string());
                    let seq = u64::try_from(r.get_ref(0)?.as_i64().map_err(bad)?).unwrap_or(0);
                    let leaf = r.get_ref(1)?.as_blob().map_err(bad)?;
                    let record = r.get_ref(2)?.as_blob().map_err(bad)?;
                    if !f(seq, leaf, record) {
                        break;
                    }
                }
                Ok::<(), StoreError>(())
            })();
            c.pragma_update(None, "mmap_size", 0i64)?;
            scanned
        })
    }
}
