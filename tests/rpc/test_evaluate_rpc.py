"""Evaluate over real gRPC: progress then results, errors with precise statuses, cancellation."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from google.protobuf import struct_pb2

from tests.polling import wait_for
from vitlens.evaluation import EvaluationResult
from vitlens.v1 import vitlens_pb2


def _request(**fields) -> vitlens_pb2.EvaluateRequest:
    dataset = vitlens_pb2.Dataset(synthetic=fields.pop("synthetic", "synthetic:4"))
    return vitlens_pb2.EvaluateRequest(dataset=dataset, **fields)  # the demo model


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def test_progress_streams_before_results(client) -> None:
    request = _request(
        methods=["oracle", "generic"],
        metrics=["segmentation", "deletion"],
        metric_options={"deletion": _struct({"steps": 4})},
    )
    events = list(client.stub.Evaluate(request, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 2 + ["result"] * 4
    assert events[1].progress.done == events[1].progress.total == 8
    results = {(e.result.method, e.result.metric): e.result for e in events[2:]}
    iou = next(v for v in results[("oracle", "segmentation")].values if v.name == "iou")
    assert iou.mean == pytest.approx(1.0) and iou.n == 4 and iou.ci95_low <= 1 <= iou.ci95_high
    (curve,) = results[("generic", "deletion")].curves
    assert curve.name == "probability" and len(curve.x) == len(curve.y) == 5


@pytest.mark.parametrize(
    ("request_fields", "code", "message"),
    [
        ({"methods": ["generic"], "metrics": ["nope"]}, "INVALID_ARGUMENT", "unknown metrics"),
        ({"methods": ["nope"], "metrics": ["segmentation"]}, "INVALID_ARGUMENT", "unknown method"),
        (
            {"methods": ["generic"], "metrics": ["segmentation"], "synthetic": "synthetic:x"},
            "INVALID_ARGUMENT",
            "N\\[:seed\\]",
        ),
        (
            {
                "methods": ["generic"],
                "metrics": ["deletion"],
                "metric_options": {"deletion": _struct({"stpes": 4})},
            },
            "INVALID_ARGUMENT",
            "metric 'deletion' has no option 'stpes'; valid: steps, baseline, batch_size",
        ),
        (
            {
                "methods": ["generic"],
                "metrics": ["insertion"],
                "metric_options": {"insertion": _struct({"baseline": "inpaint"})},
            },
            "INVALID_ARGUMENT",
            "insertion.baseline must be one of zeros, blur",
        ),
        (
            {
                "methods": ["generic"],
                "metrics": ["segmentation"],
                "metric_options": {"perturbaton": _struct({"baseline": "inpaint"})},
            },
            "INVALID_ARGUMENT",
            "unknown metrics \\['perturbaton'\\]",
        ),
    ],
)
def test_bad_requests_get_precise_statuses(client, request_fields, code, message) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Evaluate(_request(**request_fields), timeout=30))
    assert caught.value.code() == grpc.StatusCode[code]
    assert pytest.importorskip("re").search(message, caught.value.details())


def test_server_folders_need_an_allowed_root_and_models_must_exist(client) -> None:
    dataset = vitlens_pb2.Dataset(server_path="/etc")
    request = vitlens_pb2.EvaluateRequest(
        model="tiny", methods=["generic"], metrics=["segmentation"], dataset=dataset
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Evaluate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request = vitlens_pb2.EvaluateRequest(model="nope", methods=["generic"])
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Evaluate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelling_the_call_stops_the_run(server, client) -> None:
    evaluations = server.server.plane.evaluations
    request = _request(methods=["generic"], metrics=["segmentation"], synthetic="synthetic:400")
    call = client.stub.Evaluate(request, timeout=120)
    first = next(call)
    assert first.WhichOneof("event") == "progress" and first.progress.total == 400
    assert evaluations.running == 1
    call.cancel()
    # the run's thread notices at its next step
    wait_for(lambda: not evaluations.running, describe=lambda: "the run kept going after cancel")
    assert client.explain(_image())[0].explanations  # still serving


def _image():
    import numpy as np

    return np.zeros((32, 32, 3), np.uint8)


def test_sanity_uses_one_randomised_copy_per_model(server, client) -> None:
    served = server.server.plane.workers[0].model
    before = [p.clone() for p in served.module.parameters()]
    request = _request(methods=["generic", "oracle"], metrics=["sanity"])
    for _ in range(2):
        events = [e for e in client.stub.Evaluate(request, timeout=120) if e.HasField("result")]
        values = {e.result.method: e.result.values[0] for e in events}
        assert {v.name for v in values.values()} == {"spearman"}
        assert values["oracle"].mean == pytest.approx(1.0) and values["generic"].n == 4
        assert -1 <= values["generic"].mean < 1
    copies = server.server.plane._randomised
    assert list(copies) == [served.name]  # made once, kept
    assert all(torch.equal(a, b) for a, b in zip(before, served.module.parameters(), strict=True))


def test_labels_beyond_the_models_classes_are_refused(client) -> None:
    request = vitlens_pb2.EvaluateRequest(
        model="tiny",  # 5 classes; the scenes have 8
        methods=["rollout"],
        metrics=["segmentation"],
        dataset=vitlens_pb2.Dataset(synthetic="synthetic:30"),
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Evaluate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "classes" in caught.value.details()


def test_sdk_and_cli_evaluate(server, client, tmp_path, capsys) -> None:
    from vitlens.cli import main

    seen = []
    result = client.evaluate(
        ["oracle", "rollout"], ["segmentation"], dataset="synthetic:3", on_progress=seen.append
    )
    assert [p.done for p in seen] == [3, 6] and seen[-1].total == 6
    assert result.get("oracle", "segmentation").value("iou").mean == pytest.approx(1.0)
    assert "segmentation.iou" in result.table().splitlines()[0]
    out = tmp_path / "results.json"
    code = main(
        ["evaluate", "--server", server.address, "--methods", "random,oracle", "--metrics",
         "segmentation,deletion", "--metric-option", "deletion.steps=2", "--metric-option",
         "deletion.baseline=blur", "--dataset", "synthetic:2", "--json", str(out), "--report",
         str(tmp_path / "report"), "--quiet"]
    )  # fmt: skip
    assert code == 0 and "random" in capsys.readouterr().out
    saved = EvaluationResult.from_dict(json.loads(out.read_text()))
    (curve,) = saved.get("random", "deletion").curves
    assert curve.x == (0.0, 0.5, 1.0)  # both options of one metric arrive: steps=2 and the baseline
    report = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| `oracle` |" in report and "![deletion probability](deletion_probability.png)" in report
    )
    assert (tmp_path / "report" / "deletion_probability.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_calls_carry_request_ids_and_are_counted(server, client) -> None:
    sample = server.server.telemetry.registry.get_sample_value

    def count(code: str) -> float:
        labels = {"rpc": "Evaluate", "method": "", "code": code}
        return sample("vitlens_requests_total", labels) or 0.0

    before_ok, before_bad = count("OK"), count("INVALID_ARGUMENT")
    request = _request(methods=["random"], metrics=["segmentation"], synthetic="synthetic:1")
    call = client.stub.Evaluate(request, timeout=60, metadata=(("x-request-id", "eval-42"),))
    assert [e.WhichOneof("event") for e in call] == ["progress", "result"]
    assert ("x-request-id", "eval-42") in call.trailing_metadata()
    bad = client.stub.Evaluate(_request(methods=["random"], metrics=["nope"]), timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        list(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())["x-request-id"]  # a generated one
    wait_for(  # counted as the handlers end
        lambda: (count("OK"), count("INVALID_ARGUMENT")) == (before_ok + 1, before_bad + 1),
        10,
        describe=lambda: (count("OK"), count("INVALID_ARGUMENT")),
    )
