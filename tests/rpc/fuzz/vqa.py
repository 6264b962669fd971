"""Fuzz strategies for visual question answering requests: Explain and Predict on a tiny ViLT
(pixels) and a tiny VisualBERT (request regions) with hostile ``questions`` and ``regions``
(`tests.rpc.fuzz.vqa_inputs`) combined with the other fields — other kinds' methods, answers
out of range, ``top_k``, grids, relevance matrices, generic's ``averaging``, texts and prompts
on VQA models, questions sent to the classifier and the CLIP — and Evaluate on ``synthetic_vqa``
datasets (small counts, bad specs, other models' metrics and datasets). Also the two models'
directories and the liveness check of their workers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from hypothesis import strategies as st

from tests.rpc.fuzz.basics import (
    UINT32_MAX,
    UNKNOWN_ENUMS,
    Shown,
    deadlines_s,
    hostile_strings,
    mutations,
    odd_names,
    option_structs,
)
from tests.rpc.fuzz.images import hostile_image_lists, valid_images
from tests.rpc.fuzz.oracle import CALL_TIMEOUT_S, EVALUATE_TIMEOUT_S
from tests.rpc.fuzz.requests import _option_maps, targets
from tests.rpc.fuzz.texts import CAPTIONS
from tests.rpc.fuzz.vqa_inputs import (
    QUESTIONS,
    VqaLimits,
    VqaModel,
    bimodal_methods,
    foreign_methods,
    many_regions,
    vqa_inputs,
)
from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.models import ModelSpec

__all__ = [
    "VqaLimits",
    "VqaLiveness",
    "VqaModel",
    "vqa_evaluate_calls",
    "vqa_explain_requests",
    "vqa_predict_requests",
    "write_vqa_models",
]

F32, F16 = tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16
IMAGE_SIZE = 64  # the ViLT's input: 4 x 4 patches of 16 px


# --------------------------------------------------------------------------- Explain, Predict


def _models(limits: VqaLimits, model: VqaModel) -> st.SearchStrategy[str]:
    """Another model: the other VQA model, the classifier or the CLIP, the default, a typo."""
    names = [m.name for m in limits.models if m != model] + list(limits.others)
    return st.one_of(st.sampled_from([*names, ""]), odd_names([model.name]))


def bad_averaging() -> st.SearchStrategy[struct_pb2.Struct]:
    """generic's ``averaging`` as no choice it has: case, spaces, NUL, other types."""
    values = st.one_of(
        st.sampled_from(["mean", "LRP", "", " lrp", "gradient\x00", "x" * 100_000]).map(
            lambda s: struct_pb2.Value(string_value=s)
        ),
        st.sampled_from([math.nan, 1.0, -1.0]).map(lambda x: struct_pb2.Value(number_value=x)),
        st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.just(struct_pb2.Value(bool_value=True)),
    )

    def struct(value: struct_pb2.Value) -> struct_pb2.Struct:
        options = struct_pb2.Struct()
        options.fields["averaging"].CopyFrom(value)
        return options

    return values.map(struct)


EXPLAIN_FIELDS = (
    "model", "method", "images", "questions", "regions", "texts", "target", "grid",
    "output_dtype", "top_k_predictions", "method_options",
)  # fmt: skip


@st.composite
def _explain(draw: st.DrawFn, limits: VqaLimits) -> vitlens_pb2.ExplainRequest:
    mut = draw(mutations(EXPLAIN_FIELDS))
    model = draw(st.sampled_from(limits.models))
    catalog = limits.catalog(model)
    images = mut.draw(
        draw,
        "images",
        st.lists(valid_images(), min_size=1, max_size=2),
        hostile_image_lists(catalog),
    )
    n, bimodal = len(images), bimodal_methods()
    methods = st.one_of(st.sampled_from(foreign_methods()), odd_names(bimodal))
    top_k = st.integers(0, model.answers)
    hostile_top_k = st.one_of(top_k, st.sampled_from([2**31, UINT32_MAX]))
    options = vitlens_pb2.ExplainOptions(
        grid=mut.draw(draw, "grid", st.sampled_from([0, 1, 2]), st.sampled_from(UNKNOWN_ENUMS)),
        return_relevance=draw(st.booleans()),
        output_dtype=mut.draw(
            draw,
            "output_dtype",
            st.sampled_from([0, F32, F16]),
            st.sampled_from([tensor_pb2.DTYPE_UINT8, *UNKNOWN_ENUMS]),
        ),
        top_k_predictions=mut.draw(draw, "top_k_predictions", top_k, hostile_top_k),
    )
    request = vitlens_pb2.ExplainRequest(
        model=mut.draw(draw, "model", st.just(model.name), _models(limits, model)),
        method=mut.draw(draw, "method", st.sampled_from(["", *bimodal]), methods),
        images=images,
        **vqa_inputs(draw, mut, n, model, limits),
        texts=mut.draw(draw, "texts", st.just([]), st.lists(st.sampled_from(CAPTIONS), min_size=1)),
        options=options,
    )
    target = draw(targets(n, catalog, mut.allows("target")))
    if target is not None:
        request.target.CopyFrom(target)
    params = catalog.methods.get(request.method or "generic", ())
    if mut.allows("method_options"):
        hostile = st.one_of(option_structs(params, catalog, hostile=True), bad_averaging())
        request.options.method_options.CopyFrom(draw(hostile))
    elif draw(st.booleans()):
        request.options.method_options.CopyFrom(draw(option_structs(params, catalog)))
    return request


