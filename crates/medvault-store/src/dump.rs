//! A logical, backend-neutral dump of a store (what a backup carries): every durable table
//! in a fixed order, rows in primary-key order, values typed, so the same store dumps to the
//! same bytes (content-defined chunking then stores only what changed) and a dump taken on
//! one backend loads into the other. Sessions and login-throttle counters are left out:
//! a restore must not revive sign-ins.
//!
//! Frame format: `T` u16 name-length name u16 column-count (a table), then per row `R` and
//! one value per column (`0` null, `1` i64 LE, `2` u32-length UTF-8 text, `3` u32-length
//! bytes, `4` bool byte); `E` ends the dump. Nothing is decrypted: bodies stay ciphertext,
//! keys stay wrapped.
//!
//! A SQLite store snapshots as a *page image* instead ([`Store::snapshot`](crate::Store::snapshot)):
//! `P` u32 page-size u64 page-count u32-length JSON [`DumpStats`] (counted in the same read
//! transaction), then every page of the database file in order, then `E`. It restores by
//! writing the pages back (no row re-inserted, no index rebuilt), and loads into PostgreSQL
//! through a logical dump of the restored file.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::StoreError;

/// How a column is typed on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int,
    Text,
    /// Nullable text.
    OptText,
    Bytes,
    Bool,
    /// A patient id: NULL (SQLite) or '' (PostgreSQL, where it is part of a key) for none.
    Patient,
}

/// A durable table: name, typed columns, order.
pub(crate) struct Table {
    pub name: &'static str,
    pub cols: &'static [(&'static str, Kind)],
    pub order: &'static str,
}

use Kind::*;

/// Every table a dump carries, in dump order.
pub(crate) const TABLES: &[Table] = &[
    Table {
        name: "meta",
        cols: &[("key", Text), ("value", Bytes)],
        order: "key",
    },
    Table {
        name: "patient_keys",
        cols: &[
            ("patient_id", Text),
            ("key_version", Int),
            ("master_version", Int),
            ("wrapped", Bytes),
        ],
        order: "patient_id, key_version",
    },
    Table {
        name: "users",
        cols: &[
            ("username", Text),
            ("role", Text),
            ("password_hash", Text),
            ("totp_secret_wrapped", Bytes),
            ("totp_last_step", Int),
            ("disabled", Bool),
            ("failed_logins", Int),
            ("created", Text),
            ("practitioner_id", OptText),
            ("last_login", Int),
            ("training_current", Bool),
        ],
        order: "username",
    },
    Table {
        name: "credentials",
        cols: &[
            ("kind", Text),
            ("id", Bytes),
            ("username", Text),
            ("name", Text),
            ("data", Bytes),
            ("created", Int),
            ("last_used", Int),
        ],
        order: "kind, id",
    },
    Table {
        name: "policies",
        cols: &[
            ("version", Int),
            ("text", Text),
            ("proposed_by", Text),
            ("proposed_at", Int),
            ("status", Text),
            ("approved_by", Text),
            ("approved_at", Int),
        ],
        order: "version",
    },
    Table {
        name: "portal_links",
        cols: &[
            ("username", Text),
            ("patient_id", Text),
            ("kind", Text),
            ("evidence", Text),
            ("linked_by", Text),
            ("linked_at", Int),
        ],
        order: "username, patient_id",
    },
    Table {
        name: "break_glass",
        cols: &[
            ("id", Text),
            ("username", Text),
            ("patient_id", Text),
            ("reason", Text),
            ("justification", Bytes),
            ("created", Int),
            ("expires", Int),
            ("outcome", Text),
            ("reviewed_by", Text),
            ("reviewed_at", Int),
            ("note", Bytes),
            ("incident", Text),
        ],
        order: "id",
    },
    Table {
        name: "governance",
        cols: &[
            ("kind", Text),
            ("id", Text),
            ("at", Int),
            ("status", Text),
            ("subject", Text),
            ("body", Bytes),
        ],
        order: "kind, id",
    },
    Table {
        name: "incidents",
        cols: &[
            ("id", Text),
            ("opened_at", Int),
            ("status", Text),
            ("body", Text),
        ],
        order: "id",
    },
    Table {
        name: "legal_holds",
        cols: &[
            ("id", Text),
            ("patient_id", Text),
            ("matter", Text),
            ("reason", Bytes),
            ("set_by", Text),
            ("set_at", Int),
            ("released_by", Text),
            ("released_at", Int),
        ],
        order: "id",
    },
    Table {
        name: "destructions",
        cols: &[
            ("id", Text),
            ("patient_id", Text),
            ("reason", Text),
            ("status", Text),
            ("requested_by", Text),
            ("requested_at", Int),
            ("approved_by", Text),
            ("approved_at", Int),
            ("records", Text),
            ("audit_seq", Int),
            ("checkpoint", Int),
        ],
        order: "id",
    },
    Table {
        name: "resource_current",
        cols: &[
            ("rtype", Text),
            ("id", Text),
            ("patient_id", Patient),
            ("version", Int),
            ("deleted", Bool),
            ("last_updated", Text),
            ("category", Text),
            ("created_seq", Int),
        ],
        order: "rtype, id",
    },
    Table {
        name: "search_index",
        cols: &[
            ("rtype", Text),
            ("param", Text),
            ("token", Bytes),
            ("id", Text),
            ("patient_id", Patient),
        ],
        order: "rtype, param, token, id",
    },
    Table {
        name: "resource_versions",
        cols: &[
            ("rtype", Text),
            ("id", Text),
            ("version", Int),
            ("patient_id", Patient),
            ("last_updated", Text),
            ("deleted", Bool),
            ("category", Text),
            ("key_version", Int),
            ("body", Bytes),
        ],
        order: "rtype, id, version",
    },
    Table {
        name: "audit_checkpoints",
        cols: &[("size", Int), ("note", Text)],
        order: "size",
    },
    Table {
        name: "audit_tiles",
        cols: &[("level", Int), ("idx", Int), ("hashes", Bytes)],
        order: "level, idx",
    },
    Table {
        name: "audit_log",
        cols: &[("seq", Int), ("leaf_hash", Bytes), ("record", Bytes)],
        order: "seq",
    },
];

