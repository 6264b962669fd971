"""The SDK's visual question answering side without a server: requests built from `explain(...,
questions=, regions=)` and `answer(...)` (and what the server decodes from them), responses
parsed into `Explanation.question` / ``region_relevance`` / ``matrices`` and `Answer`, ModelInfo's
VQA fields; then Client and AsyncClient against an in-process fake servicer."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

import vitlens
from vitlens.build import build_answer_request, build_explain_request, build_predict_request
from vitlens.results import ExplainResult, Explanation
from vitlens.tensors import numpy_to_tensor, tensor_to_numpy
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens.vqa import Answer, Regions, answers_from_proto, build_questions, build_regions
from vitlens_server.rpc import convert

ANSWERS = ("yes", "no", "red", "blue")
BOXES = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]])  # (2, 4), float64


def features(r: int = 2, f: int = 3) -> np.ndarray:
    return np.arange(r * f, dtype=np.float64).reshape(r, f)


# ------------------------------------------------------------------------------ requests


def test_explain_request_carries_questions_and_regions() -> None:
    request = build_explain_request(
        [b"a", b"b"],
        questions=["what colour?", "how many?"],
        regions=[Regions(features(), BOXES), (features(1), BOXES[:1])],
        top_k=2,
    )
    assert list(request.questions) == ["what colour?", "how many?"]
    first, second = request.regions
    assert first.features.dtype == first.boxes.dtype == tensor_pb2.DTYPE_FLOAT32
    np.testing.assert_array_equal(tensor_to_numpy(first.boxes), BOXES.astype(np.float32))
    assert list(second.features.shape) == [1, 3] and request.target.top_k == 2


def test_one_question_string_is_asked_of_every_image() -> None:
    request = build_explain_request([b"a", b"b", b"c"], questions="is there a star?")
    assert list(request.questions) == ["is there a star?"]  # the server broadcasts it
    assert build_explain_request(b"a").questions == []  # not a VQA request
    assert build_questions((q for q in ("x?", "y?")), 2) == ["x?", "y?"]


def test_float16_region_features_are_kept() -> None:
    (message,) = build_regions(Regions(features().astype(np.float16), BOXES), 1)
    assert message.features.dtype == tensor_pb2.DTYPE_FLOAT16
    assert message.boxes.dtype == tensor_pb2.DTYPE_FLOAT32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"questions": ["a?", "b?"]}, ValueError, "2 questions for 3 images"),
        ({"questions": ["a?", " ", "c?"]}, ValueError, r"questions\[1\] is empty"),
        ({"questions": [1, 2, 3]}, TypeError, "must be strings"),
        ({"regions": [Regions(features(), BOXES)] * 2}, ValueError, "regions for 2 images"),
        ({"regions": [(features(), BOXES)] * 2 + [features()]}, TypeError, r"regions\[2\]"),
        ({"regions": [(features(), BOXES[:1])] * 3}, ValueError, r"regions\[0\]\.boxes .*\(2, 4\)"),
        ({"regions": [(np.zeros((0, 3)), np.zeros((0, 4)))] * 3}, ValueError, "at least one"),
        ({"regions": [(features()[0], BOXES)] * 3}, ValueError, r"regions\[0\]\.features"),
        ({"regions": [(np.array([["a"] * 3] * 2), BOXES)] * 3}, TypeError, "numbers"),
    ],
)
def test_client_side_refusals(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_explain_request([b"a", b"b", b"c"], **kwargs)


def test_answer_request_needs_a_question() -> None:
    request = build_answer_request([b"a", b"b"], "what shape?", top_k=3, ids=["x", "y"])
    assert list(request.questions) == ["what shape?"] and request.top_k == 3
    assert [i.id for i in request.images] == ["x", "y"]
    generated = build_answer_request([b"a", b"b"], (q for q in ["one?", "two?"]))
    assert list(generated.questions) == ["one?", "two?"]
    for none in ("", [], ()):
        with pytest.raises(ValueError, match=r"give a question|empty"):
            build_answer_request(b"a", none)
    regions = build_answer_request(b"a", "q?", regions=Regions(features(), BOXES)).regions
    assert len(regions) == 1  # a lone Regions is the one image's


def test_what_the_server_decodes_from_the_sdk_request() -> None:
    request = build_explain_request(
        [b"a", b"b"], questions="what colour?", regions=[(features(), BOXES)] * 2
    )
    query = convert.explain_query(request, None)
    assert query.questions == ("what colour?", "what colour?")
    np.testing.assert_array_equal(query.regions[1].features, features().astype(np.float32))
    np.testing.assert_array_equal(query.regions[0].boxes, BOXES.astype(np.float32))
    predict = convert.predict_query(build_predict_request(b"a", questions=["q?"]), None)
    assert predict.questions == ("q?",)


# ----------------------------------------------------------------------------- responses


def vqa_explanation(*, regions: bool = False, dtype: type = np.float32) -> dict:
    matrix = np.arange(6, dtype=dtype).reshape(2, 3)
    e = {
        "target": {"index": 2, "label": "red", "probability": 0.8, "logit": 4.0},
        "text": {
            "text": "what colour?",
            "tokens": ["what", "colour", "?"],
            "relevance": [0.1, 0.7, 0.2],
        },
        "matrices": [
            {"queries": "text", "keys": "image", "matrix": numpy_to_tensor(matrix)},
            {"queries": "image", "keys": "text", "matrix": numpy_to_tensor(matrix.T)},
        ],
    }
    if regions:
        e["region_relevance"] = [0.25, 1.0]
    else:
        e["heatmap"] = numpy_to_tensor(np.ones((2, 2), dtype))
    return e


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_explanations_expose_question_regions_and_matrices(dtype: type) -> None:
    pixels = Explanation.from_proto(vitlens_pb2.Explanation(**vqa_explanation(dtype=dtype)))
    assert pixels.question is pixels.text and pixels.question.tokens == ("what", "colour", "?")
    np.testing.assert_allclose(pixels.question.relevance, [0.1, 0.7, 0.2], rtol=1e-6)
    assert pixels.region_relevance is None and pixels.heatmap.shape == (2, 2)
    assert set(pixels.matrices) == {("text", "image"), ("image", "text")}
    assert pixels.matrices["text", "image"].dtype == dtype
    np.testing.assert_array_equal(pixels.matrices["image", "text"], np.arange(6).reshape(2, 3).T)
    regions = Explanation.from_proto(vitlens_pb2.Explanation(**vqa_explanation(regions=True)))
    np.testing.assert_array_equal(regions.region_relevance, np.float32([0.25, 1.0]))
    assert regions.heatmap.shape == (0, 0) and regions.normalized().shape == (0, 0)


def test_classifier_explanations_keep_their_shape() -> None:
    e = Explanation.from_proto(
        vitlens_pb2.Explanation(target={"index": 1}, heatmap=numpy_to_tensor(np.eye(2)))
    )
    assert e.question is None and e.region_relevance is None and e.matrices == {}


def predict_response(n: int) -> vitlens_pb2.PredictResponse:
    results = [
        {"id": f"img{i}", "predictions": [{"index": 2, "label": "red", "probability": 0.75}]}
        for i in range(n)
    ]
    return vitlens_pb2.PredictResponse(model="vilt", results=results)


def test_answers_pair_each_image_with_its_question() -> None:
    answers = answers_from_proto(predict_response(2), ["what colour?"])
    assert [(a.id, a.question, a.text) for a in answers] == [
        ("img0", "what colour?", "red"),
        ("img1", "what colour?", "red"),
    ]
    assert str(answers[0]) == "what colour? -> red (75.0%)"
    assert answers_from_proto(predict_response(2), ["a?", "b?"])[1].question == "b?"
    with pytest.raises(ValueError, match="2 answers for 3 questions"):
        answers_from_proto(predict_response(2), ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match="no answers"):
        _ = Answer("x", "q?", ()).top


def test_model_info_vqa_fields() -> None:
    message = vitlens_pb2.ModelInfo(
        name="lxmert",
        labels=list(ANSWERS),
        task=vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING,
        modalities=[{"name": "text", "num_tokens": 20}, {"name": "image", "num_tokens": 36}],
        visual_input="regions",
        region_feature_dim=2048,
        stream_architecture="two_stream",
    )
    info = vitlens.ModelInfo.from_proto(message)
    assert info.task == "visual_question_answering" and info.vqa and not info.image_text
    assert (info.visual_input, info.region_feature_dim, info.stream_architecture) == (
        "regions",
        2048,
        "two_stream",
    )
    assert info.modalities == {"text": 20, "image": 36} and info.labels == ANSWERS
    plain = vitlens.ModelInfo.from_proto(
        vitlens_pb2.ModelInfo(task=vitlens_pb2.TASK_CLASSIFICATION)
    )
    assert not plain.vqa and plain.visual_input == "" and plain.stream_architecture == ""


# ----------------------------------------------------------------- clients, fake servicer


class FakeVqa(vitlens_pb2_grpc.VitlensServiceServicer):
    """Answers every image with "red"; records the requests."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def Explain(self, request, context) -> vitlens_pb2.ExplainResponse:
        self.requests.append(request)
        regions = len(request.regions) > 0
        results = [
            {
                "id": img.id,
                "predictions": [{"index": 2, "label": "red", "probability": 0.8}],
                "explanations": [vqa_explanation(regions=regions)],
            }
            for img in request.images
        ]
        return vitlens_pb2.ExplainResponse(model="vilt", method="generic", results=results)

    def Predict(self, request, context) -> vitlens_pb2.PredictResponse:
        self.requests.append(request)
        return predict_response(len(request.images))

    def ListModels(self, request, context) -> vitlens_pb2.ListModelsResponse:
        info = vitlens_pb2.ModelInfo(
            name="vitlens-vilt", task=vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING, labels=ANSWERS
        )
        return vitlens_pb2.ListModelsResponse(models=[info], default_model="vitlens-vilt")


