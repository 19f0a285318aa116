#!/usr/bin/env bash
# Offline validation of everything that cannot run here (no Docker daemon, no cluster):
# Dockerfiles, compose file, Kubernetes manifests, GitHub workflows, Prometheus/Grafana files,
# YAML style, shell scripts, and the metric names the dashboards and alerts query.
#
#   bash scripts/validate.sh        (make validate; tests/ops/test_validate.py runs it too)
#
# Every check runs even after a failure; the summary lists each failed check and the file it
# concerns, and the exit status is 1 if anything failed. Tools come from .venv/bin first
# (uv dev dependencies); promtool comes from the Debian/Ubuntu package `prometheus`, kubectl
# from the system.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PATH="$ROOT/.venv/bin:$PATH"
PYTHON="$ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
K8S_VERSION=1.31.0 # the API version checked (kubernetes-validate bundles schemas for 1.25-1.37)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

failures=()
step() { printf '\n==> %s\n' "$*"; }
fail() {
  failures+=("$1")
  printf 'FAIL: %s\n' "$1"
}
# check LABEL COMMAND...: run the command, report LABEL as ok or failed.
check() {
  local label="$1"
  shift
  if "$@"; then
    echo "ok: $label"
  else
    fail "$label"
  fi
}
# need TOOL CHECK HINT: the tool is on PATH, or the check fails saying how to get it.
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  fail "$2: '$1' not found: $3"
  return 1
}
UV_HINT="run 'make install' (it is a dev dependency in pyproject.toml)"

step "hadolint: docker/Dockerfile.*"
if need hadolint hadolint "$UV_HINT"; then
  for file in docker/Dockerfile.*; do
    check "hadolint: $file" hadolint --no-color "$file"
  done
fi

