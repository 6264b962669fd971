"""Request ids: echoed to the caller, attached to the server's log lines; JSON log format."""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np

import vitlens
from vitlens.v1 import vitlens_pb2
from vitlens_server.logs import JsonFormatter, request_id


def _call(client, request, rpc="Predict"):
    method = getattr(client.stub, rpc)
    return method.with_call(request, metadata=(("x-request-id", "trace-42"),), timeout=30)


def test_request_ids_are_echoed_on_success_and_error(client) -> None:
    image = vitlens.to_image(np.zeros((32, 32, 3), np.uint8))
    _, call = _call(client, vitlens_pb2.PredictRequest(model="tiny", images=[image]))
    assert ("x-request-id", "trace-42") in call.trailing_metadata()
    try:
        _call(client, vitlens_pb2.PredictRequest(model="tiny"))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-request-id", "trace-42") in err.trailing_metadata()
    else:
        raise AssertionError("an empty request must fail")
    response = client.stub.Predict.with_call(
        vitlens_pb2.PredictRequest(model="tiny", images=[image]), timeout=30
    )[1]
    generated = dict(response.trailing_metadata())["x-request-id"]
    assert len(generated) == 16  # one is made up when the caller sends none


def test_json_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("vitlens.rpc", logging.WARNING, __file__, 1, "slow %s", ("x",), None)
    token = request_id.set("trace-7")
    try:
        record.request_id = request_id.get()
    finally:
        request_id.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "slow x" and entry["request_id"] == "trace-7"
    assert entry["level"] == "WARNING" and entry["time"].endswith("Z")
