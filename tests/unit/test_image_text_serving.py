"""Image-text serving pieces without a server: --model grammar, metadata, rounds of pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from vitlens_server.cli import parse_model_spec
from vitlens_server.explain.image_text import side_rounds
from vitlens_server.models.image_text import ImageTextLoadError, parse_image_text_source
from vitlens_server.models.image_text_serving import read_metadata


@pytest.mark.parametrize(
    ("text", "name", "source"),
    [
        ("clip=open_clip:/m/dir", "clip", "open_clip:/m/dir"),
        ("open_clip:ViT-B-32:/m/b32.safetensors", "b32", "open_clip:ViT-B-32:/m/b32.safetensors"),
        ("hf=hf-clip:/m/hf", "hf", "hf-clip:/m/hf"),
    ],
)
def test_model_spec_names_image_text_sources(text: str, name: str, source: str) -> None:
    spec = parse_model_spec(text, "cpu")
    assert spec.image_text and spec.name == name and spec.source == source


def test_the_classifier_grammar_is_unchanged() -> None:
    spec = parse_model_spec("tiny=vit_tiny_patch16_224:random", "cpu")
    assert not spec.image_text and spec.architecture == "vit_tiny_patch16_224"
    assert spec.weights is None and not spec.pretrained
    assert parse_model_spec("vit_tiny_patch16_224", "cpu").pretrained


def test_metadata_from_config_key_then_sidecar(tmp_path: Path) -> None:
    config = {"model_cfg": {}, "vitlens": {"labels": ["a", "b"]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    (tmp_path / "vitlens.json").write_text(json.dumps({"labels": ["x"], "prompt_template": "{}!"}))
    found = read_metadata(parse_image_text_source(f"open_clip:{tmp_path}"))
    assert found == {"labels": ["a", "b"], "prompt_template": "{}!"}
    hf = read_metadata(parse_image_text_source(f"hf-clip:{tmp_path}"))
    assert hf["labels"] == ["x"]


def test_metadata_labels_must_be_a_list(tmp_path: Path) -> None:
    (tmp_path / "vitlens.json").write_text(json.dumps({"labels": "cat"}))
    with pytest.raises(ImageTextLoadError, match="list of strings"):
        read_metadata(parse_image_text_source(f"hf-clip:{tmp_path}"))


@pytest.mark.parametrize(("images", "texts"), [(1, 1), (3, 2), (2, 5), (4, 4), (7, 3)])
def test_rounds_hold_each_item_of_their_tower_once(images: int, texts: int) -> None:
    pairs = list(itertools.product(range(images), range(texts)))
    for side, count in ((0, texts), (1, images)):
        rounds = side_rounds(pairs, side)
        assert len(rounds) == count  # M image rounds, B text rounds for the full grid
        assert sorted(i for r in rounds for i in r) == list(range(len(pairs)))
        for members in rounds:
            assert len({pairs[i][side] for i in members}) == len(members)


def test_rounds_of_any_pairs() -> None:
    pairs = [(0, 2), (1, 2), (2, 2), (0, 0), (1, 1)]  # three images chose text 2
    assert side_rounds(pairs, 0) == [[0, 1, 2], [3, 4]]
    assert side_rounds(pairs, 1) == [[0, 3, 4], [1], [2]]