/// One value of a dumped row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
}

/// One value of a row being dumped, borrowed from the database's own buffers (a dump
/// copies each byte once, into the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Int(i64),
    /// UTF-8 text, as stored.
    Text(&'a [u8]),
    Bytes(&'a [u8]),
    Bool(bool),
}

impl Value {
    /// This value as a [`Cell`].
    pub fn cell(&self) -> Cell<'_> {
        match self {
            Value::Null => Cell::Null,
            Value::Int(i) => Cell::Int(*i),
            Value::Text(t) => Cell::Text(t.as_bytes()),
            Value::Bytes(b) => Cell::Bytes(b),
            Value::Bool(b) => Cell::Bool(*b),
        }
    }
}

/// What a dump or load counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Current, non-deleted resources per FHIR type (what a drill counts after restoring).
    pub resources: BTreeMap<String, u64>,
    /// Entries in the audit log.
    pub audit_entries: u64,
    /// The newest `last_updated` of any resource version (FHIR instant), if any.
    pub newest_write: Option<String>,
    /// Bytes of the dump stream.
    pub bytes: u64,
}

impl DumpStats {
    fn note(&mut self, table: &str, row: &[Cell<'_>]) {
        match self.rows.get_mut(table) {
            Some(n) => *n += 1,
            None => {
                self.rows.insert(table.to_owned(), 1);
            }
        }
        let text = |t: &[u8]| String::from_utf8_lossy(t).into_owned();
        match table {
            "resource_current" => {
                if let (Some(Cell::Text(t)), Some(Cell::Bool(false))) = (row.first(), row.get(4)) {
                    let t = std::str::from_utf8(t).unwrap_or("");
                    match self.resources.get_mut(t) {
                        Some(n) => *n += 1,
                        None => {
                            self.resources.insert(t.to_owned(), 1);
                        }
                    }
                }
            }
            "resource_versions" => {
                if let Some(Cell::Text(u)) = row.get(4) {
                    if self
                        .newest_write
                        .as_deref()
                        .is_none_or(|n| n.as_bytes() < *u)
                    {
                        self.newest_write = Some(text(u));
                    }
                }
            }
            "audit_log" => self.audit_entries += 1,
            _ => {}
        }
    }
}

/// Writes frames, counting; buffered, so the stream sees few large writes.
pub(crate) struct Encoder<'a> {
    out: &'a mut dyn Write,
    pub stats: DumpStats,
    table: &'static str,
    buf: Vec<u8>,
}

/// How much an [`Encoder`] gathers before writing it out.
const ENCODE_BUFFER: usize = 256 * 1024;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("dump stream: {e}"))
}

