//! FHIR `date`, `dateTime` and `instant` values as the intervals their precision denotes,
//! and the prefixes of date search (FHIR R4 §3.1.1.4.2.2 "date", §3.1.1.5.6 "prefixes").
//!
//! A value is the half-open interval `[start, end)` in milliseconds since the Unix epoch,
//! UTC: `2026` is the whole year, `2026-11-22` the whole day, `2026-11-22T10:00:00+05:00`
//! that second, converted to UTC. A value without a time zone is taken as UTC (FHIR leaves
//! it to the server; medvault runs in UTC).

use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};

const DAY_MS: i64 = 86_400_000;

/// A date, dateTime or instant as an interval `[start, end)` of epoch milliseconds (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: i64,
    pub end: i64,
}

/// A date search prefix (FHIR R4 §3.1.1.5.6). Without one, `eq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// One date parameter value: a prefix and the interval it compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateQuery {
    pub prefix: Prefix,
    pub value: Interval,
}

fn ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn num(s: &str, len: usize) -> Option<u32> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn day_start(y: i32, m: Month, d: u8) -> Option<i64> {
    Some(ms(Date::from_calendar_date(y, m, d)
        .ok()?
        .midnight()
        .assume_utc()))
}

/// Parses a FHIR date, dateTime or instant into its interval.
///
/// # Errors
/// A short message for anything that is not one (years 0001–9999).
pub fn parse(s: &str) -> Result<Interval, &'static str> {
    const BAD: &str = "must be a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.sss]][Z|±hh:mm])";
    let (date, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let y = parts.next().and_then(|p| num(p, 4)).ok_or(BAD)?;
    let y = i32::try_from(y).map_err(|_| BAD)?;
    if y == 0 {
        return Err(BAD);
    }
    let mo = parts.next().map(|p| num(p, 2).ok_or(BAD)).transpose()?;
    let d = parts.next().map(|p| num(p, 2).ok_or(BAD)).transpose()?;
    if parts.next().is_some() {
        return Err(BAD);
    }
    let month = |m: u32| Month::try_from(u8::try_from(m).unwrap_or(0)).map_err(|_| BAD);
    match (mo, d, time_part) {
        (None, None, None) => Ok(Interval {
            start: day_start(y, Month::January, 1).ok_or(BAD)?,
            end: day_start(y + 1, Month::January, 1).unwrap_or(i64::MAX),
        }),
        (Some(m), None, None) => {
            let m = month(m)?;
            let (ny, nm) = if m == Month::December {
                (y + 1, Month::January)
            } else {
                (y, m.next())
            };
            Ok(Interval {
                start: day_start(y, m, 1).ok_or(BAD)?,
                end: day_start(ny, nm, 1).unwrap_or(i64::MAX),
            })
        }
        (Some(m), Some(d), None) => {
            let start = day_start(y, month(m)?, u8::try_from(d).map_err(|_| BAD)?).ok_or(BAD)?;
            Ok(Interval {
                start,
                end: start + DAY_MS,
            })
        }
        (Some(m), Some(d), Some(t)) => {
            let date = Date::from_calendar_date(y, month(m)?, u8::try_from(d).map_err(|_| BAD)?)
                .map_err(|_| BAD)?;
            let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
                (c, UtcOffset::UTC)
            } else if let Some(i) = t.rfind(['+', '-']) {
                let (c, z) = t.split_at(i);
                let sign: i8 = if z.starts_with('-') { -1 } else { 1 };
                let (h, mi) = z.get(1..).and_then(|z| z.split_once(':')).ok_or(BAD)?;
                let h = i8::try_from(num(h, 2).ok_or(BAD)?).map_err(|_| BAD)?;
                let mi = i8::try_from(num(mi, 2).ok_or(BAD)?).map_err(|_| BAD)?;
                (
                    c,
                    UtcOffset::from_hms(sign * h, sign * mi, 0).map_err(|_| BAD)?,
                )
            } else {
                (t, UtcOffset::UTC)
            };
            let mut f = clock.split(':');
            let h = f.next().and_then(|p| num(p, 2)).ok_or(BAD)?;
            let mi = f.next().and_then(|p| num(p, 2)).ok_or(BAD)?;
            let (sec, frac, width) = match f.next() {
                None => (0, 0, 60_000),
                Some(sf) => {
                    let (sec, frac) = match sf.split_once('.') {
                        Some((s, fr)) => (s, Some(fr)),
                        None => (sf, None),
                    };
                    let sec = num(sec, 2).ok_or(BAD)?;
                    match frac {
                        None => (sec, 0, 1000),
                        Some(fr) if !fr.is_empty() && fr.bytes().all(|b| b.is_ascii_digit()) => {
                            let digits = fr.len().min(3);
                            let v: i64 = fr.get(..digits).and_then(|x| x.parse().ok()).unwrap_or(0);
                            let scale = [1000, 100, 10, 1].get(digits).copied().unwrap_or(1);
                            (sec, v * scale, scale)
                        }
                        Some(_) => return Err(BAD),
                    }
                }
            };
            if f.next().is_some() {
                return Err(BAD);
            }
            let clock = Time::from_hms(
                u8::try_from(h).map_err(|_| BAD)?,
                u8::try_from(mi).map_err(|_| BAD)?,
                u8::try_from(sec).map_err(|_| BAD)?,
            )
            .map_err(|_| BAD)?;
            let start = ms(PrimitiveDateTime::new(date, clock).assume_offset(offset)) + frac;
            Ok(Interval {
                start,
                end: start + width,
            })
        }
        _ => Err(BAD),
    }
}

