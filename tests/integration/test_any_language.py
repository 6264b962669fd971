"""Clients in other languages against a live server, run as examples/README.md shows them.

The Node example (`examples/node`: @grpc/grpc-js + @grpc/proto-loader) must raise gRPC's 4 MiB
receive limit for large replies, send `method_options` as a google.protobuf.Struct and decode the
google.rpc.Status error details; the buf curl walkthrough (`examples/grpcurl/walkthrough.sh`)
does the same from a shell. Both run as subprocesses against the session's test server over
loopback; their numbers are compared with the Python SDK's for the same requests.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.report import report

ROOT = Path(__file__).resolve().parents[2]
EXPLAIN_JS = "examples/node/explain.js"
SCENE = "examples/grpcurl/scene.png"  # a held-out generated scene: a disc
WALKTHROUGH = "examples/grpcurl/walkthrough.sh"
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024
# explain.js arguments the tests run and examples/README.md shows (after --server, --image).
ROLLOUT_MAX = ("--method", "rollout", "--option", "head_fusion=max", "--values")
# 8 images x top-2 classes, input-resolution heatmaps + relevance matrices: 5.7 MB.
LARGE = ("--images", "8", "--method", "generic", "--top-k", "2", "--grid", "input", "--relevance")
RAISED = ("--max-receive-mb", "64")
NO_SUCH_METHOD = ("--method", "no_such_method")
DOCUMENTED = {(), ROLLOUT_MAX, LARGE, (*LARGE, *RAISED), NO_SUCH_METHOD}
DOCS = ("README.md", "examples/README.md")
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
RESOURCE_INFO = "type.googleapis.com/google.rpc.ResourceInfo"


@pytest.fixture(scope="module", autouse=True)
def node_example() -> None:
    if shutil.which("node") is None:
        pytest.fail("node (>= 18.3) is not on PATH")
    if not (ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node/node_modules is missing: run `npm ci --prefix examples/node`")


def explain_js(
    server: RunningServer, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict]:
    """Run explain.js on the sample scene; returns its exit status and its JSON stdout."""
    proc = subprocess.run(
        ["node", EXPLAIN_JS, "--server", server.address, "--image", SCENE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def heatmap_values(summary: dict, image: int = 0) -> np.ndarray:
    heatmap = summary["images"][image]["explanations"][0]["heatmap"]
    return np.asarray(heatmap["values"], dtype=np.float32).reshape(heatmap["shape"])


def test_node_explains_an_image(server: RunningServer, client) -> None:
    code, summary = explain_js(server)

    assert code == 0
    expected = client.explain(str(ROOT / SCENE))[0]
    assert (summary["model"], summary["method"]) == ("vitlens-demo", "generic")
    (image,) = summary["images"]
    assert image["top"]["label"] == expected.top.label == "disc"
    assert image["top"]["probability"] == pytest.approx(expected.top.probability, rel=1e-6)
    (explanation,) = image["explanations"]
    assert explanation["heatmap"] == {"dtype": "DTYPE_FLOAT32", "shape": [14, 14], "bytes": 784}
    assert explanation["relevance"] is None


def test_the_node_quickstart(server: RunningServer, client) -> None:
    proc = subprocess.run(
        ["node", "examples/node/quickstart.js", server.address, SCENE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    explained, failed = proc.stdout.splitlines()

    options = {"head_fusion": "max", "discard_ratio": 0.9}
    sdk = client.explain(str(ROOT / SCENE), method="rollout", grid="input", method_options=options)
    label, shape, peak = explained.split()
    assert (label, shape) == (sdk[0].top.label, "224x224")
    assert float(peak) == pytest.approx(float(sdk[0].heatmap.max()), rel=1e-6)
    assert failed == f"INVALID_ARGUMENT {BAD_REQUEST} method"


def test_node_method_options_travel_as_a_struct_and_change_the_map(
    server: RunningServer, client
) -> None:
    _, fused_max = explain_js(server, *ROLLOUT_MAX)
    _, fused_mean = explain_js(server, "--method", "rollout", "--values")

    sdk = client.explain(str(ROOT / SCENE), method="rollout", method_options={"head_fusion": "max"})
    np.testing.assert_allclose(heatmap_values(fused_max), sdk[0].heatmap, rtol=1e-6, atol=1e-9)
    assert not np.allclose(heatmap_values(fused_max), heatmap_values(fused_mean))


def test_proto_loader_silently_drops_a_plain_object_struct_and_to_struct_keeps_it() -> None:
    # The pitfall the example works around, checked against the pinned proto-loader.
    script = """
    const { load, toStruct } = require('./vitlens-client');
    const { requestSerialize, requestDeserialize } = load().Service.service.Explain;
    const roundTrip = (methodOptions) =>
      requestDeserialize(requestSerialize({ options: { methodOptions } })).options.methodOptions;
    const options = { head_fusion: 'max', discard_ratio: 0.9, nested: [1, null, { on: true }] };
    const struct = roundTrip(toStruct(options));
    console.log(JSON.stringify({ plain: roundTrip(options), struct }));
    """
    proc = subprocess.run(
        ["node", "-e", script],
        cwd=ROOT / "examples" / "node",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(proc.stdout)

    assert result["plain"] == {"fields": {}}
    fields = result["struct"]["fields"]
    assert fields["head_fusion"]["stringValue"] == "max"
    assert fields["discard_ratio"]["numberValue"] == 0.9
    nested = fields["nested"]["listValue"]["values"]
    assert [value["kind"] for value in nested] == ["numberValue", "nullValue", "structValue"]
    assert nested[2]["structValue"]["fields"]["on"]["boolValue"] is True


def test_a_large_reply_needs_a_raised_receive_limit(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    code, summary = explain_js(server, *LARGE, *RAISED)
    assert code == 0
    assert summary["bytesReceived"] > GRPC_DEFAULT_RECEIVE_BYTES
    assert len(summary["images"]) == 8
    for image in summary["images"]:
        assert len(image["explanations"]) == 2
        for explanation in image["explanations"]:
            assert explanation["heatmap"]["shape"] == [224, 224]
            assert explanation["relevance"]["shape"] == [197, 197]

    code, refused = explain_js(server, *LARGE)
    assert code == 3
    assert refused["error"]["codeName"] == "RESOURCE_EXHAUSTED"
    assert f"vs {GRPC_DEFAULT_RECEIVE_BYTES})" in refused["error"]["message"]
    # the client's refusal is the client's doing: no ERROR (nor traceback) in the server's log
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    report(
        "any-language clients",
        f"node explain.js {' '.join(LARGE)}: {summary['bytesReceived'] / 1e6:.2f} MB reply in "
        f"{summary['seconds']:.2f} s (server {summary['serverSeconds']:.2f} s); refused at the "
        f"default 4 MiB: {refused['error']['message']}",
    )


@pytest.mark.parametrize(
    ("args", "code_name", "detail"),
    [
        (NO_SUCH_METHOD, "INVALID_ARGUMENT", {"field": "method"}),
        (
            ("--method", "rollout", "--option", "head_fusion=maxx"),
            "INVALID_ARGUMENT",
            {"field": "options.method_options.head_fusion"},
        ),
        (("--model", "nope"), "NOT_FOUND", {"resourceType": "model", "resourceName": "nope"}),
    ],
)
def test_node_decodes_the_error_details(
    server: RunningServer, args: tuple[str, ...], code_name: str, detail: dict
) -> None:
    code, answer = explain_js(server, *args)

    assert code == 3
    error = answer["error"]
    assert error["codeName"] == code_name
    (decoded,) = error["details"]
    if "field" in detail:
        assert decoded["@type"] == BAD_REQUEST
        (violation,) = decoded["fieldViolations"]
        assert violation["field"] == detail["field"]
        assert violation["description"] == error["message"]
    else:
        assert decoded["@type"] == RESOURCE_INFO
        assert {key: decoded[key] for key in detail} == detail


def test_node_reads_the_protos_from_vitlens_protos(server: RunningServer, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos" / "vitlens", tmp_path / "vitlens")
    code, summary = explain_js(server, env={**os.environ, "VITLENS_PROTOS": str(tmp_path)})
    assert code == 0
    assert summary["images"][0]["top"]["label"] == "disc"

    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        ["node", EXPLAIN_JS, "--server", server.address, "--image", SCENE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VITLENS_PROTOS": str(missing)},
    )
    assert proc.returncode not in (0, 3)
    assert "vitlens.proto" in proc.stderr


def walkthrough_steps(output: str) -> dict[str, list[str]]:
    """The walkthrough's output per step: lines under each `== N title` header, keyed by N."""
    steps: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith("== "):
            lines = steps.setdefault(line.split()[1], [])
        elif line.strip():
            lines.append(line)
    return steps


