"""VQA models served through the one data plane, over real gRPC on loopback.

A tiny random ViLT (patches) whose tokenizer and answers are the generated questions' and a tiny
VisualBERT (request regions) are served next to the tiny classifier. Explanations are compared
with the engine run in the test on the same model and pixels, one item at a time — independent
of the server's decoding, batching and encoding.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import vitlens
from tests.conftest import RunningServer, start_server
from tests.tiny import tiny_loaded
from tests.unit import bimodal_tiny
from tests.unit.image_text_tiny import sharpen
from vitlens.build import build_explain_request
from vitlens.v1 import vitlens_pb2
from vitlens_server.config import ServerConfig
from vitlens_server.data.questions import ANSWERS, vocab_lines
from vitlens_server.explain.bimodal import BIMODAL_METHODS, explain_bimodal
from vitlens_server.models import ModelRegistry, ModelSpec, load_model

QUESTION = "what colour is the star?"
MAX_CHARS = 60


def _write_vilt(path: Path) -> Path:
    config = tf.ViltConfig(
        vocab_size=len(vocab_lines()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=12,
        image_size=64,
        patch_size=16,
        num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)),
        label2id={a: i for i, a in enumerate(ANSWERS)},
    )
    sharpen(tf.ViltForQuestionAnswering(config), 5).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab_lines()) + "\n")
    (path / "vitlens.json").write_text(json.dumps({"metadata": {"note": "tiny, random"}}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = Path(tmp_path_factory.mktemp("vqa"))
    return {
        "vilt": _write_vilt(root / "vilt"),
        "vbert": bimodal_tiny.write_dir(root / "vbert", "visual_bert"),
    }


@pytest.fixture(scope="module")
def served(dirs) -> RunningServer:
    config = ServerConfig(port=0, max_images_per_request=8, max_batch_size=4, max_text_chars=60)
    specs = [
        ModelSpec(name=name, architecture="hf-vqa", source=f"hf-vqa:{path}")
        for name, path in dirs.items()
    ]
    registry = ModelRegistry([tiny_loaded(seed=11), *(load_model(s) for s in specs)])
    running, stop = start_server(config, registry)
    yield running
    stop()


@pytest.fixture
def client(served):
    with vitlens.Client(served.address, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def vilt(dirs):
    model = load_model(ModelSpec(name="v", architecture="hf-vqa", source=f"hf-vqa:{dirs['vilt']}"))
    yield model
    model.adapter.close()


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _status(call) -> tuple[str, str]:
    with pytest.raises(vitlens.VitlensError) as info:
        call()
    err = info.value
    fields = [v.field for v in err.field_violations]
    return err.code.name, fields[0] if fields else ""


def _reference(model, image: np.ndarray, question: str, method: str = "generic"):
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    inputs = model.inputs([question], pixels=pixels)
    out = explain_bimodal(model.adapter, inputs, BIMODAL_METHODS[method])
    heatmap = out.tokens.to_grid(out.image[:, 0])[0]
    text = out.text[0, 0][out.tokens.text_valid[0]]
    return out, heatmap.numpy(), text.numpy()


def test_get_model_reports_the_vqa_task_and_its_methods(client) -> None:
    info = client.model("vilt")
    assert info.task == "visual_question_answering" and info.vqa
    assert info.visual_input == "pixels" and info.stream_architecture == "single_stream"
    assert info.labels == ANSWERS
    assert set(info.method_names) == set(BIMODAL_METHODS)
    raw = client.stub.GetModel(vitlens_pb2.GetModelRequest(name="vbert"))
    assert raw.task == vitlens_pb2.TASK_VISUAL_QUESTION_ANSWERING
    assert raw.visual_input == "regions" and raw.region_feature_dim == bimodal_tiny.FEATURES
    assert raw.weights.sha256


@pytest.mark.parametrize("method", ["generic", "transformer_attribution", "rollout"])
def test_explain_matches_the_engine_on_each_image(client, vilt, method) -> None:
    batch = images(3, seed=1)
    questions = [QUESTION, "is there a red object?", "how many objects are there?"]
    result = client.explain(batch, model="vilt", method=method, questions=questions)
    for image, question, item in zip(batch, questions, result.results, strict=True):
        out, heatmap, text = _reference(vilt, image, question, method)
        (explanation,) = item.explanations
        assert explanation.target.index == int(out.targets[0, 0])
        np.testing.assert_allclose(explanation.heatmap, heatmap, rtol=1e-4, atol=1e-6)
        assert explanation.question.tokens == tuple(question.replace("?", " ?").split())
        np.testing.assert_allclose(explanation.question.relevance, text, rtol=1e-4, atol=1e-6)


def test_one_question_for_all_images_and_chosen_answers(client) -> None:
    batch = images(2, seed=2)
    yes = ANSWERS.index("yes")
    result = client.explain(
        batch, model="vilt", questions=QUESTION, target=yes, relevance=True, grid="input"
    )
    for item in result.results:
        (explanation,) = item.explanations
        assert explanation.target.label == "yes" and explanation.heatmap.shape == (64, 64)
        joint = explanation.matrices["joint", "joint"]
        assert joint.shape == (8 + 1 + 16, 8 + 1 + 16)  # [CLS] 6 words [SEP], image CLS, 4 x 4


def test_answer_returns_the_top_answers(client, vilt) -> None:
    batch = images(2, seed=3)
    answers = client.answer(batch, [QUESTION, "where is the disc?"], model="vilt", top_k=3)
    assert [len(a.predictions) for a in answers] == [3, 3]
    out, _, _ = _reference(vilt, batch[1], "where is the disc?")
    assert answers[1].predictions[0].index == int(out.logits.argmax())


def test_concurrent_requests_batch_and_each_gets_its_own(client, vilt) -> None:
    batch = images(6, seed=4)
    questions = [f"is there a {shape}?" for shape in ("star", "disc", "cross", "ring", "square")]
    questions.append(QUESTION)

    def call(i: int):
        return client.explain(batch[i], model="vilt", questions=questions[i])

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    for i, result in enumerate(results):
        _, heatmap, _ = _reference(vilt, batch[i], questions[i])
        np.testing.assert_allclose(
            result.results[0].explanations[0].heatmap, heatmap, rtol=1e-4, atol=1e-6
        )


def test_region_models_explain_each_region(client) -> None:
    rng = np.random.default_rng(5)
    regions = []
    for count in (3, 5):
        low = rng.random((count, 2)).astype(np.float32) * 0.5
        boxes = np.concatenate([low, low + 0.4], axis=1)
        features = rng.standard_normal((count, bimodal_tiny.FEATURES)).astype(np.float32)
        regions.append(vitlens.Regions(features, boxes))
    questions = list(bimodal_tiny.QUESTIONS)
    result = client.explain(images(2), model="vbert", questions=questions, regions=regions)
    lengths = [len(i.explanations[0].region_relevance) for i in result.results]
    assert lengths == [3, 5]
    words = ("what", "color", "is", "the", "cat", "?")
    assert result.results[0].explanations[0].question.tokens == words


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"model": "vilt"}, "INVALID_ARGUMENT", "questions"),
        (
            {"model": "vilt", "questions": ["how many " * 5 + "?"]},
            "INVALID_ARGUMENT",
            "questions[0]",
        ),
        ({"model": "vilt", "questions": ["x" * 61]}, "INVALID_ARGUMENT", "questions[0]"),
        ({"model": "vilt", "questions": ["a?"], "method": "agcam"}, "INVALID_ARGUMENT", "method"),
        ({"model": "vilt", "questions": [QUESTION], "texts": ["a"]}, "INVALID_ARGUMENT", "texts"),
        ({"model": "vilt", "questions": [QUESTION], "target": 99}, "INVALID_ARGUMENT", "target"),
        ({"model": "tiny", "questions": [QUESTION]}, "INVALID_ARGUMENT", "questions"),
        ({"model": "vbert", "questions": [QUESTION]}, "INVALID_ARGUMENT", "regions"),
        (
            {
                "model": "vilt",
                "questions": [QUESTION, QUESTION],
                "regions": [vitlens.Regions(np.zeros((1, 4), np.float32), np.zeros((1, 4)))] * 2,
            },
            "INVALID_ARGUMENT",
            "regions",
        ),
    ],
)
def test_bad_requests_name_what_to_fix(client, kwargs, code, field) -> None:
    got = _status(lambda: client.explain(images(2), **kwargs))
    assert got == (code, field)
    assert client.explain(images(1), model="vilt", questions=QUESTION).results  # still serving


def test_the_server_refuses_a_question_count_the_sdk_would_catch(client) -> None:
    request = build_explain_request(images(2), model="vilt", questions=["a?"] * 2)
    request.questions.append("c?")  # three questions for two images, past the SDK's check
    with pytest.raises(vitlens.VitlensError) as info:
        client._call(client.stub.Explain, request, None)
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert [v.field for v in info.value.field_violations] == ["questions"]
