//! The storage conformance suite. Every backend runs it (after akd's
//! `run_test_cases_for_storage_impl`): `run_all(|| fresh_store())?`.
//! A case fails with an error naming the broken guarantee: a failed assertion panics with
//! its message (as tests do), and a store call that errs or returns nothing is a
//! [`Failure`] naming the case's step.

use std::sync::Arc;

use medvault_types::PatientId;

use crate::*;

/// A case that could not run to its assertions: a store call failed, or returned nothing
/// where the guarantee says it must return a row.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("store call failed: {0}")]
    Store(#[from] StoreError),
    #[error("expected {0}, found nothing")]
    Missing(&'static str),
    #[error("a writer thread of the case stopped")]
    Thread,
}

/// `Option` → [`Failure::Missing`] naming what was expected.
trait Found<T> {
    fn found(self, what: &'static str) -> Result<T, Failure>;
}

impl<T> Found<T> for Option<T> {
    fn found(self, what: &'static str) -> Result<T, Failure> {
        self.ok_or(Failure::Missing(what))
    }
}

/// Runs every case, each on a fresh store from `make`.
///
/// # Errors
/// The first [`Failure`]; a broken guarantee panics with its assertion message.
pub fn run_all(make: &dyn Fn() -> Arc<dyn Store>) -> Result<(), Failure> {
    versions_are_appended_never_overwritten(&*make())?;
    preconditions_guard_writes(&*make())?;
    batches_are_all_or_nothing(&*make())?;
    audit_sequence_is_dense_under_concurrency(make())?;
    search_by_tokens_patient_and_paging(&*make())?;
    identity_rows(&*make())?;
    throttles_challenges_and_credentials(&*make())?;
    keys_and_meta_insert_once(&*make())?;
    audited_reads_commit_with_their_audit_entries(&*make())?;
    checkpoints_are_kept_and_cosigned(&*make())?;
    hash_tiles_only_grow(&*make())?;
    snapshots_keysets_tallies_and_reindex(&*make())?;
    care_relationships_and_break_glass(&*make())?;
    privacy_rows_restrict_searches(&*make())?;
    policy_versions_need_a_second_approver(&*make())?;
    portal_links_reach_charts(&*make())?;
    destruction_shreds_one_chart_under_two_people_and_holds(&*make())?;
    dumps_load_into_a_fresh_store_alike(&*make(), &*make(), &*make())?;
    reencryption_replaces_a_version_and_keys_keep_their_versions(&*make())?;
    Ok(())
}

/// A data key rotation re-encrypts a chart's versions in place of themselves (nothing else
/// changes; a missing version is a `Conflict`), and the chart keeps every key version.
pub fn reencryption_replaces_a_version_and_keys_keep_their_versions(
    s: &dyn Store,
) -> Result<(), Failure> {
    for v in [1, 2] {
        one(
            s,
            Op::PutPatientKey {
                patient: pid("p1"),
                key_version: v,
                master_version: 1,
                wrapped: vec![v as u8],
            },
        )?;
    }
    put(
        s,
        row("Patient", "p1", 1, "p1", b"old"),
        Expect::Absent,
        vec![],
    )?;
    put(
        s,
        row("Patient", "p1", 2, "p1", b"old2"),
        Expect::Version(1),
        vec![],
    )?;
    put(
        s,
        row("Patient", "p2", 1, "p2", b"other"),
        Expect::Absent,
        vec![],
    )?;
    let versions = s.chart_versions(&pid("p1"))?;
    assert_eq!(versions.len(), 2);
    let mut r = VersionRow::from(versions.first().found("version 1")?.clone());
    r.body = b"new".to_vec();
    r.key_version = 2;
    one(s, Op::ReencryptVersion(r.clone()))?;
    let back = s
        .version("Patient", "p1", 1)?
        .found("re-encrypted version")?;
    assert_eq!((back.ciphertext(), back.key_version()), (&b"new"[..], 2));
    assert_eq!(
        s.current("Patient", "p1")?.found("current")?.version(),
        2,
        "the pointer stays"
    );
    r.version = 9;
    assert!(matches!(
        one(s, Op::ReencryptVersion(r)),
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.chart_versions(&pid("p2"))?.len(),
        1,
        "other charts untouched"
    );
    let keys: Vec<u32> = s
        .patient_keys(&pid("p1"))?
        .iter()
        .map(|k| k.key_version)
        .collect();
    assert_eq!(keys, [2, 1]);
    Ok(())
}

/// A dump carries every durable table and loads, all-or-nothing, into a fresh store of any
/// backend, which then dumps to the same bytes; a store holding anything refuses a load.
pub fn dumps_load_into_a_fresh_store_alike(
    s: &dyn Store,
    fresh: &dyn Store,
    third: &dyn Store,
) -> Result<(), Failure> {
    first_key(s, "p1")?;
    one(
        s,
        Op::PutMetaOnce {
            key: "k".into(),
            value: vec![0, 255],
        },
    )?;
    put(
        s,
        row("Patient", "p1", 1, "p1", b"x"),
        Expect::Absent,
        vec![ix("name", b"n")],
    )?;
    put(
        s,
        row("Patient", "p1", 2, "p1", b"y"),
        Expect::Version(1),
        vec![],
    )?;
    let mut dir = row("Practitioner", "dr", 1, "p1", b"d");
    dir.patient = None;
    put(s, dir, Expect::Absent, vec![])?;
    one(
        s,
        Op::PutCheckpoint {
            size: 1,
            note: "cp".into(),
        },
    )?;
    let mut first = vec![];
    let stats = s.dump(&mut first)?;
    assert_eq!(stats.audit_entries, 3);
    assert_eq!(stats.resources.get("Patient"), Some(&1));
    assert_eq!(stats.resources.get("Practitioner"), Some(&1));
    assert_eq!(stats.rows.get("resource_versions"), Some(&3));
    assert_eq!(stats.bytes, first.len() as u64);
    let loaded = fresh.load(&mut first.as_slice())?;
    assert_eq!(loaded.rows, stats.rows);
    assert_eq!(fresh.census()?, s.census()?);
    assert_eq!(fresh.history("Patient", "p1")?.len(), 2);
    assert!(fresh
        .current("Practitioner", "dr")?
        .is_some_and(|r| r.patient().is_none()));
    assert_eq!(fresh.audit_len()?, 3);
    let mut second = vec![];
    fresh.dump(&mut second)?;
    assert!(second == first, "the same store dumps to the same bytes");
    assert!(matches!(
        fresh.load(&mut first.as_slice()),
        Err(StoreError::Exists)
    ));
    // A cut dump loads nothing: the store stays fresh, and takes the whole dump after.
    let mut cut = first.get(..first.len() - 1).found("a dump less its end")?;
    assert!(third.load(&mut cut).is_err());
    assert_eq!(third.audit_len()?, 0);
    assert!(third.census()?.is_empty());
    third.load(&mut first.as_slice())?;
    assert_eq!(third.audit_len()?, 3);
    Ok(())
}

/// A SQLite snapshot is a page image (`dump` module docs): its counts equal a logical
/// dump's; it restores, under a temporary name renamed into place, to a store that dumps
/// to the same bytes as the original and holds no sessions; a cut or damaged image leaves
/// nothing at the target; a target holding data refuses it; and `pg` (a fresh PostgreSQL
/// store, when one is given) loads it with the same records.
///
/// # Errors
/// A store call failed.
pub fn page_images_restore_whole(
    dir: &std::path::Path,
    pg: Option<&dyn Store>,
) -> Result<(), Failure> {
    let s = SqliteStore::open(&dir.join("source.db"))?;
    first_key(&*s, "p1")?;
    for v in 1..=3 {
        put(
            &*s,
            row("Observation", &format!("o{v}"), 1, "p1", &[v as u8; 3000]),
            Expect::Absent,
            vec![ix("code", b"c")],
        )?;
    }
    one(
        &*s,
        Op::PutSession(SessionRow {
            token_hash: vec![7; 32],
            kind: "session".into(),
            username: "u".into(),
            created: 1,
            last_seen: 1,
            expires: i64::MAX,
            attempts: 0,
            mfa_at: 0,
            source: "127.0.0.1".into(),
            method: "password+totp".into(),
            scope: String::new(),
        }),
    )?;
    let mut logical = vec![];
    let dumped = s.dump(&mut logical)?;
    let mut image = vec![];
    let imaged = s.snapshot(&mut image)?;
    assert_eq!(
        image.first(),
        Some(&crate::dump::IMAGE_TAG),
        "SQLite snapshots a page image"
    );
    assert_eq!(imaged.bytes, image.len() as u64);
    assert_eq!(
        (
            &imaged.rows,
            &imaged.resources,
            imaged.audit_entries,
            &imaged.newest_write
        ),
        (
            &dumped.rows,
            &dumped.resources,
            dumped.audit_entries,
            &dumped.newest_write
        ),
        "a page image counts what a logical dump counts"
    );
    assert_eq!(crate::dump::check(&mut image.as_slice())?, imaged);
    let restored = dir.join("restored.db");
    let stats = SqliteStore::restore(&restored, &mut image.as_slice())?;
    assert_eq!(stats, imaged);
    assert!(!dir.join("restored.db.restoring").exists());
    let r = SqliteStore::open(&restored)?;
    let mut again = vec![];
    r.dump(&mut again)?;
    assert!(
        again == logical,
        "the restored store dumps to the original's bytes"
    );
    assert!(
        r.session(&[7; 32])?.is_none(),
        "a restore revives no session"
    );
    assert!(matches!(
        SqliteStore::restore(&restored, &mut image.as_slice()),
        Err(StoreError::Exists)
    ));
    // Cut anywhere, nothing is left at the target (a damaged page is the backup layer's
    // to catch: every chunk is authenticated).
    let len = image.len();
    for (n, bad) in [
        image
            .get(..len - 1)
            .found("an image less its end")?
            .to_vec(),
        image.get(..len / 2).found("half an image")?.to_vec(),
        image.get(..40).found("an image's header")?.to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let to = dir.join(format!("cut{n}.db"));
        assert!(SqliteStore::restore(&to, &mut bad.as_slice()).is_err());
        assert!(!to.exists(), "a cut image leaves no database");
        assert!(!dir.join(format!("cut{n}.db.restoring")).exists());
    }
    if let Some(pg) = pg {
        let loaded = pg.load(&mut image.as_slice())?;
        assert_eq!(loaded.rows, dumped.rows);
        assert_eq!(pg.census()?, s.census()?);
        assert!(pg.session(&[7; 32])?.is_none());
        assert_eq!(pg.audit_len()?, s.audit_len()?);
        assert!(pg
            .current("Observation", "o2")?
            .is_some_and(|v| v.ciphertext() == [2u8; 3000]));
    }
    Ok(())
}

/// A destruction request needs a second person to complete; an active legal hold blocks
/// the request and its completion (checked in the shredding's own transaction); shredding
/// removes one chart's keys, versions, pointers, tokens, grants and links and nothing of
/// any other chart.
pub fn destruction_shreds_one_chart_under_two_people_and_holds(
    s: &dyn Store,
) -> Result<(), Failure> {
    for p in ["p1", "p2"] {
        first_key(s, p)?;
        put(
            s,
            row("Patient", p, 1, p, b"x"),
            Expect::Absent,
            vec![ix("name", b"n")],
        )?;
        put(s, row("Patient", p, 2, p, b"y"), Expect::Version(1), vec![])?;
        put(
            s,
            row("Observation", &format!("o-{p}"), 1, p, b"z"),
            Expect::Absent,
            vec![],
        )?;
        one(
            s,
            Op::PutPortalLink(PortalLinkRow {
                username: format!("u-{p}"),
                patient: pid(p),
                kind: "self".into(),
                evidence: "id".into(),
                linked_by: "fd".into(),
                linked_at: 1,
            }),
        )?;
    }
    assert_eq!(
        s.chart_census(&pid("p1"))?,
        [
            ("Observation".to_owned(), 1, 1),
            ("Patient".to_owned(), 1, 2)
        ]
    );
    let hold = LegalHoldRow {
        id: "h1".into(),
        patient: pid("p1"),
        matter: "2026-CV-114".into(),
        reason: vec![9],
        set_by: "admin".into(),
        set_at: 5,
        released_by: String::new(),
        released_at: 0,
    };
    one(s, Op::PutLegalHold(hold.clone()))?;
    let request = |id: &str, by: &str| {
        one(
            s,
            Op::RequestDestruction(DestructionRow {
                id: id.into(),
                patient: pid("p1"),
                reason: "retention-period-ended".into(),
                status: String::new(),
                requested_by: by.into(),
                requested_at: 10,
                approved_by: String::new(),
                approved_at: 0,
                records: String::new(),
                audit_seq: -1,
                checkpoint: 0,
            }),
        )
    };
    assert!(
        matches!(request("d0", "alice"), Err(StoreError::Conflict)),
        "a hold blocks the request"
    );
    one(
        s,
        Op::ReleaseLegalHold {
            id: "h1".into(),
            released_by: "admin".into(),
            released_at: 6,
        },
    )?;
    assert!(matches!(
        one(
            s,
            Op::ReleaseLegalHold {
                id: "h1".into(),
                released_by: "admin".into(),
                released_at: 7,
            }
        ),
        Err(StoreError::Conflict)
    ));
    request("d1", "alice")?;
    assert!(
        matches!(request("d2", "bob"), Err(StoreError::Conflict)),
        "one pending request per chart"
    );
    let complete = |by: &str| {
        s.commit(WriteBatch {
            ops: vec![
                Op::CompleteDestruction {
                    id: "d1".into(),
                    approved_by: by.into(),
                    approved_at: 20,
                    records: "Patient=1/2".into(),
                },
                Op::ShredPatient { patient: pid("p1") },
                Op::RemoveShredded { patient: pid("p1") },
            ],
            audit: vec![(vec![1], b"destroy".to_vec())],
        })
    };
    assert!(
        matches!(complete("alice"), Err(StoreError::Conflict)),
        "not by the requester"
    );
    // A hold placed after the request still wins, in the shredding's own transaction.
    one(
        s,
        Op::PutLegalHold(LegalHoldRow {
            id: "h2".into(),
            ..hold
        }),
    )?;
    assert!(matches!(complete("bob"), Err(StoreError::Conflict)));
    assert!(s.patient_key(&pid("p1"))?.is_some(), "nothing shredded");
    one(
        s,
        Op::ReleaseLegalHold {
            id: "h2".into(),
            released_by: "admin".into(),
            released_at: 8,
        },
    )?;
    let before = s.audit_len()?;
    complete("bob")?;
    assert_eq!(s.audit_len()?, before + 1);
    assert!(s.patient_key(&pid("p1"))?.is_none(), "key shredded");
    assert!(s.current("Patient", "p1")?.is_none());
    assert!(s.history("Patient", "p1")?.is_empty(), "every version gone");
    assert!(s.current("Observation", "o-p1")?.is_none());
    assert!(s.chart_census(&pid("p1"))?.is_empty());
    assert!(s.portal_links("u-p1")?.is_empty());
    assert!(s
        .search(&SearchQuery {
            tokens: vec![("name".into(), vec![b"n".to_vec()])],
            rtype: Some("Patient".into()),
            limit: 10,
            ..Default::default()
        })?
        .rows
        .iter()
        .all(|r| r.id() == "p2"));
    // The other chart is untouched.
    assert!(s.patient_key(&pid("p2"))?.is_some());
    assert_eq!(s.history("Patient", "p2")?.len(), 2);
    assert_eq!(s.portal_links("u-p2")?.len(), 1);
    one(
        s,
        Op::SetDestructionEvidence {
            id: "d1".into(),
            audit_seq: i64::try_from(before).unwrap_or(0),
            checkpoint: 99,
        },
    )?;
    let d = s
        .destructions()?
        .into_iter()
        .next()
        .found("destruction d1")?;
    assert_eq!(
        (
            d.status.as_str(),
            d.approved_by.as_str(),
            d.records.as_str(),
            d.checkpoint
        ),
        ("completed", "bob", "Patient=1/2", 99)
    );
    assert!(
        matches!(complete("carol"), Err(StoreError::Conflict)),
        "completed once"
    );
    assert_eq!(s.legal_holds(Some(&pid("p1")))?.len(), 2);
    assert!(s.legal_holds(Some(&pid("p2")))?.is_empty());
    Ok(())
}

/// Portal accounts reach the charts they are linked to — their own and, as proxies,
/// others' — in `charts` and in search scopes; a link is made once.
pub fn portal_links_reach_charts(s: &dyn Store) -> Result<(), Failure> {
    let link = |p: &str, kind: &str| {
        one(
            s,
            Op::PutPortalLink(PortalLinkRow {
                username: "pat".into(),
                patient: pid(p),
                kind: kind.into(),
                evidence: "government-photo-id".into(),
                linked_by: "desk".into(),
                linked_at: 5,
            }),
        )
    };
    link("p5", "self")?;
    link("p6", "guardian")?;
    assert!(matches!(link("p5", "self"), Err(StoreError::Exists)));
    let mut reach = s.charts(&[], "pat", 1, None)?;
    reach.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(reach, [(pid("p5"), Reach::Own), (pid("p6"), Reach::Proxy)]);
    assert_eq!(
        s.charts(&[], "pat", 1, Some(&pid("p6")))?,
        [(pid("p6"), Reach::Proxy)]
    );
    assert_eq!(s.portal_links("pat")?.len(), 2);
    let unlink = || {
        one(
            s,
            Op::DeletePortalLink {
                username: "pat".into(),
                patient: pid("p6"),
            },
        )
    };
    unlink()?;
    assert!(matches!(unlink(), Err(StoreError::Conflict)));
    assert_eq!(s.charts(&[], "pat", 1, None)?, [(pid("p5"), Reach::Own)]);
    link("p6", "guardian")?;
    for p in ["p5", "p6", "p7"] {
        put(
            s,
            row("Observation", &format!("o{p}"), 1, p, b"o"),
            Expect::Absent,
            vec![],
        )?;
    }
    let q = |kinds: &[&str]| -> Result<Vec<String>, Failure> {
        let q = SearchQuery {
            scopes: vec![(
                vec!["vitals".into()],
                Charts::Links {
                    username: "pat".into(),
                    kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
                },
            )],
            limit: 10,
            ..Default::default()
        };
        let mut ids: Vec<String> = s
            .search(&q)?
            .rows
            .iter()
            .map(|r| r.id().to_owned())
            .collect();
        ids.sort();
        Ok(ids)
    };
    assert_eq!(q(&["self"])?, ["op5"]);
    assert_eq!(q(&["guardian", "caregiver"])?, ["op6"]);
    Ok(())
}

/// Policy versions: proposed, put in force only by someone other than the proposer, the
/// version in force superseded; a version is proposed and approved once.
pub fn policy_versions_need_a_second_approver(s: &dyn Store) -> Result<(), Failure> {
    let propose = |v: i64, by: &str| {
        one(
            s,
            Op::ProposePolicy(PolicyRow {
                version: v,
                text: format!("// v{v}"),
                proposed_by: by.into(),
                proposed_at: 10 * v,
                status: String::new(),
                approved_by: String::new(),
                approved_at: 0,
            }),
        )
    };
    let approve = |v: i64, by: &str| {
        one(
            s,
            Op::ApprovePolicy {
                version: v,
                approved_by: by.into(),
                approved_at: 100 + v,
            },
        )
    };
    let status = || -> Result<Vec<(i64, String)>, Failure> {
        Ok(s.policies()?
            .into_iter()
            .map(|p| (p.version, p.status))
            .collect())
    };
    propose(1, "alice")?;
    assert!(matches!(propose(1, "bob"), Err(StoreError::Exists)));
    assert!(
        matches!(approve(1, "alice"), Err(StoreError::Conflict)),
        "not by its proposer"
    );
    assert_eq!(status()?, [(1, "proposed".to_owned())]);
    approve(1, "bob")?;
    propose(2, "bob")?;
    assert!(matches!(approve(2, "bob"), Err(StoreError::Conflict)));
    assert_eq!(
        status()?,
        [(2, "proposed".to_owned()), (1, "active".to_owned())],
        "nothing changed"
    );
    approve(2, "alice")?;
    assert_eq!(
        status()?,
        [(2, "active".to_owned()), (1, "superseded".to_owned())]
    );
    assert!(
        matches!(approve(2, "carol"), Err(StoreError::Conflict)),
        "approved once"
    );
    let v2 = s.policies()?.into_iter().next().found("policy v2")?;
    assert_eq!(
        (v2.approved_by.as_str(), v2.approved_at, v2.text.as_str()),
        ("alice", 102, "// v2")
    );
    Ok(())
}

/// What labels and consents need: `chart_tokens` finds a chart's privacy rows, and a
/// search's [`Privacy`] leaves out labelled resources without a grant (their own label or
/// their Patient's), what a consent denies by category or label, and nothing else.
pub fn privacy_rows_restrict_searches(s: &dyn Store) -> Result<(), Failure> {
    let mut patient = row("Patient", "p1", 1, "p1", b"p");
    patient.category = "demographics".into();
    put(s, patient.clone(), Expect::Absent, vec![])?;
    put(
        s,
        row("Observation", "oa", 1, "p1", b"a"),
        Expect::Absent,
        vec![],
    )?;
    put(
        s,
        row("Observation", "ob", 1, "p1", b"b"),
        Expect::Absent,
        vec![ix("_label", b"L-HIV")],
    )?;
    put(
        s,
        row("Observation", "oz", 1, "p2", b"z"),
        Expect::Absent,
        vec![ix("_label", b"L-HIV")],
    )?;
    let consent = |id: &str, index: Vec<IndexRow>| -> Result<Committed, StoreError> {
        let mut c = row("Consent", id, 1, "p1", b"c");
        c.category = "demographics".into();
        put(s, c, Expect::Absent, index)
    };
    let pv = Privacy {
        deny_params: vec!["_deny.dr".into(), "_deny.*".into()],
        grant_params: vec!["_grant.dr".into(), "_grant.*".into()],
        category_tokens: vec![
            ("vitals".into(), b"T-vitals".to_vec()),
            ("demographics".into(), b"T-demo".to_vec()),
        ],
        everything_token: b"T-all".to_vec(),
        exempt: None,
        ignored_labels: vec![],
    };
    let found = |privacy: Option<Privacy>| -> Result<Vec<String>, Failure> {
        let q = SearchQuery {
            privacy,
            limit: 50,
            ..Default::default()
        };
        let mut ids: Vec<String> = s
            .search(&q)?
            .rows
            .iter()
            .map(|r| r.id().to_owned())
            .collect();
        ids.sort();
        Ok(ids)
    };
    assert_eq!(
        found(None)?,
        ["oa", "ob", "oz", "p1"],
        "no privacy, no restriction"
    );
    assert_eq!(
        found(Some(pv.clone()))?,
        ["oa", "p1"],
        "labelled resources need a grant"
    );
    consent("c1", vec![ix("_grant.nurse", b"L-HIV")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "oa", "p1"],
        "another actor's grant"
    );
    consent("c2", vec![ix("_grant.dr", b"L-HIV")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "c2", "oa", "ob", "p1"],
        "granted in its chart only"
    );
    consent("c3", vec![ix("_deny.*", b"L-HIV")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "c2", "c3", "oa", "p1"],
        "a deny beats a grant"
    );
    consent("c4", vec![ix("_deny.dr", b"T-vitals")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "c2", "c3", "c4", "p1"],
        "a category denied"
    );
    consent("c5", vec![ix("_deny.nurse", b"T-all")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "c2", "c3", "c4", "c5", "p1"],
        "another actor's deny"
    );
    // The Patient restricted: the whole chart needs the grant.
    patient.version = 2;
    put(s, patient, Expect::Version(1), vec![ix("_label", b"L-R")])?;
    assert_eq!(found(Some(pv.clone()))?, Vec::<String>::new());
    consent("c6", vec![ix("_grant.*", b"L-R")])?;
    assert_eq!(
        found(Some(pv.clone()))?,
        ["c1", "c2", "c3", "c4", "c5", "c6", "p1"]
    );
    let mut hits: Vec<(String, String, Vec<u8>)> = s
        .audited(Box::new(|tx: &dyn TxRead| {
            let h = tx.chart_tokens(&pid("p1"), &["_label".into(), "_deny.dr".into()])?;
            Ok((vec![(vec![1], b"r".to_vec())], Box::new(h) as Payload))
        }))?
        .downcast::<Vec<IndexHit>>()
        .map(|h| h.into_iter().map(|h| (h.id, h.param, h.token)).collect())
        .unwrap_or_default();
    hits.sort();
    assert_eq!(
        hits,
        [
            ("c4".into(), "_deny.dr".into(), b"T-vitals".to_vec()),
            ("ob".into(), "_label".into(), b"L-HIV".to_vec()),
            ("p1".into(), "_label".into(), b"L-R".to_vec()),
        ]
    );
    Ok(())
}

/// What access control reads: the charts a caller reaches through `_care` tokens of
/// CareTeam and Encounter rows (replaced with the row's tokens, gone when it is deleted)
/// and through live break-the-glass grants (reviewed once); incidents; the training flag.
pub fn care_relationships_and_break_glass(s: &dyn Store) -> Result<(), Failure> {
    let mut team = row("CareTeam", "t1", 1, "p1", b"t");
    team.category = "care_plans".into();
    put(s, team.clone(), Expect::Absent, vec![ix("_care", b"dr-a")])?;
    let enc = row("Encounter", "e1", 1, "p2", b"e");
    put(
        s,
        enc,
        Expect::Absent,
        vec![ix("_care", b"dr-a"), ix("_care", b"dr-b")],
    )?;
    // A `_care` token on another type reaches nothing.
    put(
        s,
        row("Observation", "o1", 1, "p3", b"o"),
        Expect::Absent,
        vec![ix("_care", b"dr-a")],
    )?;
    let mut reach = s.charts(&[b"dr-a".to_vec(), b"nobody".to_vec()], "ann", 100, None)?;
    reach.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reach,
        vec![(pid("p1"), Reach::Care), (pid("p2"), Reach::Care)]
    );
    assert_eq!(
        s.charts(&[b"dr-b".to_vec()], "ann", 100, None)?,
        vec![(pid("p2"), Reach::Care)]
    );
    assert_eq!(s.charts(&[], "ann", 100, None)?, vec![]);
    // The care team's new version drops dr-a; a deletion removes its tokens.
    team.version = 2;
    put(
        s,
        team.clone(),
        Expect::Version(1),
        vec![ix("_care", b"dr-c")],
    )?;
    assert_eq!(
        s.charts(&[b"dr-a".to_vec()], "ann", 100, None)?,
        vec![(pid("p2"), Reach::Care)]
    );
    team.version = 3;
    team.deleted = true;
    put(s, team, Expect::Version(2), vec![])?;
    assert_eq!(s.charts(&[b"dr-c".to_vec()], "ann", 100, None)?, vec![]);

    let grant = BreakGlassRow {
        id: "g1".into(),
        username: "ann".into(),
        patient: pid("p9"),
        reason: "medical-emergency".into(),
        justification: vec![7],
        created: 100,
        expires: 200,
        outcome: String::new(),
        reviewed_by: String::new(),
        reviewed_at: 0,
        note: vec![],
        incident: String::new(),
    };
    one(s, Op::PutBreakGlass(grant.clone()))?;
    let mut other = grant.clone();
    other.id = "g2".into();
    other.patient = pid("p2");
    other.reason = "continuity-of-care".into();
    other.created = 101;
    one(s, Op::PutBreakGlass(other))?;
    let mut reach = s.charts(&[b"dr-b".to_vec()], "ann", 150, None)?;
    reach.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reach,
        vec![(pid("p2"), Reach::Care), (pid("p9"), Reach::Emergency)],
        "a chart reached both ways is a care relationship"
    );
    assert_eq!(
        s.charts(&[], "bob", 150, None)?,
        vec![],
        "grants are the grantee's"
    );
    assert_eq!(
        s.charts(&[b"dr-b".to_vec()], "ann", 150, Some(&pid("p9")))?,
        vec![(pid("p9"), Reach::Emergency)],
        "one chart"
    );
    assert_eq!(
        s.charts(&[], "ann", 200, None)?,
        vec![],
        "a grant ends at its expiry"
    );
    assert_eq!(
        s.audited(Box::new(|tx: &dyn TxRead| {
            let r = tx.charts(&[], "ann", 150, None)?;
            Ok((vec![(vec![1], b"r".to_vec())], Box::new(r) as Payload))
        }))?
        .downcast::<Vec<(PatientId, Reach)>>()
        .map(|b| b.len())
        .unwrap_or(0),
        2,
        "inside an audited read too"
    );
    // Search scopes: categories open everywhere, or only within charts reached by care
    // tokens, by grants, or listed.
    let mut demo = row("Patient", "p9", 1, "p9", b"d");
    demo.category = "demographics".into();
    put(s, demo, Expect::Absent, vec![])?;
    put(
        s,
        row("Observation", "v9", 1, "p9", b"v"),
        Expect::Absent,
        vec![],
    )?;
    put(
        s,
        row("Observation", "v2", 1, "p2", b"v"),
        Expect::Absent,
        vec![],
    )?;
    let found = |scopes: Vec<(Vec<String>, Charts)>| -> Result<Vec<String>, Failure> {
        let q = SearchQuery {
            categories: vec!["demographics".into()],
            scopes,
            limit: 50,
            ..Default::default()
        };
        let mut ids: Vec<String> = s
            .search(&q)?
            .rows
            .iter()
            .map(|r| r.id().to_owned())
            .collect();
        ids.sort();
        let tq = q.clone();
        let tallied: u64 = s
            .audited(Box::new(move |tx: &dyn TxRead| {
                let n: u64 = tx.tally(&tq)?.iter().map(|(_, n)| n).sum();
                Ok((vec![(vec![1], b"t".to_vec())], Box::new(n) as Payload))
            }))?
            .downcast::<u64>()
            .map(|b| *b)
            .unwrap_or(u64::MAX);
        assert_eq!(
            tallied,
            ids.len() as u64,
            "the tally counts what the search finds"
        );
        Ok(ids)
    };
    let vitals = || vec!["vitals".to_owned()];
    assert_eq!(found(vec![(vitals(), Charts::Patients(vec![]))])?, ["p9"]);
    assert_eq!(
        found(vec![(vitals(), Charts::Care(vec![b"dr-b".to_vec()]))])?,
        ["e1", "p9", "v2"]
    );
    let grants = Charts::Grants {
        username: "ann".into(),
        now: 150,
    };
    assert_eq!(found(vec![(vitals(), grants)])?, ["e1", "p9", "v2", "v9"]);
    let expired = Charts::Grants {
        username: "ann".into(),
        now: 250,
    };
    assert_eq!(found(vec![(vitals(), expired)])?, ["p9"]);
    assert_eq!(
        found(vec![(vitals(), Charts::Patients(vec![pid("p9")]))])?,
        ["p9", "v9"]
    );
    let list = s.break_glass()?;
    assert_eq!(
        list.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["g2", "g1"]
    );
    assert_eq!(list.get(1), Some(&grant));
    let review = || Op::ReviewBreakGlass {
        id: "g1".into(),
        outcome: "inappropriate".into(),
        reviewed_by: "po".into(),
        reviewed_at: 300,
        note: vec![1, 2],
        incident: "i1".into(),
    };
    one(s, review())?;
    assert!(
        matches!(one(s, review()), Err(StoreError::Conflict)),
        "reviewed once"
    );
    let g = s
        .break_glass()?
        .into_iter()
        .find(|g| g.id == "g1")
        .found("grant g1")?;
    assert_eq!(
        (
            g.outcome.as_str(),
            g.reviewed_by.as_str(),
            g.incident.as_str()
        ),
        ("inappropriate", "po", "i1")
    );

    let mut inc = IncidentRow {
        id: "i1".into(),
        opened_at: 300,
        status: "open".into(),
        body: "{}".into(),
    };
    one(s, Op::PutIncident(inc.clone()))?;
    inc.status = "closed".into();
    one(s, Op::PutIncident(inc.clone()))?;
    assert_eq!(s.incidents()?, vec![inc]);

    // Governance records: kept by kind, replaced whole, newest change first, deleted.
    let g = |id: &str, at: i64, status: &str| GovernanceRow {
        kind: "alert".into(),
        id: id.into(),
        at,
        status: status.into(),
        subject: "ann".into(),
        body: vec![0, 1, 2],
    };
    one(s, Op::PutGovernance(g("a1", 10, "open")))?;
    one(s, Op::PutGovernance(g("a2", 20, "open")))?;
    one(s, Op::PutGovernance(g("a1", 30, "triage")))?;
    let mut other = g("a1", 5, "x");
    other.kind = "suppression".into();
    one(s, Op::PutGovernance(other.clone()))?;
    assert_eq!(
        s.governance("alert")?,
        vec![g("a1", 30, "triage"), g("a2", 20, "open")]
    );
    assert_eq!(s.governance_record("suppression", "a1")?, Some(other));
    one(
        s,
        Op::DeleteGovernance {
            kind: "suppression".into(),
            id: "a1".into(),
        },
    )?;
    assert_eq!(s.governance_record("suppression", "a1")?, None);
    assert!(s.governance("suppression")?.is_empty());

    let u = UserRow {
        username: "ann".into(),
        role: "nurse".into(),
        password_hash: "h".into(),
        totp_secret_wrapped: vec![1],
        totp_last_step: 0,
        disabled: false,
        created: "2024".into(),
        practitioner_id: Some("pr1".into()),
        last_login: 0,
        training_current: true,
    };
    one(s, Op::CreateUser(u))?;
    one(
        s,
        Op::SetTraining {
            username: "ann".into(),
            current: false,
        },
    )?;
    assert!(!s.user("ann")?.found("user ann")?.training_current);
    assert!(matches!(
        one(
            s,
            Op::SetTraining {
                username: "nobody".into(),
                current: true
            }
        ),
        Err(StoreError::Conflict)
    ));
    Ok(())
}

/// What paging that holds still, totals over visible categories and re-indexing rely on:
/// `created_before` hides resources created after a snapshot (updates keep their place);
/// `after` continues strictly after a key in both orders; `tally` counts matches by
/// category; `_lastUpdated` ranges (and their complement) compare instants; `types` and
/// `patients` restrict; `ReplaceIndex` swaps tokens without a new version.
pub fn snapshots_keysets_tallies_and_reindex(s: &dyn Store) -> Result<(), Failure> {
    for i in 0..4u8 {
        let mut r = row(
            "Observation",
            &format!("k{i}"),
            1,
            if i < 2 { "p1" } else { "p2" },
            &[i],
        );
        r.last_updated = format!("2024-01-0{}T00:00:00.000Z", 4 - i);
        if i == 3 {
            r.category = "labs".into();
        }
        put(s, r, Expect::Absent, vec![ix("code", b"k")])?;
    }
    let snapshot = s.audit_len()?;
    put(
        s,
        row("Observation", "k9", 1, "p1", b"late"),
        Expect::Absent,
        vec![ix("code", b"k")],
    )?;
    let mut changed = row("Observation", "k0", 2, "p1", b"changed");
    changed.last_updated = "2024-01-05T00:00:00.000Z".into();
    put(s, changed, Expect::Version(1), vec![ix("code", b"k")])?;
    let base = SearchQuery {
        rtype: Some("Observation".into()),
        tokens: vec![("code".into(), vec![b"k".to_vec()])],
        limit: 100,
        ..Default::default()
    };
    let ids = |q: &SearchQuery| -> Result<Vec<String>, Failure> {
        Ok(s.search(q)?
            .rows
            .iter()
            .map(|r| r.id().to_owned())
            .collect())
    };
    assert_eq!(ids(&base)?, ["k0", "k1", "k2", "k3", "k9"]);
    let snap = SearchQuery {
        created_before: Some(snapshot),
        ..base.clone()
    };
    assert_eq!(
        ids(&snap)?,
        ["k0", "k1", "k2", "k3"],
        "created after the snapshot: hidden; updated: kept"
    );
    let after = SearchQuery {
        after: Some(vec!["Observation".into(), "k1".into()]),
        ..snap.clone()
    };
    assert_eq!(ids(&after)?, ["k2", "k3"], "strictly after the key");
    let by_time = SearchQuery {
        order: Order::LastUpdated,
        ..snap.clone()
    };
    assert_eq!(
        ids(&by_time)?,
        ["k3", "k2", "k1", "k0"],
        "k0 was updated last"
    );
    let desc_after = SearchQuery {
        order: Order::LastUpdatedDesc,
        after: Some(vec![
            "2024-01-03T00:00:00.000Z".into(),
            "Observation".into(),
            "k1".into(),
        ]),
        ..snap.clone()
    };
    assert_eq!(ids(&desc_after)?, ["k2", "k3"]);
    let q = snap.clone();
    let out = s.audited(Box::new(move |tx| {
        let t = tx.tally(&q)?;
        Ok((vec![(vec![5], b"tally".to_vec())], Box::new(t) as Payload))
    }))?;
    let mut tally = *out
        .downcast::<Vec<(String, u64)>>()
        .map_err(|_| Failure::Missing("the tally"))?;
    tally.sort();
    assert_eq!(tally, [("labs".to_owned(), 1), ("vitals".to_owned(), 3)]);
    let in_range = SearchQuery {
        last_updated: vec![TimeRange {
            from: Some("2024-01-02T00:00:00.000Z".into()),
            to: Some("2024-01-04T00:00:00.000Z".into()),
            outside: false,
        }],
        ..snap.clone()
    };
    assert_eq!(ids(&in_range)?, ["k1", "k2"], "from <= t < to");
    let outside = SearchQuery {
        last_updated: vec![TimeRange {
            from: Some("2024-01-02T00:00:00.000Z".into()),
            to: Some("2024-01-04T00:00:00.000Z".into()),
            outside: true,
        }],
        ..snap.clone()
    };
    assert_eq!(ids(&outside)?, ["k0", "k3"]);
    let restricted = SearchQuery {
        rtype: None,
        types: vec!["Observation".into()],
        patients: vec![pid("p2")],
        ..snap.clone()
    };
    assert_eq!(ids(&restricted)?, ["k2", "k3"]);
    s.commit(WriteBatch {
        ops: vec![Op::ReplaceIndex {
            rtype: "Observation".into(),
            id: "k1".into(),
            version: 1,
            index: vec![ix("code", b"re")],
        }],
        audit: vec![(vec![4], b"reindex".to_vec())],
    })?;
    let re = SearchQuery {
        tokens: vec![("code".into(), vec![b"re".to_vec()])],
        ..base.clone()
    };
    assert_eq!(ids(&re)?, ["k1"]);
    assert_eq!(s.history("Observation", "k1")?.len(), 1, "no new version");
    let stale = s.commit(WriteBatch {
        ops: vec![Op::ReplaceIndex {
            rtype: "Observation".into(),
            id: "k0".into(),
            version: 1,
            index: vec![],
        }],
        audit: vec![(vec![4], b"reindex".to_vec())],
    });
    assert!(
        matches!(stale, Err(StoreError::Conflict)),
        "only the current version"
    );
    Ok(())
}

pub fn hash_tiles_only_grow(s: &dyn Store) -> Result<(), Failure> {
    let put = |level: u32, index: u64, hashes: &[u8]| {
        s.commit(WriteBatch {
            ops: vec![Op::PutTile {
                level,
                index,
                hashes: hashes.to_vec(),
            }],
            audit: vec![],
        })
    };
    put(0, 0, &[1; 64])?;
    put(0, 1, &[2; 32])?;
    put(1, 0, &[3; 32])?;
    put(0, 0, &[1; 96])?;
    put(0, 0, &[1; 32])?;
    assert_eq!(
        s.tiles(0, 0, 10)?,
        vec![(0, vec![1; 96]), (1, vec![2; 32])],
        "a wider tile replaces a narrower one; a narrower copy is ignored"
    );
    let mut forked = vec![1u8; 128];
    if let Some(b) = forked.get_mut(5) {
        *b = 9;
    }
    assert!(
        matches!(put(0, 0, &forked), Err(StoreError::Conflict)),
        "a tile that disagrees with the stored one is refused"
    );
    assert_eq!(s.tiles(0, 0, 1)?, vec![(0, vec![1; 96])]);
    assert_eq!(s.tiles(1, 0, 1)?, vec![(0, vec![3; 32])]);
    assert_eq!(s.tiles(0, 1, 2)?, vec![(1, vec![2; 32])]);
    assert!(s.tiles(2, 0, 100)?.is_empty());
    assert_eq!(
        s.tiles_at(0, &[1, 7, 0])?,
        vec![(0, vec![1; 96]), (1, vec![2; 32])],
        "tiles by index: those that exist, in order"
    );
    assert!(s.tiles_at(0, &[])?.is_empty());
    Ok(())
}

pub fn checkpoints_are_kept_and_cosigned(s: &dyn Store) -> Result<(), Failure> {
    assert_eq!(s.checkpoint(None)?, None);
    for n in [3u64, 7, 5] {
        s.commit(WriteBatch {
            ops: vec![Op::PutCheckpoint {
                size: n,
                note: format!("note {n}\n"),
            }],
            audit: vec![],
        })?;
    }
    s.commit(WriteBatch {
        ops: vec![Op::PutCheckpoint {
            size: 7,
            note: "other\n".into(),
        }],
        audit: vec![],
    })?;
    assert_eq!(
        s.checkpoint(None)?,
        Some((7, "note 7\n".into())),
        "latest by size; first write wins"
    );
    assert_eq!(s.checkpoint(Some(5))?, Some((5, "note 5\n".into())));
    assert_eq!(s.checkpoint(Some(4))?, None);
    let cosign = || {
        s.commit(WriteBatch {
            ops: vec![Op::AddCosignature {
                size: 5,
                line: "w\n".into(),
            }],
            audit: vec![],
        })
    };
    cosign()?;
    cosign()?;
    assert_eq!(
        s.checkpoint(Some(5))?.found("the checkpoint of size 5")?.1,
        "note 5\nw\n",
        "a cosignature is added once"
    );
    assert_eq!(
        s.checkpoints()?.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![3, 5, 7]
    );
    Ok(())
}

#[expect(
    clippy::expect_used,
    reason = "the suite's constant patient ids are valid"
)]
fn pid(s: &str) -> PatientId {
    PatientId::new(s).expect("constant patient id")
}

