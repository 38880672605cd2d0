#!/usr/bin/env python3
"""Validates leadscore's JSON contracts (schemas/*.schema.json).

Always (unless --skip-examples): every docs/examples/*.json against the schema
its name starts with (leads.segment-changes.cold-to-warm.json ->
schemas/leads.segment-changes.schema.json).

Then each line of the NDJSON files given:
  --changes FILE         leads.segment-changes payloads
  --handoffs FILE        leads.sales-handoffs payloads
  --events-web FILE      events.web events (likewise --events-adpixel,
                         --events-email, --events-crm)
  --outputs FILE         both output kinds mixed, e.g. `leadscore replay` stdout
  --events FILE          input events with a `source` field, e.g. a replay input
Each option may repeat; FILE may be `-` for standard input. Blank lines are skipped.

Beyond draft 2020-12 with format checking (date-time, uuid), it enforces the
schemas' `x-maxUtf8Bytes` (leadscore's limits are in UTF-8 bytes) and
`x-utcRange` (the exact occurred_at range), and rejects duplicate JSON keys.

Exit status: 0 all valid, 1 a document failed, 2 a setup problem (missing
package, bad schema, unreadable file). Needs scripts/requirements-tests.txt;
installs nothing.
"""

import argparse
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
EXAMPLES = ROOT / "docs" / "examples"
NDJSON_OPTIONS = {  # option -> schema stem (None: chosen per line), help
    "changes": ("leads.segment-changes", "segment changes"),
    "handoffs": ("leads.sales-handoffs", "hand-offs"),
    "events_web": ("events.web", "events.web events"),
    "events_adpixel": ("events.adpixel", "events.adpixel events"),
    "events_email": ("events.email", "events.email events"),
    "events_crm": ("events.crm", "events.crm events"),
    "outputs": (None, "changes and hand-offs mixed (leadscore replay's output)"),
    "events": (None, "input events with a `source` field (leadscore replay's input)"),
}


def setup_error(message):
    print(f"check-contracts: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import jsonschema
    from jsonschema import Draft202012Validator, ValidationError, validators
except ImportError:
    setup_error("the jsonschema package is missing: pip install -r scripts/requirements-tests.txt")

FORMAT_CHECKER = Draft202012Validator.FORMAT_CHECKER
# jsonschema silently skips a format whose checker package is missing.
for needed, package in [("date-time", "rfc3339-validator"), ("uuid", "jsonschema")]:
    if needed not in FORMAT_CHECKER.checkers:
        setup_error(f"format {needed!r} cannot be checked ({package} missing): "
                    "pip install -r scripts/requirements-tests.txt")

RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)")


def utc_instant(text):
    """An RFC 3339 timestamp as an aware datetime, or None if it is not one."""
    m = RFC3339.fullmatch(text)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    try:
        t = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone.utc)
    except ValueError:
        return None
    t += timedelta(microseconds=int((frac or "0")[:6].ljust(6, "0")))
    if off not in ("Z", "z"):
        sign = 1 if off[0] == "+" else -1
        t -= sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6]))
    return t


def max_utf8_bytes(validator, limit, instance, schema):
    if isinstance(instance, str):
        size = len(instance.encode("utf-8"))
        if size > limit:
            yield ValidationError(f"{short(instance)} is {size} bytes of UTF-8, more than {limit}")


def utc_range(validator, bounds, instance, schema):
    if not isinstance(instance, str):
        return
    t, low, high = utc_instant(instance), utc_instant(bounds[0]), utc_instant(bounds[1])
    if t is not None and not (low <= t < high):
        yield ValidationError(f"{instance!r} is outside [{bounds[0]}, {bounds[1]})")


Validator = validators.extend(
    Draft202012Validator, {"x-maxUtf8Bytes": max_utf8_bytes, "x-utcRange": utc_range}
)


def short(value, limit=80):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse(text):
    return json.loads(text, object_pairs_hook=no_duplicate_keys)


def load_validators():
    found = {}
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        try:
            schema = json.loads(path.read_text())
            Draft202012Validator.check_schema(schema)
        except (ValueError, jsonschema.SchemaError) as e:
            setup_error(f"{path.relative_to(ROOT)} is not a valid draft 2020-12 schema: {e}")
        found[path.name[: -len(".schema.json")]] = Validator(schema, format_checker=FORMAT_CHECKER)
    if not found:
        setup_error(f"no schemas in {SCHEMAS}")
    return found


