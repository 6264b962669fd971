"""Every RPC of vitlens.v1 is counted and timed: after a call over real gRPC its rpc label shows
in ``vitlens_requests_total`` with the call's status code, and in ``vitlens_request_seconds``.

The RPCs come from the service descriptor, so an RPC added to the contract fails here until it
has a call below (and the dashboard, which groups by rpc, charts it without a change).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import NamedTuple

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.polling import wait_for
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc

SERVICE = vitlens_pb2.DESCRIPTOR.services_by_name["VitlensService"]


def _png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _image() -> list[tensor_pb2.Image]:
    return [tensor_pb2.Image(encoded=_png())]


Call = Callable[[vitlens_pb2_grpc.VitlensServiceStub], object]


class Calls(NamedTuple):
    """A call of the RPC that succeeds and the method label it is counted under; a call that
    fails (None: the RPC cannot fail on its input) and its status."""

    ok: Call
    method: str
    failing: Call | None
    failure: str


CALLS: dict[str, Calls] = {
    "Explain": Calls(
        lambda s: s.Explain(
            vitlens_pb2.ExplainRequest(model="tiny", method="rollout", images=_image()), timeout=60
        ),
        "rollout",
        lambda s: s.Explain(vitlens_pb2.ExplainRequest(model="nope", images=_image()), timeout=60),
        "NOT_FOUND",
    ),
    "Predict": Calls(
        lambda s: s.Predict(vitlens_pb2.PredictRequest(model="tiny", images=_image()), timeout=60),
        "",
        lambda s: s.Predict(vitlens_pb2.PredictRequest(model="tiny"), timeout=60),  # no images
        "INVALID_ARGUMENT",
    ),
    "ListModels": Calls(
        lambda s: s.ListModels(vitlens_pb2.ListModelsRequest(), timeout=60),
        "",
        None,
        "",
    ),
    "GetModel": Calls(
        lambda s: s.GetModel(vitlens_pb2.GetModelRequest(name="tiny"), timeout=60),
        "",
        lambda s: s.GetModel(vitlens_pb2.GetModelRequest(name="nope"), timeout=60),
        "NOT_FOUND",
    ),
    "Evaluate": Calls(
        lambda s: list(
            s.Evaluate(
                vitlens_pb2.EvaluateRequest(  # the demo model: the synthetic scenes' classes
                    methods=["random"],
                    metrics=["segmentation"],
                    dataset=vitlens_pb2.Dataset(synthetic="synthetic:1"),
                ),
                timeout=120,
            )
        ),
        "",
        lambda s: list(
            s.Evaluate(
                vitlens_pb2.EvaluateRequest(methods=["random"], metrics=["nope"]), timeout=60
            )
        ),
        "INVALID_ARGUMENT",
    ),
}


def test_every_rpc_of_the_contract_has_a_call_here() -> None:
    assert {m.name for m in SERVICE.methods} == set(CALLS)


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
def test_every_rpc_is_counted_and_timed_with_its_status(server, client, rpc: str) -> None:
    telemetry = server.server.telemetry
    sample = telemetry.registry.get_sample_value
    calls = CALLS[rpc]

    def counted(code: str, label: str) -> float:
        return sample("vitlens_requests_total", {"rpc": rpc, "method": label, "code": code}) or 0

    def timed(label: str) -> float:
        return sample("vitlens_request_seconds_count", {"rpc": rpc, "method": label}) or 0

    cases = [(calls.ok, calls.method, "OK")]
    if calls.failing is not None:
        failed_label = "" if rpc != "Explain" else "generic"  # no method named: the default
        cases.append((calls.failing, failed_label, calls.failure))
    for call, label, code in cases:
        before_count, before_timed = counted(code, label), timed(label)
        if code == "OK":
            call(client.stub)
        else:
            with pytest.raises(grpc.RpcError) as caught:
                call(client.stub)
            assert caught.value.code().name == code
        # counted and timed as the handler ends, which may be just after the answer
        wait_for(
            lambda c=code, la=label, b=before_count, t=before_timed: (
                counted(c, la) == b + 1 and timed(la) >= t + 1
            ),
            10,
            describe=lambda: telemetry.text(),
        )
        assert sample("vitlens_request_seconds_sum", {"rpc": rpc, "method": label}) > 0
    assert sample("vitlens_in_flight_requests", {"rpc": rpc}) is not None