fn row(rtype: &str, id: &str, version: u64, patient: &str, body: &[u8]) -> VersionRow {
    VersionRow {
        patient: Some(pid(patient)),
        rtype: rtype.into(),
        id: id.into(),
        version,
        last_updated: format!("2024-01-01T00:00:0{version}.000Z"),
        deleted: false,
        category: "vitals".into(),
        key_version: 1,
        body: body.to_vec(),
    }
}

fn put(
    s: &dyn Store,
    r: VersionRow,
    expect: Expect,
    index: Vec<IndexRow>,
) -> Result<Committed, StoreError> {
    s.commit(WriteBatch {
        ops: vec![Op::PutVersion {
            row: r,
            expect,
            index,
        }],
        audit: vec![(vec![1], b"a".to_vec())],
    })
}

fn ix(param: &str, token: &[u8]) -> IndexRow {
    IndexRow {
        param: param.into(),
        token: token.to_vec(),
    }
}

pub fn versions_are_appended_never_overwritten(s: &dyn Store) -> Result<(), Failure> {
    put(
        s,
        row("Observation", "o1", 1, "p1", b"v1"),
        Expect::Absent,
        vec![],
    )?;
    put(
        s,
        row("Observation", "o1", 2, "p1", b"v2"),
        Expect::Version(1),
        vec![],
    )?;
    assert_eq!(
        s.current("Observation", "o1")?.found("o1")?.ciphertext(),
        b"v2",
        "current is the newest version"
    );
    assert_eq!(
        s.version("Observation", "o1", 1)?
            .found("o1 version 1")?
            .ciphertext(),
        b"v1",
        "old version kept"
    );
    let h = s.history("Observation", "o1")?;
    assert_eq!(
        h.iter().map(|r| r.version()).collect::<Vec<_>>(),
        vec![2, 1],
        "history newest first"
    );
    let mut del = row("Observation", "o1", 3, "p1", b"");
    del.deleted = true;
    put(s, del, Expect::Live, vec![])?;
    assert!(
        s.current("Observation", "o1")?.found("o1")?.deleted(),
        "delete is a new version"
    );
    assert_eq!(s.history("Observation", "o1")?.len(), 3);
    assert!(s.current("Observation", "nope")?.is_none());
    assert_eq!(
        s.current("Observation", "o1")?
            .found("o1")?
            .patient()
            .cloned(),
        Some(pid("p1")),
        "rows carry the patient id"
    );
    Ok(())
}

