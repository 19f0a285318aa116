#!/usr/bin/env bash
# Known vulnerabilities in the locked dependencies (uv.lock, every group), with pip-audit.
#
#   bash scripts/audit.sh            (make audit)
#   AUDIT_SERVICE=osv bash scripts/audit.sh
#
# The lock is exported as pinned requirements (uv export --frozen) and audited as it is
# (--no-deps --disable-pip: nothing is resolved or installed). pip-audit itself is pinned and
# run with `uv tool run`, outside the project's environment and lock.
#
# Advisory sources (AUDIT_SERVICE): "pypi" (default, the `vulnerabilities` of PyPI's JSON API
# per release, /pypi/<name>/<version>/json) or "osv" (api.osv.dev). The service is probed
# first, and every package must actually have been looked up: when the service cannot be
# reached, or answers "not found" for releases that exist (a mirror without the per-release
# JSON API does), the audit says so and exits 3. It never passes without having looked.
#
# Accepted findings live in scripts/audit-allowlist.txt, one vulnerability id per line with
# the reason (see that file); an entry without a reason is an error.
#
# Exit codes: 0 no known vulnerability outside the allowlist, 1 vulnerabilities found,
# 2 the audit could not run (export, install of pip-audit, allowlist syntax),
# 3 advisory database unreachable (nothing, or not everything, could be checked).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export UV_PYTHON_DOWNLOADS=never
PIP_AUDIT_VERSION=2.10.1
SERVICE="${AUDIT_SERVICE:-pypi}"
ALLOWLIST="$ROOT/scripts/audit-allowlist.txt"
PYTHON="${PYTHON:-python3}"
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
else
  UV=("$PYTHON" -m uv)
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

die() {
  local code="$1"
  shift
  printf 'audit: %s\n' "$*" >&2
  exit "$code"
}

case "$SERVICE" in
pypi | osv) ;;
*) die 2 "AUDIT_SERVICE must be pypi or osv, not '$SERVICE'" ;;
esac

# 1. the locked dependencies, pinned, every dependency group (dev tools run in CI too)
requirements="$TMP/requirements.txt"
"${UV[@]}" export --frozen --all-groups --no-emit-project --no-hashes --quiet \
  --output-file "$requirements" || die 2 "uv export --frozen failed (is uv.lock in sync?)"
packages="$(grep -cE '^[A-Za-z0-9]' "$requirements" || true)"
((packages > 0)) || die 2 "uv export produced no requirements"

# 2. the allowlist: "<vulnerability id> <reason>" per line
ignore=()
allowed=0
if [[ -f "$ALLOWLIST" ]]; then
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    read -r id reason <<<"$line" || true
    [[ -z "${id:-}" ]] && continue
    [[ -n "${reason:-}" ]] || die 2 "$ALLOWLIST: '$id' has no reason"
    ignore+=(--ignore-vuln "$id")
    allowed=$((allowed + 1))
  done <"$ALLOWLIST"
fi

# 3. can the advisory service answer at all? (one known release of a locked package)
probe_name="$(grep -m1 -oE '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$requirements" | tr -d '=')"
probe_version="$(grep -m1 -E "^${probe_name}==" "$requirements" | sed -E 's/^[^=]+==([^ ;]+).*/\1/')"
if ! probe="$("$PYTHON" - "$SERVICE" "$probe_name" "$probe_version" 2>&1 <<'PY'
import json
import sys
import urllib.error
import urllib.request

service, name, version = sys.argv[1:]
if service == "pypi":
    url = f"https://pypi.org/pypi/{name}/{version}/json"
    request = urllib.request.Request(url)
else:
    url = "https://api.osv.dev/v1/query"
    body = {"package": {"name": name, "ecosystem": "PyPI"}, "version": version}
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
try:
    with urllib.request.urlopen(request, timeout=20) as response:
        data = json.load(response)
except urllib.error.HTTPError as exc:
    sys.exit(f"{url}: HTTP {exc.code} for {name} {version}, a release that exists")
except (OSError, ValueError) as exc:
    sys.exit(f"{url}: {exc}")
if service == "pypi" and "vulnerabilities" not in data:
    sys.exit(f"{url}: answered without a 'vulnerabilities' field")
print(url)
PY
)"; then
  die 3 "advisory database unreachable: $probe"
fi
echo "audit: $packages locked packages, advisories from $SERVICE (probe: $probe)"

# 4. pip-audit on the pinned requirements, nothing resolved or installed
report="$TMP/audit.json"
set +e
"${UV[@]}" tool run --quiet --from "pip-audit==$PIP_AUDIT_VERSION" pip-audit \
  --requirement "$requirements" --no-deps --disable-pip \
  --vulnerability-service "$SERVICE" --progress-spinner off \
  --format json --output "$report" "${ignore[@]}" 2>"$TMP/stderr"
status=$?
set -e
if [[ ! -s "$report" ]]; then
  cat "$TMP/stderr" >&2
  if grep -qE 'ConnectionError|ServiceError|NameResolution|Max retries|timed out' "$TMP/stderr"; then
    die 3 "advisory database unreachable: pip-audit could not query $SERVICE (see above)"
  fi
  die 2 "pip-audit did not run (exit $status; see above)"
fi

# 5. every package looked up, then the findings
"$PYTHON" - "$report" "$packages" "$allowed" <<'PY'
import json
import sys

report, expected, allowed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(report) as handle:
    dependencies = json.load(handle)["dependencies"]
skipped = [d for d in dependencies if "skip_reason" in d]
if skipped:
    for dep in skipped[:10]:
        print(f"  not audited: {dep['name']}: {dep['skip_reason']}", file=sys.stderr)
    print(
        f"audit: advisory database unreachable: {len(skipped)} of {len(dependencies)} "
        "packages could not be looked up (nothing about them is known)",
        file=sys.stderr,
    )
    sys.exit(3)
if not dependencies:
    print("audit: pip-audit reported no packages at all", file=sys.stderr)
    sys.exit(2)
if len(dependencies) < expected:  # requirements whose markers exclude this platform
    print(f"audit: {expected - len(dependencies)} requirement(s) not for this platform")
found = [(d, v) for d in dependencies for v in d.get("vulns", [])]
for dep, vuln in found:
    fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
    aliases = ", ".join(vuln.get("aliases") or [])
    print(f"  {dep['name']} {dep['version']}: {vuln['id']} ({aliases}) fixed in: {fixes}")
if found:
    print(
        f"audit: {len(found)} known vulnerabilities in {len(dependencies)} packages; upgrade, "
        "or accept each in scripts/audit-allowlist.txt with the reason",
        file=sys.stderr,
    )
    sys.exit(1)
print(f"audit: {len(dependencies)} packages, no known vulnerabilities ({allowed} allowlisted)")
PY
