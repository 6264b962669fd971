"""The VQA fields of the contract through `rpc.convert`: questions and regions decoded into the
queries (broadcast, owned float32 arrays, every refusal naming its field), region relevance and
relevance matrices encoded per explanation in the result's dtype, the ModelInfo fields and the
task. No server, no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitlens.tensors import numpy_to_tensor, tensor_to_numpy
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens_server.domain import (
    ExplainResult,
    Predictions,
    RelevanceMatrix,
    TextRelevance,
)
from vitlens_server.errors import InvalidArgument
from vitlens_server.rpc import convert
from vitlens_server.runtime.api import ExplainReply, ModalityCard, ModelCard, Timing

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ("yes", "no", "red", "blue")


def image(i: int = 0) -> dict:
    return {"id": f"img{i}", "encoded": b"png"}


def regions_msg(features: np.ndarray, boxes: np.ndarray) -> vitlens_pb2.Regions:
    return vitlens_pb2.Regions(features=numpy_to_tensor(features), boxes=numpy_to_tensor(boxes))


def good_regions(r: int = 3, f: int = 5, seed: int = 0) -> vitlens_pb2.Regions:
    rng = np.random.default_rng(seed)
    lo = rng.uniform(0.0, 0.5, (r, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.0, 0.5, (r, 2))], axis=1)  # (R, 4)
    return regions_msg(rng.normal(size=(r, f)).astype(np.float32), boxes.astype(np.float32))


def explain(**fields) -> vitlens_pb2.ExplainRequest:
    return vitlens_pb2.ExplainRequest(**fields)


def refusal(call, field: str, match: str = "") -> InvalidArgument:
    with pytest.raises(InvalidArgument, match=match) as info:
        call()
    assert info.value.field == field
    assert info.value.status == "INVALID_ARGUMENT"
    return info.value


# ---------------------------------------------------------------------------- questions


def test_questions_one_per_image_pass_through() -> None:
    request = explain(images=[image(0), image(1)], questions=["what colour?", "is it red?"])
    query = convert.explain_query(request, None)
    assert query.questions == ("what colour?", "is it red?")
    assert query.regions == ()


def test_a_single_question_is_asked_of_every_image() -> None:
    request = explain(images=[image(i) for i in range(3)], questions=["how many stars?"])
    assert convert.explain_query(request, None).questions == ("how many stars?",) * 3
    predict = vitlens_pb2.PredictRequest(images=[image(0), image(1)], questions=["any?"], top_k=3)
    query = convert.predict_query(predict, None)
    assert query.questions == ("any?", "any?") and query.top_k == 3


def test_no_questions_stay_none_for_other_models() -> None:
    query = convert.explain_query(explain(images=[image()], texts=["a red star"]), None)
    assert query.questions == () and query.texts == ("a red star",)
    assert convert.predict_query(vitlens_pb2.PredictRequest(images=[image()]), None).questions == ()


@pytest.mark.parametrize("count", [2, 4])
def test_question_count_must_be_one_or_the_images(count: int) -> None:
    request = explain(images=[image(i) for i in range(3)], questions=["q?"] * count)
    refusal(lambda: convert.explain_query(request, None), "questions", f"{count} questions for 3")
    predict = vitlens_pb2.PredictRequest(images=[image(i) for i in range(3)], questions=["q"] * 2)
    refusal(lambda: convert.predict_query(predict, None), "questions", "one per image")


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_an_empty_question_is_named_by_index(blank: str) -> None:
    request = explain(images=[image(0), image(1)], questions=["what shape?", blank])
    refusal(lambda: convert.explain_query(request, None), "questions[1]", "empty")
    single = vitlens_pb2.PredictRequest(images=[image(0), image(1)], questions=[blank])
    refusal(lambda: convert.predict_query(single, None), "questions[0]", "empty")


# ------------------------------------------------------------------------------ regions


def test_regions_decode_into_owned_float32_arrays() -> None:
    half = good_regions(r=2, f=4, seed=1)
    half.features.CopyFrom(numpy_to_tensor(tensor_to_numpy(half.features).astype(np.float16)))
    request = explain(
        images=[image(0), image(1)], questions=["q"], regions=[good_regions(3, 4), half]
    )
    query = convert.explain_query(request, None)
    assert [r.where for r in query.regions] == ["regions[0]", "regions[1]"]
    first, second = query.regions
    assert first.features.shape == (3, 4) and first.boxes.shape == (3, 4)
    assert second.features.shape == (2, 4) and second.features.dtype == np.float32
    for r, msg in zip(query.regions, request.regions, strict=True):
        assert r.features.dtype == r.boxes.dtype == np.float32
        assert r.features.flags.writeable and r.features.flags.owndata
        assert r.boxes.flags.writeable and r.features.flags.c_contiguous
        np.testing.assert_array_equal(r.boxes, tensor_to_numpy(msg.boxes))
        np.testing.assert_allclose(r.features, tensor_to_numpy(msg.features).astype(np.float32))
    predict = vitlens_pb2.PredictRequest(images=[image()], questions=["q"], regions=[half])
    assert convert.predict_query(predict, None).regions[0].features.shape == (2, 4)


def test_boxes_on_the_image_edges_and_degenerate_boxes_are_accepted() -> None:
    boxes = np.array([[0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]], np.float32)
    request = explain(images=[image()], regions=[regions_msg(np.ones((2, 3), np.float32), boxes)])
    np.testing.assert_array_equal(convert.explain_query(request, None).regions[0].boxes, boxes)


@pytest.mark.parametrize("count", [1, 3])
def test_region_count_must_equal_the_images(count: int) -> None:
    request = explain(images=[image(0), image(1)], regions=[good_regions()] * count)
    refusal(lambda: convert.explain_query(request, None), "regions", f"{count} entries for 2")


def _bad(name: str, array: np.ndarray) -> vitlens_pb2.Regions:
    regions = good_regions(r=3, f=5)
    getattr(regions, name).CopyFrom(numpy_to_tensor(array))
    return regions


BAD_FEATURES = [
    (np.ones((3,), np.float32), "shape"),
    (np.ones((1, 3, 5), np.float32), "shape"),
    (np.ones((0, 5), np.float32), "at least one region"),
    (np.ones((3, 0), np.float32), "shape"),
    (np.ones((3, 5), np.uint8), "DTYPE_UINT8"),
    (np.array([[1, 2, np.nan, 4, 5]] * 3, np.float32), "non-finite"),
    (np.array([[1, 2, 3, 4, 5], [1, np.inf, 3, 4, 5], [0] * 5], np.float32), "region 1"),
]


@pytest.mark.parametrize(("features", "match"), BAD_FEATURES)
def test_malformed_features_are_named(features: np.ndarray, match: str) -> None:
    request = explain(
        images=[image(0), image(1)], regions=[good_regions(), _bad("features", features)]
    )
    refusal(lambda: convert.explain_query(request, None), "regions[1].features", match)


BAD_BOXES = [
    (np.zeros((3, 3), np.float32), r"\(R, 4\)"),
    (np.zeros((2, 4), np.float32), "2 boxes for 3 regions"),
    (np.array([[0, 0, 1, 1], [0, 0, 1.5, 1], [0, 0, 1, 1]], np.float32), "box 1 .* in \\[0, 1\\]"),
    (np.array([[-0.1, 0, 1, 1]] * 3, np.float32), "box 0"),
    (np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0.6, 0, 0.4, 1]], np.float32), "box 2 .*x1 <= x2"),
    (np.array([[0, 0.9, 1, 0.1]] * 3, np.float32), "y1 <= y2"),
    (np.array([[0, 0, np.nan, 1]] * 3, np.float32), "non-finite"),
    (np.zeros((3, 4), np.uint8), "DTYPE_UINT8"),
]


@pytest.mark.parametrize(("boxes", "match"), BAD_BOXES)
def test_malformed_boxes_are_named(boxes: np.ndarray, match: str) -> None:
    request = explain(images=[image()], regions=[_bad("boxes", boxes)])
    refusal(lambda: convert.explain_query(request, None), "regions[0].boxes", match)
    predict = vitlens_pb2.PredictRequest(images=[image()], regions=[_bad("boxes", boxes)])
    refusal(lambda: convert.predict_query(predict, None), "regions[0].boxes", match)


def test_missing_and_malformed_region_tensors_are_named() -> None:
    no_boxes = vitlens_pb2.Regions(features=numpy_to_tensor(np.ones((2, 3), np.float32)))
    request = explain(images=[image()], regions=[no_boxes])
    refusal(lambda: convert.explain_query(request, None), "regions[0].boxes", "missing")
    refusal(
        lambda: convert.explain_query(explain(images=[image()], regions=[{}]), None),
        "regions[0].features",
        "missing",
    )
    short = good_regions()
    short.features.data = short.features.data[:-4]
    request = explain(images=[image()], regions=[short])
    refusal(lambda: convert.explain_query(request, None), "regions[0].features", "needs 60 bytes")


# ------------------------------------------------------------------------------- replies


def vqa_result(dtype: type, *, on_regions: bool, matrices: bool) -> ExplainResult:
    """One image, K = 2 explained answers, a 3-token question, 4 regions or a 2 x 3 grid."""
    k = 2
    heatmaps = (
        np.zeros((1, k, 0, 0), dtype)
        if on_regions
        else np.arange(12, dtype=np.float32).reshape(1, k, 2, 3).astype(dtype)
    )
    tokens = ("what", "colour", "?")
    texts = (
        (
            tuple(
                TextRelevance("what colour?", tokens, np.float32([0.1, 0.7, 0.2]) * (i + 1))
                for i in range(k)
            )
        ),
    )
    regions = (
        (np.float32([[0.5, 0.25, 0.0, 1.0], [1, 2, 3, 4]]).astype(dtype),) if on_regions else None
    )
    pairs = None
    if matrices:
        rng = np.random.default_rng(3)
        pairs = (
            tuple(
                (
                    RelevanceMatrix("text", "image", rng.random((3, 4)).astype(dtype)),
                    RelevanceMatrix("image", "text", rng.random((4, 3)).astype(dtype)),
                    RelevanceMatrix("text", "text", np.eye(3, dtype=dtype) * (i + 1)),
                )
                for i in range(k)
            ),
        )
    return ExplainResult(
        predictions=Predictions(
            np.array([[2, 3, 0]]), np.float32([[0.8, 0.15, 0.05]]), np.float32([[4.0, 2.0, 0.5]])
        ),
        targets=np.array([[2, 3]]),
        target_probabilities=np.float32([[0.8, 0.15]]),
        target_logits=np.float32([[4.0, 2.0]]),
        heatmaps=heatmaps,
        relevance=None,
        compute_seconds=0.01,
        texts=texts,
        regions=regions,
        matrices=pairs,
    )


def reply(result: ExplainResult) -> ExplainReply:
    timing = Timing(preprocess_s=0.0, queue_s=0.0, compute_s=0.01, total_s=0.02)
    return ExplainReply("vilt", "generic", ANSWERS, ("img0",), (result,), timing)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pixel_answers_encode_heatmap_question_and_matrices(dtype: type) -> None:
    result = vqa_result(dtype, on_regions=False, matrices=True)
    response = convert.explain_response(reply(result))
    (item,) = response.results
    assert [p.label for p in item.predictions] == ["red", "blue", "yes"]
    assert len(item.explanations) == 2
    for k, e in enumerate(item.explanations):
        assert (e.target.index, e.target.label) == ([2, 3][k], ["red", "blue"][k])
        assert tensor_to_numpy(e.heatmap).dtype == dtype
        np.testing.assert_array_equal(tensor_to_numpy(e.heatmap), result.heatmaps[0, k])
        assert e.text.text == "what colour?" and list(e.text.tokens) == ["what", "colour", "?"]
        np.testing.assert_allclose(
            e.text.relevance, np.float32([0.1, 0.7, 0.2]) * (k + 1), rtol=1e-6
        )
        assert list(e.region_relevance) == []
        assert [(m.queries, m.keys) for m in e.matrices] == [
            ("text", "image"),
            ("image", "text"),
            ("text", "text"),
        ]
        for m, expected in zip(e.matrices, result.matrices[0][k], strict=True):
            assert m.matrix.dtype == (
                tensor_pb2.DTYPE_FLOAT16 if dtype == np.float16 else tensor_pb2.DTYPE_FLOAT32
            )
            np.testing.assert_array_equal(tensor_to_numpy(m.matrix), expected.matrix)


def test_region_answers_encode_region_relevance_and_no_heatmap() -> None:
    response = convert.explain_response(
        reply(vqa_result(np.float32, on_regions=True, matrices=False))
    )
    first, second = response.results[0].explanations
    assert not first.HasField("heatmap") and not second.HasField("heatmap")
    assert list(first.region_relevance) == [0.5, 0.25, 0.0, 1.0]
    assert list(second.region_relevance) == [1, 2, 3, 4]
    assert len(first.matrices) == 0 and first.HasField("text")


def test_classifier_replies_carry_no_vqa_fields() -> None:
    result = vqa_result(np.float32, on_regions=False, matrices=False)
    plain = ExplainResult(**{**result.__dict__, "texts": None})
    e = convert.explain_response(reply(plain)).results[0].explanations[0]
    assert e.HasField("heatmap") and not e.HasField("text")
    assert len(e.region_relevance) == 0 and len(e.matrices) == 0


def card(**fields) -> ModelCard:
    base = dict(
        name="vilt",
        architecture="ViltForQuestionAnswering",
        input_size=(3, 64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        patch_size=(16, 16),
        patch_grid=(4, 4),
        num_prefix_tokens=0,
        num_layers=2,
        num_heads=2,
        labels=ANSWERS,
        methods=(),
        weights_source="hf-vqa:/x",
        weights_random=False,
        weights_sha256="0" * 64,
        weights_metadata={},
        device="cpu",
        readout="token",
    )
    return ModelCard(**{**base, **fields})


def test_model_info_reports_the_vqa_task_and_fields() -> None:
    info = convert.model_info(
        card(
            task="visual_question_answering",
            modalities=(
                ModalityCard("text", 40, "question tokens"),
                ModalityCard("image", 16, "image patches"),
                ModalityCard("joint", 56, "text positions, then image tokens"),
            ),
            visual_input="pixels",
            stream_architecture="single_stream",
        )
    )
    assert info.task == vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING
    assert (info.visual_input, info.region_feature_dim, info.stream_architecture) == (
        "pixels",
        0,
        "single_stream",
    )
    assert [(m.name, m.num_tokens) for m in info.modalities] == [
        ("text", 40),
        ("image", 16),
        ("joint", 56),
    ]
    assert list(info.labels) == list(ANSWERS)
    regions = convert.model_info(
        card(
            task="visual_question_answering",
            visual_input="regions",
            region_feature_dim=2048,
            stream_architecture="two_stream",
        )
    )
    assert (regions.visual_input, regions.region_feature_dim, regions.stream_architecture) == (
        "regions",
        2048,
        "two_stream",
    )
    classifier = convert.model_info(card())
    assert classifier.task == vitlens_pb2.TASK_CLASSIFICATION and classifier.visual_input == ""


def test_the_rpc_conversion_imports_no_torch() -> None:
    code = "import sys, vitlens_server.rpc.convert; assert 'torch' not in sys.modules"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")]),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
