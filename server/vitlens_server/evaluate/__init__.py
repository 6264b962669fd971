"""Quality metrics of explanations (METHODS.md "Metrics"). Never imports grpc.

A request becomes an `EvaluationPlan` once (`plan_evaluation`); `run_evaluation` runs it over a
dataset of `Sample`s through `ModelCalls` (`LocalCalls` in process). Metrics are registered
functions (`register_metric`, the `METRICS` table), importing this package registers them.
VQA models have their own plan, metrics and run (`vqa_plan`, `VQA_METRICS`, `vqa_run`).
"""

from vitlens_server.evaluate.class_sensitivity import class_sensitivity
from vitlens_server.evaluate.context import MetricContext, ModelCalls, method_maps, resized
from vitlens_server.evaluate.datasets import (
    FolderDataset,
    Sample,
    SyntheticDataset,
    VOCFolder,
    open_server_path,
    parse_synthetic,
    resolve_allowed,
)
from vitlens_server.evaluate.faithfulness import average_drop, deletion, insertion, perturbation
from vitlens_server.evaluate.local import LocalCalls, ZeroShotLocalCalls
from vitlens_server.evaluate.perturbation import (
    CHEFER_STEPS,
    CausalCurve,
    average_drop_increase,
    blur,
    deletion_curve,
    inpaint,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    removal_ranks,
)
from vitlens_server.evaluate.plan import (
    EvaluationPlan,
    PlannedMethod,
    PlannedMetric,
    plan_evaluation,
    plan_method,
)
from vitlens_server.evaluate.primitives import (
    auc,
    average_precision,
    iou,
    min_max,
    otsu_masks,
    otsu_thresholds,
    spearman,
    upsample_maps,
)
from vitlens_server.evaluate.registry import (
    METRICS,
    Curve,
    MetricSpec,
    Scores,
    get_metric,
    register_metric,
)
from vitlens_server.evaluate.runner import Cancelled, batch_samples, run_evaluation
from vitlens_server.evaluate.sanity import randomised_copy, sanity
from vitlens_server.evaluate.segmentation import (
    SEGMENTATION_KEYS,
    segmentation,
    segmentation_scores,
    threshold_maps,
)
from vitlens_server.evaluate.vqa_plan import (
    VQA_METRICS,
    SyntheticVqaDataset,
    VqaPlan,
    parse_synthetic_vqa,
    plan_vqa_evaluation,
)
from vitlens_server.evaluate.vqa_run import VqaCalls, VqaLocalCalls, run_vqa_evaluation

__all__ = [
    "CHEFER_STEPS",
    "METRICS",
    "SEGMENTATION_KEYS",
    "VQA_METRICS",
    "Cancelled",
    "CausalCurve",
    "Curve",
    "EvaluationPlan",
    "FolderDataset",
    "LocalCalls",
    "MetricContext",
    "MetricSpec",
    "ModelCalls",
    "PlannedMethod",
    "PlannedMetric",
    "Sample",
    "Scores",
    "SyntheticDataset",
    "SyntheticVqaDataset",
    "VOCFolder",
    "VqaCalls",
    "VqaLocalCalls",
    "VqaPlan",
    "ZeroShotLocalCalls",
    "auc",
    "average_drop",
    "average_drop_increase",
    "average_precision",
    "batch_samples",
    "blur",
    "class_sensitivity",
    "deletion",
    "deletion_curve",
    "get_metric",
    "inpaint",
    "insertion",
    "insertion_curve",
    "iou",
    "method_maps",
    "min_max",
    "open_server_path",
    "otsu_masks",
    "otsu_thresholds",
    "parse_synthetic",
    "parse_synthetic_vqa",
    "perturbation",
    "perturbation_auc",
    "perturbation_curve",
    "plan_evaluation",
    "plan_method",
    "plan_vqa_evaluation",
    "randomised_copy",
    "register_metric",
    "removal_ranks",
    "resized",
    "resolve_allowed",
    "run_evaluation",
    "run_vqa_evaluation",
    "sanity",
    "segmentation",
    "segmentation_scores",
    "spearman",
    "threshold_maps",
    "upsample_maps",
]
