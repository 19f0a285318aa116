#!/usr/bin/env bash
# Builds every LedgerFlux image: ledgerflux-common first, then one image per service on top
# of it, plus ledgerflux-normalizer:simple.
#
#   VERSION   image tag                          (default: dev)
#   REGISTRY  prefix such as ghcr.io/your-org/   (default: empty = local images only)
#   PUSH      true to push every image after building (needs REGISTRY and a docker login)
#
# Example: VERSION=v0.1.0 REGISTRY=ghcr.io/your-org/ PUSH=true ./docker/build-images.sh
set -euo pipefail

VERSION="${VERSION:-dev}"
REGISTRY="${REGISTRY:-}"
PUSH="${PUSH:-false}"
SERVICES=(ingestor normalizer snapshotter gateway)

# Accept "ghcr.io/org" as well as "ghcr.io/org/": image names are "${REGISTRY}ledgerflux-x".
if [[ -n "$REGISTRY" && "$REGISTRY" != */ ]]; then
  REGISTRY="${REGISTRY}/"
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
  echo "build-images: $*" >&2
  exit 1
}

command -v docker >/dev/null 2>&1 || die "docker is not installed (needed to build images)"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is the daemon running? minikube: eval \$(minikube docker-env))"
if [[ "$PUSH" == "true" && -z "$REGISTRY" ]]; then
  die "PUSH=true needs REGISTRY (e.g. REGISTRY=ghcr.io/your-org/)"
fi

built=()

build() {
  local name="$1" dockerfile="$2" context="$3"
  local image="${REGISTRY}${name}:${VERSION}"
  echo "== building ${image} (${dockerfile})"
  docker build \
    --file "$dockerfile" \
    --build-arg "REGISTRY=${REGISTRY}" \
    --build-arg "VERSION=${VERSION}" \
    --tag "$image" \
    "$context"
  built+=("$image")
}

# The common image needs the sources and uv.lock: the repository root is its context
# (.dockerignore keeps .venv, .git, caches and local state out of it).
build ledgerflux-common docker/Dockerfile.common .
# Service images copy nothing; docker/ is a tiny context.
for svc in "${SERVICES[@]}"; do
  build "ledgerflux-${svc}" "docker/Dockerfile.${svc}" docker
done

# Single-replica normalizer owning every shard: the same image (NORMALIZER_SHARDS unset is
# its default), under the tag the README documents.
simple="${REGISTRY}ledgerflux-normalizer:simple"
docker tag "${REGISTRY}ledgerflux-normalizer:${VERSION}" "$simple"
built+=("$simple")

if [[ "$PUSH" == "true" ]]; then
  for image in "${built[@]}"; do
    echo "== pushing ${image}"
    docker push "$image"
  done
fi

echo "== built: ${built[*]}"