def describe(error, root=None):
    """One line per problem (with the `$comment` of the rule it breaks, if any);
    for anyOf/oneOf, each alternative's own problem."""
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message
    if error.validator in ("anyOf", "oneOf"):
        message = "matches none of the alternatives"
    elif message.startswith(repr(error.instance)):  # jsonschema quotes the whole value first
        message = short(error.instance) + message[len(repr(error.instance)):]
    if len(message) > 300:
        message = message[:299] + "…"
    node, comment = root, None
    for step in list(error.absolute_schema_path)[:-1] if root is not None else []:
        node = node[step]
        if isinstance(node, dict) and "$comment" in node:
            comment = node["$comment"]
    lines = [f"{where}: {message}" + (f"  [{comment}]" if comment else "")]
    if error.validator in ("anyOf", "oneOf") and error.context:
        for sub in sorted(error.context, key=lambda e: list(e.relative_schema_path)):
            lines.append(f"    alternative {sub.relative_schema_path[0]}: {describe(sub)[0]}")
    return lines


class Checker:
    def __init__(self, validators_by_stem):
        self.validators = validators_by_stem
        self.passed = 0
        self.failed = 0

    def check(self, where, stem, document):
        errors = sorted(self.validators[stem].iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            self.failed += 1
            print(f"FAIL {where} ({stem}):")
            for e in errors:
                for line in describe(e, self.validators[stem].schema):
                    print(f"  {line}")
        else:
            self.passed += 1

    def fail(self, where, message):
        self.failed += 1
        print(f"FAIL {where}: {message}")


def stem_of_example(name, stems):
    matches = [s for s in stems if name.startswith(s + ".")]
    return max(matches, key=len) if matches else None


def check_examples(checker):
    files = sorted(EXAMPLES.glob("*.json"))
    if not files:
        setup_error(f"no examples in {EXAMPLES}")
    for path in files:
        where = str(path.relative_to(ROOT))
        stem = stem_of_example(path.name, checker.validators)
        if stem is None:
            checker.fail(where, "the name starts with no schema's name (" + ", ".join(sorted(checker.validators)) + ")")
            continue
        try:
            document = parse(path.read_text())
        except ValueError as e:
            checker.fail(where, f"not JSON: {e}")
            continue
        checker.check(where, stem, document)
    return len(files)


def stem_of_line(option, document):
    if not isinstance(document, dict):
        return None, "not a JSON object"
    if option == "outputs":
        if "previous_segment" in document:
            return "leads.segment-changes", None
        if "top_signals" in document:
            return "leads.sales-handoffs", None
        return None, "neither a segment change (previous_segment) nor a hand-off (top_signals)"
    source = document.get("source")
    if source in ("web", "adpixel", "email", "crm"):
        return f"events.{source}", None
    return None, f"`source` must be web, adpixel, email or crm, not {short(source)}"


def check_ndjson(checker, option, name):
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        setup_error(f"cannot read {name}: {e}")
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        count += 1
        where = f"{name}:{number}"
        try:
            document = parse(line)
        except ValueError as e:
            checker.fail(where, f"not JSON: {e}")
            continue
        stem = NDJSON_OPTIONS[option][0]
        if stem is None:
            stem, problem = stem_of_line(option, document)
            if stem is None:
                checker.fail(where, problem)
                continue
        checker.check(where, stem, document)
    print(f"{name}: {count} line(s) checked as --{option.replace('_', '-')}")


def main():
    parser = argparse.ArgumentParser(
        description="Validate docs/examples and NDJSON files against leadscore's JSON Schemas.",
        epilog="Options taking FILE may repeat; FILE is NDJSON (one document a line) or - for standard input. "
        "Exit status: 0 valid, 1 a document failed, 2 setup problem.",
    )
    parser.add_argument("--skip-examples", action="store_true", help="do not check docs/examples/*.json")
    for option, (_, what) in NDJSON_OPTIONS.items():
        parser.add_argument("--" + option.replace("_", "-"), dest=option, action="append", default=[],
                            metavar="FILE", help=what)
    args = parser.parse_args()

    checker = Checker(load_validators())
    if not args.skip_examples:
        n = check_examples(checker)
        print(f"docs/examples: {n} file(s) checked")
    for option in NDJSON_OPTIONS:
        for name in getattr(args, option):
            check_ndjson(checker, option, name)
    if checker.passed + checker.failed == 0:
        setup_error("nothing was checked")
    print(f"contracts: {checker.passed} passed, {checker.failed} failed")
    return 1 if checker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
