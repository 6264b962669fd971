"""Sanity check (Adebayo et al. 2018) on the shipped demo model: class-sensitive methods must
depend on the learned weights — their maps decorrelate from a weight-randomised copy's."""

from __future__ import annotations

import pytest

from tests.report import report
from vitlens_server.data import render_scene, split_seeds
from vitlens_server.evaluate import Summary, randomised_copy, sanity_correlations
from vitlens_server.explain import METHODS, Explainer
from vitlens_server.models import load_model
from vitlens_server.models.default import DEMO_WEIGHTS, demo_spec

pytestmark = pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="no demo weights shipped")

SCENES = 50
# Token reflection classifies gh·gw = 196 masked images per scene and model (≈ 11 s a scene for
# both models on one core); 10 scenes keep it inside the suite's time budget.
SCENES_FOR = {"token_reflection": 10}
CLASS_SENSITIVE = [s.name for s in METHODS.specs() if s.class_specific and not s.needs_mask]


@pytest.fixture(scope="module")
def explainers() -> tuple[Explainer, Explainer]:
    model = load_model(demo_spec())
    assert not model.weights.random
    return Explainer(model), Explainer(randomised_copy(model))


@pytest.fixture(scope="module")
def scenes() -> list:
    return [render_scene(seed) for seed in split_seeds("test", SCENES)]


@pytest.mark.parametrize("method", CLASS_SENSITIVE)
def test_maps_decorrelate_from_a_randomised_model(explainers, scenes, method: str) -> None:
    trained, randomised = explainers
    scenes = scenes[: SCENES_FOR.get(method, SCENES)]
    rho = Summary.of(sanity_correlations(trained, randomised, method, scenes))
    report(
        "sanity: Spearman rho, trained vs randomised weights",
        f"{method:24s} {rho.mean:+.3f} ± {rho.ci95:.3f}  ({rho.n} scenes)",
    )
    assert rho.mean < 0.5, f"{method}: rho {rho.mean:.3f} (n={rho.n})"
