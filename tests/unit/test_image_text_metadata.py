"""An image-text model's vitlens metadata: labels and template, and the rest as weights metadata."""

from __future__ import annotations

import json

import pytest

from tests.unit.image_text_tiny import VIT_CFG, build_open_clip_module, write_open_clip_dir
from vitlens_server.models.image_text import ImageTextLoadError
from vitlens_server.models.image_text_serving import SIDECAR, load_image_text
from vitlens_server.models.spec import ModelSpec


def _spec(folder) -> ModelSpec:
    return ModelSpec(name="clip", architecture="open_clip", source=f"open_clip:{folder}")


def test_sidecar_keys_beyond_labels_and_template_become_weights_metadata(tmp_path) -> None:
    folder = write_open_clip_dir(tmp_path / "clip", VIT_CFG, build_open_clip_module(VIT_CFG))
    sidecar = {
        "labels": ["disc", "star"],
        "prompt_template": "a drawing of a {}.",
        "training_command": "python -m train",
        "metrics": {"zero_shot_top1": 0.97},
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    served = load_image_text(_spec(folder))
    assert served.prompts == ("a drawing of a disc.", "a drawing of a star.")
    assert served.weights.metadata == {
        "training_command": "python -m train",
        "metrics": '{"zero_shot_top1": 0.97}',
    }


def test_a_template_without_one_placeholder_is_refused_by_name(tmp_path) -> None:
    folder = write_open_clip_dir(tmp_path / "clip", VIT_CFG, build_open_clip_module(VIT_CFG))
    (folder / SIDECAR).write_text(json.dumps({"labels": ["a"], "prompt_template": "a {shape}."}))
    with pytest.raises(ImageTextLoadError, match="exactly once"):
        load_image_text(_spec(folder))
