"""Fuzz strategies for whole requests: Explain, Predict, Evaluate (datasets, inline samples,
option maps), raw bytes, and `Shown`, the short repr of a failing example."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.rpc.fuzz.basics import (
    UINT32_MAX,
    UNKNOWN_ENUMS,
    Catalog,
    Param,
    Shown,
    mutations,
    odd_names,
    option_structs,
)
from tests.rpc.fuzz.images import (
    hostile_image_lists,
    hostile_tensors,
    images,
    valid_images,
)
from vitlens.v1 import tensor_pb2, vitlens_pb2

M = TypeVar("M", bound=Message)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# --------------------------------------------------------------------------- Explain, Predict


def _class_indices(catalog: Catalog, hostile: bool) -> st.SearchStrategy[int]:
    valid = st.integers(0, catalog.num_classes - 1)
    if not hostile:
        return valid
    edges = st.sampled_from([-1, catalog.num_classes, INT32_MIN, INT32_MAX])
    return st.one_of(valid, edges, st.integers(INT32_MIN, INT32_MAX))


def _top_k(catalog: Catalog, hostile: bool) -> st.SearchStrategy[int]:
    valid = st.integers(0, catalog.num_classes)  # 0: the server's default
    if not hostile:
        return valid
    return st.one_of(valid, st.sampled_from([2**31, UINT32_MAX]), st.integers(0, UINT32_MAX))


@st.composite
def targets(
    draw: st.DrawFn, num_images: int, catalog: Catalog, hostile: bool
) -> vitlens_pb2.Target | None:
    """Unset, predicted, one class, one per image or top-k; when ``hostile``, indices out of
    range, lists of the wrong length, k of 0 or 2³² - 1."""
    kind = draw(st.sampled_from(["unset", "predicted", "class_index", "per_image", "top_k"]))
    index = _class_indices(catalog, hostile)
    if kind == "unset":
        return None
    if kind == "predicted":
        return vitlens_pb2.Target(predicted=draw(st.booleans()))
    if kind == "class_index":
        return vitlens_pb2.Target(class_index=draw(index))
    if kind == "per_image":
        length = st.integers(0, num_images + 2) if hostile else st.just(num_images)
        indices = draw(st.lists(index, min_size=(n := draw(length)), max_size=n))
        return vitlens_pb2.Target(per_image=vitlens_pb2.ClassIndices(indices=indices))
    k = st.integers(1, catalog.num_classes)
    if hostile:
        k = st.one_of(k, st.sampled_from([0, catalog.num_classes + 1, UINT32_MAX]))
    return vitlens_pb2.Target(top_k=draw(k))


EXPLAIN_FIELDS = (
    "model",
    "method",
    "images",
    "target",
    "grid",
    "output_dtype",
    "top_k_predictions",
    "method_options",
)


@st.composite
def _explain_requests(draw: st.DrawFn, catalog: Catalog) -> vitlens_pb2.ExplainRequest:
    mut = draw(mutations(EXPLAIN_FIELDS))
    images_ = mut.draw(
        draw,
        "images",
        st.lists(valid_images(), min_size=1, max_size=2),
        hostile_image_lists(catalog),
    )
    method = mut.draw(
        draw,
        "method",
        st.sampled_from(["", *catalog.method_names]),
        odd_names(catalog.method_names),
    )
    output_dtypes = [0, tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16]
    options = vitlens_pb2.ExplainOptions(
        grid=mut.draw(draw, "grid", st.sampled_from([0, 1]), st.sampled_from(UNKNOWN_ENUMS)),
        return_relevance=draw(st.booleans()),
        output_dtype=mut.draw(
            draw,
            "output_dtype",
            st.sampled_from(output_dtypes),
            st.sampled_from([tensor_pb2.DTYPE_UINT8, *UNKNOWN_ENUMS]),
        ),
        top_k_predictions=draw(_top_k(catalog, mut.allows("top_k_predictions"))),
    )
    if draw(st.booleans()):
        params = catalog.methods.get(method or "generic", ())
        hostile = mut.allows("method_options")
        options.method_options.CopyFrom(draw(option_structs(params, catalog, hostile=hostile)))
    request = vitlens_pb2.ExplainRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        method=method,
        images=images_,
        options=options,
    )
    target = draw(targets(len(images_), catalog, mut.allows("target")))
    if target is not None:
        request.target.CopyFrom(target)
    return request


@st.composite
def _predict_requests(draw: st.DrawFn, catalog: Catalog) -> vitlens_pb2.PredictRequest:
    mut = draw(mutations(("model", "images", "top_k")))
    return vitlens_pb2.PredictRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        images=mut.draw(
            draw,
            "images",
            st.lists(valid_images(), min_size=1, max_size=2),
            hostile_image_lists(catalog),
        ),
        top_k=draw(_top_k(catalog, mut.allows("top_k"))),
    )


# --------------------------------------------------------------------------- Evaluate

# Dataset specs the parser must refuse (or, for the large valid counts, the deadline must stop).
ODD_SYNTHETIC = (
    "",
    "synthetic:",
    "synthetic:0",
    "synthetic:-1",
    "synthetic:x",
    "synthetic:1:2:3",
    "synthetic:1:-1",
    "synthetic:1.5",
    "synthetic:1e3",
    "synthetic: 1",
    "synthetic:1_0",
    "synthetic:٣",
    "synthetic:1:two_object:two_object",
    "two_object",
    "synthetic:5000000",
    "synthetic:100000000",
    "synthetic:1:100000000",
    "synthetic:99999999999999999999999",
)


def valid_synthetic() -> st.SearchStrategy[str]:
    """``synthetic:N[:seed][:two_object]`` with N of 1 or 2 (the prefix is optional)."""
    return st.builds(
        lambda prefix, n, seed, two: f"{prefix}{n}{'' if seed is None else f':{seed}'}{two}",
        st.sampled_from(["synthetic:", ""]),
        st.integers(1, 2),
        st.one_of(st.none(), st.integers(0, 50)),
        st.sampled_from(["", ":two_object"]),
    )


def odd_server_paths(root: Path) -> st.SearchStrategy[str]:
    """Paths that are not a usable dataset or must not escape the root: relative, ``..``,
    NUL, overlong, symlinks out, files, missing, and folders of the test tree that are broken
    (see test_fuzz's ``build_dataset_tree``)."""
    r = str(root)
    return st.one_of(
        st.sampled_from(
            [
                f"{r}/voc",
                f"{r}/escape",
                f"{r}/corrupt",
                f"{r}/badlabel",
                r,
                "",
                "folder",
                "./folder",
                "..",
                f"{r}/../{root.name}/folder",
                f"{r}/..",
                f"{r}/folder/../../..",
                f"{r}/folder\x00",
                f"{r}/\x00/folder",
                f"{r}/{'a' * 300}",
                f"{r}/{'a/' * 3000}",
                "/",
                "/etc",
                "/proc/self/root",
                f"{r}/link_out",
                f"{r}/missing",
                f"{r}/file.txt",
                f"{r}/empty",
                f"{r}/folder/c0/a.png",
                "~",
                f"//{r}/folder",
                f"file://{r}/folder",
            ]
        ),
        st.text(max_size=16),
    )


@st.composite
def masks(draw: st.DrawFn, height: int, width: int, hostile: bool) -> tensor_pb2.Tensor:
    """A (H, W) uint8 mask; when ``hostile``, one of the wrong size, rank or dtype too."""
    kinds = ["match", "size", "hw1", "float", "tensor"] if hostile else ["match"]
    kind = draw(st.sampled_from(kinds))
    if kind == "tensor":
        return draw(hostile_tensors())
    if kind == "size":
        height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (height, width, 1) if kind == "hw1" else (height, width)
    if kind == "float":
        values = np.asarray(rng.random(shape), dtype="<f4")
        return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape, data=values.tobytes())
    mask = rng.integers(0, 2, shape, dtype=np.uint8)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=shape, data=mask.tobytes())


