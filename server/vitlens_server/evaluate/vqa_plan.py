"""An Evaluate request on a visual question answering model, parsed once, and its dataset.

Methods are the bi-modal methods (`explain.bimodal.BIMODAL_METHODS`, with Explain's options:
generic's ``averaging``) and the reference row ``random`` (U[0, 1) relevance on every text and
image token, drawn from the method's ``seed`` and the item's place in the dataset, so the table
has a floor). The ``oracle`` row of image models is not offered: a question's mask has no text
relevance, and as an image map it scores itself. Metrics are `VQA_METRICS` (registered by
`evaluate.vqa_run`).

The dataset is ``synthetic_vqa:N[:seed]``: the held-out "test" scenes ``seed .. seed + N - 1``
with one generated question each (`training.vqa_data.held_out`: crisp scenes at the model's
input size, one and two objects alternating, the question kinds cycled), rendered chunk by
chunk. The ground-truth answers are matched to the model's answers by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitlens_server.data import SPLIT_STRIDE
from vitlens_server.data.questions import ANSWERS
from vitlens_server.errors import FailedPrecondition, InvalidArgument, clip
from vitlens_server.explain.bimodal import BIMODAL_METHODS, BimodalMethod
from vitlens_server.explain.methods.reference import RandomParams
from vitlens_server.explain.params import NoParams, parse_params
from vitlens_server.training.vqa_data import QuestionBatch, held_out

if TYPE_CHECKING:
    from vitlens_server.evaluate.vqa_run import VqaChunk

__all__ = [
    "RANDOM",
    "SYNTHETIC_VQA",
    "VQA_METHODS",
    "VQA_METRICS",
    "SyntheticVqaDataset",
    "VqaMetricSpec",
    "VqaPlan",
    "VqaPlannedMethod",
    "VqaPlannedMetric",
    "answer_indices",
    "parse_synthetic_vqa",
    "plan_vqa_evaluation",
    "register_vqa_metric",
]

RANDOM = "random"
VQA_METHODS = (*BIMODAL_METHODS, RANDOM)
SYNTHETIC_VQA = "synthetic_vqa"
_FORM = (
    f"dataset.synthetic must be {SYNTHETIC_VQA}:N[:seed] for VQA models, N and seed whole numbers "
    f"with 1 ≤ N and 0 ≤ seed, N + seed ≤ {SPLIT_STRIDE:,}"
)
_DIGITS = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class VqaMetricSpec:
    """A registered VQA metric: ``fn(chunk, options) -> Scores``, its options dataclass."""

    name: str
    fn: Callable[[VqaChunk, Any], Any]
    options: type
    description: str


VQA_METRICS: dict[str, VqaMetricSpec] = {}


def register_vqa_metric(name: str, *, description: str, options: type = NoParams) -> Callable:
    """Decorator adding a VQA metric to `VQA_METRICS`; a name registered twice is an error."""

    def add(fn: Callable) -> Callable:
        if name in VQA_METRICS:
            raise ValueError(f"VQA metric {name!r} is registered twice")
        VQA_METRICS[name] = VqaMetricSpec(name, fn, options, description)
        return fn

    return add


@dataclass(frozen=True)
class VqaPlannedMethod:
    """A method of the plan: the bi-modal method (None for ``random``) and its parameters."""

    name: str
    method: BimodalMethod | None
    params: Any


@dataclass(frozen=True)
class VqaPlannedMetric:
    name: str
    spec: VqaMetricSpec
    options: Any


@dataclass(frozen=True)
class VqaPlan:
    """Every method x every metric over chunks of ``chunk_size`` items; ``explain_label``:
    explain the ground-truth answer instead of the model's prediction."""

    methods: tuple[VqaPlannedMethod, ...]
    metrics: tuple[VqaPlannedMetric, ...]
    explain_label: bool = False
    chunk_size: int = 32