@st.composite
def _predict(draw: st.DrawFn, limits: VqaLimits) -> vitlens_pb2.PredictRequest:
    mut = draw(mutations(("model", "images", "questions", "regions", "prompts", "top_k")))
    model = draw(st.sampled_from(limits.models))
    images = mut.draw(
        draw,
        "images",
        st.lists(valid_images(), min_size=1, max_size=2),
        hostile_image_lists(limits.catalog(model)),
    )
    n = len(images)
    top_k = st.integers(0, model.answers + 1)
    return vitlens_pb2.PredictRequest(
        model=mut.draw(draw, "model", st.just(model.name), _models(limits, model)),
        images=images,
        **vqa_inputs(draw, mut, n, model, limits),
        prompts=mut.draw(
            draw, "prompts", st.just([]), st.lists(st.sampled_from(CAPTIONS), min_size=1)
        ),
        top_k=mut.draw(draw, "top_k", top_k, st.sampled_from([2**31, UINT32_MAX])),
    )


def vqa_explain_requests(limits: VqaLimits) -> st.SearchStrategy[Shown[vitlens_pb2.ExplainRequest]]:
    """Explain on a VQA model (sometimes sent to another model)."""
    return _explain(limits).map(Shown)


def vqa_predict_requests(limits: VqaLimits) -> st.SearchStrategy[Shown[vitlens_pb2.PredictRequest]]:
    return _predict(limits).map(Shown)


# --------------------------------------------------------------------------- Evaluate

ODD_SYNTHETIC_VQA = (
    "", "synthetic_vqa", "synthetic_vqa:", "synthetic_vqa:0", "synthetic_vqa:-1",
    "synthetic_vqa:x", "synthetic_vqa:1:2:3", "synthetic_vqa:1.5", "synthetic_vqa: 1",
    "synthetic_vqa:1_0", "synthetic_vqa:٣", "synthetic_vqa:1:", "synthetic_vqa::1",
    "SYNTHETIC_VQA:1", "synthetic_vqa:1:two_object", "synthetic_vqa:1\x00", "synthetic:2",
    "2", "synthetic_vqa:2:9999999", "synthetic_vqa:10000001", "synthetic_vqa:1:99999999999",
    "synthetic_vqa:" + "9" * 100_000,
)  # fmt: skip
EDGE_SYNTHETIC_VQA = ("synthetic_vqa:0001", "synthetic_vqa:1:9999999")  # valid: cheap
HEAVY_SYNTHETIC_VQA = ("synthetic_vqa:5000000", "synthetic_vqa:9999999:1", "synthetic_vqa:400")
SHORT_DEADLINES_S = (0.05, 0.3, 1.0)  # for the heavy runs: each may cost its deadline


@st.composite
def _vqa_datasets(draw: st.DrawFn, hostile: bool) -> vitlens_pb2.Dataset | None:
    limits = st.one_of(st.integers(0, 2), st.just(UINT32_MAX)) if hostile else st.integers(0, 2)
    limit = draw(limits)
    valid = st.builds(
        lambda n, seed: f"synthetic_vqa:{n}{'' if seed is None else f':{seed}'}",
        st.integers(1, 2),
        st.one_of(st.none(), st.integers(0, 50)),
    )
    if not hostile:
        return vitlens_pb2.Dataset(synthetic=draw(valid), limit=limit)
    kind = draw(st.sampled_from(["odd", "edge", "heavy", "text", "inline", "server_path", "unset"]))
    if kind == "unset":
        return vitlens_pb2.Dataset(limit=limit) if limit else None
    if kind == "inline":
        image = draw(valid_images())
        sample = vitlens_pb2.Sample(image=image, label=draw(st.integers(0, 3)))
        return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=[sample]), limit=limit)
    if kind == "server_path":
        path = draw(st.one_of(st.sampled_from(["/data", "", "..", "/"]), hostile_strings()))
        return vitlens_pb2.Dataset(server_path=path, limit=limit)
    specs = {"odd": ODD_SYNTHETIC_VQA, "edge": EDGE_SYNTHETIC_VQA, "heavy": HEAVY_SYNTHETIC_VQA}
    spec = draw(st.sampled_from(specs[kind]) if kind in specs else st.text(max_size=16))
    return vitlens_pb2.Dataset(synthetic=spec, limit=limit)


EVALUATE_FIELDS = ("model", "methods", "metrics", "dataset", "method_options", "metric_options")