@pytest.mark.slow  # eight buf curl runs: about 5 s
def test_the_buf_curl_walkthrough(server: RunningServer, client) -> None:
    if not BUF.exists():
        pytest.fail("tools/node_modules/.bin/buf is missing: run `npm ci --prefix tools`")
    if shutil.which("jq") is None or shutil.which("base64") is None:
        pytest.fail("the walkthrough needs jq and base64 on PATH")

    proc = subprocess.run(
        ["bash", WALKTHROUGH, server.address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    steps = walkthrough_steps(proc.stdout)
    assert sorted(steps) == [str(n) for n in range(1, 9)]

    assert {"vitlens.v1.VitlensService", "grpc.health.v1.Health"} <= set(steps["1"])

    model = json.loads(steps["2"][0])
    assert (model["name"], model["patchGrid"], model["labels"][0]) == (
        "vitlens-demo",
        [14, 14],
        "disc",
    )
    assert "rollout" in model["methods"]

    predicted = json.loads(steps["3"][0])
    assert predicted["id"] == "scene"
    assert predicted["predictions"][0]["label"] == "disc"
    assert len(predicted["predictions"]) == 3

    explained = json.loads(steps["4"][0])
    heatmap = explained["heatmap"]
    assert (explained["method"], heatmap["dtype"], heatmap["shape"]) == (
        "rollout",
        "DTYPE_FLOAT32",
        ["14", "14"],
    )
    values = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f4").reshape(14, 14)
    options = {"head_fusion": "max", "discard_ratio": 0.9}
    sdk = client.explain(str(ROOT / SCENE), method="rollout", method_options=options)[0].heatmap
    default = client.explain(str(ROOT / SCENE), method="rollout")[0].heatmap
    np.testing.assert_allclose(values, sdk, rtol=1e-6, atol=1e-9)
    assert not np.allclose(values, default)

    refused = json.loads(steps["5"][0])
    assert refused["code"] == "resource_exhausted"
    assert f"larger than configured max {GRPC_DEFAULT_RECEIVE_BYTES}" in refused["message"]

    half = json.loads(steps["6"][0])
    assert (half["images"], half["explanations"]) == (8, 16)
    assert half["heatmap"] == {"dtype": "DTYPE_FLOAT16", "shape": ["224", "224"]}
    assert half["relevance"] == {"dtype": "DTYPE_FLOAT16", "shape": ["197", "197"]}

    error = json.loads(steps["7"][0])
    assert error["code"] == "invalid_argument"
    assert "no_such_method" in error["message"]
    assert [d["type"] for d in error["details"]] == ["google.rpc.BadRequest"]
    assert steps["7"][1] == "(buf curl exit status 24: the gRPC code times 8)"

    (violation,) = json.loads(steps["8"][0])["fieldViolations"]
    assert violation == {"field": "method", "description": error["message"]}


def code_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_show_what_these_tests_run(doc: str) -> None:
    text = (ROOT / doc).read_text()
    quickstart = (ROOT / "examples" / "node" / "quickstart.js").read_text()
    walkthrough = (ROOT / WALKTHROUGH).read_text()
    prefix = ["node", EXPLAIN_JS, "--server", "localhost:50051", "--image", SCENE]
    for lang, body in code_blocks(text):
        if lang == "js":
            assert body == quickstart, f"{doc}: a js block that is not examples/node/quickstart.js"
        elif body.startswith(f"# from {WALKTHROUGH}\n"):
            excerpt = body.split("\n", 1)[1]
            assert excerpt in walkthrough, f"{doc}: not verbatim from {WALKTHROUGH}:\n{excerpt}"
        for line in body.splitlines():
            if line.startswith(f"node {EXPLAIN_JS}"):
                argv = shlex.split(line)
                assert argv[: len(prefix)] == prefix, line
                assert tuple(argv[len(prefix) :]) in DOCUMENTED, f"{doc}: untested: {line}"