@st.composite
def inline_samples(
    draw: st.DrawFn, catalog: Catalog, with_mask: bool, hostile: bool
) -> vitlens_pb2.Sample:
    """A sample of a pixel image with its label and, ``with_mask``, its mask; when
    ``hostile``, any image, labels out of range and masks that do not fit."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = tensor_pb2.Image(
        pixels=tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes()
        )
    )
    if hostile:
        image = draw(st.one_of(st.just(image), images()))
    sample = vitlens_pb2.Sample(image=image, label=draw(_class_indices(catalog, hostile)))
    if with_mask or (hostile and draw(st.booleans())):
        sample.mask.CopyFrom(draw(masks(height, width, hostile)))
    return sample


@st.composite
def valid_datasets(draw: st.DrawFn, catalog: Catalog, root: Path) -> vitlens_pb2.Dataset:
    kind = draw(st.sampled_from(["synthetic", "inline", "server_path"]))
    limit = draw(st.integers(0, 2))
    if kind == "synthetic":
        return vitlens_pb2.Dataset(synthetic=draw(valid_synthetic()), limit=limit)
    if kind == "server_path":
        return vitlens_pb2.Dataset(server_path=f"{root}/folder", limit=limit)
    with_mask = draw(st.booleans())
    samples = draw(st.lists(inline_samples(catalog, with_mask, False), min_size=1, max_size=2))
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples), limit=limit)


@st.composite
def hostile_datasets(draw: st.DrawFn, catalog: Catalog, root: Path) -> vitlens_pb2.Dataset | None:
    kind = draw(st.sampled_from(["synthetic", "inline", "server_path", "unset"]))
    limit = draw(st.one_of(st.integers(0, 2), st.just(UINT32_MAX)))
    if kind == "unset":
        return vitlens_pb2.Dataset(limit=limit) if limit else None
    if kind == "synthetic":
        spec = st.one_of(st.sampled_from(ODD_SYNTHETIC), st.text(max_size=16))
        return vitlens_pb2.Dataset(synthetic=draw(spec), limit=limit)
    if kind == "server_path":
        return vitlens_pb2.Dataset(server_path=draw(odd_server_paths(root)), limit=limit)
    some = st.lists(inline_samples(catalog, False, True), max_size=3)
    many = st.builds(  # copies of one sample: 1x1 images over and under an inline bound
        lambda sample, n: [sample] * n,
        inline_samples(catalog, False, False),
        st.sampled_from([300, 5000]),
    )
    samples = draw(st.one_of(some, many))
    return vitlens_pb2.Dataset(inline=vitlens_pb2.InlineDataset(samples=samples), limit=limit)


EVALUATE_FIELDS = ("model", "methods", "metrics", "dataset", "method_options", "metric_options")


@st.composite
def _option_maps(
    draw: st.DrawFn,
    table: Mapping[str, tuple[Param, ...]],
    requested: Sequence[str],
    catalog: Catalog,
    hostile: bool,
) -> dict[str, struct_pb2.Struct]:
    """Options keyed by requested names; when ``hostile``, also by unrequested or unknown
    names, with hostile values."""
    keys = st.sampled_from(list(requested)) if requested else st.nothing()
    if hostile:
        keys = st.one_of(keys, st.sampled_from(sorted(table)), odd_names(sorted(table)))
    elif not requested:
        return {}
    chosen = draw(st.lists(keys, max_size=2, unique=True))
    return {
        key: draw(option_structs(table.get(key, ()), catalog, hostile=hostile)) for key in chosen
    }


@st.composite
def _evaluate_requests(
    draw: st.DrawFn, catalog: Catalog, root: Path
) -> vitlens_pb2.EvaluateRequest:
    mut = draw(mutations(EVALUATE_FIELDS))

    def name_lists(valid: list[str], field: str) -> list[str]:
        good = st.lists(st.sampled_from(valid), min_size=1, max_size=2, unique=True)
        bad = st.lists(st.one_of(st.sampled_from(valid), odd_names(valid)), max_size=3)
        return mut.draw(draw, field, good, bad)

    methods = name_lists(catalog.method_names, "methods")
    metrics = name_lists(catalog.metric_names, "metrics")
    request = vitlens_pb2.EvaluateRequest(
        model=mut.draw(
            draw, "model", st.sampled_from([catalog.model, ""]), odd_names([catalog.model])
        ),
        methods=methods,
        metrics=metrics,
        explain_label=draw(st.booleans()),
    )
    dataset = mut.draw(
        draw, "dataset", valid_datasets(catalog, root), hostile_datasets(catalog, root)
    )
    if dataset is not None:
        request.dataset.CopyFrom(dataset)
    method_options = _option_maps(catalog.methods, methods, catalog, mut.allows("method_options"))
    for key, options in draw(method_options).items():
        request.method_options[key].CopyFrom(options)
    metric_options = _option_maps(catalog.metrics, metrics, catalog, mut.allows("metric_options"))
    for key, options in draw(metric_options).items():
        request.metric_options[key].CopyFrom(options)
    return request


def explain_requests(catalog: Catalog) -> st.SearchStrategy[Shown[vitlens_pb2.ExplainRequest]]:
    return _explain_requests(catalog).map(Shown)


def predict_requests(catalog: Catalog) -> st.SearchStrategy[Shown[vitlens_pb2.PredictRequest]]:
    return _predict_requests(catalog).map(Shown)


def evaluate_requests(
    catalog: Catalog, root: Path
) -> st.SearchStrategy[Shown[vitlens_pb2.EvaluateRequest]]:
    return _evaluate_requests(catalog, root).map(Shown)
