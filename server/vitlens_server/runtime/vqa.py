"""The data plane's VQA side: questions and regions checked, jobs resolved, cards and versions.

check_questions   ``questions``: one per image or one for all; empty, too many characters, or
                  more tokens than the model reads (refused, never truncated), by field
check_regions     ``regions``: only for models on request regions, one per image, the
                  model's feature width, at most `MAX_REGIONS_PER_IMAGE` each
check_method      a method name → its `BimodalMethod`, if the model can run it
explain_job       an `ExplainQuery` on a VQA model → `VqaExplainJob` (pixels still empty)
predict_job       a `PredictQuery` on a VQA model → `VqaPredictJob` (pixels still empty)
vqa_card          GetModel's answer: task, modalities, answers, methods
refuse_questions  another model given ``questions`` or ``regions``
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import RegionsInput
from vitlens_server.errors import InvalidArgument, clip
from vitlens_server.explain.bimodal import BIMODAL_METHODS, BimodalMethod
from vitlens_server.explain.params import choice, describe_params, parse_params
from vitlens_server.explain.vqa_batch import VqaExplainJob, VqaPredictJob
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime.api import (
    ExplainQuery,
    MethodCard,
    ModalityCard,
    ModelCard,
    PredictQuery,
)

__all__ = [
    "MAX_REGIONS_PER_IMAGE",
    "GenericParams",
    "check_method",
    "check_questions",
    "check_regions",
    "explain_job",
    "predict_job",
    "refuse_questions",
    "vqa_card",
    "vqa_version",
]


# Attention over an image's R regions is (T + R)² per head and layer: 100,000 regions would ask
# for 40 GB per head of the first layer. Detectors give 10-100.
MAX_REGIONS_PER_IMAGE = 1024


@dataclass(frozen=True)
class GenericParams:
    """Options of ``generic`` on VQA models."""

    averaging: str = choice(
        "gradient",
        "gradient",
        "lrp",
        doc="head averaging: Eq. 5 (gradient x attention) or Eq. 13 (gradient x LRP relevance)",
    )


@dataclass(frozen=True)
class _NoOptions:
    """For methods without options."""


def _params(name: str) -> type:
    return GenericParams if name == "generic" else _NoOptions


def refuse_questions(field: str, model: str) -> InvalidArgument:
    """The error of a classifier or an image-text model given ``questions`` or ``regions``."""
    return InvalidArgument(
        f"{field} is for visual question answering models (ModelInfo.task "
        f"TASK_VISUAL_QUESTION_ANSWERING); model {model!r} is not one: unset {field}",
        field=field,
    )


def check_method(served: LoadedVqaModel, name: str, field: str = "method") -> BimodalMethod:
    """The VQA method ``name``."""
    method = BIMODAL_METHODS.get(name)
    if method is None:
        raise InvalidArgument(
            f"method {clip(name)} does not apply to VQA model {served.name!r}; use one of: "
            f"{', '.join(BIMODAL_METHODS)}",
            field=field,
        )
    return method


def check_questions(
    served: LoadedVqaModel, questions: Sequence[str], images: int, config: ServerConfig
) -> tuple[str, ...]:
    """One question per image (a single one is asked of every image), each checked."""
    field = "questions"
    if not questions:
        raise InvalidArgument(
            f"model {served.name!r} answers questions: give one per image in {field}, or one "
            "for all",
            field=field,
        )
    if len(questions) not in (1, images):
        raise InvalidArgument(
            f"{field} has {len(questions)} questions for {images} images: give one per image, "
            "or one for all",
            field=field,
        )
    tokenizer, most = served.adapter.tokenizer, served.adapter.max_text_length
    for i, question in enumerate(questions):
        where = f"{field}[{i}]"
        if not question.strip():
            raise InvalidArgument(f"{where} is empty; ask a non-empty question", field=where)
        if len(question) > config.max_text_chars:
            raise InvalidArgument(
                f"{where} has {len(question)} characters; at most {config.max_text_chars}",
                field=where,
            )
        used = len(tokenizer(question)["input_ids"])
        if used > most:
            raise InvalidArgument(
                f"{where} is {used} tokens with [CLS] and [SEP]; the model reads at most "
                f"{most}: shorten it (questions are never truncated)",
                field=where,
            )
    return tuple(questions) * images if len(questions) == 1 else tuple(questions)


def check_regions(
    served: LoadedVqaModel, regions: Sequence[RegionsInput], images: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
    """The request's regions as tensors, for models that read them; None for the others."""
    if served.visual_input == "pixels":
        if regions:
            raise InvalidArgument(
                f"model {served.name!r} reads the images' pixels itself (ModelInfo.visual_input "
                "pixels): unset regions",
                field="regions",
            )
        return None
    if len(regions) != images:
        raise InvalidArgument(
            f"model {served.name!r} reads detector regions: give one Regions per image in "
            f"regions ({len(regions)} for {images} images)",
            field="regions",
        )
    width = _feature_dim(served)
    found = []
    for region in regions:
        if region.features.shape[0] > MAX_REGIONS_PER_IMAGE:
            raise InvalidArgument(
                f"{region.where}.features has {region.features.shape[0]:,} regions; this server "
                f"takes at most {MAX_REGIONS_PER_IMAGE:,} per image",
                field=f"{region.where}.features",
            )
        if region.features.shape[1] != width:
            raise InvalidArgument(
                f"{region.where}.features has {region.features.shape[1]} features per region; "
                f"model {served.name!r} reads {width} (ModelInfo.region_feature_dim)",
                field=f"{region.where}.features",
            )
        found.append((torch.from_numpy(region.features), torch.from_numpy(region.boxes)))
    return tuple(found)


