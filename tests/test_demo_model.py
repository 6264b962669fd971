"""The shipped demo weights are what their metadata says they are."""

from __future__ import annotations

import json

import pytest

from vitlens_server.models import load_model
from vitlens_server.models.default import DEMO_LABELS, DEMO_WEIGHTS, demo_spec
from vitlens_server.training import scene_accuracy

pytestmark = pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="no demo weights shipped")


def _metadata() -> dict:
    return json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())


def test_weights_file_is_small_and_described() -> None:
    sidecar = _metadata()
    assert DEMO_WEIGHTS.stat().st_size <= 25_000_000
    assert sidecar["labels"] == list(DEMO_LABELS)
    for key in ("training_command", "seed", "top1", "two_object_top2_both", "train_seconds"):
        assert key in sidecar["metadata"], key


def test_shipped_weights_reproduce_the_recorded_accuracy() -> None:
    """Classify the same fixed-seed held-out scenes as at export: accuracy within 1 point."""
    recorded = _metadata()["metadata"]
    model = load_model(demo_spec())
    assert not model.weights.random
    measured = scene_accuracy(
        model.module, count=recorded["eval_count"], mean=model.mean, std=model.std
    )
    assert measured.top1 == pytest.approx(recorded["top1"], abs=0.01)
    assert measured.two_object_top2_both == pytest.approx(
        recorded["two_object_top2_both"], abs=0.01
    )
    assert recorded["top1"] >= 0.97
