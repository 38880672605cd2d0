#!/usr/bin/env python3
"""Checks leadscore's OpenAPI document and real answers against it.

    check_openapi.py DOC.json SAMPLES.ndjson

DOC.json is the document served at /openapi.json. It must be a valid OpenAPI
3.1 document (openapi-spec-validator). Each line of SAMPLES.ndjson is one
real answer: {"method": "get", "path": "/v1/leads/{id}", "status": 200,
"content_type": "application/json", "body": ...}. The operation must be in the
document, must list that status, and a JSON body must validate against the
schema documented for it (OpenAPI 3.1 schema dialect, $refs into
components), with no field the document does not name. Exit 0: all good; 1: a check failed (each failure printed);
2: bad usage.
"""

import json
import sys

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        doc = json.load(f)
    failures = []
    try:
        validate(doc)
    except Exception as e:  # the validator's own exception types vary by version
        failures.append(f"document: {e}")
    # Answers must not carry fields the document does not name.
    strict = json.loads(json.dumps(doc))
    for schema in strict.get("components", {}).get("schemas", {}).values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    checked = 0
    with open(argv[2]) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            s = json.loads(line)
            where = f'{s["method"].upper()} {s["path"]} -> {s["status"]}'
            op = doc.get("paths", {}).get(s["path"], {}).get(s["method"])
            if op is None:
                failures.append(f"{where}: operation not documented")
                continue
            response = op.get("responses", {}).get(str(s["status"]))
            if response is None:
                failures.append(f"{where}: status not documented ({sorted(op.get('responses', {}))})")
                continue
            content = response.get("content", {})
            media = content.get(s["content_type"])
            if media is None:
                failures.append(f"{where}: content type {s['content_type']} not documented ({sorted(content)})")
                continue
            schema = (strict["paths"][s["path"]][s["method"]]["responses"][str(s["status"])]
                      ["content"][s["content_type"]].get("schema"))
            if schema is not None and s["content_type"] == "application/json":
                # Local $refs (#/components/...) resolve against this root.
                rooted = dict(schema, components=strict.get("components", {}))
                validator = OAS31Validator(rooted)
                for error in validator.iter_errors(s["body"]):
                    path = "/".join(map(str, error.absolute_path))
                    failures.append(f"{where}: body at /{path}: {error.message}")
            checked += 1
    for failure in failures:
        print(f"check_openapi: {failure}")
    print(f"check_openapi: {checked} answers checked, {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
