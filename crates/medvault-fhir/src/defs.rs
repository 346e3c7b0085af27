//! The vendored HL7 R4 element table (see `tools/gen-fhir-defs.py`).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde::Deserialize;

const DATA: &str = include_str!("../data/r4-elements.json");

#[derive(Deserialize)]
struct Raw {
    resources: Vec<String>,
    #[serde(rename = "complexTypes")]
    complex_types: Vec<String>,
    elements: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Element {
    pub min: u32,
    pub max: String,
    #[serde(default)]
    pub t: Vec<String>,
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    #[serde(default)]
    pub codes: Option<Vec<String>>,
    #[serde(default)]
    pub choice: Option<String>,
}

impl Element {
    pub fn is_array(&self) -> bool {
        self.max != "1" && self.max != "0"
    }
}

pub(crate) struct Defs {
    resources: HashSet<String>,
    complex: HashSet<String>,
    elements: HashMap<String, Element>,
    /// parent path -> names of its required children
    required: HashMap<String, Vec<String>>,
    /// parent path -> choice stems (short names) that must have one value
    required_choice: HashMap<String, Vec<String>>,
}

impl Defs {
    pub fn is_resource(&self, t: &str) -> bool {
        self.resources.contains(t)
    }
    pub fn is_complex(&self, t: &str) -> bool {
        self.complex.contains(t)
    }
    pub fn element(&self, path: &str) -> Option<&Element> {
        self.elements.get(path)
    }
    pub fn required(&self, parent: &str) -> &[String] {
        self.required.get(parent).map(Vec::as_slice).unwrap_or(&[])
    }
    pub fn required_choices(&self, parent: &str) -> &[String] {
        self.required_choice
            .get(parent)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

fn split_parent(path: &str) -> Option<(&str, &str)> {
    path.rsplit_once('.')
}

fn load() -> Defs {
    // INVARIANT: the vendored file is generated and checked by the tests below; a parse
    // failure here would be a build defect, so fall back to an empty table (deny all).
    let raw: Raw = serde_json::from_str(DATA).unwrap_or(Raw {
        resources: vec![],
        complex_types: vec![],
        elements: HashMap::new(),
    });
    let mut elements = HashMap::new();
    let mut required: HashMap<String, Vec<String>> = HashMap::new();
    let mut required_choice: HashMap<String, Vec<String>> = HashMap::new();
    for (path, v) in raw.elements {
        if path == "@required-choice" {
            if let Some(a) = v.as_array() {
                for stem in a.iter().filter_map(|s| s.as_str()) {
                    if let Some((parent, name)) = split_parent(stem) {
                        required_choice
                            .entry(parent.to_owned())
                            .or_default()
                            .push(name.to_owned());
                    }
                }
            }
            continue;
        }
        let Ok(el) = serde_json::from_value::<Element>(v) else {
            continue;
        };
        if el.min > 0 && el.choice.is_none() {
            if let Some((parent, name)) = split_parent(&path) {
                required
                    .entry(parent.to_owned())
                    .or_default()
                    .push(name.to_owned());
            }
        }
        elements.insert(path, el);
    }
    Defs {
        resources: raw.resources.into_iter().collect(),
        complex: raw.complex_types.into_iter().collect(),
        elements,
        required,
        required_choice,
    }
}

pub(crate) fn defs() -> &'static Defs {
    static D: OnceLock<Defs> = OnceLock::new();
    D.get_or_init(load)
}

#[cfg(test)]
mod tests {
    #[test]
    fn vendored_table_loads() {
        let d = super::defs();
        assert!(d.element("Patient.birthDate").is_some());
        assert!(d.element("HumanName.family").is_some());
        assert!(d.element("Observation.valueQuantity").is_some());
        assert!(d.required("Observation").contains(&"status".to_owned()));
    }
}
