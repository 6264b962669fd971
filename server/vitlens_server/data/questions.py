"""Visual questions about generated scenes, with closed answers: what a VQA model learns.

Every answer is read from `scene_facts` (shape, nearest named colour and centroid position of
each object's visible mask), so, like a caption, it is true of the pixels. The kinds
(`KINDS`, in this order) and their only phrasings:

- **existence**: "is there a {shape}?", "is there a {colour} object?" -> yes / no;
- **shape**: "what shape is the {colour} object?" (only for a colour that names exactly one
  object of the scene) and, in single-object scenes, "what shape is the object?" -> a shape;
- **colour**: "what colour is the {shape}?" (a shape of the scene) -> a colour;
- **position**: "where is the {shape}?" (a shape of the scene) -> centre / left / right / top /
  bottom (the `WHERE` names of the captions);
- **count**: "how many objects are there?" -> one / two; "how many {shapes} are there?" -> zero /
  one (two objects always differ in shape); "how many {colour} objects are there?" -> zero /
  one / two.

"a" becomes "an" before a vowel ("is there an orange object?"). Questions are lower case and end
in "?"; `question_words` splits one into the words of `VOCABULARY` (the "?" is a word of its
own, as a BERT basic tokenizer splits it), so a word-level `vocab.txt` (`vocab_lines`) never
splits or misses a word.

A `Question` names the objects it is about (``about``): the asked object, the objects counted
or found, none for a "no" or a "zero". `question_mask` is the union of their masks, the target
of an explanation's segmentation.

`sample_question` balances answers, so that a model cannot answer from the question alone (see
its docstring for the exact rule): yes and no are equally likely for every existence question
form, zero and non-zero for shape counts, every count a scene allows for colour counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitlens_server.data.captions import (
    COLOURS,
    WHERE,
    crisp_scene_config,
    scene_facts,
    with_article,
)
from vitlens_server.data.scenes import Scene, SceneConfig, render_scene
from vitlens_server.data.shapes import CLASSES

__all__ = [
    "ANSWERS",
    "COUNTS",
    "KINDS",
    "PLURALS",
    "VOCABULARY",
    "Question",
    "answer_index",
    "question_batch",
    "question_mask",
    "question_words",
    "sample_question",
    "scene_questions",
    "vocab_lines",
]

KINDS = ("existence", "shape", "colour", "position", "count")
COUNTS = ("zero", "one", "two")  # answers of the count questions, by number
ANSWERS: tuple[str, ...] = ("yes", "no", *CLASSES, *COLOURS, *WHERE, *COUNTS)
PLURALS: dict[str, str] = {  # shape -> its plural ("cross" -> "crosses")
    s: s + ("es" if s.endswith(("s", "x", "ch", "sh")) else "s") for s in CLASSES
}

# Every phrasing, by form: {s} a shape, {p} its plural, {c} a colour. A form's kind is its prefix.
_TEMPLATES = {
    "existence/shape": "is there a {s}?",
    "existence/colour": "is there a {c} object?",
    "shape/colour": "what shape is the {c} object?",
    "shape/object": "what shape is the object?",
    "colour/shape": "what colour is the {s}?",
    "position/shape": "where is the {s}?",
    "count/objects": "how many objects are there?",
    "count/shape": "how many {p} are there?",
    "count/colour": "how many {c} objects are there?",
}
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORD = re.compile(r"[a-z]+|\?")


def question_words(text: str) -> list[str]:
    """The words of a question, the "?" one of them: "is there a star?" -> [..., "star", "?"]."""
    return _WORD.findall(text)


def _vocabulary() -> tuple[str, ...]:
    fixed = {w for t in _TEMPLATES.values() for w in question_words(re.sub(r"{\w}", "", t))}
    return tuple(sorted(fixed | {"an"} | set(CLASSES) | set(PLURALS.values()) | set(COLOURS)))


VOCABULARY: tuple[str, ...] = _vocabulary()
_ANSWER_INDEX = {answer: index for index, answer in enumerate(ANSWERS)}


@dataclass(frozen=True)
class Question:
    """One question about a scene and its answer.

    Attributes:
        text: the question, lower case, ending in "?".
        answer: one of `ANSWERS`.
        kind: one of `KINDS`.
        about: indices into the scene's objects the question is about: the asked object; the
            objects found or counted; empty for a "no" or a "zero".
        subject: the word of ``text`` naming what is asked about ("star", "crosses", "red",
            "object"); empty for "how many objects are there?".
    """

    text: str
    answer: str
    kind: str
    about: tuple[int, ...]
    subject: str


def vocab_lines() -> list[str]:
    """The lines of a word-level BERT ``vocab.txt``: the specials in BERT's order ([PAD] is id
    0), then `VOCABULARY`."""
    return [*_BERT_SPECIALS, *VOCABULARY]


def answer_index(answer: str) -> int:
    """The index of ``answer`` in `ANSWERS` (a classifier's target)."""
    try:
        return _ANSWER_INDEX[answer]
    except KeyError:
        raise ValueError(f"{answer!r} is not one of ANSWERS") from None


def scene_questions(scene: Scene) -> tuple[Question, ...]:
    """Every question of every kind about ``scene``, answered from `scene_facts`, in the order of
    `KINDS`: existence and counts of every shape and colour (present or not), a shape question
    per colour naming exactly one object, colour and position questions per present shape."""
    return tuple(question for _, question in _catalogue(scene))


def sample_question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Question:
    """One question about ``scene``, drawn with balanced answers.

    The rule, each step uniform among what the scene allows:

    1. the kind: ``kind`` if given, else one of `KINDS` (a two-object scene whose objects share
       their colour has no shape question; its kind is then one of the other four);
    2. the form, one of the kind's phrasings the scene has ("is there a {shape}?" or "is there a
       {colour} object?"; "how many objects", of a shape or of a colour; "what shape is the
       {colour} object?" or, with one object, "what shape is the object?");
    3. the answer, among the answers of that form's questions: yes or no for existence, zero or
       one for a shape count, zero and the counts present (one, or two) for a colour count;
       "how many objects" has the scene's one answer (balanced by the dataset's mix of one- and
       two-object scenes);
    4. the question, among that form's questions with that answer (the absent shape or colour
       of a "no", the present one of a "yes", ...).

    Raises:
        ValueError: ``kind`` is not in `KINDS`, or the scene has no question of that kind.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    catalogue = _catalogue(scene)
    kinds = [k for k in KINDS if any(q.kind == k for _, q in catalogue)]
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    elif kind not in kinds:
        raise ValueError(f"scene {scene.seed} has no {kind} question")
    forms = sorted({form for form, q in catalogue if q.kind == kind})
    form = forms[int(rng.integers(len(forms)))]
    answers = sorted({q.answer for f, q in catalogue if f == form}, key=_ANSWER_INDEX.__getitem__)
    answer = answers[int(rng.integers(len(answers)))]
    pool = [q for f, q in catalogue if f == form and q.answer == answer]
    return pool[int(rng.integers(len(pool)))]


def question_mask(scene: Scene, question: Question) -> np.ndarray:
    """The (H, W) bool union of the masks of the objects ``question`` is about (all False when
    it is about none)."""
    if not question.about:
        return np.zeros(scene.masks.shape[1:], dtype=bool)
    return scene.masks[list(question.about)].any(axis=0)  # (K', H, W) -> (H, W)


def question_batch(
    seeds: Sequence[int],
    rng: np.random.Generator,
    *,
    two_object_fraction: float = 0.5,
    config: SceneConfig | None = None,
) -> list[tuple[Scene, Question]]:
    """Scenes of ``seeds`` with a `sample_question` each; a scene holds two objects with
    probability ``two_object_fraction`` (drawn from ``rng`` before its question), so the same
    seeds and ``rng`` state give the same pairs. ``config`` None: `crisp_scene_config` (224 px)."""
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    config = crisp_scene_config() if config is None else config
    pairs = []
    for seed in seeds:
        two_object = bool(rng.random() < two_object_fraction)
        scene = render_scene(int(seed), two_object=two_object, config=config)
        pairs.append((scene, sample_question(scene, rng)))
    return pairs


def _catalogue(scene: Scene) -> list[tuple[str, Question]]:
    """Every question of ``scene`` with its form (a key of `_TEMPLATES`), in `KINDS` order."""
    facts = scene_facts(scene)
    where_shape = {f.shape: i for i, f in enumerate(facts)}  # shapes differ within a scene
    with_colour = {c: tuple(i for i, f in enumerate(facts) if f.colour == c) for c in COLOURS}
    out: list[tuple[str, Question]] = []

    def add(form: str, answer: str, about: tuple[int, ...], subject: str, **names: str) -> None:
        text = with_article(_TEMPLATES[form].format(**names))
        out.append((form, Question(text, answer, form.split("/")[0], about, subject)))

    for s in CLASSES:
        found = (where_shape[s],) if s in where_shape else ()
        add("existence/shape", "yes" if found else "no", found, s, s=s)
    for c, found in with_colour.items():
        add("existence/colour", "yes" if found else "no", found, c, c=c)
    for c, found in with_colour.items():
        if len(found) == 1:
            add("shape/colour", facts[found[0]].shape, found, c, c=c)
    if len(facts) == 1:
        add("shape/object", facts[0].shape, (0,), "object")
    for i, f in enumerate(facts):
        add("colour/shape", f.colour, (i,), f.shape, s=f.shape)
    for i, f in enumerate(facts):
        add("position/shape", f.position, (i,), f.shape, s=f.shape)
    add("count/objects", COUNTS[len(facts)], tuple(range(len(facts))), "")
    for s in CLASSES:
        found = (where_shape[s],) if s in where_shape else ()
        add("count/shape", COUNTS[len(found)], found, PLURALS[s], p=PLURALS[s])
    for c, found in with_colour.items():
        add("count/colour", COUNTS[len(found)], found, c, c=c)
    return out
