"""An Evaluate result as files people can read: JSON, one PNG per curve, a Markdown report.

Needs matplotlib (``pip install "vitlens[cli]"``), imported only here, with its non-interactive
backend, so the SDK itself stays light.
"""

from __future__ import annotations

import re
from pathlib import Path

from vitlens.evaluation import EvaluationResult

__all__ = ["write_report"]

# What a larger value means, for the report's reading notes.
BETTER = {
    "segmentation": "higher is better",
    "perturbation": "positive_auc: lower is better; negative_auc: higher is better",
    "perturbation_image": "positive_auc: lower is better; negative_auc: higher is better",
    "perturbation_text": "positive_auc: lower is better; negative_auc: higher is better",
    "deletion": "lower is better",
    "insertion": "higher is better",
    "average_drop": "average_drop: lower is better; average_increase: higher is better",
    "class_sensitivity": "higher is better (0: the map ignores which class is explained)",
    "sanity": "lower is better (a map that reads the model changes when its weights are "
    "randomised; Adebayo et al. 2018 pass below 0.5)",
}
X_LABELS = {
    "perturbation": "fraction of pixels removed",
    "perturbation_image": "fraction of image tokens removed",
    "perturbation_text": "fraction of question tokens removed",
    "deletion": "fraction of pixels deleted",
    "insertion": "fraction of pixels inserted",
}


def write_report(result: EvaluationResult, out_dir: Path | str) -> Path:
    """Write ``results.json``, ``<metric>_<curve>.png`` and ``report.md`` into ``out_dir``;
    returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(result.to_json())
    lines = [
        f"# Evaluation of {len({r.method for r in result.results})} methods on {result.dataset}",
        "",
        f"Model `{result.model}`. Each cell: mean ± 95 % confidence half-width over images.",
        "",
    ]
    metrics = list(dict.fromkeys(r.metric for r in result.results))
    for metric in metrics:
        rows = [r for r in result.results if r.metric == metric]
        names = list(dict.fromkeys(v.name for r in rows for v in r.values))
        lines += [f"## {metric}", "", f"_{BETTER.get(metric, '')}_", ""]
        lines.append("| method | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for r in rows:
            cells = []
            for name in names:
                try:
                    v = r.value(name)
                except KeyError:
                    cells.append("—")
                    continue
                cells.append(f"{v.mean:.3f} ± {(v.ci95_high - v.ci95_low) / 2:.3f} (n={v.n})")
            lines.append(f"| `{r.method}` | " + " | ".join(cells) + " |")
        lines.append("")
        for curve_name in dict.fromkeys(c.name for r in rows for c in r.curves):
            figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
            for r in rows:
                for curve in r.curves:
                    if curve.name == curve_name:
                        axes.plot(curve.x, curve.y, marker="o", markersize=3, label=r.method)
            axes.set_xlabel(X_LABELS.get(metric, "x"))
            accuracy = metric.startswith("perturbation")  # VQA: perturbation_image / _text
            axes.set_ylabel("accuracy" if accuracy else "probability")
            axes.set_title(f"{metric}: {curve_name}")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
            figure.tight_layout()
            png = f"{_safe(metric)}_{_safe(curve_name)}.png"
            figure.savefig(out / png)
            plt.close(figure)
            lines += [f"![{metric} {curve_name}]({png})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)
