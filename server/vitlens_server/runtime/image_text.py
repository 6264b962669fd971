"""The data plane's image-text (CLIP) side: texts checked, targets resolved, cards and versions.

check_method      a method name → its spec, if it applies to the model (Explain, Evaluate)
check_texts       ``texts`` / ``prompts``: count, characters, empty texts and texts longer
                  than the model's context (refused, never truncated), by field
explain_job       an `ExplainQuery` on an image-text model → `ImageTextExplainJob`
image_text_card   GetModel's answer: task, modalities, prompt template, methods
refuse_texts      a classifier given ``texts`` or ``prompts``
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import TargetSpec
from vitlens_server.errors import InvalidArgument, about
from vitlens_server.explain import MethodSpec, get_method
from vitlens_server.explain.image_text import IMAGE_TEXT_METHODS, LRP_METHODS
from vitlens_server.explain.image_text_batch import ImageTextExplainJob
from vitlens_server.explain.params import describe_params, parse_params
from vitlens_server.models.image_text import ImageTextModel
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.runtime.api import ExplainQuery, MethodCard, ModalityCard, ModelCard

__all__ = [
    "candidates",
    "check_method",
    "check_texts",
    "explain_job",
    "image_text_card",
    "image_text_version",
    "refuse_texts",
]

_DESCRIPTIONS = {
    "generic": "Chefer et al. 2021 Eq. 5-6 per tower on the pair's similarity logit: image map "
    "from the image tower's readout row, token relevance from the text tower's EOT row",
    "transformer_attribution": "Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021) per "
    "tower on the pair's similarity logit: LRP from the logit (the dot product with the other "
    "tower's unit embedding, the projection, then every block) gives R^A of each layer; "
    "mean_h((dy/dA * R^A)+) accumulated over the layers; image map from the class-token row, "
    "token relevance from the EOT row",
    "gradcam": "Grad-CAM as adapted to ViT by Chefer et al. 2021, per tower on the pair's "
    "similarity logit: each tower's last-layer attention of its readout row (image: class "
    "token; text: EOT token), weighted per head by its mean gradient, ReLU",
    "agcam": "Attention-guided CAM (Leem & Seo 2024) per tower on the pair's similarity logit: "
    "positive attention gradients of every layer times sigmoid scores, in the readout row "
    "(image: class token; text: EOT token), summed over heads and layers",
    "saliency": "Saliency (Simonyan et al. 2014) of the pair's similarity logit: image map = "
    "max over colour channels of |dy/dx| at input resolution (options SmoothGrad, Integrated "
    "Gradients); token relevance = max over the embedding width of |dy/de| of each token "
    "embedding (the plain gradient, whatever the image option)",
    "token_reflection": "Token reflection (Sago & Hotta 2024) on the image tower: masks from the "
    "Transformer Attribution relevance R among the patch tokens, the masked images scored "
    "against the pair's text (float32), plus R's class-token row; token relevance as in "
    "transformer_attribution",
    "rollout": "attention rollout (Abnar & Zuidema 2020) per tower; not target-specific",
    "raw_attention": "last layer's head-mean attention per tower; not target-specific",
}
_FB, _FBE = ("forward", "backward"), ("forward", "backward", "extra")
_PASSES = {
    "generic": _FB,
    "transformer_attribution": (*_FB, "lrp"),
    "gradcam": _FB,
    "agcam": _FB,
    "saliency": _FBE,
    "token_reflection": ("forward", "backward", "lrp", "extra"),
}
_MATRICES = frozenset({"generic", "rollout", "raw_attention"})
_REFUSED = {
    "partial_lrp": "it is a last-layer baseline of classifiers; for image-text models use "
    "transformer_attribution",
}


def refuse_texts(field: str, model: str) -> InvalidArgument:
    """The error of a classifier given ``texts`` or ``prompts``."""
    return InvalidArgument(
        f"{field} is for image-text models (ModelInfo.task TASK_IMAGE_TEXT_SIMILARITY); "
        f"model {model!r} is a classifier: unset {field}",
        field=field,
    )


def check_texts(
    model: ImageTextModel, texts: Sequence[str], field: str, config: ServerConfig
) -> None:
    """Refuse too many texts, an empty one, one too long in characters or in tokens."""
    limit = config.max_texts_per_request
    if len(texts) > limit:
        raise InvalidArgument(
            f"{field} has {len(texts)} texts; this server accepts at most {limit} per request",
            field=field,
        )
    for i, text in enumerate(texts):
        where = f"{field}[{i}]"
        if not text.strip():
            raise InvalidArgument(f"{where} is empty; give a non-empty text", field=where)
        if len(text) > config.max_text_chars:
            raise InvalidArgument(
                f"{where} has {len(text)} characters; at most {config.max_text_chars} per text",
                field=where,
            )
        used, context = model.tokenizer.count(text), model.context_length
        if used > context:
            raise InvalidArgument(
                f"{where} is {used} tokens with the start and end tokens; the model reads at "
                f"most {context} tokens: shorten it (texts are never truncated)",
                field=where,
            )


def candidates(
    served: LoadedImageTextModel, texts: Sequence[str], field: str, config: ServerConfig
) -> tuple[str, ...]:
    """The texts a query scores against: its own (checked), or the label prompts."""
    if texts:
        check_texts(served.adapter, texts, field, config)
        return tuple(texts)
    if not served.labels:
        raise InvalidArgument(
            f"model {served.name!r} has no labels for zero-shot classification; give {field}",
            field=field,
        )
    return served.prompts


def check_method(served: LoadedImageTextModel, name: str, field: str = "method") -> MethodSpec:
    """The registered method ``name`` if it applies to ``served`` (Explain and Evaluate alike):
    an image-text method, and the LRP methods only on towers with LRP taps."""
    with about(field):
        method = get_method(name)
    if name not in IMAGE_TEXT_METHODS:
        why = _REFUSED.get(name)
        raise InvalidArgument(
            f"method {name!r} does not apply to image-text model {served.name!r}"
            + (f": {why}" if why else "")
            + f"; use one of: {', '.join(IMAGE_TEXT_METHODS)}",
            field=field,
        )
    problem = served.adapter.lrp_problem
    if name in LRP_METHODS and problem is not None:
        raise InvalidArgument(
            f"method {name!r} cannot explain image-text model {served.name!r}: {problem}",
            field=field,
        )
    return method


def explain_job(
    served: LoadedImageTextModel,
    query: ExplainQuery,
    config: ServerConfig,
    *,
    top_k: int,
) -> tuple[ImageTextExplainJob, MethodSpec, object]:
    """The query as a checked job, its images still to be decoded (``pixels`` empty)."""
    name = query.method or "generic"
    method = check_method(served, name)
    params = parse_params(
        method.params, query.method_options, method=name, field="options.method_options"
    )
    if query.return_relevance and name not in _MATRICES:
        raise InvalidArgument(
            f"method {name!r} has no token relevance matrix for image-text models; unset "
            f"return_relevance or use one of: {', '.join(sorted(_MATRICES))}",
            field="options.return_relevance",
        )
    texts = candidates(served, query.texts, "texts", config)
    target: TargetSpec | None = query.target
    if query.texts:
        if query.target.kind != "predicted":
            raise InvalidArgument(
                "with texts every text is explained, in order; unset target", field="target"
            )
        target = None
    else:
        query.target.check(len(texts), served.name, "label", "labels")
    job = ImageTextExplainJob(
        pixels=torch.empty(0),
        texts=texts,
        method=name,
        target=target,
        params=params,
        grid=query.grid,
        relevance=query.return_relevance,
        top_k_predictions=top_k,
        output_dtype=query.output_dtype,
    )
    return job, method, params


def image_text_card(served: LoadedImageTextModel) -> ModelCard:
    """GetModel's answer for an image-text model."""
    adapter = served.adapter
    image, text = adapter.image_graph, adapter.text_graph
    methods = []
    for name in IMAGE_TEXT_METHODS:
        if name in LRP_METHODS and adapter.lrp_problem is not None:
            continue
        spec = get_method(name)
        methods.append(
            MethodCard(
                name=name,
                description=_DESCRIPTIONS[name],
                passes=_PASSES.get(name, ("forward",)),
                class_specific=spec.class_specific,
                relevance_matrix=name in _MATRICES,
                parameters=tuple(describe_params(spec.params)),
                modalities=("image", "text"),
            )
        )
    patch = adapter.preprocess.input_size[1] // image.grid[0]
    return ModelCard(
        name=served.name,
        architecture=str(served.weights.source),
        input_size=tuple(adapter.preprocess.input_size),
        mean=tuple(adapter.preprocess.mean),
        std=tuple(adapter.preprocess.std),
        patch_size=(patch, patch),
        patch_grid=tuple(image.grid),
        num_prefix_tokens=image.num_prefix_tokens,
        num_layers=image.num_layers,
        num_heads=image.num_heads,
        labels=served.labels,
        methods=tuple(methods),
        weights_source=served.weights.source,
        weights_random=False,
        weights_sha256=served.weights.sha256,
        weights_metadata=dict(served.weights.metadata),
        device=str(served.device),
        readout=image.readout,
        task="image_text_similarity",
        modalities=(
            ModalityCard("image", image.num_tokens, "image tower: prefix + patch tokens"),
            ModalityCard("text", text.num_tokens, "text tower: the context length in tokens"),
        ),
        prompt_template=served.prompt_template,
    )


def image_text_version(served: LoadedImageTextModel) -> str:
    """What answers are keyed by: the weights and the zero-shot prompts."""
    return json.dumps([served.weights.source, served.weights.sha256, list(served.prompts)])
