"""Options of Evaluate's metrics (``metric_options`` of the request, ``--metric-option
METRIC.KEY=VALUE`` on the command line): typed, bounded, documented, checked before a run starts.

Defaults follow the papers: Chefer's perturbation zeroes pixels, RISE deletes towards zeros and
inserts into a blurred image, seed 004's Average Drop keeps the top half of the map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate.perturbation import BASELINES
from vitlens_server.explain.params import NoParams, choice, param, parse_params

__all__ = ["METRIC_OPTIONS", "metric_options"]

_BATCH = "Perturbed images per model call."
_REMOVAL = (
    "What removed pixels become: 'zeros' (black), 'blur' (the pixel of a Gaussian-blurred copy) "
    "or 'inpaint' (filled from the kept pixels around them, so the removed region's shape does "
    "not remain visible)."
)


@dataclass(frozen=True)
class SegmentationOptions:
    threshold: str = choice(
        "otsu", "otsu", "mean", doc="Foreground cut: Otsu's threshold (seed 002) or the map's mean."
    )


@dataclass(frozen=True)
class PerturbationOptions:
    baseline: str = choice("zeros", *BASELINES, doc=_REMOVAL + " Chefer zeroes.")
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class DeletionOptions:
    steps: int = param(16, "K: the curve has K + 1 points, from 0 to all pixels.", low=1, high=1024)
    baseline: str = choice("zeros", *BASELINES, doc=_REMOVAL + " RISE deletes towards zeros.")
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class InsertionOptions:
    steps: int = param(16, "K: the curve has K + 1 points, from 0 to all pixels.", low=1, high=1024)
    baseline: str = choice(
        "blur", "zeros", "blur", doc="The canvas pixels are inserted into; RISE blurs."
    )
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class AverageDropOptions:
    keep: float = param(0.5, "Fraction of pixels kept, most relevant first.", low=0.0, high=1.0)
    batch_size: int = param(64, _BATCH, low=1, high=4096)


METRIC_OPTIONS: dict[str, type] = {
    "segmentation": SegmentationOptions,
    "perturbation": PerturbationOptions,
    "deletion": DeletionOptions,
    "insertion": InsertionOptions,
    "average_drop": AverageDropOptions,
    "class_sensitivity": NoParams,
    "sanity": NoParams,
}


def metric_options(
    metrics: Sequence[str], requested: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Parsed options of every metric in ``metrics``, defaults filled in: name → options object.

    Raises `InvalidArgument` for options of an unknown metric, unknown option names, values of
    the wrong type, outside their range or not among their choices."""
    unknown = sorted(set(requested) - set(METRIC_OPTIONS))
    if unknown:
        raise InvalidArgument(
            f"metric_options name unknown metrics {unknown}; valid: {', '.join(METRIC_OPTIONS)}"
        )
    return {
        metric: parse_params(
            METRIC_OPTIONS[metric], requested.get(metric, {}), method=metric, kind="metric"
        )
        for metric in metrics
    }
