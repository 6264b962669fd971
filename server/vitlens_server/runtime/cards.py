"""What a served model is, as GetModel tells it and as the result cache keys it."""

from __future__ import annotations

import json
from collections.abc import Iterable

from vitlens_server.explain import MethodSpec
from vitlens_server.explain.params import describe_params
from vitlens_server.models import LoadedModel
from vitlens_server.runtime.api import MethodCard, ModalityCard, ModelCard

__all__ = ["model_card", "model_version"]


def model_card(model: LoadedModel, methods: Iterable[MethodSpec]) -> ModelCard:
    """GetModel's answer; ``methods`` are those Explain accepts for the model."""
    g = model.geometry
    return ModelCard(
        name=model.name,
        architecture=model.spec.architecture,
        input_size=tuple(g.input_size),
        mean=tuple(model.mean),
        std=tuple(model.std),
        patch_size=tuple(g.patch_size),
        patch_grid=tuple(g.grid),
        num_prefix_tokens=g.num_prefix_tokens,
        num_layers=g.num_layers,
        num_heads=g.num_heads,
        labels=tuple(model.labels),
        methods=tuple(
            MethodCard(
                name=spec.name,
                description=spec.description,
                passes=tuple(spec.pass_names),
                class_specific=spec.class_specific,
                relevance_matrix=spec.relevance_matrix,
                parameters=tuple(describe_params(spec.params)),
            )
            for spec in methods
        ),
        weights_source=model.weights.source,
        weights_random=model.weights.random,
        weights_sha256=model.weights.sha256,
        weights_metadata={
            **dict(model.weights.metadata),
            "model_kwargs": json.dumps(dict(model.spec.model_kwargs)),
        },
        device=str(model.device),
        readout=g.readout,
        task="classification",
        modalities=(ModalityCard("image", g.num_tokens, "prefix + patch tokens"),),
    )


def model_version(model: LoadedModel) -> str:
    """The weights a model answers with: their file's SHA-256, or how they were initialised."""
    spec = model.spec
    weights = model.weights.sha256 or f"{model.weights.source}:seed={spec.seed}"
    return f"{spec.architecture}|{json.dumps(dict(spec.model_kwargs), sort_keys=True)}|{weights}"
