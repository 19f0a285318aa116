#!/usr/bin/env bash
# Builds the images and deploys k8s/ to a local kind or minikube cluster (make deploy-local).
#
#   VERSION   image tag                 (default: dev)
#   REGISTRY  e.g. ghcr.io/your-org/    (default: empty = images stay local)
#   PUSH      true to push the images   (then the cluster pulls them from REGISTRY)
#   KIND_CLUSTER_NAME  kind cluster to load images into (default: the first `kind get clusters`)
#
# kind: images are built with the local Docker and copied into the nodes (`kind load`).
# minikube: images are built straight into minikube's Docker (`minikube docker-env`).
set -euo pipefail

VERSION="${VERSION:-dev}"
REGISTRY="${REGISTRY:-}"
PUSH="${PUSH:-false}"
NAMESPACE=ledgerflux
SERVICES=(ingestor normalizer snapshotter gateway)
if [[ -n "$REGISTRY" && "$REGISTRY" != */ ]]; then
  REGISTRY="${REGISTRY}/"
fi
export VERSION REGISTRY PUSH

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- what is there: report everything missing at once, then stop
missing=()
command -v docker >/dev/null 2>&1 || missing+=("docker (to build the images)")
command -v kubectl >/dev/null 2>&1 || missing+=("kubectl (to apply the manifests)")
cluster=""
if command -v kind >/dev/null 2>&1 && [[ -n "$(kind get clusters 2>/dev/null)" ]]; then
  cluster=kind
elif command -v minikube >/dev/null 2>&1 && minikube status >/dev/null 2>&1; then
  cluster=minikube
elif command -v kind >/dev/null 2>&1; then
  missing+=("a kind cluster: kind is installed but has none (kind create cluster)")
elif command -v minikube >/dev/null 2>&1; then
  missing+=("a running minikube: it is installed but not running (minikube start)")
else
  missing+=("kind or minikube (neither is installed): https://kind.sigs.k8s.io/ or https://minikube.sigs.k8s.io/")
fi
if ((${#missing[@]})); then
  echo "deploy-local: cannot deploy, missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi

# ---- build (into minikube's Docker when that is the cluster)
if [[ "$cluster" == minikube ]]; then
  echo "== minikube: building into the cluster's Docker daemon"
  eval "$(minikube docker-env)"
fi
if ! docker info >/dev/null 2>&1; then
  echo "deploy-local: the Docker engine is not reachable (is the daemon running?)" >&2
  exit 1
fi
./docker/build-images.sh

if [[ "$cluster" == kind ]]; then
  kind_name="${KIND_CLUSTER_NAME:-$(kind get clusters | head -n 1)}"
  for svc in "${SERVICES[@]}"; do
    echo "== kind: loading ${REGISTRY}ledgerflux-${svc}:${VERSION} into cluster ${kind_name}"
    kind load docker-image --name "$kind_name" "${REGISTRY}ledgerflux-${svc}:${VERSION}"
  done
fi

# ---- manifests: a temporary overlay on a copy of k8s/ sets registry and tag of each image
overlay="$(mktemp -d)"
trap 'rm -rf "$overlay"' EXIT
cp -R k8s "$overlay/base"
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources: [base]"
  echo "images:"
  for svc in "${SERVICES[@]}"; do
    echo "  - name: ledgerflux-${svc}"
    echo "    newName: ${REGISTRY}ledgerflux-${svc}"
    echo "    newTag: \"${VERSION}\""
  done
} >"$overlay/kustomization.yaml"

echo "== deploying to $(kubectl config current-context) (namespace ${NAMESPACE})"
# Jobs cannot be updated in place (their pod template is immutable): replace finished ones.
if kubectl get namespace "$NAMESPACE" >/dev/null 2>&1; then
  kubectl -n "$NAMESPACE" delete job -l app.kubernetes.io/component=init --ignore-not-found
fi
kubectl apply -k "$overlay"
# Re-deploying the same tag (dev) leaves the pod specs unchanged, so apply alone would keep
# the old containers: restart the four services onto the freshly built images.
kubectl -n "$NAMESPACE" rollout restart deployment \
  -l 'app.kubernetes.io/name in (ingestor,normalizer,snapshotter,gateway)'

# ---- wait: NATS and its streams first (the services need them), then everything else
kubectl -n "$NAMESPACE" rollout status statefulset/nats --timeout=300s
for job in nats-streams dynamodb-init minio-init; do
  kubectl -n "$NAMESPACE" wait --for=condition=complete "job/${job}" --timeout=300s
done
mapfile -t deployments < <(kubectl -n "$NAMESPACE" get deployments -o name)
for deployment in "${deployments[@]}"; do
  kubectl -n "$NAMESPACE" rollout status "$deployment" --timeout=300s
done

cat <<EOF

LedgerFlux is running in namespace ${NAMESPACE} (${cluster}).
  kubectl -n ${NAMESPACE} get pods
  kubectl -n ${NAMESPACE} port-forward svc/gateway 8080:8080
then open http://localhost:8080/ or run: make test-client
(the gateway's API keys are GATEWAY_API_KEYS in k8s/config/secrets.env)
EOF
