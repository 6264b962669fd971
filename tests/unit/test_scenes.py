"""The scene generator: deterministic, exact masks, class-blind backgrounds, VOC round trips."""

from __future__ import annotations

import ast
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlens_server.data as data_package
from vitlens_server.data import (
    CLASSES,
    SPLIT_STRIDE,
    Scene,
    SceneConfig,
    SceneObject,
    render_background,
    render_batch,
    render_object_mask,
    render_scene,
    split_seeds,
)
from vitlens_server.data.__main__ import main as data_main
from vitlens_server.data.voc import VOC_CLASSES, VOCDataset, export_voc, voc_palette
from vitlens_server.models.default import DEMO_LABELS

SIZE = SceneConfig().size
SINGLE_SEEDS = range(480)
PAIR_SEEDS = range(1000, 1160)


@pytest.fixture(scope="module")
def singles() -> list[Scene]:
    return [render_scene(seed) for seed in SINGLE_SEEDS]


@pytest.fixture(scope="module")
def pairs() -> list[Scene]:
    return [render_scene(seed, two_object=True) for seed in PAIR_SEEDS]


def _digest(scene: Scene) -> str:
    return hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes()).hexdigest()


def _luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# --- determinism ---------------------------------------------------------------------------------


def test_classes_are_the_demo_labels() -> None:
    assert CLASSES == DEMO_LABELS
    assert len(CLASSES) == 8


@pytest.mark.parametrize("two_object", [False, True])
def test_same_seed_same_bytes(two_object: bool) -> None:
    first, again = (render_scene(7, two_object=two_object) for _ in range(2))
    assert first.image.dtype == np.uint8 and first.image.shape == (SIZE, SIZE, 3)
    assert first.masks.dtype == bool and first.masks.shape == (1 + two_object, SIZE, SIZE)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.masks.tobytes() == again.masks.tobytes()
    assert first.objects == again.objects and first.labels == again.labels
    other = render_scene(8, two_object=two_object)
    assert not np.array_equal(first.image, other.image)


def test_same_bytes_in_another_process() -> None:
    cases = [(0, False), (1, False), (2, True), (12_345_678, True)]
    code = (
        "import hashlib\n"
        "from vitlens_server.data import render_scene\n"
        f"for seed, two in {cases!r}:\n"
        "    s = render_scene(seed, two_object=two)\n"
        "    print(hashlib.sha256(s.image.tobytes() + s.masks.tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    expected = [_digest(render_scene(seed, two_object=two)) for seed, two in cases]
    assert child.stdout.split() == expected


# --- masks and painting --------------------------------------------------------------------------


def test_single_masks_are_the_objects_rendered_alone(singles: list[Scene]) -> None:
    for scene in singles[:120]:
        (obj,) = scene.objects
        assert scene.labels == (obj.label,)
        np.testing.assert_array_equal(scene.masks[0], render_object_mask(obj, SIZE))


def test_pair_masks_are_the_objects_alone_minus_occlusion(pairs: list[Scene]) -> None:
    for scene in pairs:
        first, second = (render_object_mask(obj, SIZE) for obj in scene.objects)
        np.testing.assert_array_equal(scene.masks[0], first & ~second)  # the later one occludes
        np.testing.assert_array_equal(scene.masks[1], second)
        assert not (first & second).any()  # placed apart: nothing is actually hidden


def test_crowded_pairs_still_do_not_overlap() -> None:
    config = SceneConfig(pair_radius=(0.26, 0.27))  # random positions rarely fit: corners do
    for seed in range(20):
        scene = render_scene(seed, two_object=True, config=config)
        first, second = (render_object_mask(obj, SIZE) for obj in scene.objects)
        assert not (first & second).any()
        np.testing.assert_array_equal(scene.masks, np.stack([first, second]))
    with pytest.raises(ValueError, match="room"):
        SceneConfig(pair_radius=(0.3, 0.35))


def test_objects_are_painted_exactly_on_their_masks(singles: list[Scene], pairs) -> None:
    for scene in singles[:60] + pairs[:30]:
        background = render_background(scene.seed)
        outside = ~scene.masks.any(axis=0)
        np.testing.assert_array_equal(scene.image[outside], background[outside])
        for mask in scene.masks:
            changed = (scene.image[mask] != background[mask]).any(axis=1)
            assert changed.mean() > 0.9
            contrast = abs(_luma(scene.image[mask]).mean() - _luma(background[mask]).mean())
            assert contrast > 0.5 * SceneConfig().min_contrast


def test_object_parameters(singles: list[Scene]) -> None:
    low, high = SceneConfig().radius
    for scene in singles:
        (obj,) = scene.objects
        assert low * SIZE <= obj.radius <= high * SIZE
        x, y = obj.centre
        assert obj.radius <= x <= SIZE - obj.radius and obj.radius <= y <= SIZE - obj.radius
        assert all(0 <= c <= 255 for c in obj.colour) and obj.name == CLASSES[obj.label]


# Areas of the unit shapes (bounding radius 1), by hand.
_PENTAGRAM_INNER = math.cos(2 * math.pi / 5) / math.cos(math.pi / 5)


def _lens(r1: float, r2: float, d: float) -> float:
    """Area of the intersection of two discs of radii r1, r2 whose centres are d apart."""
    a1 = r1 * r1 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    a2 = r2 * r2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    return a1 + a2 - 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))


