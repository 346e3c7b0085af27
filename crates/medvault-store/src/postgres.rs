//! PostgreSQL backend (sqlx): the same contract as SQLite, for several stateless servers
//! over one database.
//!
//! - Patient-scoped tables are hash-partitioned by patient id (the shard key).
//! - The audit sequence has a single sequencer: every transaction that appends audit
//!   entries first takes a transaction-scoped advisory lock, then numbers its entries
//!   from `MAX(seq) + 1`; a rolled-back transaction releases the lock having used nothing,
//!   so the sequence stays dense and gap-free across servers.
//! - Each process group-commits through one writer connection, like the SQLite backend;
//!   reads use a pool.
//! - Data-key cache evictions are announced with NOTIFY and heard with LISTEN.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use medvault_types::PatientId;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use crate::writer::{fail_all, Job, Sequencer, Writer};
use crate::*;

const PARTITIONS: u32 = 8;
const NOTIFY_CHANNEL: &str = "medvault_key_eviction";
/// Advisory lock key of the audit sequencer ("medvault" in ASCII, as a bigint).
const SEQUENCER_LOCK: i64 = 0x6d65_6476_6175_6c74;

fn migration() -> String {
    let mut m = String::from(
        r#"
CREATE TABLE IF NOT EXISTS medvault_schema (version INTEGER PRIMARY KEY);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE patient_keys (
    patient_id TEXT NOT NULL, key_version BIGINT NOT NULL, wrapped BYTEA NOT NULL,
    PRIMARY KEY (patient_id, key_version)) PARTITION BY HASH (patient_id);
CREATE TABLE resource_versions (
    patient_id TEXT NOT NULL, rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL,
    last_updated TEXT NOT NULL, deleted BOOLEAN NOT NULL, category TEXT NOT NULL,
    key_version BIGINT NOT NULL, body BYTEA NOT NULL,
    PRIMARY KEY (patient_id, rtype, id, version)) PARTITION BY HASH (patient_id);
CREATE INDEX resource_versions_by_id ON resource_versions (rtype, id, version);
CREATE TABLE resource_current (
    patient_id TEXT NOT NULL, rtype TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL, last_updated TEXT NOT NULL, category TEXT NOT NULL,
    PRIMARY KEY (patient_id, rtype, id)) PARTITION BY HASH (patient_id);
CREATE INDEX resource_current_by_id ON resource_current (rtype, id);
CREATE INDEX resource_current_updated ON resource_current (rtype, last_updated);
CREATE TABLE search_index (
    patient_id TEXT NOT NULL, rtype TEXT NOT NULL, param TEXT NOT NULL, token BYTEA NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (patient_id, rtype, param, token, id)) PARTITION BY HASH (patient_id);
CREATE INDEX search_index_token ON search_index (rtype, param, token);
CREATE INDEX search_index_resource ON search_index (rtype, id);
CREATE TABLE users (
    username TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    totp_secret_wrapped BYTEA NOT NULL, totp_last_step BIGINT NOT NULL, disabled BOOLEAN NOT NULL,
    failed_logins BIGINT NOT NULL, created TEXT NOT NULL, practitioner_id TEXT);
CREATE TABLE sessions (
    token_hash BYTEA PRIMARY KEY, kind TEXT NOT NULL, username TEXT NOT NULL,
    created BIGINT NOT NULL, last_seen BIGINT NOT NULL, expires BIGINT NOT NULL);
CREATE INDEX sessions_user ON sessions (username);
CREATE TABLE audit_log (seq BIGINT PRIMARY KEY, leaf_hash BYTEA NOT NULL, record BYTEA NOT NULL);
CREATE FUNCTION medvault_refuse_change() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION medvault_refuse_change();
CREATE TRIGGER resource_versions_immutable BEFORE UPDATE ON resource_versions
  FOR EACH ROW EXECUTE FUNCTION medvault_refuse_change();
"#,
    );
    for t in [
        "patient_keys",
        "resource_versions",
        "resource_current",
        "search_index",
    ] {
        for i in 0..PARTITIONS {
            m.push_str(&format!(
                "CREATE TABLE {t}_p{i} PARTITION OF {t} FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i});\n"
            ));
        }
    }
    m.push_str("INSERT INTO medvault_schema (version) VALUES (1);\n");
    m
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base.get(scheme_end..).and_then(|rest| rest.find('/')) {
        Some(i) => base.get(..scheme_end + i).unwrap_or(base),
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        // A connection cut mid-handshake or mid-message surfaces as a protocol error.
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => StoreError::Exists,
        sqlx::Error::Database(d)
            if matches!(
                d.code().as_deref(),
                Some("57P01" | "57P02" | "57P03" | "08006" | "08003" | "08001")
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")))
}

fn pid_col(p: &Option<PatientId>) -> &str {
    p.as_ref().map(PatientId::as_str).unwrap_or("")
}

type Listeners = Arc<Mutex<Vec<Box<dyn Fn(&PatientId) + Send + Sync>>>>;

/// The store's own runtime. It may be dropped from inside another runtime (a server
/// shutting down), so it shuts down in the background instead of blocking.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for OwnedRuntime {
    type Target = tokio::runtime::Runtime;
    #[expect(clippy::expect_used, reason = "the runtime is taken only in Drop")]
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The PostgreSQL backend.
pub struct PgStore {
    rt: Arc<OwnedRuntime>,
    pool: PgPool,
    writer: Writer,
    listeners: Listeners,
}

impl PgStore {
    /// Loads a logical dump in one transaction ([`Store::load`]).
    fn load_rows(&self, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
        use crate::dump::{Decoder, Item, Kind, Value};
        self.rt.block_on(async {
            let mut tx = self.pool.begin().await.map_err(classify)?;
            let audit: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
            let meta: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM meta")
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
            crate::dump::must_be_empty(audit, meta)?;
            let mut dec = Decoder::new(input);
            let mut current: Option<(&'static crate::dump::Table, String)> = None;
            loop {
                match dec.next()? {
                    Item::Table(t) => current = Some((t, crate::dump::insert_sql(t))),
                    Item::Row(row) => {
                        let Some((t, sql)) = &current else {
                            return Err(StoreError::Backend("row before table".into()));
                        };
                        let mut q = sqlx::query(sql);
                        for ((_, k), v) in t.cols.iter().zip(row) {
                            q = match (k, v) {
                                (Kind::Patient, Value::Null) => q.bind(String::new()),
                                (_, Value::Null) => q.bind(Option::<String>::None),
                                (_, Value::Int(i)) => q.bind(i),
                                (_, Value::Text(s)) => q.bind(s),
                                (_, Value::Bytes(b)) => q.bind(b),
                                (_, Value::Bool(b)) => q.bind(b),
                            };
                        }
                        q.execute(&mut *tx).await.map_err(classify)?;
                    }
                    Item::Image(_) => {
                        return Err(StoreError::Backend("a page image inside a dump".into()))
                    }
                    Item::End => break,
                }
            }
            tx.commit().await.map_err(classify)?;
            Ok(dec.stats)
        })
    }

    /// Connects (URL as libpq: `postgres://user@host:port/db?sslmode=require`), migrates,
    /// and starts the writer and the eviction listener.
    pub fn open(url: &str) -> Result<Arc<Self>, StoreError> {
        let rt = Arc::new(OwnedRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("medvault-pg")
                .enable_all()
                .build()
                .map_err(|e| StoreError::Backend(e.to_string()))?,
        )));
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|_| StoreError::Unavailable("invalid PostgreSQL URL".into()))?;
        let pool = rt
            .block_on(
                PgPoolOptions::new()
                    .max_connections(16)
                    .min_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(opts.clone()),
            )
            .map_err(classify)?;
        rt.block_on(migrate(&pool))?;
        let writer = Writer::start(
            "medvault-pg-writer",
            PgSequencer {
                rt: rt.clone(),
                opts,
                conn: None,
            },
        )?;
        let listeners: Listeners = Arc::new(Mutex::new(Vec::new()));
        let l2 = listeners.clone();
        let p2 = pool.clone();
        rt.spawn(async move { listen_loop(p2, l2).await });
        Ok(Arc::new(PgStore {
            rt,
            pool,
            writer,
            listeners,
        }))
    }

    /// Creates database `name` through `admin_url` (a URL to any database the user may
    /// create databases from) and returns the URL of the new database. For tests and setup.
    pub fn create_database(admin_url: &str, name: &str) -> Result<String, StoreError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(StoreError::Backend("database names are [a-z0-9_]+".into()));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        rt.block_on(async {
            let mut c = PgConnection::connect(admin_url).await.map_err(classify)?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut c)
                .await
                .map_err(classify)?;
            let _ = c.close().await;
            Ok::<(), StoreError>(())
        })?;
        Ok(with_database(admin_url, name))
    }

    /// Drops database `name` (tests clean up after themselves).
    pub fn drop_database(admin_url: &str, name: &str) -> Result<(), StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        rt.block_on(async {
            let mut c = PgConnection::connect(admin_url).await.map_err(classify)?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut c)
                .await
                .map_err(classify)?;
            let _ = c.close().await;
            Ok(())
        })
    }

    /// Whether this server's connections to the database are encrypted (TLS).
    pub fn connection_is_tls(&self) -> Result<bool, StoreError> {
        self.rt
            .block_on(
                sqlx::query_scalar::<_, bool>("SELECT COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)")
                    .fetch_one(&self.pool),
            )
            .map_err(classify)
    }

    /// Stops the writer after draining queued batches (also done on drop).
    pub fn close(&self) {
        self.writer.close();
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.map_err(classify)?;
    // One migrator at a time across servers.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SEQUENCER_LOCK + 1)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('medvault_schema') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
    let result = async {
        if !exists {
            sqlx::raw_sql(&migration())
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        let version: i32 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM medvault_schema")
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?;
        if version < 2 {
            sqlx::raw_sql(
                "CREATE TABLE audit_checkpoints (size BIGINT PRIMARY KEY, note TEXT NOT NULL);
                 INSERT INTO medvault_schema (version) VALUES (2);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 3 {
            sqlx::raw_sql(
                "CREATE TABLE audit_tiles (level INTEGER NOT NULL, idx BIGINT NOT NULL,
                     hashes BYTEA NOT NULL, PRIMARY KEY (level, idx));
                 CREATE FUNCTION medvault_tile_grows() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN
                     IF length(NEW.hashes) < length(OLD.hashes)
                        OR substring(NEW.hashes FROM 1 FOR length(OLD.hashes)) <> OLD.hashes THEN
                       RAISE EXCEPTION 'a hash tile only grows';
                     END IF;
                     RETURN NEW;
                   END $$;
                 CREATE TRIGGER audit_tiles_grow BEFORE UPDATE ON audit_tiles
                   FOR EACH ROW EXECUTE FUNCTION medvault_tile_grows();
                 CREATE TRIGGER audit_tiles_no_delete BEFORE DELETE ON audit_tiles
                   FOR EACH ROW EXECUTE FUNCTION medvault_refuse_change();
                 INSERT INTO medvault_schema (version) VALUES (3);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 4 {
            // The audit sequence number of the batch that created each resource: a
            // search's snapshot. Existing resources: 0.
            sqlx::raw_sql(
                "ALTER TABLE resource_current ADD COLUMN created_seq BIGINT NOT NULL DEFAULT 0;
                 INSERT INTO medvault_schema (version) VALUES (4);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 5 {
            // Identity state shared by every server: the login throttle, credentials beyond
            // the password, and what sessions need for step-up, attempt limits and listing.
            sqlx::raw_sql(
                "CREATE TABLE login_throttle (key BYTEA PRIMARY KEY, subject BYTEA NOT NULL,
                     failures BIGINT NOT NULL, window_start BIGINT NOT NULL, last_failure BIGINT NOT NULL);
                 CREATE INDEX login_throttle_subject ON login_throttle (subject);
                 CREATE TABLE credentials (kind TEXT NOT NULL, id BYTEA NOT NULL, username TEXT NOT NULL,
                     name TEXT NOT NULL, data BYTEA NOT NULL, created BIGINT NOT NULL, last_used BIGINT NOT NULL,
                     PRIMARY KEY (kind, id));
                 CREATE INDEX credentials_user ON credentials (username, kind);
                 ALTER TABLE sessions ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0,
                     ADD COLUMN mfa_at BIGINT NOT NULL DEFAULT 0,
                     ADD COLUMN source TEXT NOT NULL DEFAULT '',
                     ADD COLUMN method TEXT NOT NULL DEFAULT '',
                     ADD COLUMN scope TEXT NOT NULL DEFAULT '';
                 ALTER TABLE users ADD COLUMN last_login BIGINT NOT NULL DEFAULT 0;
                 INSERT INTO medvault_schema (version) VALUES (5);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 6 {
            // Access control beyond roles: break-the-glass grants and reviews, incidents,
            // the training gate (treatment relationships are `_care` index tokens).
            sqlx::raw_sql(
                "CREATE TABLE break_glass (id TEXT PRIMARY KEY, username TEXT NOT NULL, patient_id TEXT NOT NULL,
                     reason TEXT NOT NULL, justification BYTEA NOT NULL, created BIGINT NOT NULL,
                     expires BIGINT NOT NULL, outcome TEXT NOT NULL, reviewed_by TEXT NOT NULL,
                     reviewed_at BIGINT NOT NULL, note BYTEA NOT NULL, incident TEXT NOT NULL);
                 CREATE INDEX break_glass_user ON break_glass (username, expires);
                 CREATE INDEX search_index_chart ON search_index (patient_id, param);
                 CREATE TABLE incidents (id TEXT PRIMARY KEY, opened_at BIGINT NOT NULL, status TEXT NOT NULL,
                     body TEXT NOT NULL);
                 CREATE TABLE portal_links (username TEXT NOT NULL, patient_id TEXT NOT NULL, kind TEXT NOT NULL,
                     evidence TEXT NOT NULL, linked_by TEXT NOT NULL, linked_at BIGINT NOT NULL,
                     PRIMARY KEY (username, patient_id));
                 CREATE TABLE policies (version BIGINT PRIMARY KEY, text TEXT NOT NULL, proposed_by TEXT NOT NULL,
                     proposed_at BIGINT NOT NULL, status TEXT NOT NULL, approved_by TEXT NOT NULL,
                     approved_at BIGINT NOT NULL);
                 ALTER TABLE users ADD COLUMN training_current BOOLEAN NOT NULL DEFAULT TRUE;
                 INSERT INTO medvault_schema (version) VALUES (6);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 7 {
            // Destruction: legal holds and two-person destruction requests.
            sqlx::raw_sql(
                "CREATE TABLE legal_holds (id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, matter TEXT NOT NULL,
                     reason BYTEA NOT NULL, set_by TEXT NOT NULL, set_at BIGINT NOT NULL,
                     released_by TEXT NOT NULL, released_at BIGINT NOT NULL);
                 CREATE INDEX legal_holds_patient ON legal_holds (patient_id, released_at);
                 CREATE TABLE destructions (id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, reason TEXT NOT NULL,
                     status TEXT NOT NULL, requested_by TEXT NOT NULL, requested_at BIGINT NOT NULL,
                     approved_by TEXT NOT NULL, approved_at BIGINT NOT NULL, records TEXT NOT NULL,
                     audit_seq BIGINT NOT NULL, checkpoint BIGINT NOT NULL);
                 CREATE INDEX destructions_patient ON destructions (patient_id, status);
                 CREATE INDEX break_glass_patient ON break_glass (patient_id);
                 CREATE INDEX portal_links_patient ON portal_links (patient_id);
                 INSERT INTO medvault_schema (version) VALUES (7);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 8 {
            // Master key rotation: which master key version wraps each data key.
            sqlx::raw_sql(
                "ALTER TABLE patient_keys ADD COLUMN master_version BIGINT NOT NULL DEFAULT 1;
                 CREATE INDEX patient_keys_master ON patient_keys (master_version);
                 INSERT INTO medvault_schema (version) VALUES (8);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        if version < 9 {
            // A privacy or security officer's records: detection alerts, suppressions,
            // staff profiles (bodies sealed by the gate where they may hold PHI).
            sqlx::raw_sql(
                "CREATE TABLE governance (kind TEXT NOT NULL, id TEXT NOT NULL, at BIGINT NOT NULL,
                     status TEXT NOT NULL, subject TEXT NOT NULL, body BYTEA NOT NULL,
                     PRIMARY KEY (kind, id));
                 CREATE INDEX governance_at ON governance (kind, at);
                 INSERT INTO medvault_schema (version) VALUES (9);",
            )
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        }
        Ok::<(), StoreError>(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SEQUENCER_LOCK + 1)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    result
}

async fn listen_loop(pool: PgPool, listeners: Listeners) {
    loop {
        let mut l = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if l.listen(NOTIFY_CHANNEL).await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        // recv reconnects by itself after a lost connection.
        while let Ok(n) = l.recv().await {
            if let Ok(p) = PatientId::new(n.payload()) {
                if let Ok(ls) = listeners.lock() {
                    for f in ls.iter() {
                        f(&p);
                    }
                }
            }
        }
    }
}

/// PostgreSQL's dialect of the group commit: one transaction per group on the writer's own
/// connection (reconnected when lost), the audit sequence under an advisory lock shared by
/// every server, each batch inside a SAVEPOINT, and retries of serialization failures.
struct PgSequencer {
    rt: Arc<OwnedRuntime>,
    opts: PgConnectOptions,
    conn: Option<PgConnection>,
}

impl Sequencer for PgSequencer {
    fn commit_group(&mut self, group: Vec<Job>) {
        if self.conn.is_none() {
            let opts = &self.opts;
            self.conn = self
                .rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(3), PgConnection::connect_with(opts))
                        .await
                })
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = self.conn.as_mut() else {
            return fail_all(group, || {
                StoreError::Unavailable("database unreachable".into())
            });
        };
        if let Err(true) = commit_group(&self.rt, c, group) {
            self.conn = None;
        }
    }
}

/// Runs a group in one transaction. Err(true) means the connection is broken.
fn commit_group(
    rt: &tokio::runtime::Runtime,
    c: &mut PgConnection,
    group: Vec<Job>,
) -> Result<(), bool> {
    // Batches are data and may be retried on serialization failure; reads run once.
    let mut attempt = 0;
    let mut group = group;
    loop {
        attempt += 1;
        let outcome = rt.block_on(sqlx::query("BEGIN").execute(&mut *c));
        if let Err(e) = outcome {
            let broken = matches!(classify(e), StoreError::Unavailable(_));
            fail_all(group, || {
                StoreError::Unavailable("database unreachable".into())
            });
            return Err(broken);
        }
        let mut results: Vec<Result<Option<Payload>, StoreError>> = Vec::with_capacity(group.len());
        let mut fatal: Option<sqlx::Error> = None;
        let needs_seq = group.iter().any(|j| match j {
            Job::Batch(b, _) => !b.audit.is_empty(),
            Job::Read(..) => true,
        });
        let mut next_seq: i64 = 0;
        if needs_seq {
            let r = rt.block_on(async {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(SEQUENCER_LOCK)
                    .execute(&mut *c)
                    .await?;
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_log")
                    .fetch_one(&mut *c)
                    .await
            });
            match r {
                Ok(n) => next_seq = n,
                Err(e) => fatal = Some(e),
            }
        }
        let mut kept: Vec<Job> = Vec::with_capacity(group.len());
        for job in group {
            if fatal.is_some() {
                results.push(Err(StoreError::Unavailable("transaction aborted".into())));
                kept.push(job);
                continue;
            }
            match job {
                Job::Batch(batch, tx) => {
                    let start = next_seq;
                    let r = rt.block_on(async {
                        sqlx::query("SAVEPOINT batch").execute(&mut *c).await?;
                        match apply(&mut *c, &batch, &mut next_seq).await {
                            Ok(v) => {
                                sqlx::query("RELEASE SAVEPOINT batch")
                                    .execute(&mut *c)
                                    .await?;
                                Ok(Ok(v))
                            }
                            Err(ApplyError::Store(e)) => {
                                sqlx::query("ROLLBACK TO SAVEPOINT batch")
                                    .execute(&mut *c)
                                    .await?;
                                Ok(Err(e))
                            }
                            Err(ApplyError::Sql(e)) => {
                                if let sqlx::Error::Database(d) = &e {
                                    if d.code().as_deref() == Some("23505") {
                                        sqlx::query("ROLLBACK TO SAVEPOINT batch")
                                            .execute(&mut *c)
                                            .await?;
                                        return Ok(Err(StoreError::Exists));
                                    }
                                }
                                Err(e)
                            }
                        }
                    });
                    match r {
                        Ok(Ok(seqs)) => results
                            .push(Ok(
                                Some(Box::new(Committed { audit_seqs: seqs }) as Payload),
                            )),
                        Ok(Err(e)) => {
                            next_seq = start;
                            results.push(Err(e));
                        }
                        Err(e) => {
                            next_seq = start;
                            results
                                .push(Err(StoreError::Unavailable("transaction aborted".into())));
                            fatal = Some(e);
                        }
                    }
                    kept.push(Job::Batch(batch, tx));
                }
                Job::Read(f, tx) => {
                    let r = {
                        let reader = PgTx {
                            rt,
                            conn: std::cell::RefCell::new(&mut *c),
                            len: u64::try_from(next_seq).unwrap_or(0),
                        };
                        f(&reader)
                    };
                    match r {
                        Ok((audit, payload)) => {
                            match rt.block_on(append_audit(&mut *c, &audit, &mut next_seq)) {
                                Ok(_) => results.push(Ok(Some(payload))),
                                Err(e) => {
                                    results.push(Err(StoreError::Unavailable(
                                        "transaction aborted".into(),
                                    )));
                                    fatal = Some(e);
                                }
                            }
                        }
                        Err(e) => results.push(Err(e)),
                    }
                    kept.push(Job::Read(
                        Box::new(|_| Err(StoreError::Backend("consumed".into()))),
                        tx,
                    ));
                }
            }
        }
        let committed = match fatal.take() {
            None => rt
                .block_on(sqlx::query("COMMIT").execute(&mut *c))
                .map(|_| ()),
            Some(e) => {
                let _ = rt.block_on(sqlx::query("ROLLBACK").execute(&mut *c));
                Err(e)
            }
        };
        match committed {
            Ok(()) => {
                for (job, r) in kept.into_iter().zip(results) {
                    match job {
                        Job::Batch(_, tx) => {
                            let _ = tx.send(r.and_then(|p| {
                                p.and_then(|p| p.downcast::<Committed>().ok())
                                    .map(|b| *b)
                                    .ok_or(StoreError::Backend("lost result".into()))
                            }));
                        }
                        Job::Read(_, tx) => {
                            let _ =
                                tx.send(r.and_then(|p| {
                                    p.ok_or(StoreError::Backend("lost result".into()))
                                }));
                        }
                    }
                }
                return Ok(());
            }
            Err(e) => {
                let has_reads = kept.iter().any(|j| matches!(j, Job::Read(..)));
                if is_retryable(&e) && attempt < 3 && !has_reads {
                    group = kept;
                    continue;
                }
                let broken = matches!(classify(e), StoreError::Unavailable(_));
                fail_all(kept, || {
                    StoreError::Unavailable("transaction failed; nothing was written".into())
                });
                return Err(broken);
            }
        }
    }
}

enum ApplyError {
    Store(StoreError),
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for ApplyError {
    fn from(e: sqlx::Error) -> Self {
        ApplyError::Sql(e)
    }
}

async fn append_audit(
    c: &mut PgConnection,
    audit: &[AuditEntry],
    next_seq: &mut i64,
) -> Result<Vec<u64>, sqlx::Error> {
    if audit.is_empty() {
        return Ok(vec![]);
    }
    let first = *next_seq;
    let seqs: Vec<i64> = (0..audit.len())
        .map(|i| first + i64::try_from(i).unwrap_or(i64::MAX))
        .collect();
    let leaves: Vec<&[u8]> = audit.iter().map(|(l, _)| l.as_slice()).collect();
    let records: Vec<&[u8]> = audit.iter().map(|(_, r)| r.as_slice()).collect();
    // One round trip for all of a job's entries.
    sqlx::query("INSERT INTO audit_log (seq, leaf_hash, record) SELECT * FROM UNNEST($1::bigint[], $2::bytea[], $3::bytea[])")
        .bind(&seqs)
        .bind(&leaves)
        .bind(&records)
        .execute(&mut *c)
        .await?;
    *next_seq = first + i64::try_from(audit.len()).unwrap_or(i64::MAX);
    Ok(seqs
        .into_iter()
        .map(|s| u64::try_from(s).unwrap_or(0))
        .collect())
}

/// Binds one argument of a statement built in `sql` (to a `query` or a `query_as`).
macro_rules! bind {
    ($q:expr, $a:expr) => {
        match $a {
            crate::sql::Arg::Text(s) => $q.bind(s),
            crate::sql::Arg::Bytes(b) => $q.bind(b),
            crate::sql::Arg::Int(i) => $q.bind(i),
            crate::sql::Arg::Bool(b) => $q.bind(b),
            crate::sql::Arg::Null => $q.bind(Option::<String>::None),
        }
    };
}

async fn apply(
    c: &mut PgConnection,
    b: &WriteBatch,
    next_seq: &mut i64,
) -> Result<Vec<u64>, ApplyError> {
    for op in &b.ops {
        match op {
            Op::PutVersion { row, expect, index } => {
                let cur: Option<(i64, bool)> =
                    sqlx::query_as("SELECT version, deleted FROM resource_current WHERE rtype = $1 AND id = $2 FOR UPDATE")
                        .bind(&row.rtype)
                        .bind(&row.id)
                        .fetch_optional(&mut *c)
                        .await?;
                let ok = match (expect, cur) {
                    (Expect::Absent, None) => true,
                    (Expect::Absent, Some(_)) => return Err(ApplyError::Store(StoreError::Exists)),
                    (Expect::Version(v), Some((cv, false))) => i64::try_from(*v).ok() == Some(cv),
                    (Expect::Live, Some((_, false))) => true,
                    (_, None) | (_, Some((_, true))) => {
                        return Err(ApplyError::Store(StoreError::NotFound))
                    }
                };
                if !ok {
                    return Err(ApplyError::Store(StoreError::Conflict));
                }
                let version = i64::try_from(row.version)
                    .map_err(|_| ApplyError::Store(StoreError::Conflict))?;
                let pid = pid_col(&row.patient);
                sqlx::query(
                    "INSERT INTO resource_versions (patient_id, rtype, id, version, last_updated, deleted, category, key_version, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(pid)
                .bind(&row.rtype)
                .bind(&row.id)
                .bind(version)
                .bind(&row.last_updated)
                .bind(row.deleted)
                .bind(&row.category)
                .bind(i64::from(row.key_version))
                .bind(&row.body)
                .execute(&mut *c)
                .await?;
                sqlx::query(
                    "INSERT INTO resource_current (patient_id, rtype, id, version, deleted, last_updated, category, created_seq)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (patient_id, rtype, id) DO UPDATE SET version = excluded.version, deleted = excluded.deleted,
                       last_updated = excluded.last_updated, category = excluded.category",
                )
                .bind(pid)
                .bind(&row.rtype)
                .bind(&row.id)
                .bind(version)
                .bind(row.deleted)
                .bind(&row.last_updated)
                .bind(&row.category)
                .bind(*next_seq)
                .execute(&mut *c)
                .await?;
                if cur.is_some() {
                    sqlx::query(
                        "DELETE FROM search_index WHERE patient_id = $1 AND rtype = $2 AND id = $3",
                    )
                    .bind(pid)
                    .bind(&row.rtype)
                    .bind(&row.id)
                    .execute(&mut *c)
                    .await?;
                }
                if !index.is_empty() {
                    let params: Vec<String> = index.iter().map(|i| i.param.clone()).collect();
                    let tokens: Vec<Vec<u8>> = index.iter().map(|i| i.token.clone()).collect();
                    sqlx::query(
                        "INSERT INTO search_index (patient_id, rtype, param, token, id)
                         SELECT $1, $2, p, t, $3 FROM UNNEST($4::text[], $5::bytea[]) AS u(p, t) ON CONFLICT DO NOTHING",
                    )
                    .bind(pid)
                    .bind(&row.rtype)
                    .bind(&row.id)
                    .bind(&params)
                    .bind(&tokens)
                    .execute(&mut *c)
                    .await?;
                }
            }
            Op::PutPatientKey {
                patient,
                key_version,
                master_version,
                wrapped,
            } => {
                sqlx::query("INSERT INTO patient_keys (patient_id, key_version, master_version, wrapped) VALUES ($1, $2, $3, $4)")
                    .bind(patient.as_str())
                    .bind(i64::from(*key_version))
                    .bind(i64::from(*master_version))
                    .bind(wrapped)
                    .execute(&mut *c)
                    .await?;
            }
            Op::PutMetaOnce { key, value } => {
                sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *c)
                    .await?;
            }
            Op::PutMeta { key, value } => {
                sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *c)
                    .await?;
            }
            Op::DeleteMeta { key } => {
                sqlx::query("DELETE FROM meta WHERE key = $1")
                    .bind(key)
                    .execute(&mut *c)
                    .await?;
            }
            Op::RequireMetaListed {
                key,
                member,
                absent,
            } => {
                // FOR SHARE: a rotation step changing the value waits for this batch, and
                // this batch for it, so no write lands under a view the step just retired.
                let v: Option<Vec<u8>> =
                    sqlx::query_scalar("SELECT value FROM meta WHERE key = $1 FOR SHARE")
                        .bind(key)
                        .fetch_optional(&mut *c)
                        .await?;
                crate::meta_lists(v.as_deref(), absent, member).map_err(ApplyError::Store)?;
            }
            Op::AddCosignature { size, line } => {
                let size =
                    i64::try_from(*size).map_err(|_| ApplyError::Store(StoreError::Conflict))?;
                sqlx::query("UPDATE audit_checkpoints SET note = note || $2 WHERE size = $1 AND strpos(note, $2) = 0")
                    .bind(size)
                    .bind(line)
                    .execute(&mut *c)
                    .await?;
            }
            Op::ReplaceIndex {
                rtype,
                id,
                version,
                index,
            } => {
                let cur: Option<(i64, String)> = sqlx::query_as(
                    "SELECT version, patient_id FROM resource_current WHERE rtype = $1 AND id = $2 FOR UPDATE",
                )
                .bind(rtype)
                .bind(id)
                .fetch_optional(&mut *c)
                .await?;
                let Some((cv, pid)) = cur else {
                    return Err(ApplyError::Store(StoreError::NotFound));
                };
                if i64::try_from(*version).ok() != Some(cv) {
                    return Err(ApplyError::Store(StoreError::Conflict));
                }
                sqlx::query(
                    "DELETE FROM search_index WHERE patient_id = $1 AND rtype = $2 AND id = $3",
                )
                .bind(&pid)
                .bind(rtype)
                .bind(id)
                .execute(&mut *c)
                .await?;
                let params: Vec<String> = index.iter().map(|i| i.param.clone()).collect();
                let tokens: Vec<Vec<u8>> = index.iter().map(|i| i.token.clone()).collect();
                sqlx::query(
                    "INSERT INTO search_index (patient_id, rtype, param, token, id)
                     SELECT $1, $2, p, t, $3 FROM UNNEST($4::text[], $5::bytea[]) AS u(p, t) ON CONFLICT DO NOTHING",
                )
                .bind(&pid)
                .bind(rtype)
                .bind(id)
                .bind(&params)
                .bind(&tokens)
                .execute(&mut *c)
                .await?;
            }
            Op::PutTile {
                level,
                index,
                hashes,
            } => {
                let index =
                    i64::try_from(*index).map_err(|_| ApplyError::Store(StoreError::Conflict))?;
                let level =
                    i32::try_from(*level).map_err(|_| ApplyError::Store(StoreError::Conflict))?;
                let stored: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT hashes FROM audit_tiles WHERE level = $1 AND idx = $2",
                )
                .bind(level)
                .bind(index)
                .fetch_optional(&mut *c)
                .await?;
                if crate::tile_grows(stored.as_deref(), hashes).map_err(ApplyError::Store)? {
                    sqlx::query(
                        "INSERT INTO audit_tiles (level, idx, hashes) VALUES ($1, $2, $3) \
                         ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes",
                    )
                    .bind(level)
                    .bind(index)
                    .bind(hashes)
                    .execute(&mut *c)
                    .await?;
                }
            }
            Op::PutCheckpoint { size, note } => {
                let size =
                    i64::try_from(*size).map_err(|_| ApplyError::Store(StoreError::Conflict))?;
                sqlx::query("INSERT INTO audit_checkpoints (size, note) VALUES ($1, $2) ON CONFLICT (size) DO NOTHING")
                    .bind(size)
                    .bind(note)
                    .execute(&mut *c)
                    .await?;
            }
            other => {
                for st in crate::sql::identity(other).unwrap_or_default() {
                    let mut q = sqlx::query(st.sql);
                    for a in st.args {
                        q = bind!(q, a);
                    }
                    let n = q.execute(&mut *c).await?.rows_affected();
                    if st.must == crate::sql::Must::Touch && n == 0 {
                        return Err(ApplyError::Store(StoreError::Conflict));
                    }
                }
            }
        }
    }
    Ok(append_audit(c, &b.audit, next_seq).await?)
}

impl crate::sql::Columns for PgRow {
    type Error = sqlx::Error;
    fn text(&self, i: usize) -> Result<String, sqlx::Error> {
        self.try_get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        self.try_get(i)
    }
    fn patient(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        let p: String = self.try_get(i)?;
        Ok((!p.is_empty()).then_some(p))
    }
    fn int(&self, i: usize) -> Result<i64, sqlx::Error> {
        self.try_get(i)
    }
    fn flag(&self, i: usize) -> Result<bool, sqlx::Error> {
        self.try_get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(i)
    }
}

fn version_row(r: &PgRow) -> Result<Sealed, sqlx::Error> {
    crate::sql::sealed(r)
}

fn user_row(r: &PgRow) -> Result<UserRow, sqlx::Error> {
    crate::sql::user(r)
}

use crate::sql::{
    BREAK_GLASS_COLS, CREDENTIAL_COLS, DESTRUCTION_COLS, GOVERNANCE_COLS, INCIDENT_COLS,
    LEGAL_HOLD_COLS, POLICY_COLS, PORTAL_LINK_COLS, SESSION_COLS, THROTTLE_COLS, USER_COLS,
    VERSION_COLS,
};
use std::sync::LazyLock;

static CURRENT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {VERSION_COLS} FROM resource_current c JOIN resource_versions v
     ON v.patient_id = c.patient_id AND v.rtype = c.rtype AND v.id = c.id AND v.version = c.version
     WHERE c.rtype = $1 AND c.id = $2"
    )
});
static VERSION_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {VERSION_COLS} FROM resource_versions v WHERE v.rtype = $1 AND v.id = $2 AND v.version = $3")
});
static HISTORY_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {VERSION_COLS} FROM resource_versions v WHERE v.rtype = $1 AND v.id = $2 ORDER BY v.version DESC")
});

async fn q_current<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    rtype: &str,
    id: &str,
) -> Result<Option<Sealed>, StoreError> {
    let r = sqlx::query(&CURRENT_SQL)
        .bind(rtype)
        .bind(id)
        .fetch_optional(e)
        .await
        .map_err(classify)?;
    r.map(|r| version_row(&r).map_err(classify)).transpose()
}

