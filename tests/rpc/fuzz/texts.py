"""Fuzz strategies for image-text (CLIP) requests: Explain with ``texts``, Predict with
``prompts``, and texts sent to a classifier.

Valid texts are a few short captions; hostile ones are empty or blank texts, texts over the
server's character limit, texts within it whose tokens overflow the model's context, more texts
than the server takes, and `hostile_strings` (NUL, 100 kB runs, emoji).
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.rpc.fuzz.basics import (
    Catalog,
    Shown,
    hostile_strings,
    mutations,
    odd_names,
    option_structs,
)
from tests.rpc.fuzz.images import hostile_image_lists, valid_images
from tests.rpc.fuzz.requests import targets
from vitlens.v1 import vitlens_pb2

__all__ = ["TextLimits", "image_text_explain_requests", "image_text_predict_requests"]

CAPTIONS = (
    "a red star",
    "a photo of a disc.",
    "two small blue squares on the left",
    "une étoile jaune",
    "a ring left of a cross",
)


class TextLimits:
    """The server's ``max_texts_per_request`` and ``max_text_chars``, and the model's name."""

    def __init__(self, model: str, max_texts: int, max_chars: int) -> None:
        self.model, self.max_texts, self.max_chars = model, max_texts, max_chars


def valid_texts(limits: TextLimits) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(CAPTIONS), min_size=1, max_size=min(3, limits.max_texts))


def hostile_texts(limits: TextLimits) -> st.SearchStrategy[list[str]]:
    """Lists with one bad text among good ones, too many texts, or hostile strings."""
    bad = st.one_of(
        st.sampled_from(["", " ", "\t\n"]),
        st.just("x" * (limits.max_chars + 1)),
        st.just("star " * (limits.max_chars // 5)),  # within the characters, past the tokens
        hostile_strings(),
    )
    one_bad = st.builds(
        lambda good, text, at: [*good[:at], text, *good[at:]],
        valid_texts(limits),
        bad,
        st.integers(0, 3),
    )
    too_many = st.just(list(CAPTIONS) * (limits.max_texts // len(CAPTIONS) + 1))
    return st.one_of(one_bad, too_many, st.lists(bad, min_size=1, max_size=3))


@st.composite
def _explain(
    draw: st.DrawFn, catalog: Catalog, limits: TextLimits, methods: list[str]
) -> vitlens_pb2.ExplainRequest:
    mut = draw(mutations(("model", "images", "texts", "method", "target", "method_options")))
    method = mut.draw(
        draw, "method", st.sampled_from(["", *methods]), odd_names([*methods, *catalog.methods])
    )
    texts = mut.draw(draw, "texts", st.one_of(st.just([]), valid_texts(limits)),
                     hostile_texts(limits))  # fmt: skip
    request = vitlens_pb2.ExplainRequest(
        model=mut.draw(draw, "model", st.just(limits.model), st.sampled_from([catalog.model, ""])),
        method=method,
        images=mut.draw(
            draw,
            "images",
            st.lists(valid_images(), min_size=1, max_size=2),
            hostile_image_lists(catalog),
        ),
        texts=texts,
        options=vitlens_pb2.ExplainOptions(
            grid=draw(st.sampled_from([0, 1, 2])), return_relevance=draw(st.booleans())
        ),
    )
    # With texts every text is explained (a target is refused); without, the label prompts.
    if mut.allows("target") or not texts:
        target = draw(targets(len(request.images), catalog, mut.allows("target")))
        if target is not None:
            request.target.CopyFrom(target)
    if mut.allows("method_options"):
        params = catalog.methods.get(method or "generic", ())
        request.options.method_options.CopyFrom(draw(option_structs(params, catalog, hostile=True)))
    return request


@st.composite
def _predict(draw: st.DrawFn, catalog: Catalog, limits: TextLimits) -> vitlens_pb2.PredictRequest:
    mut = draw(mutations(("model", "prompts", "top_k")))
    prompts = mut.draw(draw, "prompts", st.one_of(st.just([]), valid_texts(limits)),
                       hostile_texts(limits))  # fmt: skip
    top_k = mut.draw(draw, "top_k", st.integers(0, 3), st.sampled_from([2**31, 2**32 - 1]))
    return vitlens_pb2.PredictRequest(
        model=mut.draw(draw, "model", st.just(limits.model), st.sampled_from([catalog.model, ""])),
        images=draw(st.lists(valid_images(), min_size=1, max_size=2)),
        prompts=prompts,
        top_k=top_k,
    )


def image_text_explain_requests(
    catalog: Catalog, limits: TextLimits, methods: list[str]
) -> st.SearchStrategy[Shown[vitlens_pb2.ExplainRequest]]:
    """Explain on the image-text model (``methods`` are its own), sometimes on the classifier."""
    return _explain(catalog, limits, methods).map(Shown)


def image_text_predict_requests(
    catalog: Catalog, limits: TextLimits
) -> st.SearchStrategy[Shown[vitlens_pb2.PredictRequest]]:
    return _predict(catalog, limits).map(Shown)
