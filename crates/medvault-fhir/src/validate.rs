//! A generic validator driven by the R4 element table: unknown elements, cardinality,
//! required elements, choice types, primitive formats, required code bindings, references.

use serde_json::{Map, Value};

use crate::defs::{defs, Element};
use crate::outcome::{Issue, IssueCode};

const MAX_STRING: usize = 1 << 20;

struct Ctx {
    issues: Vec<Issue>,
}

impl Ctx {
    fn err(&mut self, code: IssueCode, msg: impl Into<String>, at: &str) {
        if self.issues.len() < 50 {
            self.issues
                .push(Issue::error(code, msg.into(), Some(at.to_owned())));
        }
    }
}

pub(crate) fn validate_resource(rtype: &str, obj: &Map<String, Value>) -> Vec<Issue> {
    let mut ctx = Ctx { issues: vec![] };
    resource(&mut ctx, rtype, obj, rtype, 0);
    ctx.issues
}

fn resource(ctx: &mut Ctx, rtype: &str, obj: &Map<String, Value>, at: &str, depth: usize) {
    if !defs().is_resource(rtype) {
        ctx.err(
            IssueCode::NotSupported,
            "resource type is not supported",
            at,
        );
        return;
    }
    object(ctx, rtype, obj, at, depth, true);
}

/// Validates the children of `obj`, whose definitions live under `def_path`.
fn object(
    ctx: &mut Ctx,
    def_path: &str,
    obj: &Map<String, Value>,
    at: &str,
    depth: usize,
    is_resource: bool,
) {
    if depth > crate::MAX_DEPTH {
        ctx.err(IssueCode::TooCostly, "nesting too deep", at);
        return;
    }
    let d = defs();
    let mut choices_seen: Vec<(String, String)> = vec![];
    for (key, value) in obj {
        if is_resource && key == "resourceType" {
            continue;
        }
        let (name, is_underscore) = match key.strip_prefix('_') {
            Some(n) => (n, true),
            None => (key.as_str(), false),
        };
        let here = format!("{at}.{key}");
        let path = format!("{def_path}.{name}");
        let Some(el) = d.element(&path) else {
            ctx.err(IssueCode::Structure, "unknown element", &here);
            continue;
        };
        if let Some(stem) = &el.choice {
            if let Some((_, prev)) = choices_seen.iter().find(|(s, k)| s == stem && k != name) {
                let msg = format!("only one of the choice elements may be present (also `{prev}`)");
                ctx.err(IssueCode::Structure, msg, &here);
            }
            choices_seen.push((stem.clone(), name.to_owned()));
        }
        element_value(ctx, &path, el, value, &here, depth, is_underscore);
    }
    for name in d.required(def_path) {
        if !obj.contains_key(name.as_str()) && !obj.contains_key(&format!("_{name}")) {
            ctx.err(
                IssueCode::Required,
                "required element is missing",
                &format!("{at}.{name}"),
            );
        }
    }
    for stem in d.required_choices(def_path) {
        let prefix = format!("{def_path}.{stem}");
        let present = choices_seen.iter().any(|(s, _)| *s == prefix);
        if !present {
            ctx.err(
                IssueCode::Required,
                "required element is missing",
                &format!("{at}.{stem}[x]"),
            );
        }
    }
}

fn element_value(
    ctx: &mut Ctx,
    path: &str,
    el: &Element,
    value: &Value,
    at: &str,
    depth: usize,
    underscore: bool,
) {
    match (el.is_array(), value) {
        (true, Value::Array(items)) => {
            if items.is_empty() {
                ctx.err(IssueCode::Structure, "arrays must not be empty", at);
            }
            for (i, item) in items.iter().enumerate() {
                let here = format!("{at}[{i}]");
                if item.is_null() && (underscore || is_primitive(el)) {
                    continue;
                }
                single(ctx, path, el, item, &here, depth + 1, underscore);
            }
        }
        (true, _) => ctx.err(IssueCode::Structure, "element must be an array", at),
        (false, Value::Array(_)) => {
            ctx.err(IssueCode::Structure, "element must not be an array", at)
        }
        (false, v) => single(ctx, path, el, v, at, depth + 1, underscore),
    }
}

