#!/usr/bin/env python3
"""Checks of the deploy files that no off-the-shelf validator makes.

Run by scripts/check-deploy.sh (with the PyYAML it pins); each command exits 1
and names every problem it finds:

    check-deploy-files.py rules      every alert has a severity, a summary, a
                                     description and a runbook_url whose anchor
                                     is a heading of docs/runbook.md, and a
                                     firing scenario in deploy/alerts.test.yml
    check-deploy-files.py dashboard  deploy/grafana/leadscore.json: structure,
                                     variables, ids, layout; writes every query
                                     (Grafana variables substituted) as a rules
                                     file for `promtool check rules` to parse
    check-deploy-files.py compose    docker-compose.yml beyond its schema: the
                                     Grafana service and its provisioning files,
                                     Kafka's host listener, Prometheus's rules
    check-deploy-files.py crds RENDERED.yaml
                                     the custom resources (ServiceMonitor,
                                     PrometheusRule, ScaledObject) in the kustomize
                                     output of base + components, and the Strimzi
                                     KafkaTopics of deploy/kubernetes/examples:
                                     required fields and types by hand, and their
                                     consistency with the Service, Deployment,
                                     ConfigMap (leadscore.toml) and alerts.yml
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "alerts.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/leadscore/leadscore/blob/main/docs/runbook.md#"
DASHBOARD = ROOT / "deploy" / "grafana" / "leadscore.json"
TOPICS = ROOT / "deploy" / "kubernetes" / "examples" / "topics.yaml"
SEVERITIES = {"critical", "warning", "info"}


class Problems:
    def __init__(self, what: str):
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, condition: bool, message: str) -> bool:
        if not condition:
            self.add(message)
        return condition

    def finish(self) -> int:
        for item in self.items:
            print(f"  {self.what}: {item}")
        if self.items:
            print(f"{self.what}: {len(self.items)} problem(s)")
            return 1
        print(f"{self.what}: ok")
        return 0


# ---------------------------------------------------------------- rules


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def check_rules() -> int:
    p = Problems("rules")
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    anchors = runbook_anchors()
    tested = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    # Links inside the runbook must resolve too.
    for link in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text(encoding="utf-8")):
        p.check(link in anchors, f"docs/runbook.md links to #{link}, which is no heading")
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    p.check(len(alerts) > 0, "no alerts in deploy/alerts.yml")
    for rule in alerts:
        name = rule["alert"]
        labels = rule.get("labels", {})
        notes = rule.get("annotations", {})
        p.check(labels.get("severity") in SEVERITIES, f"{name}: labels.severity must be one of {sorted(SEVERITIES)}")
        p.check('job="leadscore"' in rule["expr"], f'{name}: the expression does not select job="leadscore"')
        for key in ("summary", "description", "runbook_url"):
            p.check(bool(notes.get(key)), f"{name}: annotations.{key} missing")
        url = notes.get("runbook_url", "")
        if p.check(url.startswith(RUNBOOK_URL), f"{name}: runbook_url must start with {RUNBOOK_URL}"):
            anchor = url[len(RUNBOOK_URL):]
            p.check(anchor in anchors, f"{name}: docs/runbook.md has no heading with anchor #{anchor}")
            p.check(anchor == github_anchor(name), f"{name}: runbook_url should point at its own section #{github_anchor(name)}")
        p.check(name in tested, f"{name}: no firing scenario in deploy/alerts.test.yml")
    return p.finish()


# ---------------------------------------------------------------- dashboard

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${instance}": ".*",
    "$instance": ".*",
}


def check_dashboard() -> int:
    p = Problems("dashboard")
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        p.add(f"{DASHBOARD.relative_to(ROOT)} is not valid JSON: {error}")
        return p.finish()

    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        p.check(isinstance(dashboard.get(key), kind), f"top-level {key} missing or not a {kind.__name__}")
    p.check(dashboard.get("schemaVersion", 0) >= 36, "schemaVersion should be 36 or later (Grafana 9.4+)")
    p.check("__inputs" not in dashboard, "__inputs present: provisioned dashboards use the ${datasource} variable")

    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    p.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
            "variable `datasource` must be a Prometheus data source variable")
    inst = variables.get("instance", {})
    p.check(inst.get("type") == "query" and inst.get("datasource", {}).get("uid") == "${datasource}",
            "variable `instance` must be a query variable on ${datasource}")

    exprs: list[tuple[str, str]] = []
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard.get("panels", []):
        title = panel.get("title", "?")
        pid = panel.get("id")
        p.check(isinstance(pid, int) and pid not in ids, f"panel {title!r}: id missing or duplicated")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if p.check(all(isinstance(grid.get(k), int) for k in "xywh"), f"panel {title!r}: gridPos incomplete"):
            p.check(grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"panel {title!r}: wider than the 24-column grid")
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    other = cells.get((x, y))
                    if other:
                        p.add(f"panel {title!r} overlaps {other!r}")
                        break
                    cells[(x, y)] = title
                else:
                    continue
                break
        if panel.get("type") == "row":
            p.check(not panel.get("targets"), f"row {title!r} has queries")
            continue
        p.check(panel.get("datasource", {}).get("uid") == "${datasource}", f"panel {title!r}: datasource is not ${{datasource}}")
        targets = panel.get("targets", [])
        p.check(len(targets) > 0, f"panel {title!r}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        p.check(len(set(ref_ids)) == len(ref_ids) and all(ref_ids), f"panel {title!r}: refIds missing or repeated")
        for target in targets:
            expr = target.get("expr", "")
            if p.check(bool(expr.strip()), f"panel {title!r}: empty query"):
                exprs.append((title, expr))
            p.check(target.get("datasource", {}).get("uid", "${datasource}") == "${datasource}",
                    f"panel {title!r}: a query uses another data source")
    instance_query = inst.get("query")
    if isinstance(instance_query, dict):
        instance_query = instance_query.get("query")
    if isinstance(instance_query, str):
        inner = re.fullmatch(r"label_values\((.*),\s*instance\)", instance_query)
        if p.check(inner is not None, "variable `instance` should be label_values(<selector>, instance)"):
            exprs.append(("variable instance", inner.group(1)))

    # Every query must parse as PromQL: promtool parses them as recording rules.
    rules = []
    for index, (title, expr) in enumerate(exprs):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if not p.check("$" not in expr, f"panel {title!r}: unknown Grafana variable in {expr!r}"):
            continue
        p.check('job="leadscore"' in expr, f"panel {title!r}: query does not select job=\"leadscore\": {expr!r}")
        rules.append({"record": f"dashboard:query_{index}:check", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False)
        path = f.name
    try:
        result = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
        if result.returncode != 0:
            p.add("promtool cannot parse a dashboard query:\n" + result.stdout + result.stderr)
        else:
            print(f"dashboard: promtool parsed all {len(rules)} queries")
    finally:
        pathlib.Path(path).unlink()
    return p.finish()


# ---------------------------------------------------------------- compose and Grafana provisioning

COMPOSE = ROOT / "docker-compose.yml"
GRAFANA = ROOT / "deploy" / "grafana"


def check_compose() -> int:
    p = Problems("compose")
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose.get("services", {})
    for name in ("kafka", "kafka-init", "redis", "leadscore", "prometheus", "grafana"):
        p.check(name in services, f"service {name} missing")

    kafka = services.get("kafka", {})
    env = kafka.get("environment", {})
    listeners = dict(item.split("://", 1) for item in env.get("KAFKA_LISTENERS", "").split(","))
    advertised = dict(item.split("://", 1) for item in env.get("KAFKA_ADVERTISED_LISTENERS", "").split(","))
    protocols = dict(item.split(":", 1) for item in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(","))
    p.check(advertised.get("PLAINTEXT") == "kafka:9092", "kafka must advertise PLAINTEXT://kafka:9092 to containers")
    p.check(advertised.get("EXTERNAL") == "localhost:29092", "kafka must advertise EXTERNAL://localhost:29092 to the host")
    p.check(listeners.get("EXTERNAL") == ":29092", "kafka must listen on EXTERNAL://:29092")
    p.check(set(listeners) <= set(protocols), f"listeners {sorted(listeners)} without a security protocol in {sorted(protocols)}")
    p.check(set(advertised) <= set(listeners) - {env.get("KAFKA_CONTROLLER_LISTENER_NAMES")},
            "every advertised listener must be a broker listener")
    p.check(any(str(port).endswith("29092:29092") for port in kafka.get("ports", [])), "kafka must publish port 29092")

    prometheus = services.get("prometheus", {})
    mounts = prometheus.get("volumes", [])
    p.check("./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts, "prometheus must mount deploy/alerts.yml beside its config")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    p.check("alerts.yml" in config.get("rule_files", []), "deploy/prometheus.yml must load alerts.yml")
    p.check(any(job.get("job_name") == "leadscore" for job in config.get("scrape_configs", [])),
            'deploy/prometheus.yml must scrape leadscore as job_name "leadscore"')

    grafana = services.get("grafana", {})
    genv = grafana.get("environment", {})
    p.check(str(grafana.get("image", "")).startswith("grafana/grafana-oss:"), "grafana must use a pinned grafana/grafana-oss image")
    p.check(any(str(port).endswith("3000:3000") for port in grafana.get("ports", [])), "grafana must publish port 3000")
    p.check(str(genv.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() == "true" and genv.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer",
            "grafana must allow anonymous viewers")
    mount = "./deploy/grafana:/etc/grafana/leadscore:ro"
    p.check(mount in grafana.get("volumes", []), f"grafana must mount {mount}")
    p.check(genv.get("GF_PATHS_PROVISIONING") == "/etc/grafana/leadscore/provisioning", "GF_PATHS_PROVISIONING must point into the mount")
    home = genv.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    p.check(home.startswith("/etc/grafana/leadscore/") and (GRAFANA / home.removeprefix("/etc/grafana/leadscore/")).is_file(),
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH must name a file in deploy/grafana")

    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    p.check(sources.get("apiVersion") == 1, "datasources provisioning: apiVersion must be 1")
    prom = [d for d in sources.get("datasources", []) if d.get("type") == "prometheus"]
    p.check(len(prom) == 1 and prom[0].get("url") == "http://prometheus:9090" and prom[0].get("name"),
            "datasources provisioning: one named Prometheus data source at http://prometheus:9090")
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "leadscore.yml").read_text(encoding="utf-8"))
    p.check(boards.get("apiVersion") == 1, "dashboards provisioning: apiVersion must be 1")
    for provider in boards.get("providers", []):
        p.check(provider.get("type") == "file", "dashboards provisioning: provider type must be file")
        path = (provider.get("options") or {}).get("path", "")
        p.check(path.startswith("/etc/grafana/leadscore") and (GRAFANA / path.removeprefix("/etc/grafana/leadscore").lstrip("/") / "leadscore.json").is_file(),
                f"dashboards provisioning: path {path!r} does not hold leadscore.json in the mount")
    p.check(len(boards.get("providers", [])) >= 1, "dashboards provisioning: no provider")
    return p.finish()


# ---------------------------------------------------------------- custom resources

# Field names the CRDs define (prometheus-operator v1, KEDA v1alpha1, KEDA's
# kafka scaler), to catch misspelt keys that the API server would silently drop.
SERVICEMONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints", "fallbackScrapeProtocol",
    "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "namespaceSelector", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeNativeHistograms", "scrapeProtocols",
    "selector", "selectorMechanism", "serviceDiscoveryRole", "targetLabels", "targetLimit",
}
SERVICEMONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2", "filterRunning",
    "followRedirects", "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "noProxy", "oauth2",
    "params", "path", "port", "proxyConnectHeader", "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme",
    "scrapeTimeout", "targetPort", "tlsConfig", "trackTimestampsStaleness",
}
RULE_GROUP = {"interval", "labels", "limit", "name", "partial_response_strategy", "query_offset", "rules"}
RULE = {"alert", "annotations", "expr", "for", "keep_firing_for", "labels", "record"}
SCALEDOBJECT_SPEC = {
    "advanced", "cooldownPeriod", "fallback", "idleReplicaCount", "initialCooldownPeriod", "maxReplicaCount",
    "minReplicaCount", "pollingInterval", "scaleTargetRef", "triggers",
}
SCALEDOBJECT_TRIGGER = {"authenticationRef", "metadata", "metricType", "name", "type", "useCachedMetrics"}
KAFKA_TRIGGER_METADATA = {
    "bootstrapServers", "consumerGroup", "topic", "partitionLimitation", "lagThreshold", "activationLagThreshold",
    "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag", "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions", "fullMetadata", "version", "tls",
    "unsafeSsl", "sasl", "saslTokenProvider", "awsRegion",
}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def known(p: "Problems", where: str, obj, allowed: set[str]) -> None:
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - allowed)
        p.check(not unknown, f"{where}: unknown field(s) {unknown}")


DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def load_docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def get(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def one(p: Problems, docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    p.check(len(found) == 1, f"expected one {kind} in the rendered output, found {len(found)}")
    return found[0] if found else {}


def require(p: Problems, doc: dict, fields: dict) -> None:
    name = f"{doc.get('kind', '?')}/{get(doc, 'metadata.name')}"
    for dotted, kind in fields.items():
        value = get(doc, dotted)
        p.check(isinstance(value, kind) and value != "" and value != [],
                f"{name}: {dotted} missing or not a {getattr(kind, '__name__', kind)}")


def check_crds(rendered: pathlib.Path) -> int:
    p = Problems("custom resources")
    docs = load_docs(rendered)
    service = one(p, docs, "Service")
    deployment = one(p, docs, "Deployment")
    configmap = one(p, docs, "ConfigMap")
    settings = tomllib.loads(get(configmap, "data") and configmap["data"]["leadscore.toml"] or "")
    # The ConfigMap lists every setting, like config/leadscore.example.toml,
    # and differs from it only in the two in-cluster addresses.
    example = tomllib.loads((ROOT / "config/leadscore.example.toml").read_text())
    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out
    mine, theirs = flat(settings), flat(example)
    p.check(set(mine) == set(theirs),
            f"ConfigMap settings differ from config/leadscore.example.toml: missing {sorted(set(theirs) - set(mine))}, extra {sorted(set(mine) - set(theirs))}")
    for key in sorted(set(mine) & set(theirs) - {"kafka.brokers", "redis.url"}):
        p.check(mine[key] == theirs[key], f"ConfigMap {key} = {mine[key]!r}, example config has {theirs[key]!r}")
    kafka = settings.get("kafka", {})
    topics = kafka.get("topics", {})
    inputs = [topics.get(k) for k in ("web", "adpixel", "email", "crm")]
    all_topics = set(inputs) | {topics.get(k) for k in ("segment_changes", "handoffs", "dead_letter")}
    namespace = get(service, "metadata.namespace")

    # ServiceMonitor (monitoring.coreos.com/v1)
    sm = one(p, docs, "ServiceMonitor")
    p.check(sm.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor: apiVersion must be monitoring.coreos.com/v1")
    require(p, sm, {"metadata.name": str, "metadata.namespace": str, "spec.selector.matchLabels": dict, "spec.endpoints": list})
    service_labels = get(service, "metadata.labels") or {}
    for key, value in (get(sm, "spec.selector.matchLabels") or {}).items():
        p.check(service_labels.get(key) == value, f"ServiceMonitor selects {key}={value}, which Service {get(service, 'metadata.name')} lacks")
    match_names = get(sm, "spec.namespaceSelector.matchNames")
    if match_names is not None:
        p.check(namespace in match_names, f"ServiceMonitor namespaceSelector does not include {namespace}")
    known(p, "ServiceMonitor spec", sm.get("spec"), SERVICEMONITOR_SPEC)
    port_names = {port.get("name") for port in get(service, "spec.ports") or []}
    for endpoint in get(sm, "spec.endpoints") or []:
        known(p, "ServiceMonitor endpoint", endpoint, SERVICEMONITOR_ENDPOINT)
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                p.check(DURATION.fullmatch(str(endpoint[key])) is not None, f"ServiceMonitor endpoint {key} {endpoint[key]!r} is not a duration")
        p.check(endpoint.get("port") in port_names, f"ServiceMonitor endpoint port {endpoint.get('port')!r} is not a Service port name {sorted(port_names)}")
        p.check(endpoint.get("path") == "/metrics", "ServiceMonitor endpoint path must be /metrics")
        job = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
        p.check(len(job) == 1 and job[0].get("replacement") == "leadscore" and job[0].get("action", "replace") == "replace",
                'ServiceMonitor endpoint must relabel job to "leadscore" (the alerts select it)')
        for relabel in endpoint.get("relabelings", []):
            p.check(relabel.get("action", "replace") in {"replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"},
                    f"ServiceMonitor relabeling action {relabel.get('action')!r} unknown")

    # PrometheusRule (monitoring.coreos.com/v1): the groups of deploy/alerts.yml
    rule = one(p, docs, "PrometheusRule")
    p.check(rule.get("apiVersion") == "monitoring.coreos.com/v1", "PrometheusRule: apiVersion must be monitoring.coreos.com/v1")
    require(p, rule, {"metadata.name": str, "metadata.namespace": str, "spec.groups": list})
    for group in get(rule, "spec.groups") or []:
        p.check(isinstance(group.get("name"), str), "PrometheusRule: a group has no name")
        known(p, f"PrometheusRule group {group.get('name')}", group, RULE_GROUP)
        for r in group.get("rules", []):
            known(p, f"PrometheusRule rule {r.get('alert') or r.get('record')}", r, RULE)
            p.check(("alert" in r) != ("record" in r) and isinstance(r.get("expr"), str),
                    f"PrometheusRule: rule {r.get('alert') or r.get('record')} needs exactly one of alert/record, and expr")
    p.check(get(rule, "spec.groups") == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"],
            "PrometheusRule groups differ from deploy/alerts.yml (run scripts/gen-prometheusrule.py --write)")

    # KafkaTopic (kafka.strimzi.io/v1beta2), from the example
    kafka_topics = [d for d in load_docs(TOPICS)]
    partitions: dict[str, int] = {}
    for topic in kafka_topics:
        name = get(topic, "metadata.name")
        p.check(topic.get("apiVersion") == "kafka.strimzi.io/v1beta2" and topic.get("kind") == "KafkaTopic",
                f"{TOPICS.name}: {name}: must be a kafka.strimzi.io/v1beta2 KafkaTopic")
        require(p, topic, {"metadata.name": str, "metadata.namespace": str, "metadata.labels": dict, "spec.partitions": int, "spec.replicas": int})
        p.check(isinstance(name, str) and len(name) <= 253 and DNS1123_SUBDOMAIN.fullmatch(name) is not None,
                f"{TOPICS.name}: {name!r} is not a valid resource name (DNS-1123 subdomain)")
        p.check(bool((get(topic, "metadata.labels") or {}).get("strimzi.io/cluster")),
                f"{TOPICS.name}: {name}: label strimzi.io/cluster missing")
        spec = topic.get("spec") or {}
        p.check(isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1, f"{TOPICS.name}: {name}: partitions must be an integer >= 1")
        p.check(isinstance(spec.get("replicas"), int) and 1 <= spec["replicas"] <= 32767, f"{TOPICS.name}: {name}: replicas must be an integer in 1..32767")
        p.check(isinstance(spec.get("config", {}), dict), f"{TOPICS.name}: {name}: config must be a map")
        p.check(set(spec) <= {"partitions", "replicas", "config", "topicName"}, f"{TOPICS.name}: {name}: unknown spec fields {sorted(set(spec) - {'partitions', 'replicas', 'config', 'topicName'})}")
        p.check((spec.get("config") or {}).get("cleanup.policy", "delete") == "delete" or name not in inputs,
                f"{TOPICS.name}: {name}: input topics must not be compacted")
        partitions[spec.get("topicName") or name] = spec.get("partitions")
    p.check(set(partitions) == all_topics, f"{TOPICS.name}: topics {sorted(partitions)} differ from leadscore.toml's {sorted(all_topics)}")
    input_partitions = {partitions.get(t) for t in inputs}
    p.check(len(input_partitions) == 1, f"{TOPICS.name}: the four input topics must have one partition count, not {sorted(map(str, input_partitions))}")
    shard_count = input_partitions.pop() if len(input_partitions) == 1 else None

    # ScaledObject (keda.sh/v1alpha1)
    so = one(p, docs, "ScaledObject")
    p.check(so.get("apiVersion") == "keda.sh/v1alpha1", "ScaledObject: apiVersion must be keda.sh/v1alpha1")
    require(p, so, {"metadata.name": str, "metadata.namespace": str, "spec.scaleTargetRef.name": str, "spec.triggers": list,
                    "spec.minReplicaCount": int, "spec.maxReplicaCount": int})
    known(p, "ScaledObject spec", so.get("spec"), SCALEDOBJECT_SPEC)
    p.check(get(so, "spec.scaleTargetRef.name") == get(deployment, "metadata.name")
            and get(so, "spec.scaleTargetRef.kind") in (None, "Deployment"),
            "ScaledObject must target the leadscore Deployment")
    p.check((get(so, "spec.minReplicaCount") or 0) >= 1, "ScaledObject: minReplicaCount must be at least 1 (decay needs a running instance)")
    p.check(get(so, "spec.maxReplicaCount") == shard_count,
            f"ScaledObject: maxReplicaCount {get(so, 'spec.maxReplicaCount')!r} must equal the input topics' partition count {shard_count!r}")
    p.check(get(deployment, "spec.replicas") is None, "Deployment still has spec.replicas: the keda component must remove it")
    trigger_topics = []
    for trigger in get(so, "spec.triggers") or []:
        meta = trigger.get("metadata") or {}
        known(p, "ScaledObject trigger", trigger, SCALEDOBJECT_TRIGGER)
        known(p, "ScaledObject kafka trigger metadata", meta, KAFKA_TRIGGER_METADATA)
        p.check(trigger.get("type") == "kafka", f"ScaledObject: trigger type {trigger.get('type')!r}, expected kafka")
        p.check(all(isinstance(v, str) for v in meta.values()), "ScaledObject: trigger metadata values must all be strings")
        for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
            p.check(bool(meta.get(key)), f"ScaledObject: trigger metadata.{key} missing")
        p.check(meta.get("consumerGroup") == kafka.get("group_id"), f"ScaledObject: consumerGroup {meta.get('consumerGroup')!r} is not kafka.group_id {kafka.get('group_id')!r}")
        p.check(meta.get("bootstrapServers") == kafka.get("brokers"), f"ScaledObject: bootstrapServers {meta.get('bootstrapServers')!r} is not kafka.brokers {kafka.get('brokers')!r}")
        p.check(str(meta.get("lagThreshold", "")).isdigit() and int(meta["lagThreshold"]) > 0, "ScaledObject: lagThreshold must be a positive integer string")
        p.check(meta.get("allowIdleConsumers", "false") == "false", "ScaledObject: allowIdleConsumers must stay false")
        trigger_topics.append(meta.get("topic"))
    p.check(sorted(trigger_topics) == sorted(inputs), f"ScaledObject: trigger topics {trigger_topics} should be the four inputs {inputs}")
    return p.finish()


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "rules":
        return check_rules()
    if len(sys.argv) >= 2 and sys.argv[1] == "dashboard":
        return check_dashboard()
    if len(sys.argv) >= 2 and sys.argv[1] == "compose":
        return check_compose()
    if len(sys.argv) == 3 and sys.argv[1] == "crds":
        return check_crds(pathlib.Path(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
