"""The Open Inference Protocol's proto: the committed generated code is what it generates, its
wire shape is tritonclient's, field number for field number, and its tensors are encoded as the
protocol says (hand-built bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.rpc.oip_client.descriptors import describe
from vitlens_server.errors import InvalidArgument
from vitlens_server.rpc.oip import grpc_service_pb2 as pb
from vitlens_server.rpc.oip import tensors

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / "build/oip-venv/bin/python"


def test_regenerating_the_oip_protos_changes_nothing(tmp_path: Path) -> None:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run(
        [str(ROOT / "scripts/gen_oip_protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PATH": path},
    )
    generated = sorted(tmp_path.iterdir())
    assert [p.name for p in generated] == ["grpc_service_pb2.py", "grpc_service_pb2.pyi"]
    committed = ROOT / "server/vitlens_server/rpc/oip"
    for path in generated:
        assert (committed / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `PATH=.venv/bin:$PATH scripts/gen_oip_protos.sh` and "
            "commit the result"
        )


def test_the_wire_shape_is_tritonclients() -> None:
    if not TRITON_PYTHON.exists():
        message = (
            "build/oip-venv is missing, so tritonclient's proto cannot be read: run make oip-venv"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = [m.name for m in service.methods]
    ours = describe(service, methods)
    run = subprocess.run(
        [str(TRITON_PYTHON), str(ROOT / "tests/rpc/oip_client/descriptors.py"), *methods],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(run.stdout)
    assert ours["rpcs"] == theirs["rpcs"]
    assert sorted(ours["messages"]) == sorted(theirs["messages"])
    for name, fields in ours["messages"].items():
        assert fields == theirs["messages"][name], name


# ------------------------------------------------------------------ the tensor codec, by hand


def _tensor(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(
        name="T", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )


def test_raw_elements_are_little_endian_in_row_major_order() -> None:
    raw = bytes([0x01, 0x00, 0xFF, 0xFF, 0x00, 0x01, 0x34, 0x12])  # int16: 1, -1, 256, 0x1234
    array = tensors.decode(_tensor("INT16", [2, 2]), raw, "T")
    assert array.tolist() == [[1, -1], [256, 0x1234]]
    floats = tensors.decode(_tensor("FP32", [1, 2]), bytes.fromhex("0000803f000000c0"), "T")
    assert floats.tolist() == [[1.0, -2.0]]


def test_raw_bytes_elements_are_length_prefixed() -> None:
    raw = b"\x03\x00\x00\x00abc" + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x00z"
    assert tensors.decode(_tensor("BYTES", [3]), raw, "T").tolist() == [b"abc", b"", b"z"]


def test_typed_contents_fill_the_shape() -> None:
    uint8 = tensors.decode(_tensor("UINT8", [1, 3], uint_contents=[0, 7, 255]), None, "T")
    assert uint8.dtype == np.uint8 and uint8.tolist() == [[0, 7, 255]]
    flags = tensors.decode(_tensor("BOOL", [2], bool_contents=[True, False]), None, "T")
    assert flags.tolist() == [True, False]
    with pytest.raises(InvalidArgument, match=r"INT8 elements must lie in \[-128, 127\]"):
        tensors.decode(_tensor("INT8", [1], int_contents=[200]), None, "T")
    with pytest.raises(InvalidArgument, match="FP16 elements have no typed contents field"):
        tensors.decode(_tensor("FP16", [1]), None, "T")


def test_outputs_encode_as_little_endian_bytes() -> None:
    tensor, raw = tensors.encode("TARGET", np.array([1, 258]), "INT32")
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("TARGET", "INT32", [2])
    assert raw == bytes([1, 0, 0, 0, 2, 1, 0, 0])
    _tensor_fp32, raw = tensors.encode("P", np.array([[0.5]], np.float64), "FP32")
    assert raw == bytes.fromhex("0000003f")