fn is_primitive(el: &Element) -> bool {
    el.t.first()
        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_lowercase()))
}

fn single(
    ctx: &mut Ctx,
    path: &str,
    el: &Element,
    v: &Value,
    at: &str,
    depth: usize,
    underscore: bool,
) {
    if underscore {
        // Primitive extension: id and extension only.
        match v {
            Value::Object(o) => object(ctx, "Element", o, at, depth, false),
            _ => ctx.err(
                IssueCode::Structure,
                "primitive extension must be an object",
                at,
            ),
        }
        return;
    }
    let d = defs();
    if let Some(target) = &el.reference {
        return match v {
            Value::Object(o) => object(ctx, target, o, at, depth, false),
            _ => ctx.err(IssueCode::Structure, "element must be an object", at),
        };
    }
    let Some(t) = el.t.first() else {
        ctx.err(IssueCode::Structure, "element has no type", at);
        return;
    };
    match t.as_str() {
        "Resource" => match v {
            Value::Object(o) => match o.get("resourceType").and_then(Value::as_str) {
                Some(rt) => resource(ctx, rt, o, at, depth),
                None => ctx.err(IssueCode::Required, "missing resourceType", at),
            },
            _ => ctx.err(IssueCode::Structure, "resource must be an object", at),
        },
        "BackboneElement" | "Element" => match v {
            Value::Object(o) => object(ctx, path, o, at, depth, false),
            _ => ctx.err(IssueCode::Structure, "element must be an object", at),
        },
        ty if d.is_complex(ty) => {
            match v {
                Value::Object(o) => {
                    object(ctx, ty, o, at, depth, false);
                    if ty == "Reference" {
                        if let Some(r) = o.get("reference").and_then(Value::as_str) {
                            if !valid_reference(r) {
                                ctx.err(IssueCode::Value, "reference must be Type/id, an absolute URL, urn:uuid: or #local", at);
                            }
                        }
                    }
                }
                _ => ctx.err(
                    IssueCode::Structure,
                    format!("element must be an object ({ty})"),
                    at,
                ),
            }
        }
        ty => primitive(ctx, ty, el, v, at),
    }
}

fn primitive(ctx: &mut Ctx, ty: &str, el: &Element, v: &Value, at: &str) {
    let ok = match ty {
        "boolean" => v.is_boolean(),
        "integer" => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        "positiveInt" => v
            .as_i64()
            .is_some_and(|n| n >= 1 && n <= i64::from(i32::MAX)),
        "unsignedInt" => v
            .as_i64()
            .is_some_and(|n| n >= 0 && n <= i64::from(i32::MAX)),
        "decimal" => v.is_number(),
        _ => match v.as_str() {
            None => false,
            Some(s) if s.is_empty() || s.len() > MAX_STRING => false,
            Some(s) => match ty {
                "string" | "markdown" => true,
                "xhtml" => s.trim_start().starts_with("<div"),
                "code" => is_code(s),
                "id" => medvault_types::is_fhir_id(s),
                "uri" | "url" | "canonical" => !s.chars().any(char::is_whitespace),
                "oid" => s.starts_with("urn:oid:") && s.len() > 8,
                "uuid" => s.starts_with("urn:uuid:") && s.len() == 45,
                "base64Binary" => s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/= \n\r".contains(&b)),
                "date" => is_date(s),
                "dateTime" => is_datetime(s, false),
                "instant" => is_datetime(s, true),
                "time" => is_time(s),
                _ => true,
            },
        },
    };
    if !ok {
        ctx.err(
            IssueCode::Value,
            format!("value is not a valid FHIR {ty}"),
            at,
        );
        return;
    }
    if let (Some(codes), Some(s)) = (&el.codes, v.as_str()) {
        if !codes.iter().any(|c| c == s) {
            ctx.err(
                IssueCode::CodeInvalid,
                "code is not in the required value set",
                at,
            );
        }
    }
}