async fn q_version<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    rtype: &str,
    id: &str,
    version: u64,
) -> Result<Option<Sealed>, StoreError> {
    let Ok(v) = i64::try_from(version) else {
        return Ok(None);
    };
    let r = sqlx::query(&VERSION_SQL)
        .bind(rtype)
        .bind(id)
        .bind(v)
        .fetch_optional(e)
        .await
        .map_err(classify)?;
    r.map(|r| version_row(&r).map_err(classify)).transpose()
}

async fn q_history<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    rtype: &str,
    id: &str,
) -> Result<Vec<Sealed>, StoreError> {
    let rows = sqlx::query(&HISTORY_SQL)
        .bind(rtype)
        .bind(id)
        .fetch_all(e)
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|r| version_row(r).map_err(classify))
        .collect()
}

async fn q_chart_tokens<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    patient: &PatientId,
    params: &[String],
) -> Result<Vec<IndexHit>, StoreError> {
    let (sql, args) = crate::sql::chart_tokens(patient, params, crate::sql::Dialect::Postgres);
    let mut query = sqlx::query_as::<_, (String, String, String, Vec<u8>)>(&sql);
    for a in args {
        query = bind!(query, a);
    }
    let rows = query.fetch_all(e).await.map_err(classify)?;
    Ok(rows
        .into_iter()
        .map(|(rtype, id, param, token)| IndexHit {
            rtype,
            id,
            param,
            token,
        })
        .collect())
}

