"""Evaluate on VQA models over real gRPC: seed 003's token perturbation and question segmentation.

A tiny random ViLT whose vocabulary is the generated questions' words and whose answers are
`questions.ANSWERS` (named so that it answers most test items right, so the curves have accuracy
to lose) is served (64 px, 4 x 4 patches) in batches of 5, beside a tiny ViLT whose answers are
not those, a region model without front-end and a classifier. The service's numbers (worker,
batcher, chunking, keep masks) must equal the same run in process on `VqaLocalCalls`, and its
perturbation hits those of `vqa_metrics.token_perturbation` on the model itself; Predict jobs
with keep masks are checked against `remove_tokens` directly. What cannot run is refused by
field, and a cancelled call stops its run.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import transformers as tf

from tests.conftest import start_server
from tests.polling import wait_for
from tests.tiny import tiny_loaded
from tests.unit import bimodal_tiny
from tests.unit.image_text_tiny import sharpen
from vitlens.errors import from_rpc_error
from vitlens.evaluation import MetricResult
from vitlens.images import to_image
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.data.questions import ANSWERS, vocab_lines
from vitlens_server.evaluate import CHEFER_STEPS, SEGMENTATION_KEYS
from vitlens_server.evaluate.vqa_metrics import question_masks, token_perturbation
from vitlens_server.evaluate.vqa_plan import (
    VQA_METHODS,
    answer_indices,
    parse_synthetic_vqa,
    plan_vqa_evaluation,
)
from vitlens_server.evaluate.vqa_run import VqaLocalCalls, run_vqa_evaluation
from vitlens_server.explain.bimodal import BIMODAL_METHODS, explain_bimodal
from vitlens_server.explain.vqa_batch import VqaPredictJob, predict_vqa_jobs
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.models.vqa_serving import LoadedVqaModel, load_vqa
from vitlens_server.runtime.vqa_evaluation import _method_params
from vitlens_server.training.vqa_data import held_out

SIZE = 64
BATCH = 5
METRICS = ["perturbation_image", "perturbation_text", "segmentation"]
START, COUNT = 5, 7  # items 5..11: the 10th asks about nothing
DATASET = f"synthetic_vqa:{COUNT}:{START}"


def _write_vilt(path: Path, seed: int) -> Path:
    """A tiny ViLT over the generated questions' words whose answers are `ANSWERS` named so
    that its unperturbed answers to the test items are mostly right (`_named_to_agree`)."""
    config = tf.ViltConfig(
        vocab_size=len(vocab_lines()), hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_hidden_layers=2, max_position_embeddings=16,
        image_size=SIZE, patch_size=16, max_image_length=-1, num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)},
    )  # fmt: skip
    torch.manual_seed(seed)
    sharpen(tf.ViltForQuestionAnswering(config), seed).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab_lines()) + "\n")
    sidecar = path / "vitlens.json"
    sidecar.write_text(json.dumps({"image_size": SIZE, "answers": list(ANSWERS)}))
    sidecar.write_text(json.dumps({"image_size": SIZE, "answers": _named_to_agree(path)}))
    return path


def _named_to_agree(path: Path) -> list[str]:
    """`ANSWERS` reordered so that logit i is named after the ground truth of the test items
    the random model answers with i (first come; the rest keep their order): perturbation then
    starts from a high accuracy, and the curves have something to lose."""
    model = load_vqa(_spec("probe", path))
    batch = held_out("test", START, COUNT, size=SIZE)
    pixels = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    (answers,) = predict_vqa_jobs(model, [VqaPredictJob(pixels, _texts(batch), 1)])
    model.adapter.close()
    names: dict[int, str] = {}
    for index, question in zip(answers.indices[:, 0].tolist(), batch.questions, strict=True):
        if index not in names and question.answer not in names.values():
            names[index] = question.answer
    rest = iter(a for a in ANSWERS if a not in names.values())
    return [names.get(i) or next(rest) for i in range(len(ANSWERS))]


def _texts(batch) -> tuple[str, ...]:
    return tuple(q.text for q in batch.questions)


def _spec(name: str, path: Path) -> ModelSpec:
    return ModelSpec(name=name, architecture="hf-vqa", source=f"hf-vqa:{path}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = Path(tmp_path_factory.mktemp("vqa_evaluate"))
    foreign = bimodal_tiny.write_dir(root / "foreign", "vilt")  # answers yes, no, red, blue, 2
    (foreign / "vitlens.json").write_text(json.dumps({"image_size": SIZE}))
    return {
        "vqa": _write_vilt(root / "vqa", seed=4),
        "foreign": foreign,
        "regions": bimodal_tiny.write_dir(root / "regions", "visual_bert"),
    }


@pytest.fixture(scope="module")
def served(dirs):
    config = ServerConfig(port=0, max_batch_size=BATCH)  # 7 items: every job is split
    models = [load_model(_spec(name, path)) for name, path in dirs.items()]
    running, stop = start_server(config, ModelRegistry([*models, tiny_loaded(seed=11)]))
    yield running
    stop()


@pytest.fixture(scope="module")
def local(dirs) -> LoadedVqaModel:
    model = load_vqa(_spec("vqa", dirs["vqa"]))
    yield model
    model.adapter.close()


def _inline() -> vitlens_pb2.Dataset:
    image = to_image(np.zeros((SIZE, SIZE, 3), np.uint8))
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=[
        vitlens_pb2.Sample(image=image, label=0)]))  # fmt: skip


def _request(dataset: vitlens_pb2.Dataset | str = DATASET, **fields):
    if isinstance(dataset, str):
        dataset = vitlens_pb2.Dataset(synthetic=dataset)
    fields.setdefault("model", "vqa")
    options = fields.pop("method_options", {})
    request = vitlens_pb2.EvaluateRequest(dataset=dataset, **fields)
    for name, values in options.items():
        request.method_options[name].update(values)
    return request


def _events(served, **fields) -> list[vitlens_pb2.EvaluateEvent]:
    with grpc.insecure_channel(served.address) as channel:
        stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        return list(stub.Evaluate(_request(**fields), timeout=120))


def _results(events) -> dict[tuple[str, str], MetricResult]:
    results = [MetricResult.from_proto(e.result) for e in events if e.HasField("result")]
    return {(r.method, r.metric): r for r in results}


def _in_process(model: LoadedVqaModel, methods, metrics, dataset=DATASET, **options):
    plan = plan_vqa_evaluation(methods, metrics, method_params=_method_params, **options)
    return run_vqa_evaluation(
        plan, parse_synthetic_vqa(dataset, SIZE), VqaLocalCalls(model, BATCH),
        answers=answer_indices(model.labels, model.name), grid=model.patch_grid,
    )  # fmt: skip


def _assert_same(results: dict[tuple[str, str], MetricResult], summaries) -> None:
    assert len(results) == len(summaries)
    for summary in summaries:
        got = results[(summary.method, summary.metric)]
        for name, stat in summary.values.items():
            assert got.value(name).n == stat.n, (summary.method, summary.metric, name)
            np.testing.assert_allclose(got.value(name).mean, stat.mean, rtol=1e-4, atol=1e-5)
        assert {c.name for c in got.curves} == set(summary.curves)
        for curve in got.curves:
            np.testing.assert_allclose(curve.y, summary.curves[curve.name][1], atol=1e-9)


def test_every_method_gets_both_directions_of_both_modalities_and_segmentation(served, local):
    methods = list(VQA_METHODS)
    events = _events(served, methods=methods, metrics=METRICS)
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress[-1].done == progress[-1].total == COUNT * len(methods)
    assert [p.stage for p in progress] == methods  # one chunk
    results = _results(events)
    assert set(results) == {(m, k) for m in methods for k in METRICS}
    assert "random" in methods and "generic" in methods
    batch = held_out("test", START, COUNT, size=SIZE)
    scored = int(question_masks(batch.scenes, batch.questions).flatten(1).any(dim=1).sum())
    assert 0 < scored < COUNT  # some questions are about nothing ("no", "zero"): skipped
    starts = set()
    for method in methods:
        for metric in METRICS[:2]:
            result = results[(method, metric)]
            for sign in ("positive", "negative"):
                assert result.value(f"{sign}_auc").n == COUNT
                assert 0 <= result.value(f"{sign}_auc").mean <= 90
                (curve,) = [c for c in result.curves if c.name == sign]
                assert list(curve.x) == pytest.approx([0.0, *CHEFER_STEPS])
                assert all(0 <= y <= 1 for y in curve.y)
                starts.add(round(curve.y[0], 9))
        segmentation = results[(method, "segmentation")]
        for key in SEGMENTATION_KEYS:
            assert segmentation.value(key).n == scored
            assert 0 <= segmentation.value(key).mean <= 1
    assert len(starts) == 1  # x = 0 is the unperturbed accuracy: one for every curve
    assert starts.pop() >= 0.5  # `_named_to_agree`
    moved = [c.y for r in results.values() for c in r.curves if len(set(c.y)) > 1]
    assert moved  # removing tokens changes answers
    _assert_same(results, _in_process(local, methods, METRICS))


@pytest.mark.parametrize("modality", ["text", "image"])
def test_hits_are_those_of_token_perturbation_on_the_model(served, local, modality) -> None:
    """generic (LRP averaging) through the service = `token_perturbation` on the adapter."""
    metric = f"perturbation_{modality}"
    results = _results(_events(served, methods=["generic"], metrics=[metric],
                               method_options={"generic": {"averaging": "lrp"}}))  # fmt: skip
    batch = held_out("test", START, COUNT, size=SIZE)
    pixels = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    inputs = local.inputs([q.text for q in batch.questions], pixels=pixels)
    out = explain_bimodal(local.adapter, inputs, BIMODAL_METHODS["generic"], averaging="lrp")
    relevance = (out.text if modality == "text" else out.image)[:, 0]
    truth = answer_indices(local.labels, local.name)[batch.answers]
    for sign in ("positive", "negative"):
        hits = token_perturbation(local.adapter, inputs, relevance, modality=modality,
                                  positive=sign == "positive", answers=truth)  # fmt: skip
        (curve,) = [c for c in results[("generic", metric)].curves if c.name == sign]
        np.testing.assert_allclose(curve.y, hits.double().mean(dim=0).numpy(), atol=1e-9)


def test_explain_label_explains_the_ground_truth_answer(served, local) -> None:
    fields = {"methods": ["generic", "gradcam"], "metrics": METRICS, "dataset": "synthetic_vqa:4"}
    results = _results(_events(served, explain_label=True, **fields))
    expected = _in_process(local, fields["methods"], METRICS, "synthetic_vqa:4", explain_label=True)
    _assert_same(results, expected)


def test_predict_keep_masks_remove_tokens_as_the_model_does(local) -> None:
    """Keep masks per word token and per patch token = `remove_tokens` on the batch; a fused
    batch of jobs with and without masks = each job alone; rows() slices the masks."""
    questions = ("is there a star?", "what colour is the circle?", "how many objects are there?")
    pixels = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    text_keep = torch.tensor([[1, 0, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0, 0]])
    image_keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    job = VqaPredictJob(pixels, questions, 3, text_keep=text_keep.bool(), image_keep=image_keep)
    inputs = local.inputs(list(questions), pixels=pixels)
    tokens = local.adapter.tokens(inputs)
    text = torch.zeros_like(tokens.text_valid)
    for b in range(3):
        positions = tokens.text_valid[b].nonzero()[:, 0]
        text[b, positions] = ~text_keep[b, : len(positions)].bool()
    removed = local.adapter.remove_tokens(inputs, text=text, image=~image_keep)
    with torch.no_grad():
        expected = local.adapter(removed).topk(3, dim=1)
    (alone,) = predict_vqa_jobs(local, [job])
    np.testing.assert_array_equal(alone.indices, expected.indices.numpy())
    np.testing.assert_allclose(alone.logits, expected.values.numpy(), rtol=1e-5, atol=1e-5)
    plain = VqaPredictJob(pixels[:2], questions[:2], 3)
    fused = predict_vqa_jobs(local, [plain, job.rows(slice(1, 3)), job.rows(slice(0, 1))])
    np.testing.assert_allclose(fused[0].logits, predict_vqa_jobs(local, [plain])[0].logits,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.concatenate([fused[2].logits, fused[1].logits]), alone.logits,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="text_keep must be"):
        VqaPredictJob(pixels, questions, 1, text_keep=text_keep[:2].bool())


@pytest.mark.parametrize(
    ("fields", "code", "field", "message"),
    [
        ({"dataset": "synthetic:4"}, "INVALID_ARGUMENT", "dataset.synthetic", "synthetic_vqa:N"),
        ({"dataset": vitlens_pb2.Dataset(server_path="/data")}, "INVALID_ARGUMENT",
         "dataset.server_path", "carries none"),
        ({"dataset": _inline()}, "INVALID_ARGUMENT", "dataset.inline", "carries none"),
        ({"dataset": "synthetic_vqa:x"}, "INVALID_ARGUMENT", "dataset.synthetic", "N\\[:seed\\]"),
        ({"metrics": ["deletion"]}, "INVALID_ARGUMENT", "metrics",
         "\\['deletion'\\] do not apply to VQA model 'vqa'; its metrics: perturbation_image"),
        ({"metrics": ["nope"]}, "INVALID_ARGUMENT", "metrics", "do not apply to VQA model"),
        ({"methods": ["saliency"]}, "INVALID_ARGUMENT", "methods", "generic, raw_attention"),
        ({"methods": ["oracle"]}, "INVALID_ARGUMENT", "methods", "do not apply"),
        ({"method_options": {"generic": {"averaging": "mean"}}}, "INVALID_ARGUMENT",
         "method_options[generic]", "averaging"),
        ({"model": "tiny", "dataset": "synthetic_vqa:4", "metrics": ["segmentation"]},
         "INVALID_ARGUMENT", "dataset.synthetic", "for visual question answering models; model "
         "'tiny' is not one"),
        ({"model": "foreign"}, "FAILED_PRECONDITION", "", "cannot answer"),
        ({"model": "regions"}, "FAILED_PRECONDITION", "", "reads detector regions"),
    ],
)  # fmt: skip
def test_what_cannot_run_on_a_vqa_model_is_refused(served, fields, code, field, message):
    fields = {"methods": ["generic"], "metrics": ["perturbation_text"], **fields}
    with pytest.raises(grpc.RpcError) as info:
        _events(served, **fields)
    error = from_rpc_error(info.value)
    assert info.value.code() == grpc.StatusCode[code], info.value.details()
    assert pytest.importorskip("re").search(message, info.value.details())
    got = [v.field for v in error.field_violations]
    assert (got[0] if got else "").startswith(field)


def test_cancelling_the_call_stops_the_run(served) -> None:
    evaluations = served.server.plane.evaluations
    with grpc.insecure_channel(served.address) as channel:
        stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        request = _request("synthetic_vqa:400", methods=["generic", "rollout"], metrics=METRICS)
        call = stub.Evaluate(request, timeout=120)
        first = next(call)
        assert first.WhichOneof("event") == "progress" and first.progress.total == 800
        assert evaluations.running == 1
        call.cancel()
    wait_for(lambda: not evaluations.running, describe=lambda: "the run kept going after cancel")
    results = _results(_events(served, methods=["rollout"], metrics=["segmentation"],
                               dataset="synthetic_vqa:2"))  # fmt: skip
    assert set(results) == {("rollout", "segmentation")}  # still serving