@st.composite
def _evaluate(
    draw: st.DrawFn, limits: VqaLimits
) -> tuple[Shown[vitlens_pb2.EvaluateRequest], float]:
    from vitlens_server.evaluate import METRICS

    mut = draw(mutations(EVALUATE_FIELDS))
    model = next(m for m in limits.models if not m.feature_dim)  # Evaluate reads pixels
    catalog = limits.catalog(model)

    def names(field: str, valid: list[str], foreign: list[str]) -> list[str]:
        good = st.lists(st.sampled_from(valid), min_size=1, max_size=2, unique=True)
        any_name = st.one_of(st.sampled_from([*valid, *foreign]), odd_names(valid))
        return mut.draw(draw, field, good, st.lists(any_name, max_size=3))

    methods = names("methods", catalog.method_names, foreign_methods())
    metrics = names("metrics", catalog.metric_names, sorted(METRICS))
    request = vitlens_pb2.EvaluateRequest(
        model=mut.draw(draw, "model", st.just(model.name), _models(limits, model)),
        methods=methods,
        metrics=metrics,
        explain_label=draw(st.booleans()),
    )
    dataset = mut.draw(draw, "dataset", _vqa_datasets(False), _vqa_datasets(True))
    if dataset is not None:
        request.dataset.CopyFrom(dataset)
    for table, requested, field, target in (
        (catalog.methods, methods, "method_options", request.method_options),
        (catalog.metrics, metrics, "metric_options", request.metric_options),
    ):
        options: Mapping[str, Any] = draw(
            _option_maps(table, requested, catalog, mut.allows(field))
        )
        for key, values in options.items():
            target[key].CopyFrom(values)
    heavy = request.dataset.synthetic in HEAVY_SYNTHETIC_VQA
    timeout = st.sampled_from(SHORT_DEADLINES_S) if heavy else deadlines_s(EVALUATE_TIMEOUT_S)
    return Shown(request), draw(timeout)


def vqa_evaluate_calls(
    limits: VqaLimits,
) -> st.SearchStrategy[tuple[Shown[vitlens_pb2.EvaluateRequest], float]]:
    """Evaluate on the ViLT (sometimes another model) with its deadline: the heavy valid runs
    get short ones, so that each costs at most a second."""
    return _evaluate(limits)


# --------------------------------------------------------------------------- serving


def write_vqa_models(root: Path, limits: VqaLimits) -> list[ModelSpec]:
    """`ModelSpec`s of a tiny ViLT (64 px, the generated questions' words, `questions.ANSWERS`)
    and a tiny VisualBERT on request regions (`tests.unit.bimodal_tiny`), written under
    ``root`` with the names in ``limits`` (pixels first)."""
    import torch
    import transformers as tf

    from tests.unit import bimodal_tiny
    from tests.unit.image_text_tiny import sharpen
    from vitlens_server.data.questions import ANSWERS, vocab_lines

    pixels, regions = limits.models
    vilt = root / pixels.name
    config = tf.ViltConfig(
        vocab_size=len(vocab_lines()), hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_hidden_layers=2, max_position_embeddings=16,
        image_size=IMAGE_SIZE, patch_size=16, max_image_length=-1, num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)},
    )  # fmt: skip
    torch.manual_seed(14)
    sharpen(tf.ViltForQuestionAnswering(config), 14).save_pretrained(vilt)
    (vilt / "vocab.txt").write_text("\n".join(vocab_lines()) + "\n")
    (vilt / "vitlens.json").write_text(json.dumps({"image_size": IMAGE_SIZE}))
    vbert = bimodal_tiny.write_dir(root / regions.name, "visual_bert", seed=14)
    return [
        ModelSpec(name=path.name, architecture="hf-vqa", source=f"hf-vqa:{path}")
        for path in (vilt, vbert)
    ]


class VqaLiveness:
    """After a VQA example: each VQA model still explains an image never sent before (its own
    worker; `oracle.Liveness` checks the classifier's and health)."""

    def __init__(self, channel: grpc.Channel, limits: VqaLimits) -> None:
        self._stub = vitlens_pb2_grpc.VitlensServiceStub(channel)
        self._models = limits.models
        self._count = 0

    def check(self) -> None:
        self._count += 1
        pixels = np.zeros((8, 8, 3), dtype=np.uint8)
        pixels[0, 0] = (self._count % 256, self._count // 256 % 256, self._count // 65536 % 256)
        image = tensor_pb2.Image(pixels=_uint8(pixels))
        for model in self._models:
            request = vitlens_pb2.ExplainRequest(
                model=model.name, method="raw_attention", images=[image], questions=[QUESTIONS[0]]
            )
            if model.feature_dim:
                request.regions.append(many_regions(1, model.feature_dim))
            try:
                reply = self._stub.Explain(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as err:
                why = f"{err.code().name}: {err.details()!r}"
                pytest.fail(f"after the example, a good Explain of {model.name} failed: {why}")
            assert len(reply.results) == 1 and len(reply.results[0].explanations) == 1


def _uint8(array: np.ndarray) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=array.shape, data=array.tobytes())
