"""A small kustomize renderer for exactly the features deploy/k8s/ uses.

PyPI has no kustomize binary (the ``kustomize`` package there is unrelated), and CI installs
from PyPI only, so deploy/validate.py renders the kustomizations with this module. Supported
``kustomization.yaml`` fields, with kustomize's semantics:

* ``resources``: YAML files (several documents each) and directories holding a kustomization,
  rendered recursively, in order;
* ``patches`` with ``path:`` to a strategic-merge patch file whose documents each name their
  target by apiVersion, kind and metadata.name (namespace too, when given);
* ``namespace``: set on every namespaced object;
* ``labels``: ``pairs`` added to metadata.labels, and to pod templates' labels
  (``includeTemplates``) and selectors (``includeSelectors``) of workloads;
* ``images``: ``name`` → ``newName`` / ``newTag`` / ``digest`` in every (init) container.

Anything else (generators, JSON 6902 patches, replacements, ``commonLabels``...) raises
`Unsupported` rather than being silently ignored. Strategic merge follows the Kubernetes patch
strategy of the fields involved: maps merge recursively, ``null`` deletes a key, lists of
containers, volumes, env, ports, volume mounts and image pull secrets merge by their merge key,
every other list is replaced. When kubectl is installed, validate.py compares this renderer's
output with ``kubectl kustomize`` and fails on any difference.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Unsupported", "load_documents", "render", "strategic_merge"]

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Objects that live outside namespaces (the ones a vitlens deployment could meet).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass",
    "APIService", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}  # fmt: skip
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Lists that strategic merge combines item by item, keyed by this field (Kubernetes'
# patchMergeKey); a list not named here is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ports": None,  # containerPort for container ports, port for Service ports
}


class Unsupported(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def load_documents(path: Path) -> list[Doc]:
    """The non-empty YAML documents of ``path``; each must be a mapping."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: every document must be a mapping, got {type(doc).__name__}")
    return docs


def _kustomization(directory: Path) -> tuple[Path, Doc]:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            path = directory / name
            doc = yaml.safe_load(path.read_text()) or {}
            unknown = set(doc) - SUPPORTED
            if unknown:
                raise Unsupported(f"{path}: unsupported fields {sorted(unknown)}")
            return path, doc
    raise FileNotFoundError(f"{directory} holds no kustomization.yaml")


def render(directory: Path) -> list[Doc]:
    """The objects the kustomization in ``directory`` builds, in resource order."""
    path, kz = _kustomization(Path(directory))
    objects: list[Doc] = []
    for entry in kz.get("resources", []):
        target = path.parent / entry
        objects += render(target) if target.is_dir() else load_documents(target)
    for patch in kz.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{path}: only `patches: - path: FILE` is supported, got {patch}")
        for doc in load_documents(path.parent / patch["path"]):
            _apply_patch(objects, doc, path)
    if "namespace" in kz:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kz["namespace"]
    for spec in kz.get("labels", []):
        _add_labels(objects, spec, path)
    for image in kz.get("images", []):
        _set_image(objects, image)
    return objects


def _apply_patch(objects: list[Doc], patch: Doc, where: Path) -> None:
    meta = patch.get("metadata", {})
    matches = [
        obj
        for obj in objects
        if obj.get("kind") == patch.get("kind")
        and obj.get("apiVersion") == patch.get("apiVersion")
        and obj.get("metadata", {}).get("name") == meta.get("name")
        and ("namespace" not in meta or obj["metadata"].get("namespace") == meta["namespace"])
    ]
    if len(matches) != 1:
        raise ValueError(
            f"{where}: patch for {patch.get('kind')}/{meta.get('name')} matches "
            f"{len(matches)} objects, expected 1"
        )
    merged = strategic_merge(matches[0], patch)
    matches[0].clear()
    matches[0].update(merged)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into a copy of ``base`` (Kubernetes strategic merge, subset above)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(isinstance(k, str) and k.startswith("$") for k in patch):
            raise Unsupported(f"strategic-merge directives are not supported: {list(patch)}")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field] or (
            "containerPort" if any("containerPort" in item for item in base + patch) else "port"
        )
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = strategic_merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def _pod_template(obj: Doc) -> Doc | None:
    if obj.get("kind") in WORKLOADS:
        return obj.get("spec", {}).get("template")
    return None


def _add_labels(objects: list[Doc], spec: Doc, where: Path) -> None:
    unknown = set(spec) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown:
        raise Unsupported(f"{where}: unsupported labels fields {sorted(unknown)}")
    pairs = spec.get("pairs", {})
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        template = _pod_template(obj)
        if template is not None and (spec.get("includeTemplates") or spec.get("includeSelectors")):
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if spec.get("includeSelectors"):
            selector = obj.get("spec", {}).get("selector")
            if obj.get("kind") == "Service" and selector is not None:
                selector.update(pairs)
            elif isinstance(selector, dict) and obj.get("kind") in WORKLOADS:
                selector.setdefault("matchLabels", {}).update(pairs)


def _set_image(objects: list[Doc], image: Doc) -> None:
    for obj in objects:
        template = _pod_template(obj)
        if template is None:
            continue
        pod = template.get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            ref = container.get("image", "")
            name, tag = _split_image(ref)
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                tag = image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name


def _split_image(ref: str) -> tuple[str, str]:
    """``registry:5000/repo:tag`` → (``registry:5000/repo``, ``tag``); digests kept in the tag."""
    if "@" in ref:
        name, digest = ref.split("@", 1)
        return name, "@" + digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, ""