def plan_vqa_evaluation(
    methods: Sequence[str],
    metrics: Sequence[str],
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    explain_label: bool = False,
    *,
    method_params: Callable[[str], type],
    model: str = "",
    chunk_size: int = 32,
) -> VqaPlan:
    """Validate a request on VQA model ``model``; `InvalidArgument` by field for every mistake.

    ``method_params``: a bi-modal method's options dataclass, as Explain parses them
    (`runtime.vqa`); ``random`` takes `RandomParams`.
    """
    method_options, metric_options = method_options or {}, metric_options or {}
    if not methods or not metrics:
        raise InvalidArgument(
            "name at least one method and one metric", field="methods" if not methods else "metrics"
        )
    _check_names("metrics", metrics, tuple(VQA_METRICS), model)
    _check_names("methods", methods, VQA_METHODS, model)
    for kind, given, requested in (
        ("method_options", method_options, methods),
        ("metric_options", metric_options, metrics),
    ):
        stray = [name for name in given if name not in requested]
        if stray:
            what = kind.split("_")[0]
            raise InvalidArgument(
                f"{kind} names {_names(stray)}, which the request does not evaluate; give "
                f"options only for the {what}s named in {what}s",
                field=kind,
            )
    planned = []
    for name in methods:
        params = RandomParams if name == RANDOM else method_params(name)
        where = f"method_options[{name}]"
        parsed = parse_params(params, method_options.get(name, {}), method=name, field=where)
        planned.append(VqaPlannedMethod(name, BIMODAL_METHODS.get(name), parsed))
    scored = []
    for name in metrics:
        spec, where = VQA_METRICS[name], f"metric_options[{name}]"
        options = metric_options.get(name, {})
        parsed = parse_params(spec.options, options, method=name, kind="metric", field=where)
        scored.append(VqaPlannedMetric(name, spec, parsed))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return VqaPlan(tuple(planned), tuple(scored), explain_label, chunk_size)


def _check_names(kind: str, names: Sequence[str], valid: Sequence[str], model: str) -> None:
    """Every name one of ``valid``, none repeated; else INVALID_ARGUMENT naming ``kind``."""
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise InvalidArgument(
            f"{kind} {_names(unknown)} do not apply to VQA model {model!r}; its {kind}: "
            f"{', '.join(valid)}",
            field=kind,
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise InvalidArgument(f"{kind} {_names(repeated)} are named more than once", field=kind)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(clip(n, 60) for n in names[:5])
    more = f", … {len(names) - 5} more" if len(names) > 5 else ""
    return f"[{shown}{more}]"


class SyntheticVqaDataset:
    """``count`` held-out scenes with a question each, rendered at ``size`` px on demand."""

    def __init__(self, count: int, seed: int = 0, *, size: int) -> None:
        if count < 1 or seed < 0 or count + seed > SPLIT_STRIDE:
            raise ValueError(f"need 1 <= count, 0 <= seed, count + seed <= {SPLIT_STRIDE}")
        self.count, self.seed, self.size = count, seed, size
        self.name = f"{SYNTHETIC_VQA}:{count}:{seed}"

    def __len__(self) -> int:
        return self.count

    def limited(self, limit: int) -> SyntheticVqaDataset:
        """The first ``limit`` items (0: all)."""
        count = min(limit, self.count) if limit else self.count
        return SyntheticVqaDataset(count, self.seed, size=self.size)

    def chunk(self, first: int, count: int) -> QuestionBatch:
        """Items ``first .. first + count - 1``: (count, S, S, 3) uint8 images, questions,
        answers (indices into `ANSWERS`), scenes."""
        if first < 0 or count < 1 or first + count > self.count:
            raise IndexError(f"items {first}..{first + count - 1} of {self.count}")
        return held_out("test", self.seed + first, count, size=self.size)


def parse_synthetic_vqa(text: str, size: int) -> SyntheticVqaDataset:
    """``synthetic_vqa:N[:seed]`` at ``size`` px; anything else is INVALID_ARGUMENT."""
    return SyntheticVqaDataset(*count_and_seed(text, SYNTHETIC_VQA, _FORM), size=size)


def count_and_seed(text: str, prefix: str, form: str) -> tuple[int, int]:
    """(N, seed) of ``PREFIX:N[:seed]``, held-out seeds in range; else INVALID_ARGUMENT on
    ``dataset.synthetic`` saying ``form``."""
    head, _, rest = text.partition(":")
    parts = rest.split(":")
    if head != prefix or not 1 <= len(parts) <= 2:
        raise InvalidArgument(f"{form}; got {clip(text)}", field="dataset.synthetic")
    if not all(_DIGITS.fullmatch(part) for part in parts):
        raise InvalidArgument(f"{form}; got {clip(text)}", field="dataset.synthetic")
    count, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if count < 1 or count + seed > SPLIT_STRIDE:
        raise InvalidArgument(
            f"{form}; got N = {count:,}, seed = {seed:,}", field="dataset.synthetic"
        )
    return count, seed


def answer_indices(labels: Sequence[str], model: str) -> Tensor:
    """(len(ANSWERS),) long: the model's index of each generated answer; FAILED_PRECONDITION
    if the model cannot give some of them."""
    index = {label: i for i, label in enumerate(labels)}
    missing = [a for a in ANSWERS if a not in index]
    if missing:
        raise FailedPrecondition(
            f"{SYNTHETIC_VQA} questions are answered with {', '.join(ANSWERS)}; VQA model "
            f"{model!r} cannot answer {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"
            " (its answers: ModelInfo.labels), so it cannot be scored on them"
        )
    return torch.tensor([index[a] for a in ANSWERS])
