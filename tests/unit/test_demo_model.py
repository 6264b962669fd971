"""The shipped demo weights are what their metadata says they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.report import report
from vitlens_server.data import render_background, render_scene, split_seeds
from vitlens_server.models import load_model
from vitlens_server.models.default import DEMO_LABELS, DEMO_WEIGHTS, demo_spec
from vitlens_server.training import scene_accuracy
from vitlens_server.training.accuracy import to_model_input

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="no demo weights shipped"),
]


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


def test_the_model_reads_the_object_not_the_background() -> None:
    """Same background, each of the eight objects in turn: the prediction follows the object.
    The background alone: predictions carry no information about the scene's class."""
    model = load_model(demo_spec())
    seeds = split_seeds("test", 400, base_seed=5_000)  # held out, apart from the accuracy sample
    classes = range(len(DEMO_LABELS))
    swaps = seeds[:48]  # 48 backgrounds x 8 objects
    swapped = np.stack([render_scene(s, labels=(c,)).image for s in swaps for c in classes])
    truth = torch.tensor([render_scene(s).label for s in seeds])

    def predict(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = to_model_input(images, model.mean, model.std, torch.device("cpu"))
            return torch.cat([model.module(chunk).argmax(1) for chunk in x.split(100)])

    follows = predict(swapped) == torch.tensor(list(classes)).repeat(len(swaps))
    guesses = predict(np.stack([render_background(s) for s in seeds]))
    follow_rate, background_hits = follows.float().mean().item(), (guesses == truth).float().mean()
    report(
        "demo model",
        f"object swapped on a fixed background: prediction follows it {follow_rate:.1%} "
        f"({len(follows)} scenes); {len(seeds)} backgrounds alone: {background_hits:.1%} name the "
        f"scene's class (chance {1 / len(DEMO_LABELS):.1%})",
    )
    assert follow_rate >= 0.95
    assert background_hits <= 0.20  # chance is 12.5 %; 400 draws put 20 % beyond 4 sigma
