"""The training command on a toy budget: it exports loadable weights and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitlens_server.models import ModelSpec, load_model
from vitlens_server.models.default import DEMO_ARCHITECTURE, DEMO_LABELS
from vitlens_server.training.train import TrainConfig, train

TOY = {
    "low_res": 48,
    "low_res_steps": 2,
    "full_res_steps": 1,
    "batch_size": 2,
    "eval_count": 2,
    "workers": 0,
    "checkpoint_every": 1,
}


def test_train_exports_weights_the_server_loads(tmp_path: Path) -> None:
    out = tmp_path / "demo.safetensors"
    metadata = train(TrainConfig(out=out, **TOY), "vitlens train-demo (test)")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["labels"] == list(DEMO_LABELS)
    assert sidecar["metadata"]["top1"] == metadata["top1"]
    assert sidecar["metadata"]["training_command"] == "vitlens train-demo (test)"
    model = load_model(ModelSpec(name="d", architecture=DEMO_ARCHITECTURE, weights=out))
    assert not model.weights.random and model.labels == DEMO_LABELS
    assert model.geometry.grid == (14, 14) and model.geometry.num_layers == 6


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    straight = tmp_path / "straight.safetensors"
    train(TrainConfig(out=straight, **TOY))
    resumed = tmp_path / "resumed.safetensors"
    assert train(TrainConfig(out=resumed, **TOY), stop_at_step=1) is None  # interrupted
    train(TrainConfig(out=resumed, **TOY), resume=True)
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-3)


def test_resume_refuses_other_hyper_parameters(tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    train(TrainConfig(out=out, **TOY), stop_at_step=1)
    with pytest.raises(SystemExit, match="other hyper-parameters"):
        train(TrainConfig(out=out, **{**TOY, "lr": 1e-4}), resume=True)
