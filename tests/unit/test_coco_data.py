"""COCO-format detection folders: export → read back, and precise refusals of bad folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from vitlens_server.data import CLASSES
from vitlens_server.data.coco import (
    ANNOTATIONS,
    COCODataset,
    coco_image_name,
    export_coco,
)
from vitlens_server.data.detection import detection_count, detection_scene, scene_boxes
from vitlens_server.data.voc import BadFile, MissingFile, open_regular

SEEDS = (2, 3, 10, 0)  # 1, 2, 3 and 4 objects


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_coco(tmp_path_factory.mktemp("coco"), SEEDS)


def _folder(tmp_path: Path, edit: Any) -> Path:
    """One exported scene (seed 3, two objects) whose JSON ``edit(dataset)`` changed in place."""
    export_coco(tmp_path, [3])
    path = tmp_path / ANNOTATIONS
    dataset = json.loads(path.read_text())
    edit(dataset)
    path.write_text(json.dumps(dataset))
    return tmp_path


def test_export_then_load_returns_the_scenes(exported: Path) -> None:
    assert sorted(detection_count(seed) for seed in SEEDS) == [1, 2, 3, 4]
    dataset = COCODataset(exported)
    assert dataset.categories == CLASSES
    assert dataset.ids == SEEDS
    for index, seed in enumerate(SEEDS):
        sample, scene = dataset[index], detection_scene(seed)
        assert sample.id == seed
        assert sample.file == f"images/{coco_image_name(seed)}"
        np.testing.assert_array_equal(sample.image, scene.image)  # PNG: lossless
        np.testing.assert_array_equal(sample.labels, np.array(scene.labels))
        assert sample.masks.dtype == bool and sample.masks.shape == scene.masks.shape
        np.testing.assert_array_equal(sample.masks, scene.masks)
        np.testing.assert_array_equal(sample.boxes, scene_boxes(scene))
        assert not sample.crowd.any()


def test_export_is_read_by_pycocotools_itself(exported: Path) -> None:
    coco = COCO(str(exported / ANNOTATIONS))
    scene = detection_scene(SEEDS[3])
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[SEEDS[3]]))
    assert [a["category_id"] - 1 for a in annotations] == list(scene.labels)
    for annotation, mask in zip(annotations, scene.masks, strict=True):
        np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), mask)
        assert annotation["area"] == mask.sum()


def test_polygons_uncompressed_rle_and_a_missing_bbox(tmp_path: Path) -> None:
    def edit(dataset: dict) -> None:
        first, second = dataset["annotations"]
        first["segmentation"] = [[2, 2, 6, 2, 6, 6, 2, 6]]  # pixels 2..5 x 2..5
        del first["bbox"]
        runs = [224 * 10 + 20, 5, 224 * 224 - 224 * 10 - 25]  # column-major: 5 pixels of column 10
        second.update(segmentation={"size": [224, 224], "counts": runs}, iscrowd=1)
        del second["bbox"]

    sample = COCODataset(_folder(tmp_path, edit))[0]
    expected = np.zeros((2, 224, 224), dtype=bool)
    expected[0, 2:6, 2:6] = True
    expected[1, 20:25, 10] = True
    np.testing.assert_array_equal(sample.masks, expected)
    np.testing.assert_array_equal(sample.boxes, [[2, 2, 6, 6], [10, 20, 11, 25]])
    np.testing.assert_array_equal(sample.crowd, [False, True])


def test_files_are_read_through_the_opener(exported: Path) -> None:
    opened: list[str] = []

    def opener(path: Path) -> BinaryIO:
        opened.append(path.relative_to(exported).as_posix())
        return open_regular(path)

    COCODataset(exported, opener=opener)[1]
    assert opened == [ANNOTATIONS, f"images/{coco_image_name(SEEDS[1])}"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), 'lacks the key "categories"'),
        (lambda d: d.update(images={}), '"images" is not a list'),
        (lambda d: d["images"][0].pop("height"), 'images[0] lacks "height"'),
        (
            lambda d: d["images"][0].update(width="224"),
            "images[0]: \"width\" is '224', not a whole",
        ),
        (lambda d: d["images"].append(dict(d["images"][0])), "images[1] repeats image id 3"),
        (
            lambda d: d["annotations"][1].update(category_id=99),
            "annotations[1] (id 2) has category_id 99, which is not among the categories' ids "
            "([1, 2, 3, 4, 5, 6, 7, 8])",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=7),
            "annotations[0] (id 1) has image_id 7, which no image has",
        ),
        (
            lambda d: d["annotations"][0].pop("segmentation"),
            'annotations[0] (id 1) lacks "segmentation"',
        ),
        (
            lambda d: d["annotations"][0]["segmentation"].update(size=[100, 224]),
            "annotations[0] (id 1): its RLE's size [100, 224] is not its image's [height, width] "
            "[224, 224]",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation=[[0, 0, 1e12, 0, 5, 5]]),
            "a polygon reaches more than 1 pixel outside its 224x224 image",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation=[[0, 0, 10**400, 0, 5, 5]]),
            "a polygon holds a non-number (or one past 2**53)",
        ),
        (lambda d: d["annotations"][1].update(iscrowd=True), "annotations[1] (id 2): iscrowd is"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "its bbox [1, 2, 3] is not [x, y"),
        (
            lambda d: d["images"][0].update(file_name="../x.png"),
            "images[0] has file_name '../x.png', which leaves the images folder",
        ),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), "which leaves the images"),
        (lambda d: d["images"][0].update(file_name="a/../../x.png"), "which leaves the images"),
    ],
)
def test_malformed_annotations_are_refused_precisely(
    tmp_path: Path, edit: Any, message: str
) -> None:
    with pytest.raises(BadFile) as caught:
        COCODataset(_folder(tmp_path, edit))
    assert caught.value.file == ANNOTATIONS
    assert message in caught.value.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON (line 1, column 2"),
        ('{"images": [], "annotations": [], "categories": NaN}', "holds NaN"),
        ("[1, 2]", "holds no JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nests its JSON too deeply"),
    ],
)
def test_files_that_are_not_coco_json(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / ANNOTATIONS).write_text(text)
    with pytest.raises(BadFile) as caught:
        COCODataset(tmp_path)
    assert caught.value.file == ANNOTATIONS and message in caught.value.reason


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MissingFile) as caught:
        COCODataset(tmp_path)
    assert str(caught.value) == f"{ANNOTATIONS} is missing"
    export_coco(tmp_path, [3])
    (tmp_path / "images" / coco_image_name(3)).unlink()
    dataset = COCODataset(tmp_path)  # images are opened when read
    with pytest.raises(MissingFile) as caught:
        dataset[0]
    assert str(caught.value) == f"images/{coco_image_name(3)} is missing"


def test_an_image_of_another_size_than_listed(tmp_path: Path) -> None:
    export_coco(tmp_path, [3])
    Image.new("RGB", (100, 80)).save(tmp_path / "images" / coco_image_name(3))
    with pytest.raises(BadFile) as caught:
        COCODataset(tmp_path)[0]
    assert str(caught.value) == (
        f"images/{coco_image_name(3)} is 100x80 but annotations.json gives it as 224x224"
    )


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([10, 5], "add up to 15 pixels, not its 224x224 image's 50,176"),
        ("0", "add up to 0 pixels"),
        ("0P", "ends inside a run"),  # "P" (code 32) continues a run the string ends in
        ("0~", "holds '~'"),
        ("a" * 9, "holds an overlong run"),
    ],
)
def test_run_lengths_are_checked_before_pycocotools_decodes_them(
    tmp_path: Path, counts: Any, message: str
) -> None:
    def edit(dataset: dict) -> None:
        dataset["annotations"][0]["segmentation"]["counts"] = counts

    dataset = COCODataset(_folder(tmp_path, edit))
    with pytest.raises(BadFile) as caught:
        dataset[0]
    assert caught.value.file == ANNOTATIONS
    assert caught.value.reason.startswith("annotations[0] (id 1): its RLE")
    assert message in caught.value.reason
