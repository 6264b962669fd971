"""The exemplar detector that ships with the server, servable by name (``--model vitlens-detr``):
its folder loads, serves as a detector over real gRPC, finds the objects of held-out scenes as
its training measured (benchmarks/detr_training.md) and explains each detection where the object
is."""

from __future__ import annotations

import numpy as np

import vitlens
from tests.conftest import start_server
from vitlens_server.config import ServerConfig
from vitlens_server.data import CLASSES, split_seeds
from vitlens_server.data.detection import detection_scene, scene_boxes
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models import default as builtin

SCENES = 12  # held-out scenes sent over gRPC; the export measured box mAP on 1,000


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    return float(inter / union)


def test_the_shipped_detector_finds_and_explains_held_out_objects_over_grpc() -> None:
    spec = builtin.builtin_spec("vitlens-detr", "cpu")
    assert spec is not None and spec.source == f"hf-detr:{builtin.ASSETS / 'vitlens-detr'}"
    running, stop = start_server(ServerConfig(port=0), ModelRegistry([load_model(spec)]))
    scenes = [detection_scene(seed) for seed in split_seeds("test", SCENES)]
    try:
        with vitlens.Client(running.address, timeout_s=300) as client:
            info = client.model("vitlens-detr")
            assert info.task == "object_detection" and tuple(info.labels) == CLASSES
            result = client.explain([s.image for s in scenes], model="vitlens-detr")
    finally:
        stop()
    found = inside = objects = 0
    for scene, explained in zip(scenes, result, strict=True):
        side = scene.image.shape[0]
        for label, box, mask in zip(scene.labels, scene_boxes(scene), scene.masks, strict=True):
            objects += 1
            match = [
                d for d in explained.detections
                if d.prediction.index == label
                and _iou(np.array(d.box.pixels(side, side), float), box) >= 0.5
            ]  # fmt: skip
            if not match:
                continue
            found += 1
            heatmap = match[0].heatmap  # (gh, gw): its peak cell should lie on the object
            row, col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
            cell = side // heatmap.shape[0]
            inside += bool(mask[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].any())
    assert found / objects >= 0.7, (found, objects)
    assert inside / found >= 0.8, (inside, found)
