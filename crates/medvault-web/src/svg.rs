//! Server-rendered SVG charts (no script): a vital sign's trend and accesses per day. Each
//! is an `<svg role="img">` with a `<title>` and `<desc>` naming what it shows for screen
//! readers; colours are presentation attributes (the CSP forbids inline `style`).
//! Text placed in the SVG is XML-escaped here, since the page embeds the markup as is.

/// One value on a day (the day as a Julian day number).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub day: i32,
    pub value: f64,
}

const W: f64 = 560.0;
const H: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 36.0;

/// XML-escapes text for an SVG element or attribute.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => {}
            c => o.push(c),
        }
    }
    o
}

/// The Julian day of a FHIR date or dateTime's date part (`YYYY-MM-DD…`).
pub(crate) fn day_number(s: &str) -> Option<i32> {
    let d = s.get(..10)?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(d, fmt).ok().map(|d| d.to_julian_day())
}

fn day_text(day: i32) -> String {
    time::Date::from_julian_day(day)
        .map(|d| d.to_string())
        .unwrap_or_default()
}

fn num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e12 {
        format!("{}", n as i64)
    } else {
        format!("{n:.1}")
    }
}

/// A line plot of `points` (sorted here by day) titled `name`, values in `unit`.
pub(crate) fn trend(name: &str, unit: &str, mut points: Vec<Point>) -> String {
    points.sort_by_key(|p| p.day);
    let (Some(first), Some(last)) = (points.first().copied(), points.last().copied()) else {
        return String::new();
    };
    let lo = points.iter().map(|p| p.value).fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.value)
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if (hi - lo).abs() < f64::EPSILON {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    let span = f64::from((last.day - first.day).max(1));
    let x = |d: i32| LEFT + f64::from(d - first.day) / span * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (H - TOP - BOTTOM);
    let line: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.day), y(p.value)))
        .collect();
    let dots: String = points
        .iter()
        .map(|p| {
            format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#0b4f8a\"><title>{} {} {}</title></circle>",
                x(p.day),
                y(p.value),
                day_text(p.day),
                num(p.value),
                esc(unit)
            )
        })
        .collect();
    let title = format!("{name} trend");
    let desc = format!(
        "{} values from {} to {}, between {} and {} {}",
        points.len(),
        day_text(first.day),
        day_text(last.day),
        num(lo),
        num(hi),
        unit
    );
    format!(
        "<figure><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\">\
<title>{t}</title><desc>{d}</desc>\
<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{yb}\" stroke=\"#4a4a4a\"/>\
<line x1=\"{LEFT}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#4a4a4a\"/>\
<text x=\"{tx}\" y=\"{ty_hi}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1a1a1a\">{hi}</text>\
<text x=\"{tx}\" y=\"{ty_lo}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1a1a1a\">{lo}</text>\
<text x=\"{LEFT}\" y=\"{tdate}\" font-size=\"12\" fill=\"#1a1a1a\">{d0}</text>\
<text x=\"{xr}\" y=\"{tdate}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1a1a1a\">{d1}</text>\
<polyline points=\"{pts}\" fill=\"none\" stroke=\"#0b4f8a\" stroke-width=\"2\"/>{dots}</svg>\
<figcaption>{t} ({u})</figcaption></figure>",
        t = esc(&title),
        d = esc(&desc),
        u = esc(unit),
        yb = H - BOTTOM,
        xr = W - RIGHT,
        tx = LEFT - 6.0,
        ty_hi = TOP + 4.0,
        ty_lo = H - BOTTOM,
        tdate = H - BOTTOM + 18.0,
        hi = num(hi),
        lo = num(lo),
        d0 = day_text(first.day),
        d1 = day_text(last.day),
        pts = line.join(" "),
    )
}

/// A bar chart of counts per day (`YYYY-MM-DD`, sorted), titled `name`.
pub(crate) fn per_day(name: &str, days: &[(String, u32)]) -> String {
    if days.is_empty() {
        return String::new();
    }
    let max = days.iter().map(|d| d.1).max().unwrap_or(1).max(1);
    let n = days.len() as f64;
    let slot = (W - LEFT - RIGHT) / n;
    let bar = (slot * 0.8).max(1.0);
    let bars: String = days
        .iter()
        .enumerate()
        .map(|(i, (day, count))| {
            let h = f64::from(*count) / f64::from(max) * (H - TOP - BOTTOM);
            format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#0b4f8a\"><title>{}: {} accesses</title></rect>",
                LEFT + i as f64 * slot,
                H - BOTTOM - h,
                bar,
                h,
                esc(day),
                count
            )
        })
        .collect();
    let total: u32 = days.iter().map(|d| d.1).sum();
    let (first, last) = (
        days.first().map(|d| d.0.as_str()).unwrap_or_default(),
        days.last().map(|d| d.0.as_str()).unwrap_or_default(),
    );
    format!(
        "<figure><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\">\
<title>{t}</title><desc>{total} accesses on {n} days from {f} to {l}; at most {max} in a day</desc>\
<line x1=\"{LEFT}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#4a4a4a\"/>\
<text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1a1a1a\">{max}</text>\
<text x=\"{LEFT}\" y=\"{tdate}\" font-size=\"12\" fill=\"#1a1a1a\">{f}</text>\
<text x=\"{xr}\" y=\"{tdate}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1a1a1a\">{l}</text>\
{bars}</svg><figcaption>{t}</figcaption></figure>",
        t = esc(name),
        n = days.len(),
        f = esc(first),
        l = esc(last),
        yb = H - BOTTOM,
        xr = W - RIGHT,
        tx = LEFT - 6.0,
        ty = TOP + 4.0,
        tdate = H - BOTTOM + 18.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_text_is_escaped() {
        let s = trend(
            "<script>alert(1)</script>",
            "mm\"Hg",
            vec![Point { day: 1, value: 1.0 }, Point { day: 2, value: 2.0 }],
        );
        assert!(!s.contains("<script>"));
        assert!(s.contains("&lt;script&gt;"));
        assert!(!s.contains("mm\"Hg"));
    }

    #[test]
    fn per_day_draws_one_bar_per_day() {
        let s = per_day(
            "Accesses",
            &[("2026-11-01".into(), 3), ("2026-11-02".into(), 1)],
        );
        assert_eq!(s.matches("<rect").count(), 2);
        assert!(s.contains("4 accesses on 2 days"));
    }

    #[test]
    fn dates_become_day_numbers() {
        assert_eq!(
            day_number("2026-11-02T10:00:00Z").map(|d| d - day_number("2026-11-01").unwrap_or(0)),
            Some(1)
        );
        assert_eq!(day_number("bad"), None);
    }
}
