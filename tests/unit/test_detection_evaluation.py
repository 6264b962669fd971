"""Evaluate's detection run (`evaluate.detection_run`) with a stand-in model that knows the truth.

The stand-in's detections are the scenes' own objects (labels, probability 0.9) with their maps
the objects' masks pooled to the token grid ("oracle"), a blurred copy of them ("blurred"), or
the method's random maps; so AP orders oracle ≥ blurred > random, and the generated scenes and
their COCO export give the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlens_server.data import CLASSES, SceneConfig, split_seeds
from vitlens_server.data.coco import COCODataset, export_coco
from vitlens_server.domain_detection import Detections
from vitlens_server.errors import InvalidArgument
from vitlens_server.evaluate.detection_datasets import COCOFolder, open_coco_folder
from vitlens_server.evaluate.detection_run import (
    DetectionPlan,
    SyntheticDetectionDataset,
    parse_synthetic_detection,
    plan_detection_evaluation,
    run_detection_evaluation,
)

SIDE, GRID = 96, (6, 6)


class TruthCalls:
    """`DetectionCalls` answering from the dataset, images in the order the run asks."""

    def __init__(self, dataset) -> None:
        self.dataset, self.seen = dataset, {}

    def _samples(self, pixels: torch.Tensor) -> list:
        # the run explains chunks in order: find the chunk's first image by its pixels
        for start in range(len(self.dataset)):
            image = torch.from_numpy(self.dataset[start].image).permute(2, 0, 1).float() / 255
            if torch.allclose(image, pixels[0], atol=1e-6):
                return [self.dataset[start + i] for i in range(len(pixels))]
        raise AssertionError("pixels not from the dataset")

    def _detections(self, sample, maps: np.ndarray) -> Detections:
        k = len(sample.labels)
        return Detections(
            queries=np.arange(k), labels=sample.labels, probabilities=np.full(k, 0.9, np.float32),
            logits=np.zeros(k, np.float32), boxes=np.tile([0, 0, 1, 1], (k, 1)).astype(np.float32),
            heatmaps=maps,
        )  # fmt: skip

    def explain(
        self, pixels: torch.Tensor, method: str, averaging: str = "gradient"
    ) -> list[Detections]:
        out = []
        for sample in self._samples(pixels):
            masks = torch.from_numpy(sample.masks).float()[:, None]  # (K, 1, H, W)
            maps = F.adaptive_avg_pool2d(masks, GRID)[:, 0]  # (K, gh, gw)
            if method == "blurred":
                maps = F.avg_pool2d(maps[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
                maps = maps + 0.3 * maps.mean((1, 2), keepdim=True)
            out.append(self._detections(sample, maps.numpy()))
        return out

    def detect(self, pixels: torch.Tensor) -> list[Detections]:
        return [self._detections(s, None) for s in self._samples(pixels)]


def _plan(methods, metrics=("detection_segmentation",), resamples=4) -> DetectionPlan:
    return DetectionPlan(tuple(methods), tuple(metrics), resamples, 0.2, chunk_size=4)


def _run(dataset, plan):
    return {
        (s.method, s.metric): s.values
        for s in run_detection_evaluation(
            plan, dataset, TruthCalls(dataset), input_size=(SIDE, SIDE), grid=GRID
        )
    }


@pytest.fixture(scope="module")
def scenes():
    return SyntheticDetectionDataset(10, size=SIDE)


def test_an_oracle_map_outscores_a_blurred_one_and_random_maps(scenes):
    got = _run(scenes, _plan(["oracle", "blurred", "random"]))
    oracle, blurred, noise = (
        got[m, "detection_segmentation"] for m in ("oracle", "blurred", "random")
    )
    assert oracle["ap20"].mean > 0.9
    assert oracle["ap"].mean >= blurred["ap"].mean > noise["ap"].mean
    assert noise["ap50"].mean < 0.5
    assert oracle["ap"].n == 10 and oracle["ap"].std >= 0


def test_the_box_metric_reads_the_detectors_boxes(scenes):
    got = _run(scenes, _plan(["oracle"], ("detection",)))
    assert set(got) == {("detector", "detection")}
    assert got["detector", "detection"]["map50"].mean < 0.1  # whole-image boxes miss the objects


def test_scenes_and_their_coco_export_score_the_same(scenes, tmp_path):
    export_coco(tmp_path, split_seeds("test", 10), config=SceneConfig(size=SIDE))
    coco = COCOFolder(COCODataset(tmp_path), np.arange(8))
    plan = _plan(["oracle", "blurred"])
    a, b = _run(scenes, plan), _run(coco, plan)
    for key, values in a.items():
        for name, value in values.items():
            assert value.mean == pytest.approx(b[key][name].mean, nan_ok=True), (key, name)


def test_a_folder_in_cocos_own_layout_opens_like_the_export(tmp_path):
    export_coco(tmp_path / "ours", split_seeds("test", 3), config=SceneConfig(size=SIDE))
    theirs = tmp_path / "coco"
    (theirs / "annotations").mkdir(parents=True)
    (tmp_path / "ours" / "annotations.json").rename(
        theirs / "annotations" / "instances_val2017.json"
    )
    (tmp_path / "ours" / "images").rename(theirs / "val2017")
    folder = open_coco_folder(str(theirs), (tmp_path,), CLASSES, max_pixels=10**7)
    assert len(folder) == 3 and folder[0].masks.shape[1:] == (SIDE, SIDE)
    with pytest.raises(InvalidArgument, match="not a COCO folder"):
        open_coco_folder(str(tmp_path / "ours"), (tmp_path,), CLASSES, max_pixels=10**7)


def test_plans_refuse_what_detectors_cannot_run():
    with pytest.raises(InvalidArgument, match="does not apply to detectors"):
        plan_detection_evaluation(["token_reflection"], [], {}, {})
    with pytest.raises(InvalidArgument, match="does not apply to detectors"):
        plan_detection_evaluation(["generic"], ["perturbation"], {}, {})
    with pytest.raises(InvalidArgument, match="take no options"):
        plan_detection_evaluation(["generic"], [], {}, {"generic": {"x": 1}})
    with pytest.raises(InvalidArgument, match="gradient or lrp"):
        plan_detection_evaluation(["generic"], [], {}, {"generic": {"averaging": "mean"}})
    assert (
        plan_detection_evaluation(["generic"], [], {}, {"generic": {"averaging": "lrp"}}).averaging
        == "lrp"
    )
    with pytest.raises(InvalidArgument, match="unknown option"):
        plan_detection_evaluation(
            ["generic"], ["detection_segmentation"], {"detection_segmentation": {"k": 1}}, {}
        )
    plan = plan_detection_evaluation(
        ["generic", "random"], [], {"detection_segmentation": {"resamples": 5, "iou_low": 0.5}}, {}
    )
    assert (plan.metrics, plan.resamples, plan.iou_low) == (("detection_segmentation",), 5, 0.5)
    for text in (
        "synthetic_detection:",
        "synthetic_detection:x",
        "synthetic:4",
        "synthetic_detection:1:2:3",
    ):
        with pytest.raises(InvalidArgument):
            parse_synthetic_detection(text, SIDE)
    assert len(parse_synthetic_detection("synthetic_detection:7:3", SIDE)) == 7
