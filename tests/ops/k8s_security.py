"""Check the securityContext of every container in rendered Kubernetes manifests.

``kubectl kustomize k8s | python -m tests.ops.k8s_security`` prints one line per violation
and exits 1 if there is any. Required of every container and init container (the pod-level
securityContext counts where Kubernetes inherits it: runAsNonRoot, runAsUser, seccomp):
runAsNonRoot true, a non-zero runAsUser, readOnlyRootFilesystem true,
allowPrivilegeEscalation false, capabilities drop ALL, seccompProfile RuntimeDefault.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import yaml  # type: ignore[import-untyped]

_POD_TEMPLATE_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    path = _POD_TEMPLATE_PATHS.get(document.get("kind", ""))
    if path is None:
        return None
    node: Any = document
    for key in path:
        node = node.get(key) or {}
    return node if isinstance(node, dict) else None


def container_violations(pod: dict[str, Any], container: dict[str, Any]) -> Iterator[str]:
    """What is missing from one container's effective securityContext."""
    pod_ctx = pod.get("securityContext") or {}
    ctx = container.get("securityContext") or {}

    def inherited(key: str) -> Any:
        return ctx[key] if key in ctx else pod_ctx.get(key)

    if inherited("runAsNonRoot") is not True:
        yield "runAsNonRoot is not true"
    if inherited("runAsUser") in (None, 0):
        yield "runAsUser is not set to a non-root uid"
    if ctx.get("readOnlyRootFilesystem") is not True:
        yield "readOnlyRootFilesystem is not true"
    if ctx.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation is not false"
    if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
        yield "capabilities.drop does not contain ALL"
    if (inherited("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield "seccompProfile.type is not RuntimeDefault"


def violations(documents: list[Any]) -> tuple[int, list[str]]:
    """(containers checked, violation lines) over all workload documents."""
    checked = 0
    problems: list[str] = []
    for document in documents:
        if not isinstance(document, dict):
            continue
        pod = _pod_spec(document)
        if pod is None:
            continue
        name = f"{document['kind']}/{document.get('metadata', {}).get('name')}"
        for field in ("initContainers", "containers"):
            for container in pod.get(field) or []:
                checked += 1
                for problem in container_violations(pod, container):
                    problems.append(f"{name} container {container.get('name')!r}: {problem}")
    return checked, problems


def main() -> int:
    documents = list(yaml.safe_load_all(sys.stdin))
    checked, problems = violations(documents)
    for line in problems:
        print(f"securityContext: {line}")
    if checked == 0:
        print("securityContext: no containers found in the input (empty render?)")
        return 1
    if problems:
        return 1
    print(f"securityContext: {checked} containers are non-root, read-only, without privileges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
