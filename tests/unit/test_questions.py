"""Visual questions of generated scenes: true of the facts, balanced, in a closed vocabulary."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vitlens_server.data import Scene, SceneObject, render_object_mask, render_scene
from vitlens_server.data.captions import COLOURS, WHERE, crisp_scene_config, scene_facts
from vitlens_server.data.questions import (
    ANSWERS,
    KINDS,
    VOCABULARY,
    Question,
    answer_index,
    question_batch,
    question_mask,
    question_words,
    sample_question,
    scene_questions,
    vocab_lines,
)
from vitlens_server.data.shapes import CLASSES

CONFIG = crisp_scene_config(64)
SEEDS = range(24)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    singles = [render_scene(seed, config=CONFIG) for seed in SEEDS]
    return singles + [render_scene(seed, two_object=True, config=CONFIG) for seed in SEEDS]


def _hand_scene(objects: list[SceneObject], size: int = 64) -> Scene:
    masks = np.stack([render_object_mask(obj, size) for obj in objects])  # (K, H, W)
    image = np.zeros((size, size, 3), np.uint8)
    labels = tuple(obj.label for obj in objects)
    return Scene(image=image, labels=labels, masks=masks, objects=tuple(objects), seed=0)


def _expected(scene: Scene, text: str) -> str:
    """The answer of ``text`` recomputed from the facts, by reading the question itself."""
    facts = scene_facts(scene)
    shapes, colours = [f.shape for f in facts], [f.colour for f in facts]
    count = ("zero", "one", "two")
    if m := re.fullmatch(r"is there an? (\w+)\?", text):
        return "yes" if m[1] in shapes else "no"
    if m := re.fullmatch(r"is there an? (\w+) object\?", text):
        return "yes" if m[1] in colours else "no"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", text):
        assert colours.count(m[1]) == 1  # only asked of a colour naming one object
        return shapes[colours.index(m[1])]
    if text == "what shape is the object?":
        assert len(facts) == 1
        return shapes[0]
    if m := re.fullmatch(r"what colour is the (\w+)\?", text):
        return colours[shapes.index(m[1])]
    if m := re.fullmatch(r"where is the (\w+)\?", text):
        return facts[shapes.index(m[1])].position
    if text == "how many objects are there?":
        return count[len(facts)]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", text):
        return count[colours.count(m[1])]
    if m := re.fullmatch(r"how many (\w+) are there\?", text):
        singular = {"crosses": "cross"}.get(m[1], m[1][:-1])
        assert singular in CLASSES
        return count[shapes.count(singular)]
    raise AssertionError(f"unexpected phrasing {text!r}")


def test_hand_built_scene_questions():
    # A red disc of radius 8 px centred at (12, 32) of 64 px: on the left (as in the captions).
    disc = SceneObject(CLASSES.index("disc"), (12.0, 32.0), 8.0, 0.0, (225, 25, 35))
    answers = {q.text: q.answer for q in scene_questions(_hand_scene([disc]))}
    assert answers["is there a disc?"] == "yes" and answers["is there a star?"] == "no"
    assert answers["is there a red object?"] == "yes"
    assert answers["is there an orange object?"] == "no"
    assert answers["what shape is the red object?"] == "disc"
    assert answers["what shape is the object?"] == "disc"
    assert answers["what colour is the disc?"] == "red"
    assert answers["where is the disc?"] == "left"
    assert answers["how many objects are there?"] == "one"
    assert answers["how many discs are there?"] == "one"
    assert answers["how many crosses are there?"] == "zero"
    assert answers["how many red objects are there?"] == "one"
    assert "what shape is the blue object?" not in answers


def test_answers_match_the_facts(scenes):
    for scene in scenes:
        questions = scene_questions(scene)
        assert len({q.text for q in questions}) == len(questions)
        assert [q.kind for q in questions] == sorted((q.kind for q in questions), key=KINDS.index)
        for question in questions:
            assert question.answer == _expected(scene, question.text), question.text
            assert question.kind in KINDS


def test_words_and_answers_are_closed(scenes):
    used = set()
    for scene in scenes:
        for question in scene_questions(scene):
            words = question_words(question.text)
            assert " ".join(words[:-1]) + "?" == question.text  # lower case words, then "?"
            assert all(word in VOCABULARY for word in words), question.text
            assert question.answer in ANSWERS
            assert (question.subject in words) == (question.text != "how many objects are there?")
            used.update(words)
    assert used == set(VOCABULARY)  # no word of the vocabulary is never asked
    assert list(VOCABULARY) == sorted(set(VOCABULARY))


def test_answer_vocabulary_and_indices():
    expected = ("yes", "no", *CLASSES, *COLOURS, *WHERE, "zero", "one", "two")
    assert expected == ANSWERS
    assert len(ANSWERS) == len(set(ANSWERS)) == 28
    assert [answer_index(a) for a in ANSWERS] == list(range(len(ANSWERS)))
    with pytest.raises(ValueError, match="maybe"):
        answer_index("maybe")


def test_vocab_lines_start_with_the_bert_specials():
    lines = vocab_lines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[5:] == list(VOCABULARY) and len(lines) == len(set(lines))


def test_masks_cover_exactly_the_objects_asked_about(scenes):
    for scene in scenes:
        for question in scene_questions(scene):
            mask = question_mask(scene, question)
            assert mask.shape == scene.masks.shape[1:] and mask.dtype == bool
            assert mask.any() == (question.answer not in ("no", "zero")), question.text
            expected = np.zeros_like(mask)
            for index in question.about:
                expected |= scene.masks[index]
            assert (mask == expected).all()


def test_shape_questions_name_a_colour_of_exactly_one_object(scenes):
    for scene in scenes:
        colours = [f.colour for f in scene_facts(scene)]
        for question in scene_questions(scene):
            if question.kind == "shape" and question.subject != "object":
                assert colours.count(question.subject) == 1
                assert question.about == (colours.index(question.subject),)


def test_a_shared_colour_has_no_shape_question():
    left = SceneObject(CLASSES.index("star"), (14.0, 30.0), 10.0, 0.0, (230, 20, 20))
    right = SceneObject(CLASSES.index("ring"), (50.0, 34.0), 10.0, 0.0, (225, 30, 25))
    scene = _hand_scene([left, right])
    questions = {q.text: q for q in scene_questions(scene)}
    assert not any(q.kind == "shape" for q in questions.values())
    red = questions["how many red objects are there?"]
    assert red.answer == "two" and red.about == (0, 1)
    with pytest.raises(ValueError, match="no shape question"):
        sample_question(scene, np.random.default_rng(0), "shape")
    rng = np.random.default_rng(0)
    kinds = Counter(sample_question(scene, rng).kind for _ in range(200))
    assert set(kinds) == set(KINDS) - {"shape"}
    with pytest.raises(ValueError, match="unknown"):
        sample_question(scene, rng, "size")


def test_existence_answers_are_balanced(scenes):
    rng = np.random.default_rng(1)
    samples = [sample_question(scenes[i % len(scenes)], rng, "existence") for i in range(400)]
    for form in ("object?", ""):  # colour questions, then all of them
        answers = [q.answer for q in samples if q.text.endswith(form)]
        assert len(answers) >= 150
        assert 0.42 <= answers.count("yes") / len(answers) <= 0.58  # a 70/30 split fails


def test_kinds_are_uniform_and_counts_balanced(scenes):
    rng = np.random.default_rng(2)
    samples = [sample_question(scenes[i % len(SEEDS)], rng) for i in range(500)]  # one object
    kinds = Counter(q.kind for q in samples)
    assert all(70 <= kinds[kind] <= 130 for kind in KINDS), kinds
    pairs = scenes[len(SEEDS) :]
    counts = [sample_question(pairs[i % len(pairs)], rng, "count") for i in range(600)]
    assert {q.answer for q in counts} == {"zero", "one", "two"}
    plural = re.compile(r"how many (?!objects)\w+ are there\?")  # of a shape
    shaped = [q.answer for q in counts if plural.fullmatch(q.text)]
    assert 0.4 <= shaped.count("zero") / len(shaped) <= 0.6  # zero as likely as one


def test_sampling_is_deterministic(scenes):
    def draw(seed: int) -> list[Question]:
        rng = np.random.default_rng(seed)
        return [sample_question(scene, rng) for scene in scenes]

    assert draw(5) == draw(5) and draw(5) != draw(6)
    again = [render_scene(seed, two_object=True, config=CONFIG) for seed in SEEDS]
    assert [scene_questions(s) for s in again] == [scene_questions(s) for s in scenes[len(SEEDS) :]]


def test_question_batch_mixes_scenes_deterministically():
    pairs = question_batch(range(40), np.random.default_rng(3), config=CONFIG)
    again = question_batch(range(40), np.random.default_rng(3), config=CONFIG)
    assert [q for _, q in pairs] == [q for _, q in again]
    assert {len(scene.objects) for scene, _ in pairs} == {1, 2}
    assert all(q in scene_questions(scene) for scene, q in pairs)
    with pytest.raises(ValueError, match="two_object_fraction"):
        question_batch([0], np.random.default_rng(0), two_object_fraction=1.5)
