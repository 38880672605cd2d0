#!/usr/bin/env python3
"""Generate the Kubernetes PrometheusRule from deploy/alerts.yml.

deploy/alerts.yml is the one source of leadscore's alert and recording rules
(docker compose's Prometheus loads it directly). This script wraps its groups,
unchanged, in a monitoring.coreos.com/v1 PrometheusRule for the Prometheus
Operator, so the two never drift:

    python3 scripts/gen-prometheusrule.py           # print the manifest
    python3 scripts/gen-prometheusrule.py --write   # rewrite the committed file
    python3 scripts/gen-prometheusrule.py --check   # exit 1 if it is out of date

Needs PyYAML (scripts/check-deploy.sh runs it with the version it pins).
"""

import argparse
import difflib
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "alerts.yml"
TARGET = ROOT / "deploy" / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/alerts.yml by scripts/gen-prometheusrule.py: do not edit.
# Change deploy/alerts.yml, then run: python3 scripts/gen-prometheusrule.py --write
# (scripts/check-deploy.sh fails while this file is out of date).
"""


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL expressions) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    if not isinstance(rules, dict) or not rules.get("groups"):
        raise SystemExit(f"{SOURCE}: no rule groups")
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "leadscore",
            "namespace": "leadscore",
            "labels": {"app.kubernetes.io/name": "leadscore"},
        },
        "spec": {"groups": rules["groups"]},
    }
    text = HEADER + yaml.dump(
        manifest, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True
    )
    # The manifest must carry exactly the source's groups.
    if yaml.safe_load(text)["spec"]["groups"] != rules["groups"]:
        raise SystemExit("internal error: generated groups differ from deploy/alerts.yml")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {TARGET.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="fail if the committed file is out of date")
    args = parser.parse_args()

    text = render()
    if args.write:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    elif args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    str(TARGET.relative_to(ROOT)),
                    "generated",
                )
            )
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: run python3 scripts/gen-prometheusrule.py --write",
                file=sys.stderr,
            )
            return 1
        print(f"{TARGET.relative_to(ROOT)} matches deploy/alerts.yml")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