UNIT_AREAS = {
    "disc": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * _PENTAGRAM_INNER * math.sin(math.pi / 5),
    "cross": 2.0,  # two 6/sqrt(10) x 2/sqrt(10) arms overlapping in a 2/sqrt(10) square
    "ring": math.pi * (1 - 0.55**2),
    "hexagon": 3 * math.sqrt(3) / 2,
    "crescent": math.pi - _lens(1.0, 0.8, 0.45),
}


@pytest.mark.parametrize("name", CLASSES)
def test_shape_areas(name: str) -> None:
    radius = 100.0
    for rotation in (0.0, 0.3, 2.0):
        obj = SceneObject(CLASSES.index(name), (112.0, 112.0), radius, rotation, (0, 0, 0))
        mask = render_object_mask(obj, SIZE)
        # Pixel centres sample the shape: axis-aligned edges are off by up to a pixel row.
        assert mask.sum() == pytest.approx(UNIT_AREAS[name] * radius**2, rel=0.015)
        rows, cols = np.nonzero(mask)
        assert (np.hypot(cols + 0.5 - 112, rows + 0.5 - 112) <= radius).all()


# --- class statistics ----------------------------------------------------------------------------


def test_every_class_appears_evenly_with_a_visible_area(singles: list[Scene], pairs) -> None:
    counts = np.bincount([scene.label for scene in singles], minlength=len(CLASSES))
    expected = len(singles) / len(CLASSES)
    assert counts.min() >= 0.6 * expected and counts.max() <= 1.4 * expected
    for scene in singles + pairs:
        assert (scene.masks.sum(axis=(1, 2)) >= 0.01 * SIZE * SIZE).all()
    pair_labels = np.bincount([label for s in pairs for label in s.labels], minlength=8)
    assert pair_labels.min() > 0


def test_two_object_scenes_hold_two_classes_apart(pairs: list[Scene]) -> None:
    for scene in pairs:
        assert len(scene.labels) == 2 and scene.labels[0] != scene.labels[1]
        assert not (scene.masks[0] & scene.masks[1]).any()


def test_background_colour_does_not_depend_on_the_class(singles: list[Scene]) -> None:
    means = np.array([scene.image[~scene.mask].mean(axis=0) for scene in singles])  # (N, 3)
    labels = np.array([scene.label for scene in singles])
    spread = means.std(axis=0)  # (3,)
    for label in range(len(CLASSES)):
        group = means[labels == label]
        error = spread / math.sqrt(len(group))
        assert (np.abs(group.mean(axis=0) - means.mean(axis=0)) < 4 * error).all(), CLASSES[label]


def test_forced_labels_swap_only_the_class() -> None:
    background = render_background(3)
    scenes = [render_scene(3, labels=(label,)) for label in range(len(CLASSES))]
    for label, scene in enumerate(scenes):
        assert scene.labels == (label,)
        outside = ~scene.mask
        np.testing.assert_array_equal(scene.image[outside], background[outside])
        obj, reference = scene.objects[0], scenes[0].objects[0]
        assert (obj.centre, obj.radius, obj.rotation) == (
            reference.centre,
            reference.radius,
            reference.rotation,
        )
    pair = render_scene(3, two_object=True, labels=(6, 2))
    assert pair.labels == (6, 2)
    for bad in [(1, 1), (0,), (8, 1)]:
        with pytest.raises(ValueError):
            render_scene(3, two_object=True, labels=bad)


# --- batches and splits --------------------------------------------------------------------------


def test_render_batch_matches_render_scene() -> None:
    images, labels, masks = render_batch([5, 6, 7], two_object=True)
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and masks.shape == (3, SIZE, SIZE) and masks.dtype == bool
    for i, seed in enumerate([5, 6, 7]):
        scene = render_scene(seed, two_object=True)
        np.testing.assert_array_equal(images[i], scene.image)
        np.testing.assert_array_equal(masks[i], scene.masks[0])
        assert labels[i] == scene.labels[0]


