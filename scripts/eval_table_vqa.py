"""What scripts/eval_table.py does differently for a visual question answering model.

A VQA model (GetModel's task ``visual_question_answering``) is scored on one part, ``vqa``:
``synthetic_vqa:BLOCK:START`` held-out scenes with a generated question each, metrics
`VQA_METRICS` (docs/vqa_models.md, "Evaluate"), methods `VQA_METHODS`: the bi-modal methods,
the ``random`` floor, and `ALIASES`, rows that send a served method with fixed options and are
reported under their own name (``generic+lrp``: ``generic`` with ``averaging=lrp``, seed 003
Eq. 13). A request names each method once, so a block whose rows share a served method runs as
several Evaluate calls (`evaluate_calls`) whose results are joined under the row names.

The orderings checked (`vqa_orderings`) are seed 003's §4 (Figs. 3 and 5):

- every model: every explanation method's positive-perturbation AUC is below that of ``random``
  on each modality (removing its most relevant tokens first hurts more than removing random
  ones);
- two-stream co-attention models (LXMERT, Fig. 3 a, b): ``generic`` has the lowest image
  positive AUC and the highest image negative AUC of the other methods (every row but
  ``random`` and generic's own variants);
- the same models' text perturbation (Fig. 3 c, d: "very similar results" for both methods):
  ``generic`` is *near* ``transformer_attribution``, meaning their 95 % intervals overlap
  (the difference of the means is within the sampling error of the two runs), positive and
  negative AUC each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vitlens.evaluation import EvaluationResult, Statistic

__all__ = [
    "ALIASES",
    "VQA_METHODS",
    "VQA_METRICS",
    "VQA_PARTS",
    "evaluate_calls",
    "served_method",
    "summary_table",
    "vqa_orderings",
]

VQA_METRICS = ("perturbation_image", "perturbation_text", "segmentation")
VQA_PARTS = {"vqa": ("synthetic_vqa:{size}:{start}", VQA_METRICS)}
# row name -> (served method, its method options)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"generic+lrp": ("generic", {"averaging": "lrp"})}
VQA_METHODS = (
    "random", "raw_attention", "rollout", "partial_lrp", "transformer_attribution", "gradcam",
    "generic", "generic+lrp",
)  # fmt: skip
RANDOM, GENERIC, ATTRIBUTION = "random", "generic", "transformer_attribution"
_MODALITIES = ("image", "text")


def served_method(row: str) -> str:
    """The method a table row sends (``generic+lrp`` -> ``generic``)."""
    return ALIASES[row][0] if row in ALIASES else row


def evaluate_calls(rows: Sequence[str]) -> list[tuple[list[str], dict[str, dict[str, Any]]]]:
    """``rows`` as Evaluate calls, each naming a served method at most once (first fit, in
    row order): per call its rows and the method options keyed by served method."""
    calls: list[list[str]] = []
    for row in rows:
        for call in calls:
            if served_method(row) not in {served_method(r) for r in call}:
                call.append(row)
                break
        else:
            calls.append([row])
    return [
        (call, {ALIASES[r][0]: dict(ALIASES[r][1]) for r in call if r in ALIASES}) for call in calls
    ]


def summary_table(result: EvaluationResult, rows: Sequence[str]) -> list[str]:
    """A Markdown table: per row the image and text AUCs (positive lower is better, negative
    higher) and the segmentation IoU, each mean ± 95 % half-width; "—" where not run."""
    columns = [
        ("image P-AUC ↓", "perturbation_image", "positive_auc"),
        ("image N-AUC ↑", "perturbation_image", "negative_auc"),
        ("text P-AUC ↓", "perturbation_text", "positive_auc"),
        ("text N-AUC ↑", "perturbation_text", "negative_auc"),
        ("IoU ↑", "segmentation", "iou"),
    ]
    shown = [c for c in columns if any(_stat(result, r, c[1], c[2]) for r in rows)]
    if not shown:
        return []
    lines = [
        "| method | " + " | ".join(c[0] for c in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for _, metric, name in shown:
            value = _stat(result, row, metric, name)
            digits = 3 if metric == "segmentation" else 1
            cells.append("—" if value is None else _pm(value, digits))
        lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def vqa_orderings(
    result: EvaluationResult, rows: Sequence[str], stream_architecture: str
) -> list[str]:
    """The module docstring's orderings as README lines, each "holds" or "does not hold" with
    its numbers (mean [95 % interval])."""
    lines = [
        "VQA (seed 003 §4, Figs. 3 and 5; AUCs x100 of accuracy over the fraction of a "
        "modality's tokens removed). *Near* means the two 95 % intervals overlap.",
        "",
    ]

    def check(text: str, holds: bool) -> None:
        lines.append(f"- {'holds' if holds else '**does not hold**'}: {text}")

    methods = [r for r in rows if r != RANDOM]
    for modality in _MODALITIES:
        metric = f"perturbation_{modality}"
        floor = _stat(result, RANDOM, metric, "positive_auc")
        if floor is None:
            continue
        for row in methods:
            value = _stat(result, row, metric, "positive_auc")
            if value is None:
                continue
            apart = (
                "95 % intervals apart" if value.ci95_high < floor.ci95_low else "intervals overlap"
            )
            check(
                f"{modality} positive perturbation AUC of {row} {_ci(value)} < random "
                f"{_ci(floor)} ({apart})",
                value.mean < floor.mean,
            )
    if stream_architecture != "two_stream":
        lines.append(
            f"- the two-stream orderings (seed 003 Fig. 3, LXMERT: generic best on image "
            f"perturbation, near transformer_attribution on text) do not apply: this model is "
            f"{stream_architecture or 'not a two-stream model'}"
        )
        return [*lines, ""]
    others = [r for r in methods if served_method(r) != GENERIC]
    for name, lowest in (("positive_auc", True), ("negative_auc", False)):
        mine = _stat(result, GENERIC, "perturbation_image", name)
        theirs = {r: v for r in others if (v := _stat(result, r, "perturbation_image", name))}
        if mine is None or not theirs:
            continue
        pick = min if lowest else max
        rival = pick(theirs, key=lambda r: theirs[r].mean)
        margin = theirs[rival].mean - mine.mean if lowest else mine.mean - theirs[rival].mean
        check(
            f"generic {'lowest' if lowest else 'highest'} image {name.split('_')[0]} "
            f"perturbation AUC, {_ci(mine)}; best of the other methods: {rival} "
            f"{_ci(theirs[rival])}",
            margin > 0,
        )
    for name in ("positive_auc", "negative_auc"):
        mine = _stat(result, GENERIC, "perturbation_text", name)
        theirs = _stat(result, ATTRIBUTION, "perturbation_text", name)
        if mine is None or theirs is None:
            continue
        overlap = mine.ci95_low <= theirs.ci95_high and theirs.ci95_low <= mine.ci95_high
        check(
            f"generic near transformer_attribution on text {name.split('_')[0]} perturbation: "
            f"{_ci(mine)} vs {_ci(theirs)}, difference {mine.mean - theirs.mean:+.1f}",
            overlap,
        )
    return [*lines, ""]


def _stat(result: EvaluationResult, method: str, metric: str, name: str) -> Statistic | None:
    """The merged statistic, or None where it was not run."""
    try:
        return result.get(method, metric).value(name)
    except KeyError:
        return None


def _ci(value: Statistic) -> str:
    return f"{value.mean:.1f} [{value.ci95_low:.1f}, {value.ci95_high:.1f}]"


def _pm(value: Statistic, digits: int) -> str:
    return f"{value.mean:.{digits}f} ± {(value.ci95_high - value.ci95_low) / 2:.{digits}f}"