step "shellcheck: scripts/*.sh docker/*.sh"
if need shellcheck shellcheck "$UV_HINT"; then
  for file in scripts/*.sh docker/*.sh; do
    check "shellcheck: $file" shellcheck "$file"
  done
fi

step "compose schema: docker/docker-compose.yaml"
if need check-jsonschema compose "$UV_HINT"; then
  check "compose schema: docker/docker-compose.yaml" \
    check-jsonschema --builtin-schema vendor.compose-spec docker/docker-compose.yaml
fi

step "nats-server -t: k8s/nats/nats.conf"
if need nats-server nats.conf "$UV_HINT"; then
  # $POD_NAME is set by the StatefulSet; any value makes the file parse
  check "nats-server config: k8s/nats/nats.conf" env POD_NAME=nats-0 nats-server -c k8s/nats/nats.conf -t
fi

step "kubectl kustomize k8s | kubernetes-validate --strict (Kubernetes $K8S_VERSION)"
rendered="$TMP/k8s.yaml"
if need kubectl kustomize "install kubectl (it includes kustomize)" &&
  need kubernetes-validate kubernetes-validate "$UV_HINT"; then
  if ! kubectl kustomize k8s >"$rendered"; then
    fail "kustomize: k8s/kustomization.yaml does not build"
  else
    if ! report="$(kubernetes-validate --strict --kubernetes-version "$K8S_VERSION" --quiet - <"$rendered" 2>&1)"; then
      printf '%s\n' "$report"
      # name the manifest file of each failing resource, not just the rendered stream
      mapfile -t bad < <(grep -oE 'resource [A-Za-z0-9.-]+/[A-Za-z0-9.-]+' <<<"$report" | awk '{print $2}' | sort -u)
      for resource in "${bad[@]}"; do
        files="$(grep -rlE "^  name: ${resource#*/}\$" k8s --include='*.yaml' | paste -sd ' ' -)"
        fail "kubernetes-validate: $resource (in ${files:-k8s/})"
      done
      ((${#bad[@]})) || fail "kubernetes-validate: rendered k8s/"
    else
      echo "ok: kubernetes-validate: $(grep -c '^kind:' "$rendered") resources rendered from k8s/"
    fi
  fi
fi

step "securityContext of every container (rendered k8s/)"
if [[ -s "$rendered" ]]; then
  "$PYTHON" -m tests.ops.k8s_security <"$rendered" || fail "securityContext: k8s/ (the containers named above)"
else
  fail "securityContext: nothing rendered from k8s/ (see the kustomize check)"
fi

step "compose: non-root, read-only root file system (docker/docker-compose*.yaml)"
# Every LedgerFlux service (built here, or a ledgerflux-* image) must run with read_only: true,
# a non-root user:, cap_drop: [ALL] and no-new-privileges, like its k8s securityContext above.
# Third-party infra images must do the same or be listed in EXEMPT below with the reason;
# an exemption that no longer applies fails too, so the list stays true. Exemptions:
# - nats user: the image runs as root and the fresh named volume for -sd /data is created
#   root-owned, so a non-root uid could not write the JetStream store without an init step.
# - dynamodb: the image's own user cannot write a fresh named volume (see the file); the JVM
#   and sqlite4java write scratch files outside the volume; local-only dev container.
# - minio: root for the same volume ownership; the server writes config and certs dirs
#   ($HOME/.minio) outside /data. minio-init: mc writes its config to ~/.mc; a one-shot job.
# - grafana read_only: writes logs, plugins and its sqlite db under paths the image owns;
#   not verified read-only (no Docker engine here to prove it), local-only dashboards.
if ! compgen -G "docker/docker-compose*.yaml" >/dev/null; then
  fail "compose security: no docker/docker-compose*.yaml found"
elif "$PYTHON" - docker/docker-compose*.yaml <<'PY'; then
import sys

import yaml

EXEMPT = {
    ("nats", "user"): "root-owned fresh volume for the JetStream store",
    ("dynamodb", "read_only"): "JVM/sqlite4java scratch files; local-only",
    ("dynamodb", "user"): "image user cannot write a fresh named volume",
    ("minio", "read_only"): "writes $HOME/.minio outside /data",
    ("minio", "user"): "root-owned fresh volume for /data",
    ("minio-init", "read_only"): "mc writes ~/.mc; one-shot job",
    ("minio-init", "user"): "one-shot bucket creation with the image's default user",
    ("grafana", "read_only"): "not verified read-only; local-only dashboards",
}


def is_ledgerflux(service):
    image = str(service.get("image", ""))
    return "build" in service or "ledgerflux" in image.lower()


def non_root(user):
    if user is None:
        return False
    name = str(user).split(":", 1)[0].strip()
    return name not in ("", "0", "root")


problems, used, names, checked = [], set(), set(), 0
for path in sys.argv[1:]:
    with open(path) as handle:
        services = (yaml.safe_load(handle) or {}).get("services") or {}
    for name, service in services.items():
        checked += 1
        names.add(name)
        ours = is_ledgerflux(service)
        missing = []
        if service.get("read_only") is not True:
            missing.append(("read_only", "read_only is not true"))
        if not non_root(service.get("user")):
            missing.append(("user", f"user is {service.get('user')!r}, not a non-root user"))
        if ours:
            if "ALL" not in (service.get("cap_drop") or []):
                missing.append(("cap_drop", "cap_drop does not contain ALL"))
            if "no-new-privileges:true" not in (service.get("security_opt") or []):
                missing.append(("security_opt", "security_opt lacks no-new-privileges:true"))
        for requirement, text in missing:
            if not ours and (name, requirement) in EXEMPT:
                used.add((name, requirement))
                continue
            kind = "LedgerFlux service" if ours else "service (not exempt)"
            problems.append(f"{path}: {kind} {name!r}: {text}")
for (name, requirement), reason in EXEMPT.items():
    if name not in names:
        problems.append(f"stale exemption: no service {name!r} ({requirement}): drop it")
    elif (name, requirement) not in used:
        problems.append(f"stale exemption: {name!r} meets {requirement} now ({reason}): drop it")
for line in problems:
    print(f"compose security: {line}")
if checked == 0:
    print("compose security: no services found")
    sys.exit(1)
if problems:
    sys.exit(1)
print(f"compose security: {checked} services checked, {len(used)} documented exemptions")
PY
  echo "ok: compose security: docker/docker-compose*.yaml"
else
  fail "compose security: docker/docker-compose*.yaml (the services named above)"
fi

step "actionlint: .github/workflows/*.yml"
if need actionlint actionlint "$UV_HINT"; then
  # actionlint runs shellcheck on every `run:` block when shellcheck is on PATH (it is)
  check "actionlint: .github/workflows/" actionlint
fi

step "workflow and dependabot schemas"
if need check-jsonschema schemas "$UV_HINT"; then
  # one call for all workflows (each start costs a second); failures name the file
  check "workflow schema: .github/workflows/*.yml" \
    check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
  check "dependabot schema: .github/dependabot.yml" \
    check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
fi

step "promtool: Prometheus config, alert rules, rule unit tests, dashboard queries"
if need promtool promtool "install the Debian/Ubuntu package 'prometheus' (sudo apt-get install -y prometheus)"; then
  # check config also resolves rule_files, so a renamed alerts.yml fails here
  check "promtool check config: monitoring/prometheus/prometheus.yml" \
    promtool check config monitoring/prometheus/prometheus.yml
  check "promtool check rules: monitoring/prometheus/alerts.yml" \
    promtool check rules monitoring/prometheus/alerts.yml
  check "promtool test rules: monitoring/prometheus/alerts_test.yml" \
    promtool test rules monitoring/prometheus/alerts_test.yml
  # Each dashboard query becomes a recording rule, so promtool parses it as PromQL.
  if "$PYTHON" -m tests.ops.promql rules "$TMP/dashboards.rules.yml"; then
    check "dashboard PromQL: monitoring/grafana/dashboards/*.json" \
      promtool check rules "$TMP/dashboards.rules.yml"
  else
    fail "dashboard JSON: monitoring/grafana/dashboards/"
  fi
fi

step "yamllint --strict (config: .yamllint.yaml)"
if need yamllint yamllint "$UV_HINT"; then
  check "yamllint: every YAML file (findings name the file)" yamllint --strict .
fi

# -p no:cacheprovider: this may run inside `make test`'s pytest; no shared cache writes
step "metric names: dashboards, alerts and rule tests vs services/*/metrics.py"
check "metric names: monitoring/ (unknown names are listed above with their file)" \
  "$PYTHON" -m pytest -q --tb=short -p no:cacheprovider tests/ops/test_metric_names.py

step "k8s settings: config/settings.env, Deployment args and stream JSON vs the services"
check "k8s settings: k8s/config, k8s/services, k8s/nats/streams (see above)" \
  "$PYTHON" -m pytest -q --tb=short -p no:cacheprovider tests/ops/test_k8s_config.py

echo
if ((${#failures[@]})); then
  echo "validate: ${#failures[@]} check(s) failed:"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "validate: all checks passed"