@pytest.fixture
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FakeVqa()
    vitlens_pb2_grpc.add_VitlensServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_client_answer_and_explain(fake) -> None:
    address, servicer = fake
    with vitlens.Client(address, timeout_s=10) as client:
        answers = client.answer([b"a", b"b"], "what colour?", model="vilt", top_k=1)
        assert [a.text for a in answers] == ["red", "red"]
        sent = servicer.requests[-1]
        assert list(sent.questions) == ["what colour?"] and sent.top_k == 1 and sent.model == "vilt"
        result = client.explain(b"a", questions="what colour?", regions=[(features(), BOXES)])
        assert isinstance(result, ExplainResult)
        e = result[0].explanations[0]
        assert e.question.text == "what colour?" and e.region_relevance.shape == (2,)
        assert len(servicer.requests[-1].regions) == 1
        with pytest.raises(ValueError, match="2 questions for 1 images"):
            client.answer(b"a", ["a?", "b?"])


async def test_async_client_answer_and_explain(fake) -> None:
    address, servicer = fake
    async with vitlens.AsyncClient(address, timeout_s=10) as client:
        answers = await client.answer(b"a", ["is it red?"], top_k=2)
        assert answers[0].question == "is it red?" and answers[0].top.index == 2
        result = await client.explain([b"a", b"b"], questions=["q1?", "q2?"], relevance=True)
        assert list(servicer.requests[-1].questions) == ["q1?", "q2?"]
        assert servicer.requests[-1].options.return_relevance
        assert result[1].explanations[0].matrices["text", "image"].shape == (2, 3)


def test_evaluate_requests_name_vqa_datasets_as_synthetic() -> None:
    from vitlens.evaluation import build_evaluate_request

    request = build_evaluate_request(
        methods=["generic"],
        metrics=["perturbation_image"],
        dataset="synthetic_vqa:50:3",
        model="vitlens-vilt",
    )
    assert request.dataset.synthetic == "synthetic_vqa:50:3"
    assert not request.dataset.server_path
