#!/usr/bin/env python3
"""List every leadscore_* and process_* metric the deploy files reference.

Reads the PromQL of deploy/alerts.yml (alerting and recording rules) and of
deploy/grafana/leadscore.json (panel targets and template variables), and
prints the sorted base names, one per line: histogram series are reduced to
their metric (`_bucket`, `_sum`, `_count` dropped), recorded series (names
with a colon) are left out. deploy/metrics-referenced.txt holds the result, so
that a test of the service can check each name is exported.

    python3 scripts/metrics-referenced.py           # print the list
    python3 scripts/metrics-referenced.py --write   # rewrite deploy/metrics-referenced.txt
    python3 scripts/metrics-referenced.py --check   # exit 1 if that file is out of date

Needs PyYAML.
"""

import argparse
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "leadscore.json"
TARGET = ROOT / "deploy" / "metrics-referenced.txt"

# PromQL string literals (label values, regexes), removed before looking for names.
STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
# Metric names, recorded names with colons included, so that they can be told apart.
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
OURS = re.compile(r"(?:leadscore|process)_[a-z0-9_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(?:bucket|sum|count)$")


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def names(exprs: list[str]) -> list[str]:
    found = set()
    for expr in exprs:
        for token in IDENT.findall(STRING.sub(" ", expr)):
            if OURS.fullmatch(token):
                found.add(HISTOGRAM_SUFFIX.sub("", token))
    return sorted(found)


def render() -> str:
    return "".join(f"{name}\n" for name in names(rule_exprs() + dashboard_exprs()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {TARGET.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="fail if the committed list is out of date")
    args = parser.parse_args()

    text = render()
    if args.write:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)} ({len(text.splitlines())} metrics)")
    elif args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            old, new = set(current.split()), set(text.split())
            for name in sorted(new - old):
                print(f"+ {name}")
            for name in sorted(old - new):
                print(f"- {name}")
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: run python3 scripts/metrics-referenced.py --write",
                file=sys.stderr,
            )
            return 1
        print(f"{TARGET.relative_to(ROOT)} lists the {len(text.splitlines())} metrics referenced")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