/// Parses a date search value: an optional prefix, then a date, dateTime or instant.
///
/// # Errors
/// A short message for a malformed value.
pub fn parse_query(v: &str) -> Result<DateQuery, &'static str> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, v.get(2..)),
        Some("ne") => (Prefix::Ne, v.get(2..)),
        Some("gt") => (Prefix::Gt, v.get(2..)),
        Some("lt") => (Prefix::Lt, v.get(2..)),
        Some("ge") => (Prefix::Ge, v.get(2..)),
        Some("le") => (Prefix::Le, v.get(2..)),
        Some("sa") => (Prefix::Sa, v.get(2..)),
        Some("eb") => (Prefix::Eb, v.get(2..)),
        Some("ap") => (Prefix::Ap, v.get(2..)),
        _ => (Prefix::Eq, Some(v)),
    };
    Ok(DateQuery {
        prefix,
        value: parse(rest.unwrap_or(""))?,
    })
}

impl DateQuery {
    /// The interval `ap` accepts: the value widened by 10% of its distance from `now`
    /// (at least a day), as FHIR suggests.
    fn approx(&self, now: i64) -> Interval {
        let gap = (now - self.value.start).abs() / 10;
        let w = gap.max(DAY_MS);
        Interval {
            start: self.value.start.saturating_sub(w),
            end: self.value.end.saturating_add(w),
        }
    }

    /// Whether a resource whose value is `target` matches (FHIR R4 §3.1.1.5.6): `eq` — the
    /// target lies within the value; `ne` — it does not; `gt`/`lt` — some of it lies
    /// after/before the value; `ge`/`le` — `gt`/`lt` or `eq`; `sa`/`eb` — it starts
    /// after/ends before the value; `ap` — it overlaps the value widened by 10% of its
    /// distance from `now` (epoch ms).
    pub fn matches(&self, target: Interval, now: i64) -> bool {
        let (s, t) = (self.value, target);
        let within = t.start >= s.start && t.end <= s.end;
        match self.prefix {
            Prefix::Eq => within,
            Prefix::Ne => !within,
            Prefix::Gt => t.end > s.end,
            Prefix::Lt => t.start < s.start,
            Prefix::Ge => t.end > s.end || within,
            Prefix::Le => t.start < s.start || within,
            Prefix::Sa => t.start >= s.end,
            Prefix::Eb => t.end <= s.start,
            Prefix::Ap => {
                let a = self.approx(now);
                t.start < a.end && t.end > a.start
            }
        }
    }