impl<'a> Encoder<'a> {
    pub fn new(out: &'a mut dyn Write) -> Self {
        Encoder {
            out,
            stats: DumpStats::default(),
            table: "",
            buf: Vec::with_capacity(ENCODE_BUFFER + 64 * 1024),
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.stats.bytes += b.len() as u64;
        self.buf.extend_from_slice(b);
        if self.buf.len() >= ENCODE_BUFFER {
            self.out.write_all(&self.buf).map_err(io)?;
            self.buf.clear();
        }
        Ok(())
    }

    pub fn table(&mut self, t: &Table) -> Result<(), StoreError> {
        self.table = t.name;
        let name = t.name.as_bytes();
        self.put(b"T")?;
        self.put(&u16::try_from(name.len()).unwrap_or(0).to_le_bytes())?;
        self.put(name)?;
        self.put(&u16::try_from(t.cols.len()).unwrap_or(0).to_le_bytes())
    }

    pub fn row(&mut self, row: &[Cell<'_>]) -> Result<(), StoreError> {
        self.put(b"R")?;
        for v in row {
            match *v {
                Cell::Null => self.put(&[0])?,
                Cell::Int(i) => {
                    self.put(&[1])?;
                    self.put(&i.to_le_bytes())?;
                }
                Cell::Text(s) => {
                    self.put(&[2])?;
                    self.put(&len32(s.len())?)?;
                    self.put(s)?;
                }
                Cell::Bytes(b) => {
                    self.put(&[3])?;
                    self.put(&len32(b.len())?)?;
                    self.put(b)?;
                }
                Cell::Bool(b) => self.put(&[4, u8::from(b)])?,
            }
        }
        let table = self.table;
        self.stats.note(table, row);
        Ok(())
    }

    pub fn end(mut self) -> Result<DumpStats, StoreError> {
        self.put(b"E")?;
        self.out.write_all(&self.buf).map_err(io)?;
        self.buf.clear();
        self.out.flush().map_err(io)?;
        Ok(self.stats)
    }
}

fn len32(n: usize) -> Result<[u8; 4], StoreError> {
    u32::try_from(n)
        .map(u32::to_le_bytes)
        .map_err(|_| StoreError::Backend("value too large for a dump".into()))
}

/// One item read back from a dump.
pub(crate) enum Item {
    Table(&'static Table),
    Row(Vec<Value>),
    /// A page image's header (only ever the first item); its pages follow, read with
    /// [`Decoder::pages`].
    Image(ImageHeader),
    End,
}

/// Frame tag of a page image: a snapshot stream that begins with this byte is a page
/// image, whose header is padded so that its pages start at a multiple of the page size (a
/// power of two from 512 to 65,536 bytes). A backup may therefore cut it on a fixed grid of
/// any multiple of 64 KiB and every chunk holds whole pages, at the same offsets each time.
pub const IMAGE_TAG: u8 = b'P';

/// The first 16 bytes of every SQLite database file (SQLite "Database File Format" 1.3).
pub(crate) const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// What a page image's header says.
#[derive(Debug, Clone)]
pub(crate) struct ImageHeader {
    /// Bytes per page: a power of two from 512 to 65,536.
    pub page_size: u32,
    pub pages: u64,
    /// What the snapshot held, counted from the same read transaction.
    pub stats: DumpStats,
}

impl ImageHeader {
    /// The header's frame bytes (tag included), a whole number of pages long: the JSON is
    /// padded with spaces (which JSON allows after a value), so the pages after it start at
    /// a multiple of the page size ([`IMAGE_TAG`]).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut stats = serde_json::to_vec(&self.stats)
            .map_err(|e| StoreError::Backend(format!("page image header: {e}")))?;
        let page = (self.page_size as usize).max(1);
        let unpadded = 17 + stats.len();
        stats.resize(
            stats.len() + unpadded.div_ceil(page) * page - unpadded,
            b' ',
        );
        let mut b = Vec::with_capacity(17 + stats.len());
        b.push(IMAGE_TAG);
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.pages.to_le_bytes());
        b.extend_from_slice(&len32(stats.len())?);
        b.extend_from_slice(&stats);
        Ok(b)
    }
}

/// Reads frames, checking each against the known tables.
pub(crate) struct Decoder<'a> {
    input: &'a mut dyn Read,
    pub stats: DumpStats,
    table: Option<&'static Table>,
}

fn bad(what: &str) -> StoreError {
    StoreError::Backend(format!("not a medvault dump: {what}"))
}

