"""Captions of generated scenes: true of the pixels, deterministic, relations right."""

from __future__ import annotations

import numpy as np
import pytest

from vitlens_server.data import Scene, SceneConfig, SceneObject, render_object_mask, render_scene
from vitlens_server.data.captions import (
    CENTRE_FRACTION,
    COLOURS,
    CRISP_ATTRIBUTES,
    LARGE_AREA_FRACTION,
    canonical_caption,
    colour_name,
    crisp_scene_config,
    prompt,
    relation,
    scene_captions,
    scene_facts,
)
from vitlens_server.data.shapes import CLASSES

SEEDS = range(40)


def _hand_scene(objects: list[SceneObject], size: int = 64) -> Scene:
    masks = np.stack([render_object_mask(obj, size) for obj in objects])  # (K, H, W)
    image = np.zeros((size, size, 3), np.uint8)
    labels = tuple(obj.label for obj in objects)
    return Scene(image=image, labels=labels, masks=masks, objects=tuple(objects), seed=0)


def test_hand_built_scene_has_the_expected_caption():
    # A disc of radius 8 px centred at (12, 32) in a 64 px image: centroid offset
    # (12 - 32) / 64 = -0.31 left, 0 vertical; area pi 8^2 / 64^2 = 0.049 < 0.08: small.
    star = SceneObject(CLASSES.index("disc"), (12.0, 32.0), 8.0, 0.0, (225, 25, 35))
    assert canonical_caption(_hand_scene([star])).text == "a small red disc on the left."
    big = SceneObject(CLASSES.index("square"), (32.0, 20.0), 24.0, 0.3, (250, 250, 250))
    # square of circumradius 24: area 2 * 24^2 / 64^2 = 0.28 >= 0.08; offset (0, -0.19): top
    assert canonical_caption(_hand_scene([big])).text == "a large white square at the top."


def test_two_hand_built_objects_relation():
    left = SceneObject(CLASSES.index("star"), (14.0, 30.0), 10.0, 0.0, (230, 20, 20))
    right = SceneObject(CLASSES.index("ring"), (50.0, 34.0), 10.0, 0.0, (30, 60, 230))
    scene = _hand_scene([left, right])
    captions = [c.text for c in scene_captions(scene)]
    assert captions[0] == "a red star left of a blue ring."
    assert "a blue ring right of a red star." in captions
    first, second = scene_facts(scene)
    assert relation(first, second) == "left of" and relation(second, first) == "right of"


@pytest.mark.parametrize("name", list(COLOURS))
def test_named_colours_name_themselves(name):
    assert colour_name(COLOURS[name]) == name


@pytest.mark.parametrize("two_object", [False, True])
def test_facts_follow_the_masks(two_object):
    for seed in SEEDS:
        scene = render_scene(seed, two_object=two_object)
        size = scene.image.shape[0]
        for facts, obj, mask in zip(scene_facts(scene), scene.objects, scene.masks, strict=True):
            rows, cols = np.nonzero(mask)
            dx = (cols.mean() + 0.5) / size - 0.5
            dy = (rows.mean() + 0.5) / size - 0.5
            if max(abs(dx), abs(dy)) < CENTRE_FRACTION:
                assert facts.position == "centre"
            elif abs(dx) >= abs(dy):
                assert facts.position == ("left" if dx < 0 else "right")
            else:
                assert facts.position == ("top" if dy < 0 else "bottom")
            large = mask.mean() >= LARGE_AREA_FRACTION
            assert facts.size == ("large" if large else "small")
            assert facts.shape == CLASSES[obj.label]
            assert facts.colour == colour_name(obj.colour)


def test_captions_are_deterministic_and_true_of_their_scene():
    for seed in SEEDS:
        for two_object in (False, True):
            scene = render_scene(seed, two_object=two_object)
            captions = scene_captions(scene)
            again = scene_captions(render_scene(seed, two_object=two_object))
            assert [c.text for c in captions] == [c.text for c in again]
            assert all(c.true_of(scene_facts(scene)) for c in captions)
            assert len({c.text for c in captions}) == len(captions)


def test_two_object_relation_matches_the_centroids():
    for seed in SEEDS:
        scene = render_scene(seed, two_object=True)
        (x0, y0), (x1, y1) = (f.centroid for f in scene_facts(scene))
        text = canonical_caption(scene).text
        if abs(x0 - x1) >= abs(y0 - y1):
            expected = "left of" if x0 < x1 else "right of"
        else:
            expected = "above" if y0 < y1 else "below"
        assert f" {expected} " in text
        first, second = (CLASSES[label] for label in scene.labels)
        assert text.index(first) < text.index(expected) < text.rindex(second)


def test_claims_reject_absent_shapes_and_wrong_relations():
    scene = render_scene(3, two_object=True)
    facts = scene_facts(scene)
    absent = next(c for c in CLASSES if c not in {f.shape for f in facts})
    single = scene_captions(render_scene(4, labels=[CLASSES.index(absent)]))
    assert not single[1].true_of(facts)  # "a photo of a <absent>."
    assert single[1].text == prompt(absent)
    canonical = canonical_caption(scene)
    swapped = scene_captions(scene)[1]  # the same relation seen from the other object
    assert swapped.true_of(facts) and canonical.true_of(facts[::-1])
    one = scene_facts(render_scene(5))
    assert not canonical.true_of(one)  # a two-object claim is never true of one object


# --- crisp attributes (SceneConfig.crisp): every caption far from its boundary ----------------


@pytest.mark.parametrize("size", [112, 224])
def test_crisp_single_objects_sit_far_from_every_caption_boundary(size):
    config = crisp_scene_config(size)
    palette = np.array(list(COLOURS.values()))  # (10, 3)
    for seed in range(60):
        scene = render_scene(seed, config=config)
        (facts,) = scene_facts(scene)
        area = scene.masks[0].mean()
        assert area <= 0.05 or area >= 0.09  # LARGE_AREA_FRACTION 0.08 in between
        offsets = np.abs(np.array(facts.centroid) - 0.5)  # (2,)
        assert offsets.max() <= 0.105 or offsets.max() >= 0.125 + 0.005
        if offsets.max() >= CENTRE_FRACTION:  # a side: one axis clearly dominates
            assert offsets.max() >= 2 * offsets.min()
        jitter = np.abs(palette - np.array(scene.objects[0].colour)).max(axis=1).min()
        assert jitter <= CRISP_ATTRIBUTES.palette_jitter  # a named colour, jittered
        assert canonical_caption(scene).true_of(scene_facts(scene))


def test_crisp_scenes_are_deterministic_and_cover_every_value():
    config = crisp_scene_config(112)
    facts = [scene_facts(render_scene(seed, config=config))[0] for seed in range(300)]
    again = scene_facts(render_scene(7, config=config))[0]
    assert again == facts[7]
    assert {f.colour for f in facts} == set(COLOURS)
    assert {f.size for f in facts} == {"small", "large"}
    assert {f.position for f in facts} == {"centre", "left", "right", "top", "bottom"}
    pairs = [render_scene(seed, two_object=True, config=config) for seed in range(20)]
    assert all(len(scene_facts(scene)) == 2 for scene in pairs)


def test_crisp_is_off_by_default():
    assert SceneConfig().crisp is None
    plain, crisp = render_scene(3), render_scene(3, config=crisp_scene_config(224))
    assert (plain.image != crisp.image).any()
    assert (plain.image == render_scene(3, config=SceneConfig()).image).all()
