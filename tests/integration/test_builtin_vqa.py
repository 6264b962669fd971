"""The exemplar VQA models that ship with the server, servable by name (``--model
vitlens-visualbert``, ``--model vitlens-lxmert``): each shipped folder loads, serves as a VQA
model over real gRPC, and answers held-out generated questions as its training measured
(benchmarks/vqa_training.md)."""

from __future__ import annotations

import pytest

import vitlens
from tests.conftest import start_server
from vitlens_server.config import ServerConfig
from vitlens_server.data.questions import ANSWERS
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models import default as builtin
from vitlens_server.training.vqa_data import held_out

QUESTIONS = 40  # held-out test questions asked over gRPC; the export measured 1,000


@pytest.mark.parametrize(
    ("name", "stream", "visual_input", "floor"),
    [
        ("vitlens-visualbert", "single_stream", "pixels", 0.85),  # 90.6 % on 1,000
        ("vitlens-lxmert", "two_stream", "pixels", 0.85),  # 92.7 % on 1,000 held-out questions
    ],
)
def test_the_shipped_exemplar_answers_held_out_questions_over_grpc(
    name: str, stream: str, visual_input: str, floor: float
) -> None:
    spec = builtin.builtin_spec(name, "cpu")
    assert spec is not None and spec.source == f"hf-vqa:{builtin.ASSETS / name}"
    running, stop = start_server(ServerConfig(port=0), ModelRegistry([load_model(spec)]))
    try:
        with vitlens.Client(running.address, timeout_s=120) as client:
            info = client.model(name)
            assert info.task == "visual_question_answering" and info.labels == ANSWERS
            assert (info.stream_architecture, info.visual_input) == (stream, visual_input)
            batch = held_out("test", 0, QUESTIONS, size=info.input_size[-1])
            answers = client.answer(list(batch.images), [q.text for q in batch.questions])
    finally:
        stop()
    predicted = [a.predictions[0].index for a in answers]
    accuracy = sum(p == t for p, t in zip(predicted, batch.answers.tolist(), strict=True))
    assert accuracy / QUESTIONS >= floor, (accuracy, QUESTIONS)
