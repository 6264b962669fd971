"""Sanity check (Adebayo et al. 2018) on the shipped demo model: class-sensitive methods must
depend on the learned weights — their maps decorrelate from a weight-randomised copy's."""

from __future__ import annotations

import pytest

from tests.report import report
from vitlens_server.evaluate import (
    LocalCalls,
    SyntheticDataset,
    plan_evaluation,
    randomised_copy,
    run_evaluation,
)
from vitlens_server.explain import METHODS, Explainer
from vitlens_server.models import LoadedModel, load_model
from vitlens_server.models.default import DEMO_WEIGHTS, demo_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="no demo weights shipped"),
]

SCENES = 50
# Token reflection classifies gh·gw = 196 masked images per scene and model (≈ 11 s a scene for
# both models on one core); 10 scenes keep it inside the suite's time budget.
SCENES_FOR = {"token_reflection": 10}
CLASS_SENSITIVE = [s.name for s in METHODS.specs() if s.class_specific and not s.needs_mask]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    model = load_model(demo_spec())
    assert not model.weights.random
    return model


@pytest.fixture(scope="module")
def calls(model) -> LocalCalls:
    return LocalCalls(Explainer(model), randomised=Explainer(randomised_copy(model)))


@pytest.mark.parametrize("method", CLASS_SENSITIVE)
def test_maps_decorrelate_from_a_randomised_model(model, calls, method: str) -> None:
    """Evaluate's ``sanity`` metric, in process: the maps of the trained model's prediction."""
    (result,) = run_evaluation(
        plan_evaluation([method], ["sanity"]),
        SyntheticDataset(SCENES_FOR.get(method, SCENES)),
        calls,
        input_size=model.geometry.input_size[1:],
        grid=model.geometry.grid,
        num_classes=model.geometry.num_classes,
    )
    rho = result.values["spearman"]
    report(
        "sanity: Spearman rho, trained vs randomised weights",
        f"{method:24s} {rho.mean:+.3f} ± {rho.ci95:.3f}  ({rho.n} scenes)",
    )
    assert rho.mean < 0.5, f"{method}: rho {rho.mean:.3f} (n={rho.n})"