pub fn preconditions_guard_writes(s: &dyn Store) -> Result<(), Failure> {
    put(
        s,
        row("Condition", "c1", 1, "p1", b"v1"),
        Expect::Absent,
        vec![],
    )?;
    assert!(matches!(
        put(
            s,
            row("Condition", "c1", 1, "p1", b"x"),
            Expect::Absent,
            vec![]
        ),
        Err(StoreError::Exists)
    ));
    assert!(matches!(
        put(
            s,
            row("Condition", "c1", 2, "p1", b"x"),
            Expect::Version(7),
            vec![]
        ),
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        put(
            s,
            row("Condition", "zz", 2, "p1", b"x"),
            Expect::Live,
            vec![]
        ),
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.audit_len()?, 1, "failed writes leave no audit entry");
    Ok(())
}

pub fn batches_are_all_or_nothing(s: &dyn Store) -> Result<(), Failure> {
    put(
        s,
        row("Patient", "p1", 1, "p1", b"v1"),
        Expect::Absent,
        vec![],
    )?;
    let before = s.audit_len()?;
    let b = WriteBatch {
        ops: vec![
            Op::PutVersion {
                row: row("Observation", "a", 1, "p1", b"x"),
                expect: Expect::Absent,
                index: vec![],
            },
            Op::PutPatientKey {
                patient: pid("p9"),
                key_version: 1,
                master_version: 1,
                wrapped: vec![1],
            },
            Op::PutVersion {
                row: row("Patient", "p1", 1, "p1", b"dup"),
                expect: Expect::Absent,
                index: vec![],
            },
        ],
        audit: vec![(vec![1], b"x".to_vec())],
    };
    assert!(s.commit(b).is_err());
    assert!(s.current("Observation", "a")?.is_none(), "no partial batch");
    assert!(s.patient_key(&pid("p9"))?.is_none(), "no partial batch");
    assert_eq!(s.audit_len()?, before, "no audit entry from a failed batch");
    Ok(())
}

pub fn audit_sequence_is_dense_under_concurrency(s: Arc<dyn Store>) -> Result<(), Failure> {
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || -> Result<(), StoreError> {
                for i in 0..50 {
                    let expect = if i % 5 == 4 {
                        Expect::Version(99)
                    } else {
                        Expect::Absent
                    };
                    let _ = put(
                        &*s,
                        row("Observation", &format!("t{t}-{i}"), 1, "p1", b"x"),
                        expect,
                        vec![],
                    );
                    s.commit(WriteBatch {
                        ops: vec![],
                        audit: vec![(vec![2], format!("{t}-{i}").into_bytes())],
                    })?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| Failure::Thread)??;
    }
    let n = s.audit_len()?;
    assert_eq!(n, 8 * (40 + 50), "one entry per successful commit");
    let rows = s.audit_range(0, n)?;
    assert_eq!(rows.len() as u64, n);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.seq, i as u64, "audit sequence must be dense");
    }
    Ok(())
}