def explain_job(
    served: LoadedVqaModel, query: ExplainQuery, config: ServerConfig, *, top_k: int
) -> tuple[VqaExplainJob, BimodalMethod, object]:
    """The query as a checked job, its images still to be decoded (``pixels`` empty)."""
    if query.texts:
        raise InvalidArgument(
            f"texts are for image-text models; VQA model {served.name!r} takes questions",
            field="texts",
        )
    name = query.method or "generic"
    method = check_method(served, name)
    params = parse_params(
        _params(name), query.method_options, method=name, field="options.method_options"
    )
    query.target.check(len(served.labels), served.name, "answer", "answers")
    images = len(query.images)
    job = VqaExplainJob(
        pixels=torch.empty(0),
        questions=check_questions(served, query.questions, images, config),
        method=name,
        regions=check_regions(served, query.regions, images),
        target=query.target,
        averaging=getattr(params, "averaging", "gradient"),
        grid=query.grid,
        relevance=query.return_relevance,
        top_k_predictions=top_k,
        output_dtype=query.output_dtype,
    )
    return job, method, params


def predict_job(served: LoadedVqaModel, query: PredictQuery, config: ServerConfig, top_k: int):
    """The query as a checked job, its images still to be decoded (``pixels`` empty)."""
    if query.prompts:
        raise InvalidArgument(
            f"prompts are for image-text models; VQA model {served.name!r} takes questions",
            field="prompts",
        )
    images = len(query.images)
    return VqaPredictJob(
        pixels=torch.empty(0),
        questions=check_questions(served, query.questions, images, config),
        top_k=top_k,
        regions=check_regions(served, query.regions, images),
    )


def cache_extra(job: VqaExplainJob) -> str:
    """What besides the image keys a VQA answer: the questions and the regions' bytes."""
    digest = hashlib.sha256(json.dumps(job.questions).encode())
    for features, boxes in job.regions or ():
        digest.update(features.numpy().tobytes())
        digest.update(boxes.numpy().tobytes())
    return digest.hexdigest()


def vqa_card(served: LoadedVqaModel) -> ModelCard:
    """GetModel's answer for a VQA model."""
    adapter = served.adapter
    graph = adapter.graph()
    methods = tuple(
        MethodCard(
            name=m.name,
            description=m.description,
            passes=_passes(m),
            class_specific=m.class_specific,
            relevance_matrix=True,
            parameters=tuple(describe_params(_params(m.name))),
            modalities=("image", "text"),
        )
        for m in BIMODAL_METHODS.values()
    )
    grid = served.patch_grid or (0, 0)
    patch = served.image_size // grid[0] if grid[0] else 0
    text_tokens = adapter.max_text_length
    modalities = [ModalityCard("text", text_tokens, "question tokens, [CLS] and [SEP] included")]
    image_tokens = grid[0] * grid[1] if served.visual_input == "pixels" else MAX_REGIONS_PER_IMAGE
    image_what = "image patches" if served.visual_input == "pixels" else "detector regions"
    modalities.append(ModalityCard("image", image_tokens, image_what))
    if adapter.architecture == "single_stream":
        modalities.append(
            ModalityCard("joint", text_tokens + image_tokens, "text positions, then image tokens")
        )
    return ModelCard(
        name=served.name,
        architecture=type(adapter.module).__name__,
        input_size=served.input_size,
        mean=served.mean,
        std=served.std,
        patch_size=(patch, patch),
        patch_grid=grid,
        num_prefix_tokens=0,
        num_layers=len(graph.edges),
        num_heads=int(adapter.module.config.num_attention_heads),
        labels=served.labels,
        methods=methods,
        weights_source=served.weights.source,
        weights_random=False,
        weights_sha256=served.weights.sha256,
        weights_metadata=dict(served.weights.metadata),
        device=str(served.device),
        readout="token",
        task="visual_question_answering",
        modalities=tuple(modalities),
        visual_input=served.visual_input,
        region_feature_dim=_feature_dim(served) if served.visual_input == "regions" else 0,
        stream_architecture=adapter.architecture,
    )


def vqa_version(served: LoadedVqaModel) -> str:
    """What answers are keyed by: the weights and the answer vocabulary."""
    return json.dumps([served.weights.source, served.weights.sha256, list(served.labels)])


def _passes(method: BimodalMethod) -> tuple[str, ...]:
    backward = ("backward",) if method.gradient else ()
    return ("forward", *backward, *(("lrp",) if method.lrp else ()))


def _feature_dim(served: LoadedVqaModel) -> int:
    config = served.adapter.module.config
    return int(getattr(config, "visual_feat_dim", None) or config.visual_embedding_dim)
