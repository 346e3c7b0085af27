//! Property-based fuzzing of everything that parses client input: resource JSON (parse,
//! validate, categorize, index, de-identify), search parameters, transaction Bundles and
//! FHIR dates. Each property is "no panic, and an answer the caller can act on".
//!
//! The CI smoke runs proptest's default 256 cases per property; a longer run:
//! `PROPTEST_CASES=200000 cargo test -p medvault-fhir --release fuzz_`.

use proptest::prelude::*;
use serde_json::{Map, Value};

use crate::{bundle, date, search, Resource, ResourceType, SUPPORTED_TYPES};

/// Element names FHIR resources use, so generated objects look like resources often enough
/// to reach the validator's and indexer's deeper branches.
const KEYS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "security",
    "tag",
    "system",
    "code",
    "display",
    "coding",
    "text",
    "name",
    "family",
    "given",
    "birthDate",
    "gender",
    "identifier",
    "value",
    "subject",
    "patient",
    "reference",
    "status",
    "category",
    "effectiveDateTime",
    "valueQuantity",
    "unit",
    "entry",
    "resource",
    "request",
    "method",
    "url",
    "fullUrl",
    "contained",
    "extension",
    "telecom",
    "address",
    "postalCode",
    "line",
    "period",
    "start",
    "end",
    "member",
    "participant",
    "actor",
    "onsetDateTime",
    "authoredOn",
    "type",
    "provision",
    "data",
    "ifMatch",
    "ifNoneExist",
    "note",
    "valueString",
    "lastUpdated",
    "versionId",
];

/// Strings with the shapes FHIR values take (dates, references, codes) and some hostile ones.
fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ./:|_-]{0,24}",
        1 => any::<String>(),
        1 => "(19|20|99)[0-9]{2}(-[0-1][0-9](-[0-3][0-9](T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][0-1][0-9]:[0-5][0-9])?)?)?)?",
        1 => "(Patient|Observation|Practitioner|urn:uuid:|#)[a-z0-9-]{0,40}(/_history/[0-9]{1,3})?",
        1 => prop::sample::select(SUPPORTED_TYPES).prop_map(str::to_owned),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
                        1 => "[a-zA-Z_@]{1,12}",
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A JSON object that names a supported resource type (most of the time).
fn arb_resource() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(SUPPORTED_TYPES),
        prop::collection::vec((prop::sample::select(KEYS), arb_json()), 0..10),
    )
        .prop_map(|(rt, kv)| {
            let mut m: Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            m.insert("resourceType".into(), Value::String(rt.to_owned()));
            Value::Object(m)
        })
}

/// Everything the server does with an accepted resource: categorize, label, index,
/// de-identify, serialize and parse again.
fn exercise(r: &Resource) {
    let rt = r.rtype();
    let _ = crate::search_tokens(rt, r.json());
    let mut copy = r.json().clone();
    crate::deid::safe_harbor(&mut copy, 2026, &|t: &str, id: &str| {
        format!("{t}-{}", id.len())
    });
    let bytes = serde_json::to_vec(&Value::Object(r.json().clone())).unwrap_or_default();
    let again = Resource::parse(&bytes, Some(rt));
    assert!(
        again.is_ok(),
        "an accepted resource must parse again: {again:?}"
    );
}

proptest! {
    #[test]
    fn fuzz_resource_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Resource::parse(&bytes, None);
    }

    #[test]
    fn fuzz_resource_json_parse_validate_index(v in arb_resource()) {
        if let Ok(r) = Resource::from_value(v.clone(), None) {
            exercise(&r);
        }
        let text = v.to_string();
        let _ = Resource::parse(text.as_bytes(), ResourceType::parse("Patient"));
    }

    #[test]
    fn fuzz_any_json_is_refused_cleanly(v in arb_json()) {
        if let Ok(r) = Resource::from_value(v, None) {
            exercise(&r);
        }
    }

    #[test]
    fn fuzz_search_parameters(
        rt in prop::sample::select(SUPPORTED_TYPES),
        params in prop::collection::vec(
            (
                prop_oneof![
                    3 => prop::sample::select(&[
                        "_id", "_count", "_sort", "_include", "_revinclude", "_elements",
                        "_summary", "_total", "_cursor", "_lastUpdated", "_has:Observation:patient:code",
                        "patient", "subject", "subject:Patient", "subject.name", "code", "code:text",
                        "date", "birthdate", "family", "family:exact", "name:contains", "given",
                        "identifier", "category", "status", "status:not", "gender:missing",
                        "value-quantity", "general-practitioner.name",
                    ][..]).prop_map(str::to_owned),
                    1 => "[a-z_:.-]{1,20}",
                ],
                prop_oneof![
                    3 => arb_string(),
                    1 => "(eq|ne|gt|lt|ge|le|sa|eb|ap)?[0-9]{4}(-[0-9]{2}){0,2}",
                    1 => "[a-z:/.]{0,20}\\|[A-Za-z0-9-]{0,12}",
                    1 => "-?[0-9]{0,20}",
                ],
            ),
            0..6,
        ),
        strict in any::<bool>(),
    ) {
        if let Some(rt) = ResourceType::parse(rt) {
            let _ = search::parse(rt, &params, strict);
        }
    }

    #[test]
    fn fuzz_transaction_bundles(
        entries in prop::collection::vec(
            (arb_resource(), prop::sample::select(&["POST", "PUT", "DELETE", "GET", "PATCH", "post", ""][..]), arb_string(), arb_string()),
            0..6,
        ),
        kind in prop::sample::select(&["transaction", "batch", "collection", "searchset", ""][..]),
        collection_allowed in any::<bool>(),
        junk in arb_json(),
    ) {
        let entry: Vec<Value> = entries
            .into_iter()
            .map(|(r, m, url, full)| serde_json::json!({"fullUrl": full, "resource": r, "request": {"method": m, "url": url}}))
            .collect();
        let b = serde_json::json!({"resourceType": "Bundle", "type": kind, "entry": entry});
        let _ = bundle::parse_transaction(b, collection_allowed);
        let _ = bundle::parse_transaction(junk, collection_allowed);
    }

    #[test]
    fn fuzz_dates(s in arb_string()) {
        if let Ok(i) = date::parse(&s) {
            // An interval's start never follows its end.
            prop_assert!(i.start <= i.end, "{s}: {i:?}");
        }
        let _ = date::parse_query(&s);
    }
}
