"""Explanation methods and the engine that runs them. Never imports grpc."""

from vitlens_server.domain import ExplainResult, Predictions, TargetSpec
from vitlens_server.explain import methods as _methods  # noqa: F401  (registers the methods)
from vitlens_server.explain.batch import ExplainJob
from vitlens_server.explain.engine import Explainer
from vitlens_server.explain.passes import Interrupted
from vitlens_server.explain.registry import METHODS, Cost, MethodSpec, Pass, get_method

__all__ = [
    "METHODS",
    "Cost",
    "ExplainJob",
    "ExplainResult",
    "Explainer",
    "Interrupted",
    "MethodSpec",
    "Pass",
    "Predictions",
    "TargetSpec",
    "get_method",
]