async fn q_charts<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
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
        crate::sql::Dialect::Postgres,
    );
    let mut query = sqlx::query_as::<_, (Option<String>, i64)>(&sql);
    for a in args {
        query = bind!(query, a);
    }
    let rows = query.fetch_all(e).await.map_err(classify)?;
    Ok(crate::sql::fold_charts(rows))
}

async fn q_tally<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    q: &SearchQuery,
) -> Result<Vec<(String, u64)>, StoreError> {
    let Some((sql, args)) =
        crate::sql::search(q, crate::sql::Dialect::Postgres, crate::sql::Select::Tally)
    else {
        return Ok(vec![]);
    };
    let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
    for a in args {
        query = bind!(query, a);
    }
    let rows = query.fetch_all(e).await.map_err(classify)?;
    Ok(rows
        .into_iter()
        .map(|(c, n)| (c, u64::try_from(n).unwrap_or(0)))
        .collect())
}

async fn q_search<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    q: &SearchQuery,
) -> Result<SearchPage, StoreError> {
    let Some((sql, args)) =
        crate::sql::search(q, crate::sql::Dialect::Postgres, crate::sql::Select::Rows)
    else {
        return Ok(SearchPage::default());
    };
    let mut query = sqlx::query(&sql);
    for a in args {
        query = bind!(query, a);
    }
    let rows = query.fetch_all(e).await.map_err(classify)?;
    let mut rows = rows
        .iter()
        .map(|r| version_row(r).map_err(classify))
        .collect::<Result<Vec<_>, _>>()?;
    let more = rows.len() > q.limit;
    rows.truncate(q.limit);
    Ok(SearchPage { rows, more })
}