    /// For a stored instant `t` (a target one millisecond wide, as `_lastUpdated`): the
    /// range of `t` that matches, `from <= t < to`, or outside it for `ne`.
    pub fn instant_range(&self, now: i64) -> (Option<i64>, Option<i64>, bool) {
        let s = self.value;
        match self.prefix {
            Prefix::Eq => (Some(s.start), Some(s.end), false),
            Prefix::Ne => (Some(s.start), Some(s.end), true),
            Prefix::Gt | Prefix::Sa => (Some(s.end), None, false),
            Prefix::Lt | Prefix::Eb => (None, Some(s.start), false),
            Prefix::Ge => (Some(s.start), None, false),
            Prefix::Le => (None, Some(s.end), false),
            Prefix::Ap => {
                let a = self.approx(now);
                (Some(a.start), Some(a.end), false)
            }
        }
    }

    /// Every interval in which a matching target must have some part (every prefix is
    /// `true` only for targets that overlap it), for choosing blind-index tokens; `None`
    /// for `ne`, which any date may satisfy.
    pub fn candidates(&self, now: i64) -> Option<Interval> {
        let s = self.value;
        let (start, end) = match self.prefix {
            Prefix::Eq => (s.start, s.end),
            Prefix::Ne => return None,
            Prefix::Gt | Prefix::Sa => (s.end, i64::MAX),
            Prefix::Lt | Prefix::Eb => (i64::MIN, s.start),
            Prefix::Ge => (s.start, i64::MAX),
            Prefix::Le => (i64::MIN, s.end),
            Prefix::Ap => {
                let a = self.approx(now);
                (a.start, a.end)
            }
        };
        Some(Interval { start, end })
    }
}

/// Formats epoch milliseconds as a FHIR instant in UTC with milliseconds
/// (`YYYY-MM-DDThh:mm:ss.sssZ`), the form `_lastUpdated` is stored in.
pub fn format_instant(ms: i64) -> String {
    let clamped = ms.clamp(-62_135_596_800_000, 253_402_300_799_999);
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(clamped) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    medvault_types::fhir_instant(t)
}

/// The token value of an ongoing Period (a start and no end): included in the covering
/// tokens of every range open to the future.
pub const OPEN_END: &str = "~open-end";

/// The first and last years the date blind index covers: open ranges stop here, and a
/// clinical date outside them is found by equality only. Living patients' birth dates and
/// every clinical date lie well inside.
pub const INDEXED_YEARS: (i32, i32) = (1800, 2200);

