"""Property-based fuzzing of every RPC over real gRPC on loopback (issue #14).

Hypothesis builds mostly valid ExplainRequest / PredictRequest / EvaluateRequest messages with
hostile mutations (`tests.rpc.fuzz`), image-text requests with hostile ``texts`` and
``prompts`` (`tests.rpc.fuzz.texts`), visual question answering requests with hostile
``questions`` and ``regions`` and ``synthetic_vqa`` evaluations (`tests.rpc.fuzz.vqa`), and raw
byte strings for every method path, and sends them to one server of the tiny classifier, a tiny
CLIP (labels: the scene classes), a tiny ViLT (pixels) and a tiny VisualBERT (request regions).
The oracle, for every answer:

- the status is OK, or a client error (`CLIENT_ERRORS`) with a non-empty message of at most
  `MAX_DETAILS_CHARS` characters; never INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED or
  UNAVAILABLE, whatever the request;
- an OK Explain or Predict answers every image;
- afterwards the server still reports SERVING on grpc.health.v1 and explains a fresh image
  (after a VQA example, each VQA model too).

The minimal reproducers of what it has found (`FOUND`) are sent on every run as well.

Two profiles, chosen by ``VITLENS_FUZZ_PROFILE``: ``ci`` (the default: a fixed, derandomised
set of examples, about a minute on two cores) and ``long`` (thousands of random examples per
RPC: ``make fuzz``). The cases tried and the status codes seen are printed in the terminal
summary, and written as JSON to ``VITLENS_FUZZ_REPORT`` when it is set.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from tests.conftest import RunningServer, start_server
from tests.report import report
from tests.rpc.fuzz import (
    Catalog,
    Shown,
    deadlines_s,
    evaluate_requests,
    explain_requests,
    model_names,
    predict_requests,
    raw_payloads,
    server_catalog,
    single_images,
)
from tests.rpc.fuzz.oracle import (
    CALL_TIMEOUT_S,
    EVALUATE_TIMEOUT_S,
    TALLY,
    Liveness,
    call_stream,
    call_unary,
    send,
)
from tests.rpc.fuzz.texts import (
    TextLimits,
    image_text_explain_requests,
    image_text_predict_requests,
)
from tests.rpc.fuzz.vqa import (
    VqaLimits,
    VqaLiveness,
    VqaModel,
    vqa_evaluate_calls,
    vqa_explain_requests,
    vqa_predict_requests,
    write_vqa_models,
)
from tests.rpc.fuzz.vqa_inputs import HUGE_REGIONS, many_regions
from tests.tiny import TINY_KWARGS, tiny_loaded
from tests.unit import bimodal_tiny
from tests.unit.image_text_tiny import VIT_CFG, build_open_clip_module, write_open_clip_dir
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.data.questions import ANSWERS
from vitlens_server.data.shapes import CLASSES
from vitlens_server.explain.image_text import IMAGE_TEXT_METHODS
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.runtime.vqa import MAX_REGIONS_PER_IMAGE

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

PROFILE = os.environ.get("VITLENS_FUZZ_PROFILE", "ci")
# Examples per test and profile; Evaluate runs a model over a dataset, so it gets fewer.
EXAMPLES: dict[str, dict[str, int]] = {
    "ci": {
        "Explain": 400,
        "Predict": 250,
        "images": 300,
        "Evaluate": 150,
        "GetModel": 50,
        "raw": 400,
        "texts": 150,
        "vqa": 150,
        "vqa Evaluate": 40,
    },
    "long": {
        "Explain": 4000,
        "Predict": 2500,
        "images": 4000,
        "Evaluate": 1500,
        "GetModel": 500,
        "raw": 5000,
        "texts": 1500,
        "vqa": 1500,
        "vqa Evaluate": 1500,
    },
}
if PROFILE not in EXAMPLES:
    raise ValueError(f"VITLENS_FUZZ_PROFILE must be one of {sorted(EXAMPLES)}; got {PROFILE!r}")
TALLY.profile = PROFILE

MODEL = "tiny"
# The generated scenes' labels index CLASSES, so the model has as many classes.
NUM_CLASSES = len(CLASSES)
MAX_IMAGES = 4
CATALOG: Catalog = server_catalog(MODEL, NUM_CLASSES, TINY_KWARGS["depth"], MAX_IMAGES)
CLIP = TextLimits("clip", max_texts=4, max_chars=60)
# The image-text methods take no options yet; the oracle reads the masks, as for the classifier.
CLIP_CATALOG: Catalog = dataclasses.replace(
    CATALOG,
    model=CLIP.model,
    methods={name: () for name in (*IMAGE_TEXT_METHODS, "oracle")},
)
VQA = VqaLimits(
    models=(
        VqaModel("vilt", len(ANSWERS)),
        VqaModel("vbert", len(bimodal_tiny.ANSWERS), feature_dim=bimodal_tiny.FEATURES),
    ),
    others=(MODEL, CLIP.model),
    max_images=MAX_IMAGES,
    max_chars=CLIP.max_chars,
    max_regions=MAX_REGIONS_PER_IMAGE,
)

_GOOD_IMAGE = tensor_pb2.Image(
    pixels=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[4, 4, 3], data=bytes(48))
)

# Raw payloads go to every method; Evaluate is the one server-streaming RPC.
RAW_RPCS = ("Evaluate", "Explain", "GetModel", "ListModels", "Predict")


def fuzz_settings(test: str) -> settings:
    """The profile's Hypothesis settings for one test: no deadline (the server's latency is
    not the property), no example database, derandomised in CI so every run tries the same."""
    return settings(
        max_examples=EXAMPLES[PROFILE][test],
        deadline=None,
        database=None,
        derandomize=PROFILE == "ci",
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --------------------------------------------------------------------------- fixtures


def _png(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def build_dataset_tree(root: Path, outside: Path) -> None:
    """The folders `tests.rpc.fuzz.requests.odd_server_paths` names, under ``root``:

    folder/     ImageFolder, classes c0 and c1 (valid)      badlabel/  a class no model has
    voc/        VOC layout with a missing image              corrupt/   an image that is not one
    escape/     a class image that is a symlink out of root  link_out   a symlink to ``outside``
    empty/      no images                                    file.txt   not a folder
    """
    secret = outside / "secret.png"
    secret.write_bytes(_png(99))
    for i, label in enumerate(("c0", "c1")):
        (root / "folder" / label).mkdir(parents=True)
        (root / "folder" / label / "a.png").write_bytes(_png(i))
    (root / "badlabel" / "dog").mkdir(parents=True)
    (root / "badlabel" / "dog" / "a.png").write_bytes(_png(3))
    (root / "corrupt" / "c0").mkdir(parents=True)
    (root / "corrupt" / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "escape" / "c0").mkdir(parents=True)
    (root / "escape" / "c0" / "x.png").symlink_to(secret)
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a dataset\n")
    voc = root / "voc"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("img1\nmissing\n")
    PILImage.open(io.BytesIO(_png(4))).save(voc / "JPEGImages" / "img1.jpg")
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[2:8, 2:8] = 1
    PILImage.fromarray(mask, "P").save(voc / "SegmentationClass" / "img1.png")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, outside = tmp_path_factory.mktemp("datasets"), tmp_path_factory.mktemp("outside")
    build_dataset_tree(root, outside)
    return root


@pytest.fixture(scope="module")
def fuzz_server(dataset_root: Path) -> Iterator[RunningServer]:
    """One server for the whole module, with small limits; the report is made at its end."""
    config = ServerConfig(
        port=0,
        max_images_per_request=MAX_IMAGES,
        max_batch_size=4,
        max_pixels=4096 * 4096,
        dataset_roots=(dataset_root,),
        cache_bytes=8 * 1024 * 1024,
        grace_s=1.0,
        max_texts_per_request=CLIP.max_texts,
        max_text_chars=CLIP.max_chars,
    )
    clip = write_open_clip_dir(
        dataset_root.parent / "clip", VIT_CFG, build_open_clip_module(VIT_CFG)
    )
    config_file = clip / "open_clip_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "vitlens": {"labels": list(CLASSES)}})
    )
    spec = ModelSpec(name=CLIP.model, architecture="open_clip", source=f"open_clip:{clip}")
    vqa = [load_model(s) for s in write_vqa_models(dataset_root.parent, VQA)]
    registry = ModelRegistry(
        [tiny_loaded(seed=14, num_classes=NUM_CLASSES), load_model(spec), *vqa]
    )
    started = time.perf_counter()
    running, stop = start_server(config, registry)
    yield running
    stop()
    for line in [*TALLY.lines(), f"module wall time {time.perf_counter() - started:.1f} s"]:
        report("vitlens fuzz", line)
    if path := os.environ.get("VITLENS_FUZZ_REPORT"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(TALLY.as_json(), indent=2) + "\n")


@pytest.fixture(scope="module")
def channel(fuzz_server: RunningServer) -> Iterator[grpc.Channel]:
    # Metadata limits far above the server's: a status message that echoes a 100 kB request
    # string arrives whole, so the oracle measures it, instead of gRPC failing the stream.
    options = [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ("grpc.max_metadata_size", 4 * 1024 * 1024),
        ("grpc.absolute_max_metadata_size", 4 * 1024 * 1024),
    ]
    with grpc.insecure_channel(fuzz_server.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vitlens_pb2_grpc.VitlensServiceStub:
    return vitlens_pb2_grpc.VitlensServiceStub(channel)


@pytest.fixture(scope="module")
def alive(channel: grpc.Channel) -> Liveness:
    liveness = Liveness(channel, MODEL)
    liveness.check()
    return liveness


@pytest.fixture(scope="module")
def vqa_alive(channel: grpc.Channel) -> VqaLiveness:
    liveness = VqaLiveness(channel, VQA)
    liveness.check()
    return liveness


# --------------------------------------------------------------------------- the properties


@fuzz_settings("Explain")
@given(request=explain_requests(CATALOG), timeout_s=deadlines_s(CALL_TIMEOUT_S))
def test_explain_answers_ok_or_a_client_error(
    request: Shown[vitlens_pb2.ExplainRequest],
    timeout_s: float,
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
) -> None:
    alive.require()
    response = call_unary("Explain", stub.Explain, request.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(request.message.images)
    alive.check()


@fuzz_settings("Predict")
@given(request=predict_requests(CATALOG), timeout_s=deadlines_s(CALL_TIMEOUT_S))
def test_predict_answers_ok_or_a_client_error(
    request: Shown[vitlens_pb2.PredictRequest],
    timeout_s: float,
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
) -> None:
    alive.require()
    response = call_unary("Predict", stub.Predict, request.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(request.message.images)
    alive.check()


@fuzz_settings("images")
@given(image=single_images())
def test_one_image_decodes_or_is_refused(
    image: Shown[tensor_pb2.Image], stub: vitlens_pb2_grpc.VitlensServiceStub, alive: Liveness
) -> None:
    alive.require()
    """The image decoders on their own: one image per Predict; a tensor also as a mask."""
    request = vitlens_pb2.PredictRequest(images=[image.message])
    call_unary("Predict (one image)", stub.Predict, request, CALL_TIMEOUT_S)
    if image.message.HasField("pixels"):
        sample = vitlens_pb2.Sample(image=_GOOD_IMAGE, mask=image.message.pixels)
        evaluate = vitlens_pb2.EvaluateRequest(
            methods=["random"],
            metrics=["segmentation"],
            dataset=vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=[sample])),
        )
        call_stream("Evaluate (one mask)", stub.Evaluate, evaluate, EVALUATE_TIMEOUT_S)
    alive.check()


@fuzz_settings("GetModel")
@given(name=model_names(CATALOG))
def test_get_and_list_models_answer_ok_or_a_client_error(
    name: str, stub: vitlens_pb2_grpc.VitlensServiceStub, alive: Liveness
) -> None:
    alive.require()
    call_unary("GetModel", stub.GetModel, vitlens_pb2.GetModelRequest(name=name), CALL_TIMEOUT_S)
    call_unary("ListModels", stub.ListModels, vitlens_pb2.ListModelsRequest(), CALL_TIMEOUT_S)
    alive.check()


@pytest.mark.parametrize(
    ("catalog", "rpc"), [(CATALOG, "Evaluate"), (CLIP_CATALOG, "Evaluate (image-text)")]
)
@fuzz_settings("Evaluate")
@given(data=st.data(), timeout_s=deadlines_s(EVALUATE_TIMEOUT_S))
def test_evaluate_streams_to_the_end_or_a_client_error(
    catalog: Catalog,
    rpc: str,
    data: st.DataObject,
    timeout_s: float,
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
    dataset_root: Path,
) -> None:
    """On the classifier, and on the CLIP (zero-shot over its labels)."""
    alive.require()
    # The dataset tree's path is known only once the fixture has made it: drawn here.
    request = data.draw(evaluate_requests(catalog, dataset_root), label="request")
    call_stream(rpc, stub.Evaluate, request.message, timeout_s)
    alive.check()


@fuzz_settings("raw")
@given(rpc=st.sampled_from(RAW_RPCS), payload=raw_payloads(CATALOG))
def test_raw_bytes_answer_ok_or_a_client_error(
    rpc: str, payload: bytes, channel: grpc.Channel, alive: Liveness
) -> None:
    alive.require()
    note(f"{rpc} <- {len(payload)} bytes {payload[:200]!r}")
    send(channel, rpc, payload, label=f"raw {rpc}")
    alive.check()


@fuzz_settings("texts")
@given(
    explain=image_text_explain_requests(CLIP_CATALOG, CLIP, list(IMAGE_TEXT_METHODS)),
    predict=image_text_predict_requests(CLIP_CATALOG, CLIP),
    timeout_s=deadlines_s(CALL_TIMEOUT_S),
)
def test_image_text_requests_answer_ok_or_a_client_error(
    explain: Shown[vitlens_pb2.ExplainRequest],
    predict: Shown[vitlens_pb2.PredictRequest],
    timeout_s: float,
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
) -> None:
    alive.require()
    response = call_unary("Explain (texts)", stub.Explain, explain.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(explain.message.images)
    response = call_unary("Predict (prompts)", stub.Predict, predict.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(predict.message.images)
    alive.check()


@fuzz_settings("vqa")
@given(
    explain=vqa_explain_requests(VQA),
    predict=vqa_predict_requests(VQA),
    timeout_s=deadlines_s(CALL_TIMEOUT_S),
)
def test_vqa_requests_answer_ok_or_a_client_error(
    explain: Shown[vitlens_pb2.ExplainRequest],
    predict: Shown[vitlens_pb2.PredictRequest],
    timeout_s: float,
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
    vqa_alive: VqaLiveness,
) -> None:
    """Questions and regions on the ViLT and the VisualBERT (and on the other models)."""
    alive.require()
    response = call_unary("Explain (vqa)", stub.Explain, explain.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(explain.message.images)
    response = call_unary("Predict (vqa)", stub.Predict, predict.message, timeout_s)
    if response is not None:
        assert len(response.results) == len(predict.message.images)
    alive.check()
    vqa_alive.check()


@fuzz_settings("vqa Evaluate")
@given(call=vqa_evaluate_calls(VQA))
def test_vqa_evaluate_streams_to_the_end_or_a_client_error(
    call: tuple[Shown[vitlens_pb2.EvaluateRequest], float],
    stub: vitlens_pb2_grpc.VitlensServiceStub,
    alive: Liveness,
    vqa_alive: VqaLiveness,
) -> None:
    """synthetic_vqa runs on the ViLT, and what cannot run on it (or elsewhere)."""
    alive.require()
    request, timeout_s = call
    call_stream("Evaluate (vqa)", stub.Evaluate, request.message, timeout_s)
    alive.check()
    vqa_alive.check()


# --------------------------------------------------------------------------- found before


def _options(**values: float) -> vitlens_pb2.ExplainOptions:
    options = vitlens_pb2.ExplainOptions()
    options.method_options.update(values)
    return options


# The minimal reproducers of what this suite has found, each once answered with a forbidden
# status or an overlong message; sent every run whatever the profile.
FOUND = [
    pytest.param(
        "Predict",
        vitlens_pb2.PredictRequest(
            images=[tensor_pb2.Image(pixels=tensor_pb2.Tensor(dtype=1, shape=[0, 2**62, 3]))]
        ),
        id="zero-element-tensor-too-big-for-numpy",
    ),
    pytest.param(
        "Explain",
        vitlens_pb2.ExplainRequest(
            images=[tensor_pb2.Image(pixels=tensor_pb2.Tensor(dtype=1, shape=[0, 2**32, 2**32]))]
        ),
        id="zero-element-tensor-too-big-for-numpy-explain",
    ),
    pytest.param(
        "Evaluate",
        vitlens_pb2.EvaluateRequest(
            methods=["random"],
            metrics=["deletion"],
            dataset=vitlens_pb2.Dataset(
                inline=vitlens_pb2.InlineDataset(
                    samples=[
                        vitlens_pb2.Sample(
                            image=_GOOD_IMAGE,
                            mask=tensor_pb2.Tensor(dtype=1, shape=[0, 2**62, 3]),
                        )
                    ]
                )
            ),
        ),
        id="zero-element-mask-too-big-for-numpy",
    ),
    pytest.param("Explain", b"\x00", id="undecodable-bytes"),
    pytest.param("Evaluate", b"\x00" * 7, id="undecodable-bytes-stream"),
    pytest.param(
        "Explain",
        vitlens_pb2.ExplainRequest(
            method="rollout", images=[_GOOD_IMAGE], options=_options(discard_ratio=math.nan)
        ),
        id="nan-option",
    ),
    pytest.param(
        "Explain",
        vitlens_pb2.ExplainRequest(
            method="rollout", images=[_GOOD_IMAGE], options=_options(discard_ratio=math.inf)
        ),
        id="inf-option",
    ),
    pytest.param(
        "Evaluate",
        vitlens_pb2.EvaluateRequest(
            methods=["random"],
            metrics=["deletion"],
            dataset=vitlens_pb2.Dataset(synthetic="synthetic:100000000"),
        ),
        id="synthetic-count-past-the-seed-range",
    ),
    pytest.param(
        "GetModel", vitlens_pb2.GetModelRequest(name="x" * 100_000), id="100kB-name-echoed"
    ),
    pytest.param(
        "Explain",
        vitlens_pb2.ExplainRequest(
            model="vilt", method="x" * 1_000, images=[_GOOD_IMAGE], questions=["is there a star?"]
        ),
        id="vqa-1kB-method-echoed",
    ),
    pytest.param(
        "Predict",
        vitlens_pb2.PredictRequest(
            model="vbert",
            images=[_GOOD_IMAGE],
            questions=["is there a star?"],
            regions=[many_regions(HUGE_REGIONS, bimodal_tiny.FEATURES)],
        ),
        id="vqa-100k-regions",
    ),
]


@pytest.mark.parametrize(("rpc", "request_"), FOUND)
def test_found_failures_stay_fixed(
    rpc: str, request_: Message | bytes, channel: grpc.Channel, alive: Liveness
) -> None:
    alive.require()
    send(channel, rpc, request_, label=f"found {rpc}")
    alive.check()