pub fn search_by_tokens_patient_and_paging(s: &dyn Store) -> Result<(), Failure> {
    for i in 0..5u8 {
        let p = if i < 3 { "p1" } else { "p2" };
        let mut r = row("Observation", &format!("o{i}"), 1, p, &[i]);
        if i == 4 {
            r.category = "labs".into();
        }
        put(
            s,
            r,
            Expect::Absent,
            vec![
                ix("code", b"hr"),
                ix("code", &[b'c', i]),
                ix("status", b"final"),
            ],
        )?;
    }
    let q = |f: &dyn Fn(&mut SearchQuery)| {
        let mut q = SearchQuery {
            rtype: Some("Observation".into()),
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        s.search(&q)
    };
    assert_eq!(q(&|_| {})?.rows.len(), 5);
    assert_eq!(q(&|q| q.patient = Some(pid("p1")))?.rows.len(), 3);
    assert_eq!(
        q(&|q| q.tokens = vec![("code".into(), vec![b"hr".to_vec()])])?
            .rows
            .len(),
        5
    );
    assert_eq!(
        q(&|q| q.tokens = vec![("code".into(), vec![vec![b'c', 1], vec![b'c', 2]])])?
            .rows
            .len(),
        2,
        "OR within"
    );
    let and = q(&|q| {
        q.tokens = vec![
            ("code".into(), vec![vec![b'c', 1]]),
            ("status".into(), vec![b"nope".to_vec()]),
        ]
    })?;
    assert!(and.rows.is_empty(), "AND across parameters");
    assert!(
        q(&|q| q.tokens = vec![("code".into(), vec![b"final".to_vec()])])?
            .rows
            .is_empty(),
        "tokens are per parameter"
    );
    let p1 = q(&|q| q.limit = 2)?;
    assert!(p1.more && p1.rows.len() == 2);
    let p3 = q(&|q| {
        q.limit = 2;
        q.offset = 4;
    })?;
    assert!(!p3.more && p3.rows.len() == 1);
    assert_eq!(q(&|q| q.categories = vec!["labs".into()])?.rows.len(), 1);
    assert_eq!(
        q(&|q| q.ids = vec!["o1".into(), "o2".into()])?.rows.len(),
        2
    );
    // updates replace tokens; deletes drop out of search
    put(
        s,
        row("Observation", "o0", 2, "p1", b"n"),
        Expect::Version(1),
        vec![ix("code", b"new")],
    )?;
    assert_eq!(
        q(&|q| q.tokens = vec![("code".into(), vec![b"hr".to_vec()])])?
            .rows
            .len(),
        4
    );
    let mut del = row("Observation", "o1", 2, "p1", b"");
    del.deleted = true;
    put(s, del, Expect::Live, vec![])?;
    assert_eq!(q(&|q| q.patient = Some(pid("p1")))?.rows.len(), 2);
    let all = SearchQuery {
        patient: Some(pid("p2")),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(s.search(&all)?.rows.len(), 2, "type-less search by patient");
    Ok(())
}

pub fn identity_rows(s: &dyn Store) -> Result<(), Failure> {
    let u = UserRow {
        username: "ann".into(),
        role: "nurse".into(),
        password_hash: "h".into(),
        totp_secret_wrapped: vec![1],
        totp_last_step: 0,
        disabled: false,
        created: "2024".into(),
        practitioner_id: None,
        last_login: 0,
        training_current: true,
    };
    s.commit(WriteBatch {
        ops: vec![Op::CreateUser(u.clone())],
        audit: vec![],
    })?;
    assert!(matches!(
        s.commit(WriteBatch {
            ops: vec![Op::CreateUser(u.clone())],
            audit: vec![]
        }),
        Err(StoreError::Exists)
    ));
    assert_eq!(s.user("ann")?.found("user ann")?, u);
    let step = |n| {
        s.commit(WriteBatch {
            ops: vec![Op::UseTotpStep {
                username: "ann".into(),
                step: n,
            }],
            audit: vec![],
        })
    };
    step(10)?;
    assert!(
        matches!(step(10), Err(StoreError::Conflict)),
        "a TOTP step is usable once"
    );
    assert!(
        matches!(step(9), Err(StoreError::Conflict)),
        "no going back"
    );
    step(11)?;
    let sess = SessionRow {
        token_hash: vec![9; 32],
        kind: "session".into(),
        username: "ann".into(),
        created: 1,
        last_seen: 1,
        expires: 99,
        attempts: 0,
        mfa_at: 1,
        source: "10.0.0.1".into(),
        method: "password+totp".into(),
        scope: String::new(),
    };
    s.commit(WriteBatch {
        ops: vec![Op::PutSession(sess.clone())],
        audit: vec![],
    })?;
    s.commit(WriteBatch {
        ops: vec![Op::TouchSession {
            token_hash: vec![9; 32],
            last_seen: 5,
        }],
        audit: vec![],
    })?;
    assert_eq!(s.session(&[9; 32])?.found("the session")?.last_seen, 5);
    s.commit(WriteBatch {
        ops: vec![Op::DeleteSession {
            token_hash: vec![9; 32],
        }],
        audit: vec![],
    })?;
    assert!(s.session(&[9; 32])?.is_none());
    assert_eq!(s.users()?.len(), 1);
    Ok(())
}

/// Stores a (dummy) wrapped data key, version 1, for `patient`.
fn first_key(s: &dyn Store, patient: &str) -> Result<Committed, StoreError> {
    one(
        s,
        Op::PutPatientKey {
            patient: pid(patient),
            key_version: 1,
            master_version: 1,
            wrapped: vec![1, 2, 3],
        },
    )
}

fn one(s: &dyn Store, op: Op) -> Result<Committed, StoreError> {
    s.commit(WriteBatch {
        ops: vec![op],
        audit: vec![],
    })
}

/// The login throttle counts atomically in windows and forgets by key or by account;
/// challenges die after their attempts; sessions list, step up and are revoked together;
/// one-time credentials are used once.
pub fn throttles_challenges_and_credentials(s: &dyn Store) -> Result<(), Failure> {
    let count = |key: &[u8], at| {
        one(
            s,
            Op::CountFailure {
                key: key.to_vec(),
                subject: b"ann".to_vec(),
                at,
                window_secs: 60,
            },
        )
    };
    for at in [100, 110, 120] {
        count(b"k1", at)?;
    }
    count(b"k2", 100)?;
    let rows = s.throttle(&[b"k1".to_vec(), b"k2".to_vec(), b"k3".to_vec()])?;
    let k1 = rows.iter().find(|r| r.key == b"k1").found("counter k1")?;
    assert_eq!(
        (k1.failures, k1.window_start, k1.last_failure),
        (3, 100, 120)
    );
    assert_eq!(rows.len(), 2, "no row for a key never counted");
    count(b"k1", 161)?;
    let k1 = s.throttle(&[b"k1".to_vec()])?.pop().found("counter k1")?;
    assert_eq!(
        (k1.failures, k1.window_start),
        (1, 161),
        "a new window starts again at one"
    );
    one(
        s,
        Op::ClearFailures {
            key: b"k2".to_vec(),
        },
    )?;
    assert_eq!(s.throttle(&[b"k2".to_vec()])?.len(), 0);
    one(
        s,
        Op::ClearSubjectFailures {
            subject: b"ann".to_vec(),
        },
    )?;
    assert_eq!(s.throttle(&[b"k1".to_vec()])?.len(), 0, "unlock clears all");

    let session = |hash: u8, kind: &str, created| SessionRow {
        token_hash: vec![hash; 32],
        kind: kind.into(),
        username: "bea".into(),
        created,
        last_seen: created,
        expires: 1000,
        attempts: 0,
        mfa_at: 0,
        source: String::new(),
        method: String::new(),
        scope: String::new(),
    };
    one(s, Op::PutSession(session(1, "mfa", 10)))?;
    let fail = || {
        one(
            s,
            Op::FailChallenge {
                token_hash: vec![1; 32],
                max_attempts: 3,
            },
        )
    };
    fail()?;
    fail()?;
    assert_eq!(s.session(&[1; 32])?.found("challenge")?.attempts, 2);
    fail()?;
    assert!(
        s.session(&[1; 32])?.is_none(),
        "the third wrong answer kills it"
    );
    one(s, Op::PutSession(session(2, "mfa", 11)))?;
    let consume = || {
        one(
            s,
            Op::ConsumeChallenge {
                token_hash: vec![2; 32],
                max_attempts: 3,
            },
        )
    };
    consume()?;
    assert!(
        matches!(consume(), Err(StoreError::Conflict)),
        "a challenge is used once"
    );
    one(s, Op::PutSession(session(3, "session", 12)))?;
    one(s, Op::PutSession(session(4, "session", 13)))?;
    one(
        s,
        Op::StepUp {
            token_hash: vec![3; 32],
            at: 50,
        },
    )?;
    assert_eq!(s.session(&[3; 32])?.found("session")?.mfa_at, 50);
    let mine = s.sessions_of("bea")?;
    assert_eq!(
        mine.iter().map(|r| r.created).collect::<Vec<_>>(),
        vec![13, 12],
        "newest first"
    );
    one(
        s,
        Op::RevokeSessions {
            username: "bea".into(),
        },
    )?;
    assert!(s.sessions_of("bea")?.is_empty());
    assert!(matches!(
        one(
            s,
            Op::StepUp {
                token_hash: vec![3; 32],
                at: 60
            }
        ),
        Err(StoreError::Conflict)
    ));

    let cred = |id: u8, kind: &str| CredentialRow {
        kind: kind.into(),
        id: vec![id],
        username: "bea".into(),
        name: format!("key {id}"),
        data: vec![id, id],
        created: i64::from(id),
        last_used: 0,
    };
    one(s, Op::PutCredential(cred(1, "recovery")))?;
    one(s, Op::PutCredential(cred(2, "recovery")))?;
    one(s, Op::PutCredential(cred(3, "webauthn")))?;
    assert!(matches!(
        one(s, Op::PutCredential(cred(3, "webauthn"))),
        Err(StoreError::Exists)
    ));
    assert_eq!(s.credentials("bea", "recovery")?.len(), 2);
    assert_eq!(
        s.credential("webauthn", &[3])?.found("passkey")?,
        cred(3, "webauthn")
    );
    one(
        s,
        Op::UseCredential {
            kind: "webauthn".into(),
            id: vec![3],
            data: vec![7],
            at: 99,
        },
    )?;
    let used = s.credential("webauthn", &[3])?.found("passkey")?;
    assert_eq!((used.data, used.last_used), (vec![7], 99));
    let use_code = || {
        one(
            s,
            Op::DeleteCredential {
                kind: "recovery".into(),
                id: vec![1],
                username: "bea".into(),
            },
        )
    };
    use_code()?;
    assert!(
        matches!(use_code(), Err(StoreError::Conflict)),
        "a one-time code is used once"
    );
    one(
        s,
        Op::DeleteCredentials {
            username: "bea".into(),
            kind: "recovery".into(),
        },
    )?;
    assert!(s.credentials("bea", "recovery")?.is_empty());
    assert_eq!(s.credentials("bea", "webauthn")?.len(), 1);
    assert!(matches!(
        one(
            s,
            Op::SetDisabled {
                username: "nobody".into(),
                disabled: true
            }
        ),
        Err(StoreError::Conflict)
    ));
    Ok(())
}

pub fn keys_and_meta_insert_once(s: &dyn Store) -> Result<(), Failure> {
    let k = |v: u32| {
        s.commit(WriteBatch {
            ops: vec![Op::PutPatientKey {
                patient: pid("p1"),
                key_version: v,
                master_version: 1,
                wrapped: vec![v as u8],
            }],
            audit: vec![],
        })
    };
    k(1)?;
    assert!(matches!(k(1), Err(StoreError::Exists)));
    k(2)?;
    let newest = s.patient_key(&pid("p1"))?.found("p1's key")?;
    assert_eq!(
        (newest.key_version, newest.master_version, newest.wrapped),
        (2, 1, vec![2]),
        "newest key version"
    );
    // Master key rotation re-wraps in place, once, from the version it read.
    let rewrap = |from: u32, to: u32| {
        s.commit(WriteBatch {
            ops: vec![Op::RewrapPatientKey {
                patient: pid("p1"),
                key_version: 2,
                from,
                to,
                wrapped: vec![20 + to as u8],
            }],
            audit: vec![],
        })
    };
    assert_eq!(s.keys_wrapped_below(2, 10)?.len(), 2);
    rewrap(1, 2)?;
    assert!(matches!(rewrap(1, 2), Err(StoreError::Conflict)), "once");
    let k = s.patient_key(&pid("p1"))?.found("p1's key")?;
    assert_eq!((k.master_version, k.wrapped), (2, vec![22]));
    let below = s.keys_wrapped_below(2, 10)?;
    assert_eq!(below.len(), 1);
    assert_eq!(below.first().map(|b| b.1.key_version), Some(1));
    assert_eq!(s.keys_wrapped_below(2, 0)?.len(), 0, "limit");
    assert_eq!(s.master_key_census()?, [(1, 1), (2, 1)]);
    let m = || {
        s.commit(WriteBatch {
            ops: vec![Op::PutMetaOnce {
                key: "k".into(),
                value: vec![7],
            }],
            audit: vec![],
        })
    };
    m()?;
    assert!(matches!(m(), Err(StoreError::Exists)));
    assert_eq!(s.meta("k")?, Some(vec![7]));
    // A listed precondition guards the whole batch; an absent value reads as `absent`.
    let guarded = |member: &str| {
        s.commit(WriteBatch {
            ops: vec![
                Op::PutMeta {
                    key: "guarded".into(),
                    value: member.as_bytes().to_vec(),
                },
                Op::RequireMetaListed {
                    key: "writers".into(),
                    member: member.into(),
                    absent: "1".into(),
                },
            ],
            audit: vec![(vec![0; 32], b"{}".to_vec())],
        })
    };
    guarded("1")?;
    let before = s.audit_len()?;
    assert!(matches!(guarded("1+2"), Err(StoreError::Unavailable(_))));
    assert_eq!(s.meta("guarded")?, Some(b"1".to_vec()), "nothing written");
    assert_eq!(s.audit_len()?, before, "nor audited");
    s.commit(WriteBatch {
        ops: vec![Op::PutMeta {
            key: "writers".into(),
            value: b"1, 1+2".to_vec(),
        }],
        audit: vec![],
    })?;
    guarded("1+2")?;
    guarded("1")?;
    assert!(matches!(guarded("2"), Err(StoreError::Unavailable(_))));
    s.commit(WriteBatch {
        ops: vec![
            Op::DeleteMeta { key: "k".into() },
            Op::DeleteMeta {
                key: "never".into(),
            },
        ],
        audit: vec![],
    })?;
    assert_eq!(
        s.meta("k")?,
        None,
        "deleted; deleting an absent key is no error"
    );
    Ok(())
}

pub fn audited_reads_commit_with_their_audit_entries(s: &dyn Store) -> Result<(), Failure> {
    put(
        s,
        row("Observation", "o1", 1, "p1", b"v1"),
        Expect::Absent,
        vec![],
    )?;
    let before = s.audit_len()?;
    let out = s.audited(Box::new(|tx| {
        let r = tx
            .current("Observation", "o1")?
            .map(|r| r.ciphertext().to_vec());
        let found = tx
            .search(&SearchQuery {
                patient: Some(pid("p1")),
                limit: 10,
                ..Default::default()
            })?
            .rows
            .len();
        Ok((
            vec![(vec![3], b"read o1".to_vec())],
            Box::new((r, found)) as Payload,
        ))
    }))?;
    let (body, found) = *out
        .downcast::<(Option<Vec<u8>>, usize)>()
        .map_err(|_| Failure::Missing("the audited read's payload"))?;
    assert_eq!(
        body.as_deref(),
        Some(&b"v1"[..]),
        "reads see committed data"
    );
    assert_eq!(found, 1);
    assert_eq!(
        s.audit_len()?,
        before + 1,
        "the read's audit entry is committed before the result returns"
    );
    assert_eq!(
        s.audit_range(before, before + 1)?
            .first()
            .found("the read's audit entry")?
            .record,
        b"read o1"
    );
    let failed = s.audited(Box::new(|_| Err(StoreError::Backend("boom".into()))));
    assert!(failed.is_err());
    assert_eq!(s.audit_len()?, before + 1, "a failed read appends nothing");
    Ok(())
}