/// The blind-index token values whose union covers every stored date that can overlap
/// `c` (widened by a day each side, since a stored value's calendar day is the one
/// written, in its own time zone): day tokens for the partial months at the edges, month
/// tokens for the partial years, year tokens for the whole years, and the precision
/// markers (`YYYY-MM~`, `YYYY~`) of values written only to month or year precision in the
/// edge months and years. Shapes as [`crate::search_tokens`] writes them.
pub fn covering_tokens(c: Interval) -> Vec<String> {
    let lo = day_start(INDEXED_YEARS.0, Month::January, 1).unwrap_or(0);
    let hi = day_start(INDEXED_YEARS.1 + 1, Month::January, 1).unwrap_or(0);
    let start = c.start.saturating_sub(DAY_MS).max(lo);
    let end = c.end.saturating_add(DAY_MS).min(hi);
    let mut out = vec![];
    if c.end == i64::MAX {
        out.push(OPEN_END.to_owned());
    }
    if start >= end {
        return out;
    }
    let to_date = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .map(|t| t.date())
            .unwrap_or(Date::MIN)
    };
    let (first, last) = (to_date(start), to_date(end - 1));
    let mut d = first;
    while d <= last {
        let (y, m) = (d.year(), d.month());
        let whole_year_left = d.month() == Month::January && d.day() == 1 && {
            let ye = Date::from_calendar_date(y, Month::December, 31).unwrap_or(d);
            ye <= last
        };
        if whole_year_left {
            out.push(format!("{y:04}"));
            d = Date::from_calendar_date(y + 1, Month::January, 1).unwrap_or(Date::MAX);
            if d == Date::MAX {
                break;
            }
            continue;
        }
        let month_end = {
            let (ny, nm) = if m == Month::December {
                (y + 1, Month::January)
            } else {
                (y, m.next())
            };
            Date::from_calendar_date(ny, nm, 1)
                .ok()
                .and_then(|x| x.previous_day())
                .unwrap_or(d)
        };
        if d.day() == 1 && month_end <= last {
            out.push(format!("{y:04}-{:02}", u8::from(m)));
            d = month_end.next_day().unwrap_or(Date::MAX);
        } else {
            out.push(format!("{y:04}-{:02}-{:02}", u8::from(m), d.day()));
            out.push(format!("{y:04}-{:02}~", u8::from(m)));
            d = d.next_day().unwrap_or(Date::MAX);
        }
        out.push(format!("{y:04}~"));
        if d == Date::MAX {
            break;
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        parse(s).unwrap().start
    }

    #[test]
    fn precision_gives_the_interval() {
        let y = parse("2026").unwrap();
        assert_eq!(y.end - y.start, 365 * DAY_MS);
        let d = parse("2026-11-22").unwrap();
        assert_eq!(d.end - d.start, DAY_MS);
        assert_eq!(
            at("2026-11-22T10:00:00+05:00"),
            at("2026-11-22T05:00:00Z"),
            "offsets convert to UTC"
        );
        let s = parse("2026-11-22T05:00:00Z").unwrap();
        assert_eq!(s.end - s.start, 1000);
        assert_eq!(at("2026-11-22T05:00:00.123Z") - s.start, 123);
        for bad in [
            "2026-13",
            "2026-02-30",
            "26",
            "2026-11-22T25:00Z",
            "2026-11-22T10:00:00+5",
            "x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_follow_the_spec() {
        let now = at("2026-11-29");
        let q = |v: &str| parse_query(v).unwrap();
        let day = parse("2026-11-22").unwrap();
        let noon = parse("2026-11-22T12:00:00Z").unwrap();
        assert!(q("2026-11-22").matches(noon, now));
        assert!(q("eq2026-11").matches(day, now));
        assert!(
            !q("eq2026-11-22T12:00:00Z").matches(day, now),
            "the day is not within the second"
        );
        assert!(q("ne2026-11-21").matches(day, now));
        assert!(q("le2026-11-22").matches(noon, now), "le today finds today");
        assert!(!q("gt2026-11-22").matches(noon, now));
        assert!(q("ge2026-11-22").matches(noon, now));
        assert!(q("lt2026-11-23").matches(noon, now));
        assert!(q("sa2026-11-21").matches(day, now) && !q("sa2026-11-22").matches(day, now));
        assert!(q("eb2026-11-23").matches(day, now) && !q("eb2026-11-22").matches(day, now));
        assert!(q("ap2026-11-21").matches(day, now));
        assert!(!q("ap2020-01-01").matches(day, now));
    }

    #[test]
    fn covering_tokens_are_few_and_cover() {
        let q = parse_query("ge2026-11-22").unwrap();
        let t = covering_tokens(q.candidates(at("2026-11-29")).unwrap());
        assert!(t.contains(&"2026-11-21".to_owned()) && t.contains(&"2026-11-30".to_owned()));
        assert!(t.contains(&"2026-12".to_owned()) && t.contains(&"2027".to_owned()));
        assert!(t.contains(&"2026-11~".to_owned()) && t.contains(&"2026~".to_owned()));
        assert!(!t.contains(&"2026-11-19".to_owned()) && !t.contains(&"2026-10".to_owned()));
        assert!(t.len() < 200, "{}", t.len());
        let e = covering_tokens(parse_query("1961-04-12").unwrap().candidates(0).unwrap());
        assert_eq!(
            e,
            [
                "1961-04-11",
                "1961-04-12",
                "1961-04-13",
                "1961-04~",
                "1961~"
            ]
        );
    }
}
