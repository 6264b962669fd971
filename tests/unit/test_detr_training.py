"""The exemplar detector's data, model and trainer: scenes of 1 to 4 objects with exact boxes,
the anchored initialisation, the attention prior, and a short run that resumes and exports a
directory the server loads."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from vitlens_server.data import MAX_OBJECTS, render_scene, split_seeds
from vitlens_server.data.detection import (
    detection_batch,
    detection_count,
    detection_scene,
    scene_boxes,
    to_centre_size,
)
from vitlens_server.models.detection import load_detr, preprocessing
from vitlens_server.training.detr_model import build_detr
from vitlens_server.training.detr_prior import attention_prior_loss
from vitlens_server.training.detr_train import DetrTrainConfig, train_detr


def test_detection_scenes_hold_one_to_four_disjoint_objects_boxed_by_their_masks():
    counts = Counter(detection_count(s) for s in range(2000))
    assert set(counts) == set(range(1, MAX_OBJECTS + 1)) and min(counts.values()) > 400
    for seed in split_seeds("test", 30):
        scene = detection_scene(seed)
        assert len(scene.labels) == detection_count(seed) == len(set(scene.labels))
        assert scene.masks.sum(0).max() == 1  # disjoint
        for mask, (x1, y1, x2, y2) in zip(scene.masks, scene_boxes(scene), strict=True):
            rows, cols = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    again = detection_scene(split_seeds("test", 1)[0])
    assert np.array_equal(again.image, detection_scene(split_seeds("test", 1)[0]).image)
    capped = detection_batch(range(40), most=1)
    assert all(len(labels) == 1 for labels in capped.labels)


def test_scenes_of_one_and_two_objects_are_the_bytes_they_always_were():
    for seed in range(5):
        assert np.array_equal(render_scene(seed).image, render_scene(seed, count=1).image)
        pair = render_scene(seed, two_object=True)
        assert np.array_equal(pair.image, render_scene(seed, count=2).image)
    with pytest.raises(ValueError, match="1 to 4"):
        render_scene(0, count=5)


def test_targets_are_normalised_centre_size_boxes():
    boxes = np.array([[10, 20, 30, 60]], dtype=np.float32)
    np.testing.assert_allclose(to_centre_size(boxes, 100), [[0.2, 0.4, 0.2, 0.4]])


def test_build_detr_refuses_fields_detr_config_does_not_have():
    with pytest.raises(TypeError, match="trunk_depth"):
        build_detr(init_trunk=False, trunk_depth=3)


def test_anchored_queries_attend_around_their_cells_on_position_alone():
    model = build_detr(init_trunk=False, num_queries=9, anchors=True)
    pos = (
        model.model.position_embedding(
            shape=torch.Size([1, 128, 14, 14]), device="cpu", dtype=torch.float32
        )[0]
        .flatten(1)
        .T
    )  # (196, 128)
    layer = model.model.decoder.layers[0].encoder_attn
    with torch.no_grad():
        q = layer.q_proj(model.model.query_position_embeddings.weight).reshape(9, 4, 32)
        k = layer.k_proj(pos).reshape(196, 4, 32)
        att = (torch.einsum("qhd,khd->hqk", q, k) * layer.scaling).softmax(-1).mean(0)  # (9, 196)
    peaks = att.argmax(-1)
    anchors = [round((i + 0.5) * 14 / 3 - 0.5) for i in range(3)]
    assert peaks.tolist() == [r * 14 + c for r in anchors for c in anchors]
    with pytest.raises(ValueError, match="square number"):
        build_detr(init_trunk=False, num_queries=8, anchors=True)


def test_the_attention_prior_is_the_cross_entropy_to_the_box_cells():
    n, side = 16, 64  # a 4 x 4 grid of 16 px cells
    uniform = torch.full((1, 2, 3, n), 1 / n)
    pairs = [(torch.tensor([1]), torch.tensor([0]))]
    box = (np.array([[0, 0, 32, 32]], dtype=np.float32),)  # covers the 4 top-left cells
    assert attention_prior_loss(uniform, pairs, box, side).item() == pytest.approx(math.log(n))
    focused = torch.zeros(1, 2, 3, n)
    focused[0, :, 1, [0, 1, 4, 5]] = 0.25
    assert attention_prior_loss(focused, pairs, box, side).item() == pytest.approx(math.log(4))
    none = [(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))]
    assert attention_prior_loss(uniform, none, box, side).item() == 0


def test_a_short_run_resumes_and_exports_a_directory_the_server_loads(tmp_path):
    config = DetrTrainConfig(
        out=tmp_path / "run", export_dir=tmp_path / "export", steps=3, batch_size=2,
        warmup_steps=1, single_object_steps=1, pair_steps=1, eval_every=0, final_eval_count=4,
    )  # fmt: skip
    assert train_detr(config, "test", stop_at_step=2) is None
    state = torch.load(tmp_path / "run" / "detr.ckpt", weights_only=True)
    assert state["step"] == 2
    assert not any(k.startswith("model.backbone") for k in state["model"])  # frozen: left out
    metadata = train_detr(config, "test", resume=True)
    assert metadata is not None and 0 <= metadata["metrics"]["map50"] <= 1
    detector = load_detr(tmp_path / "export")
    assert detector.num_queries == 9 and detector.labels[0] == "disc"
    assert preprocessing(tmp_path / "export").height == 224
    sidecar = json.loads((tmp_path / "export" / "vitlens.json").read_text())
    assert sidecar["metadata"]["config"]["steps"] == 3