def test_split_seeds_never_overlap() -> None:
    train = split_seeds("train", 1000, base_seed=SPLIT_STRIDE - 1000)
    val, test = split_seeds("val", 1000), split_seeds("test", 10, base_seed=5)
    assert train == range(SPLIT_STRIDE - 1000, SPLIT_STRIDE)
    assert val == range(SPLIT_STRIDE, SPLIT_STRIDE + 1000)
    assert not set(train) & set(val) and not set(val) & set(test)
    with pytest.raises(ValueError, match="split"):
        split_seeds("holdout", 1)
    with pytest.raises(ValueError):
        split_seeds("train", SPLIT_STRIDE, base_seed=1)  # would run into the val seeds


# --- Pascal VOC ----------------------------------------------------------------------------------


def test_voc_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    export_voc(root, 10, seed=3, split="val")
    export_voc(root, 10, seed=3, split="val", two_object=True)
    export_voc(root, 10, seed=3, split="val")  # again: ids are not listed twice
    dataset = VOCDataset(root, "val")
    assert len(dataset) == 20 and len(set(dataset.ids)) == 20
    assert dataset.labels == CLASSES
    assert (root / "labels.txt").read_text().split() == list(CLASSES)

    scenes = [render_scene(seed) for seed in split_seeds("val", 10, base_seed=3)]
    scenes += [render_scene(s, two_object=True) for s in split_seeds("val", 10, base_seed=3)]
    for sample, scene in zip(dataset, scenes, strict=True):
        expected_class = np.zeros((SIZE, SIZE), dtype=np.uint8)
        expected_object = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for instance, (label, mask) in enumerate(zip(scene.labels, scene.masks, strict=True)):
            expected_class[mask] = label + 1
            expected_object[mask] = instance + 1
        np.testing.assert_array_equal(sample.class_mask, expected_class)
        np.testing.assert_array_equal(sample.object_mask, expected_object)
        areas = scene.masks.sum(axis=(1, 2))
        assert sample.labels == tuple(np.array(scene.labels)[np.argsort(-areas, kind="stable")])
        assert sample.image.shape == scene.image.shape and sample.image.dtype == np.uint8
        assert np.abs(sample.image.astype(int) - scene.image).mean() < 3
        assert sample.id.startswith("vitlens_")

    with Image.open(root / "SegmentationClass" / f"{dataset.ids[0]}.png") as png:
        assert png.mode == "P" and png.getpalette()[: 3 * 256] == voc_palette()
    assert voc_palette()[3 * 255 :] == [224, 224, 192]  # VOC's void colour


def test_voc_dataset_reads_a_plain_voc_layout(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    values = np.array([[0, 15, 15, 255, 255, 0]] * 2 + [[15, 15, 15, 255, 3, 0]] * 2, np.uint8)
    mask = Image.frombytes("P", (6, 4), values.tobytes())
    mask.putpalette(voc_palette())
    mask.save(tmp_path / "SegmentationClass" / "2007_000001.png")

    dataset = VOCDataset(tmp_path, "train")
    assert dataset.labels == VOC_CLASSES
    sample = dataset[0]
    assert sample.object_mask is None
    np.testing.assert_array_equal(sample.class_mask, values)  # void (255) kept as is
    assert sample.labels == (14, 2)  # person (8 pixels) before bird (2)
    assert [VOC_CLASSES[i] for i in sample.labels] == ["person", "bird"]
    assert VOCDataset(tmp_path, "train", labels=["a"] * 20).labels == ("a",) * 20
    with pytest.raises(ValueError, match="beyond"):
        VOCDataset(tmp_path, "train", labels=["a", "b"])[0]


def test_voc_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        VOCDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        VOCDataset(tmp_path)
    root = export_voc(tmp_path / "voc", 2, split="test")
    dataset = VOCDataset(root, "test")
    with pytest.raises(IndexError):
        dataset[2]
    (root / "JPEGImages" / f"{dataset.ids[0]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=dataset.ids[0]):
        dataset[0]
    Image.new("L", (10, 10)).save(root / "SegmentationClass" / f"{dataset.ids[1]}.png")
    with pytest.raises(ValueError, match="10x10"):
        dataset[1]


def test_data_modules_do_not_import_torch() -> None:
    # The generator is numpy + Pillow only (DataLoader workers, the SDK side, plain scripts).
    for path in Path(data_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in getattr(node, "names", [])] + [getattr(node, "module", "")]
            assert not any((n or "").split(".")[0] == "torch" for n in names), path.name


# --- command line --------------------------------------------------------------------------------


def test_cli_writes_a_preview_and_a_voc_folder(tmp_path: Path, capsys) -> None:
    assert data_main(["preview", str(tmp_path / "sheet.png"), "--two-object"]) == 0
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width > 4 * SIZE and sheet.height > 4 * SIZE
    assert data_main(["voc", str(tmp_path / "voc"), "--count", "3", "--split", "train"]) == 0
    assert len(VOCDataset(tmp_path / "voc", "train")) == 3
    assert "wrote" in capsys.readouterr().out