impl<'a> Decoder<'a> {
    pub fn new(input: &'a mut dyn Read) -> Self {
        Decoder {
            input,
            stats: DumpStats::default(),
            table: None,
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut b = [0u8; N];
        self.input
            .read_exact(&mut b)
            .map_err(|_| bad("truncated"))?;
        self.stats.bytes += N as u64;
        Ok(b)
    }

    fn take_vec(&mut self, n: usize) -> Result<Vec<u8>, StoreError> {
        // Reserved up to a bound: a length is only believed as far as the bytes arrive.
        let mut b = Vec::with_capacity(n.min(1 << 20));
        let got = (&mut self.input)
            .take(n as u64)
            .read_to_end(&mut b)
            .map_err(|_| bad("truncated"))?;
        if got != n {
            return Err(bad("truncated"));
        }
        self.stats.bytes += n as u64;
        Ok(b)
    }

    pub fn next(&mut self) -> Result<Item, StoreError> {
        match &self.take::<1>()? {
            b"T" => {
                let n = u16::from_le_bytes(self.take()?) as usize;
                let name = String::from_utf8(self.take_vec(n)?).map_err(|_| bad("table name"))?;
                let cols = u16::from_le_bytes(self.take()?) as usize;
                let t = TABLES
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| bad("unknown table"))?;
                if t.cols.len() != cols {
                    return Err(bad("column count"));
                }
                self.table = Some(t);
                Ok(Item::Table(t))
            }
            b"R" => {
                let t = self.table.ok_or_else(|| bad("row before table"))?;
                let mut row = Vec::with_capacity(t.cols.len());
                for _ in t.cols {
                    let v = match self.take::<1>()? {
                        [0] => Value::Null,
                        [1] => Value::Int(i64::from_le_bytes(self.take()?)),
                        [2] => {
                            let n = u32::from_le_bytes(self.take()?) as usize;
                            Value::Text(
                                String::from_utf8(self.take_vec(n)?).map_err(|_| bad("text"))?,
                            )
                        }
                        [3] => {
                            let n = u32::from_le_bytes(self.take()?) as usize;
                            Value::Bytes(self.take_vec(n)?)
                        }
                        [4] => Value::Bool(self.take::<1>()? != [0]),
                        _ => return Err(bad("value tag")),
                    };
                    row.push(v);
                }
                let cells: Vec<Cell<'_>> = row.iter().map(Value::cell).collect();
                self.stats.note(t.name, &cells);
                Ok(Item::Row(row))
            }
            [IMAGE_TAG] if self.stats.bytes == 1 => {
                let page_size = u32::from_le_bytes(self.take()?);
                let pages = u64::from_le_bytes(self.take()?);
                if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
                    return Err(bad("page size"));
                }
                let n = u32::from_le_bytes(self.take()?) as usize;
                let stats: DumpStats =
                    serde_json::from_slice(&self.take_vec(n)?).map_err(|_| bad("image header"))?;
                Ok(Item::Image(ImageHeader {
                    page_size,
                    pages,
                    stats,
                }))
            }
            b"E" => Ok(Item::End),
            _ => Err(bad("frame tag")),
        }
    }

    /// Copies a page image's pages (after its header) to `out`, checking that the first
    /// is a SQLite database's and that every byte arrives, then reads the closing `E`.
    pub fn pages(&mut self, h: &ImageHeader, out: &mut dyn Write) -> Result<(), StoreError> {
        let total = u64::from(h.page_size)
            .checked_mul(h.pages)
            .ok_or_else(|| bad("page count"))?;
        let mut first = [0u8; 16];
        if total < 16 {
            return Err(bad("no database pages"));
        }
        self.input
            .read_exact(&mut first)
            .map_err(|_| bad("truncated"))?;
        if &first != SQLITE_MAGIC {
            return Err(bad("the first page is not a SQLite database's"));
        }
        out.write_all(&first).map_err(io)?;
        let copied = std::io::copy(&mut (&mut self.input).take(total - 16), out)
            .map_err(|_| bad("truncated"))?;
        self.stats.bytes += 16 + copied;
        if copied != total - 16 {
            return Err(bad("truncated"));
        }
        match self.next()? {
            Item::End => Ok(()),
            _ => Err(bad("data after the pages")),
        }
    }
}

/// The INSERT of one table (`$n` placeholders).
pub(crate) fn insert_sql(t: &Table) -> String {
    let cols: Vec<&str> = t.cols.iter().map(|c| c.0).collect();
    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        t.name,
        cols.join(", "),
        marks.join(", ")
    )
}

