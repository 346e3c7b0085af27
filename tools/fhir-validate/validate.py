"""Validates FHIR R4 JSON documents with fhir.resources (independent of medvault's own
validator): each file argument is parsed into the R4 model its resourceType names, which
checks every element's name, type and cardinality, nested resources included. Prints one
line per resource (a `.ndjson` file holds one per line) and exits 1 if any is invalid."""
import json
import sys

from fhir.resources import construct_fhir_element


def empty_arrays(v, path):
    """FHIR JSON forbids empty arrays (R4 JSON format, 'arrays')."""
    if isinstance(v, list):
        if not v:
            yield path
        for i, x in enumerate(v):
            yield from empty_arrays(x, f"{path}[{i}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from empty_arrays(x, f"{path}.{k}")


def check(p, doc):
    """Validates one resource; returns 1 if it is invalid."""
    try:
        construct_fhir_element(doc["resourceType"], doc)
        empties = list(empty_arrays(doc, doc["resourceType"]))
        if empties:
            raise ValueError(f"empty arrays at {', '.join(empties)}")
        print(f"valid {p} ({doc['resourceType']})")
        return 0
    except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
        print(f"INVALID {p} ({doc.get('resourceType')}): {e}")
        return 1


def main(paths):
    bad = 0
    for p in paths:
        with open(p, encoding="utf-8") as f:
            if p.endswith(".ndjson"):
                # Bulk Data NDJSON: one resource per line, each validated.
                docs = [json.loads(x) for x in f if x.strip()]
            else:
                docs = [json.load(f)]
        for doc in docs:
            bad += check(p, doc)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