fn is_code(s: &str) -> bool {
    !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.contains("  ")
        && !s.chars().any(|c| c.is_whitespace() && c != ' ')
}

fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() == n && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn is_date(s: &str) -> bool {
    let mut parts = s.split('-');
    let Some(y) = parts.next().and_then(|p| digits(p, 4)) else {
        return false;
    };
    let m = match parts.next() {
        None => return true,
        Some(p) => match digits(p, 2) {
            Some(m) if (1..=12).contains(&m) => m,
            _ => return false,
        },
    };
    let dd = match parts.next() {
        None => return true,
        Some(p) => match digits(p, 2) {
            Some(d) => d,
            None => return false,
        },
    };
    if parts.next().is_some() {
        return false;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let max = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    (1..=max).contains(&dd)
}

fn is_time(s: &str) -> bool {
    let (hms, frac) = match s.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (s, None),
    };
    if frac.is_some_and(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let p: Vec<&str> = hms.split(':').collect();
    matches!(p.as_slice(), [h, m, sec]
        if digits(h, 2).is_some_and(|h| h < 24) && digits(m, 2).is_some_and(|m| m < 60) && digits(sec, 2).is_some_and(|x| x < 61))
}

fn is_datetime(s: &str, instant: bool) -> bool {
    let Some((date, rest)) = s.split_once('T') else {
        return !instant && is_date(s);
    };
    if date.len() != 10 || !is_date(date) {
        return false;
    }
    let (time, tz) = if let Some(t) = rest.strip_suffix('Z') {
        (t, "Z")
    } else if rest.len() > 6 {
        let (t, z) = rest.split_at(rest.len() - 6);
        (t, z)
    } else {
        return false;
    };
    let tz_ok = tz == "Z"
        || ((tz.starts_with('+') || tz.starts_with('-'))
            && tz.get(3..4) == Some(":")
            && tz
                .get(1..3)
                .and_then(|h| digits(h, 2))
                .is_some_and(|h| h <= 14)
            && tz
                .get(4..6)
                .and_then(|m| digits(m, 2))
                .is_some_and(|m| m < 60));
    tz_ok && is_time(time)
}

fn valid_reference(r: &str) -> bool {
    if r.starts_with('#') || r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
        return !r.chars().any(char::is_whitespace);
    }
    if r.starts_with("http://") || r.starts_with("https://") {
        return !r.chars().any(char::is_whitespace) && !r.contains("/../");
    }
    let parts: Vec<&str> = r.split('/').collect();
    let type_ok = |t: &str| {
        t.starts_with(|c: char| c.is_ascii_uppercase())
            && t.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    match parts.as_slice() {
        [t, id] => type_ok(t) && medvault_types::is_fhir_id(id),
        [t, id, "_history", v] => {
            type_ok(t) && medvault_types::is_fhir_id(id) && medvault_types::is_fhir_id(v)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for ok in ["2024", "2024-02", "2024-02-29", "2000-02-29"] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in [
            "24",
            "2023-02-29",
            "2024-00",
            "2024-1-01",
            "2024-01-32",
            "1900-02-29",
            "2024-01-01-",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
        assert!(is_datetime("2024-05-01T10:00:00Z", true));
        assert!(is_datetime("2024-05-01T10:00:00.123+02:00", true));
        assert!(!is_datetime("2024-05-01", true));
        assert!(is_datetime("2024-05", false));
        assert!(!is_datetime("2024-05-01T25:00:00Z", false));
        assert!(!is_datetime("2024-05-01T10:00Z", false));
    }

    #[test]
    fn references() {
        assert!(valid_reference("Patient/abc-1"));
        assert!(valid_reference(
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"
        ));
        assert!(!valid_reference("Patient/../x"));
        assert!(!valid_reference("patient/x"));
        assert!(!valid_reference("Patient/a/b"));
    }
}