/// The SELECT of one table, in dump order: integers as 64-bit, no patient as NULL.
pub(crate) fn select_sql(t: &Table, pg: bool) -> String {
    let cols: Vec<String> = t
        .cols
        .iter()
        .map(|(c, k)| match k {
            Int if pg => format!("{c}::BIGINT"),
            Patient => format!("NULLIF({c}, '')"),
            _ => (*c).to_owned(),
        })
        .collect();
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        cols.join(", "),
        t.name,
        t.order
    )
}

/// The SQL counting current resources per type (a drill's census).
pub(crate) const CENSUS_SQL: &str =
    "SELECT rtype, COUNT(*) FROM resource_current WHERE NOT deleted GROUP BY rtype ORDER BY rtype";

/// Reads a whole dump without loading it: every frame parsed, to its end.
///
/// # Errors
/// The stream is cut, malformed or unreadable.
pub fn check(input: &mut dyn Read) -> Result<DumpStats, StoreError> {
    let mut d = Decoder::new(input);
    loop {
        match d.next()? {
            Item::End => return Ok(d.stats),
            Item::Image(h) => {
                d.pages(&h, &mut std::io::sink())?;
                return Ok(DumpStats {
                    bytes: d.stats.bytes,
                    ..h.stats
                });
            }
            Item::Table(_) | Item::Row(_) => {}
        }
    }
}

/// Called with `(table, row)` for each row of a dump.
pub type RowVisitor<'a> = dyn FnMut(&str, &[Value]) -> Result<(), StoreError> + 'a;

/// Calls `f(table, row)` for every row of a dump, in order.
///
/// # Errors
/// The stream is cut, malformed or unreadable; or `f` fails.
pub fn rows(input: &mut dyn Read, f: &mut RowVisitor<'_>) -> Result<DumpStats, StoreError> {
    let mut d = Decoder::new(input);
    let mut table = "";
    loop {
        match d.next()? {
            Item::Table(t) => table = t.name,
            Item::Row(r) => f(table, &r)?,
            Item::Image(_) => return Err(bad("a page image has no rows to visit")),
            Item::End => return Ok(d.stats),
        }
    }
}

/// Refuses to load into a store that holds anything: a restore goes to a fresh one.
pub(crate) fn must_be_empty(audit_rows: i64, meta_rows: i64) -> Result<(), StoreError> {
    if audit_rows > 0 || meta_rows > 0 {
        return Err(StoreError::Exists);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_junk_is_refused() {
        let mut buf = vec![];
        let mut e = Encoder::new(&mut buf);
        let t = TABLES.iter().find(|t| t.name == "audit_log").unwrap();
        e.table(t).unwrap();
        e.row(&[Cell::Int(0), Cell::Bytes(&[1, 2]), Cell::Bytes(b"{}")])
            .unwrap();
        let stats = e.end().unwrap();
        assert_eq!(stats.audit_entries, 1);
        assert_eq!(stats.bytes, buf.len() as u64);
        let mut r: &[u8] = &buf;
        let mut d = Decoder::new(&mut r);
        assert!(matches!(d.next().unwrap(), Item::Table(t) if t.name == "audit_log"));
        assert!(matches!(d.next().unwrap(), Item::Row(v) if v[1] == Value::Bytes(vec![1, 2])));
        assert!(matches!(d.next().unwrap(), Item::End));
        for cut in 0..buf.len() - 1 {
            let mut r: &[u8] = &buf[..cut];
            let mut d = Decoder::new(&mut r);
            let mut failed = false;
            for _ in 0..4 {
                match d.next() {
                    Err(_) => {
                        failed = true;
                        break;
                    }
                    Ok(Item::End) => break,
                    Ok(_) => {}
                }
            }
            assert!(failed, "a dump cut at {cut} is refused");
        }
    }

    #[test]
    fn a_page_image_header_fills_whole_pages_and_reads_back() {
        for page_size in [512u32, 4096, 65536] {
            let mut stats = DumpStats::default();
            stats.rows.insert("audit_log".into(), 12);
            stats.audit_entries = 12;
            let h = ImageHeader {
                page_size,
                pages: 3,
                stats,
            };
            let b = h.encode().unwrap();
            assert_eq!(b.len() % page_size as usize, 0, "page size {page_size}");
            let mut r: &[u8] = &b;
            let mut d = Decoder::new(&mut r);
            match d.next().unwrap() {
                Item::Image(back) => {
                    assert_eq!((back.page_size, back.pages), (page_size, 3));
                    assert_eq!(back.stats.audit_entries, 12);
                }
                _ => panic!("not read back as a page image's header"),
            }
            drop(d);
            assert!(r.is_empty());
        }
    }
}