/// Reads inside the writer's transaction.
struct PgTx<'a, 'c> {
    rt: &'a tokio::runtime::Runtime,
    conn: std::cell::RefCell<&'c mut PgConnection>,
    /// The audit log's length when this read runs (the sequencer's next number).
    len: u64,
}

impl TxRead for PgTx<'_, '_> {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_current(&mut **c, rtype, id))
    }
    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_version(&mut **c, rtype, id, version))
    }
    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_history(&mut **c, rtype, id))
    }
    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_search(&mut **c, q))
    }
    fn tally(&self, q: &SearchQuery) -> Result<Vec<(String, u64)>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_tally(&mut **c, q))
    }
    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt
            .block_on(q_charts(&mut **c, care_tokens, username, now, patient))
    }
    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError> {
        let mut c = self.conn.borrow_mut();
        self.rt.block_on(q_chart_tokens(&mut **c, patient, params))
    }
    fn audit_len(&self) -> u64 {
        self.len
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn audited(&self, read: AuditedRead) -> Result<Payload, StoreError> {
        self.writer.audited(read)
    }

    fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        self.writer.commit(batch)
    }

    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
        self.rt.block_on(q_current(&self.pool, rtype, id))
    }

    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError> {
        self.rt.block_on(q_version(&self.pool, rtype, id, version))
    }

    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
        self.rt.block_on(q_history(&self.pool, rtype, id))
    }

    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.rt.block_on(q_search(&self.pool, q))
    }

    fn patient_key(&self, patient: &PatientId) -> Result<Option<WrappedKey>, StoreError> {
        let r: Option<(i64, i64, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as("SELECT key_version, master_version, wrapped FROM patient_keys WHERE patient_id = $1 ORDER BY key_version DESC LIMIT 1")
                    .bind(patient.as_str())
                    .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        Ok(r.map(|(v, m, w)| WrappedKey {
            key_version: u32::try_from(v).unwrap_or(0),
            master_version: u32::try_from(m).unwrap_or(0),
            wrapped: w,
        }))
    }

    fn dump(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        use crate::dump::{Encoder, Kind, Value, TABLES};
        use futures_util::TryStreamExt;
        self.rt.block_on(async {
            // One snapshot for every table, while writers go on (rolled back if dropped).
            let mut conn = self.pool.begin().await.map_err(classify)?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
            let mut enc = Encoder::new(out);
            for t in TABLES {
                enc.table(t)?;
                let sql = crate::dump::select_sql(t, true);
                let mut rows = sqlx::query(&sql).fetch(&mut *conn);
                while let Some(r) = rows.try_next().await.map_err(classify)? {
                    let mut v = Vec::with_capacity(t.cols.len());
                    for (i, (_, k)) in t.cols.iter().enumerate() {
                        v.push(match k {
                            Kind::Int => Value::Int(r.try_get(i).map_err(classify)?),
                            Kind::Text => Value::Text(r.try_get(i).map_err(classify)?),
                            Kind::Bytes => Value::Bytes(r.try_get(i).map_err(classify)?),
                            Kind::Bool => Value::Bool(r.try_get(i).map_err(classify)?),
                            Kind::OptText | Kind::Patient => r
                                .try_get::<Option<String>, _>(i)
                                .map_err(classify)?
                                .map_or(Value::Null, Value::Text),
                        });
                    }
                    let cells: Vec<crate::dump::Cell<'_>> = v.iter().map(Value::cell).collect();
                    enc.row(&cells)?;
                }
            }
            conn.commit().await.map_err(classify)?;
            enc.end()
        })
    }

    fn load(&self, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
        let mut first = [0u8; 1];
        input
            .read_exact(&mut first)
            .map_err(|_| StoreError::Backend("not a medvault dump: empty".into()))?;
        let mut input = std::io::Read::chain(&first[..], input);
        if first == [crate::dump::IMAGE_TAG] {
            // A SQLite page image: restored to a temporary file, then loaded row by row.
            return crate::sqlite::through_logical_dump(&mut input, &mut |rows| {
                self.load_rows(rows)
            });
        }
        self.load_rows(&mut input)
    }

    fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let rows: Vec<(String, i64)> = self
            .rt
            .block_on(sqlx::query_as(crate::dump::CENSUS_SQL).fetch_all(&self.pool))
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, n.max(0).unsigned_abs()))
            .collect())
    }

    fn chart_versions(&self, patient: &PatientId) -> Result<Vec<Sealed>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {VERSION_COLS} FROM resource_versions v {}",
                    crate::sql::CHART_VERSIONS_SQL
                ))
                .bind(patient.as_str())
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| version_row(r).map_err(classify))
            .collect()
    }

    fn patient_keys(&self, patient: &PatientId) -> Result<Vec<WrappedKey>, StoreError> {
        let rows: Vec<(i64, i64, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as(crate::sql::PATIENT_KEYS_SQL)
                    .bind(patient.as_str())
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(v, m, w)| WrappedKey {
                key_version: u32::try_from(v).unwrap_or(0),
                master_version: u32::try_from(m).unwrap_or(0),
                wrapped: w,
            })
            .collect())
    }

    fn keys_wrapped_below(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(PatientId, WrappedKey)>, StoreError> {
        let rows: Vec<(String, i64, i64, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as(crate::sql::KEYS_BELOW_SQL)
                    .bind(i64::from(master_version))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .filter_map(|(p, v, m, w)| {
                PatientId::new(&p).ok().map(|p| {
                    (
                        p,
                        WrappedKey {
                            key_version: u32::try_from(v).unwrap_or(0),
                            master_version: u32::try_from(m).unwrap_or(0),
                            wrapped: w,
                        },
                    )
                })
            })
            .collect())
    }

    fn master_key_census(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let rows: Vec<(i64, i64)> = self
            .rt
            .block_on(sqlx::query_as(crate::sql::MASTER_CENSUS_SQL).fetch_all(&self.pool))
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(v, n)| (u32::try_from(v).unwrap_or(0), n.max(0).unsigned_abs()))
            .collect())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.rt
            .block_on(
                sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool),
            )
            .map_err(classify)
    }

    fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let r = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {USER_COLS} FROM users WHERE username = $1"
                ))
                .bind(username)
                .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        r.map(|r| user_row(&r).map_err(classify)).transpose()
    }

    fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!("SELECT {USER_COLS} FROM users ORDER BY username"))
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter().map(|r| user_row(r).map_err(classify)).collect()
    }

    fn session(&self, token_hash: &[u8]) -> Result<Option<SessionRow>, StoreError> {
        let r = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE token_hash = $1"
                ))
                .bind(token_hash)
                .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        r.map(|r| crate::sql::session(&r).map_err(classify))
            .transpose()
    }

    fn sessions_of(&self, username: &str) -> Result<Vec<SessionRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE username = $1 ORDER BY created DESC"
                ))
                .bind(username)
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::session(r).map_err(classify))
            .collect()
    }

    fn throttle(&self, keys: &[Vec<u8>]) -> Result<Vec<ThrottleRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {THROTTLE_COLS} FROM login_throttle WHERE key = ANY($1)"
                ))
                .bind(keys)
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::throttle(r).map_err(classify))
            .collect()
    }

    fn credential(&self, kind: &str, id: &[u8]) -> Result<Option<CredentialRow>, StoreError> {
        let r = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {CREDENTIAL_COLS} FROM credentials WHERE kind = $1 AND id = $2"
                ))
                .bind(kind)
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        r.map(|r| crate::sql::credential(&r).map_err(classify))
            .transpose()
    }

    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError> {
        self.rt
            .block_on(q_charts(&self.pool, care_tokens, username, now, patient))
    }

    fn break_glass(&self) -> Result<Vec<BreakGlassRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {BREAK_GLASS_COLS} FROM break_glass ORDER BY created DESC, id"
                ))
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        let rows = rows
            .iter()
            .map(|r| crate::sql::break_glass(r).map_err(classify))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().flatten().collect())
    }

    fn legal_holds(&self, patient: Option<&PatientId>) -> Result<Vec<LegalHoldRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {LEGAL_HOLD_COLS} FROM legal_holds WHERE $1::TEXT IS NULL OR patient_id = $1 ORDER BY set_at DESC, id"
                ))
                .bind(patient.map(PatientId::as_str))
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        let rows = rows
            .iter()
            .map(|r| crate::sql::legal_hold(r).map_err(classify))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().flatten().collect())
    }

    fn destructions(&self) -> Result<Vec<DestructionRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {DESTRUCTION_COLS} FROM destructions ORDER BY requested_at DESC, id"
                ))
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        let rows = rows
            .iter()
            .map(|r| crate::sql::destruction(r).map_err(classify))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().flatten().collect())
    }

    fn chart_census(&self, patient: &PatientId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let rows: Vec<(String, i64, i64)> = self
            .rt
            .block_on(
                sqlx::query_as(crate::sql::CENSUS_SQL)
                    .bind(patient.as_str())
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(t, a, b)| (t, a.max(0).unsigned_abs(), b.max(0).unsigned_abs()))
            .collect())
    }

    fn portal_links(&self, username: &str) -> Result<Vec<PortalLinkRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {PORTAL_LINK_COLS} FROM portal_links WHERE username = $1 ORDER BY linked_at, patient_id"
                ))
                .bind(username)
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        let rows = rows
            .iter()
            .map(|r| crate::sql::portal_link(r).map_err(classify))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().flatten().collect())
    }

    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError> {
        self.rt
            .block_on(q_chart_tokens(&self.pool, patient, params))
    }

    fn policies(&self) -> Result<Vec<PolicyRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {POLICY_COLS} FROM policies ORDER BY version DESC"
                ))
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::policy(r).map_err(classify))
            .collect()
    }

    fn incidents(&self) -> Result<Vec<IncidentRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {INCIDENT_COLS} FROM incidents ORDER BY opened_at DESC, id"
                ))
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::incident(r).map_err(classify))
            .collect()
    }

    fn governance(&self, kind: &str) -> Result<Vec<GovernanceRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {GOVERNANCE_COLS} FROM governance WHERE kind = $1 ORDER BY at DESC, id"
                ))
                .bind(kind)
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::governance(r).map_err(classify))
            .collect()
    }

    fn governance_record(&self, kind: &str, id: &str) -> Result<Option<GovernanceRow>, StoreError> {
        let row = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {GOVERNANCE_COLS} FROM governance WHERE kind = $1 AND id = $2"
                ))
                .bind(kind)
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        row.map(|r| crate::sql::governance(&r).map_err(classify))
            .transpose()
    }

    fn credentials(&self, username: &str, kind: &str) -> Result<Vec<CredentialRow>, StoreError> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(&format!(
                    "SELECT {CREDENTIAL_COLS} FROM credentials WHERE username = $1 AND kind = $2 ORDER BY created, id"
                ))
                .bind(username)
                .bind(kind)
                .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        rows.iter()
            .map(|r| crate::sql::credential(r).map_err(classify))
            .collect()
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .rt
            .block_on(
                sqlx::query_scalar("SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_log")
                    .fetch_one(&self.pool),
            )
            .map_err(classify)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn audit_range(&self, start: u64, end: u64) -> Result<Vec<AuditRow>, StoreError> {
        let s = i64::try_from(start).unwrap_or(i64::MAX);
        let e = i64::try_from(end).unwrap_or(i64::MAX);
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as("SELECT seq, leaf_hash, record FROM audit_log WHERE seq >= $1 AND seq < $2 ORDER BY seq")
                    .bind(s)
                    .bind(e)
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(seq, leaf_hash, record)| AuditRow {
                seq: u64::try_from(seq).unwrap_or(0),
                leaf_hash,
                record,
            })
            .collect())
    }

    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, StoreError> {
        let size = size.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        let row: Option<(i64, String)> = self
            .rt
            .block_on(
                sqlx::query_as(
                    "SELECT size, note FROM audit_checkpoints WHERE $1::bigint IS NULL OR size = $1 ORDER BY size DESC LIMIT 1",
                )
                .bind(size)
                .fetch_optional(&self.pool),
            )
            .map_err(classify)?;
        Ok(row.map(|(s, n)| (u64::try_from(s).unwrap_or(0), n)))
    }

    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let level = i32::try_from(level).unwrap_or(i32::MAX);
        let s = i64::try_from(start).unwrap_or(i64::MAX);
        let e = i64::try_from(end).unwrap_or(i64::MAX);
        let rows: Vec<(i64, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as("SELECT idx, hashes FROM audit_tiles WHERE level = $1 AND idx >= $2 AND idx < $3 ORDER BY idx")
                    .bind(level)
                    .bind(s)
                    .bind(e)
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(i, h)| (u64::try_from(i).unwrap_or(0), h))
            .collect())
    }

    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let level = i32::try_from(level).unwrap_or(i32::MAX);
        let idx: Vec<i64> = indexes
            .iter()
            .filter_map(|&i| i64::try_from(i).ok())
            .collect();
        let rows: Vec<(i64, Vec<u8>)> = self
            .rt
            .block_on(
                sqlx::query_as("SELECT idx, hashes FROM audit_tiles WHERE level = $1 AND idx = ANY($2) ORDER BY idx")
                    .bind(level)
                    .bind(&idx)
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(i, h)| (u64::try_from(i).unwrap_or(0), h))
            .collect())
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let rows: Vec<(i64, String)> = self
            .rt
            .block_on(
                sqlx::query_as("SELECT size, note FROM audit_checkpoints ORDER BY size")
                    .fetch_all(&self.pool),
            )
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(s, n)| (u64::try_from(s).unwrap_or(0), n))
            .collect())
    }

    fn announce_key_eviction(&self, patient: &PatientId) -> Result<(), StoreError> {
        self.rt
            .block_on(
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(NOTIFY_CHANNEL)
                    .bind(patient.as_str())
                    .execute(&self.pool),
            )
            .map(|_| ())
            .map_err(classify)
    }

    fn on_key_eviction(&self, f: Box<dyn Fn(&PatientId) + Send + Sync>) {
        if let Ok(mut l) = self.listeners.lock() {
            l.push(f);
        }
    }
}
