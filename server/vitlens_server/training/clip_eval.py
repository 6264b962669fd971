"""Held-out metrics of a CLIP on generated scenes: zero-shot shapes, caption retrieval, and
whether each object of a two-object scene is found by its name.

``python -m vitlens_server.training.clip_eval DIR`` loads an exported model directory with
open_clip (``local-dir:DIR``) and prints the metrics on the "test" split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitlens_server.data import SceneConfig, render_scene, split_seeds
from vitlens_server.data.captions import (
    COLOURS,
    WHERE,
    ObjectFacts,
    canonical_caption,
    crisp_scene_config,
    prompt,
    scene_facts,
    with_article,
)
from vitlens_server.data.shapes import CLASSES
from vitlens_server.training.accuracy import to_model_input

__all__ = ["PROMPT_TEMPLATE", "ClipMetrics", "evaluate_clip", "main"]

PROMPT_TEMPLATE = "a photo of a {}."

Tokenize = Callable[[Sequence[str]], torch.Tensor]  # texts → (T, L) int64 tokens


@dataclass(frozen=True)
class ClipMetrics:
    """Fractions in [0, 1] over ``count`` scenes of each kind.

    Attributes:
        zero_shot_top1: single-object scenes whose best of the 8 prompts names their shape.
        image_to_text_r1 / text_to_image_r1: caption retrieval among the ``count`` single-object
            scenes with canonical captions; a retrieved caption (image) counts as a hit when its
            text is identical to the scene's (a few scenes share a caption).
        pair_image_to_text_r1 / pair_text_to_image_r1: the same on two-object scenes.
        pair_zero_shot_top2_both: two-object scenes whose 2 best prompts are their two shapes.
        pair_name_first / pair_name_second: per object (painting order), the prompt of its shape
            scores higher than the prompts of all six shapes absent from the scene.
        pair_text_first / pair_text_second: per object, its shape's prompt scores higher with
            this scene than with the next held-out two-object scene that lacks that shape.
        colour_top1 / position_top1 / size_top1: single-object scenes whose best of "a {colour}
            {shape}." (10 colours), "a {shape} {where}." (5 positions) or "a {size} {shape}."
            (2 sizes), with the scene's own shape, names the scene's value.
    """

    count: int
    zero_shot_top1: float
    image_to_text_r1: float
    text_to_image_r1: float
    pair_image_to_text_r1: float
    pair_text_to_image_r1: float
    pair_zero_shot_top2_both: float
    pair_name_first: float
    pair_name_second: float
    pair_text_first: float
    pair_text_second: float
    colour_top1: float
    position_top1: float
    size_top1: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.items()}

    def items(self):
        return dataclasses.asdict(self).items()


@torch.inference_mode()
def _image_embeddings(
    model: nn.Module, seeds: Sequence[int], two_object: bool, config: SceneConfig, batch_size: int
) -> tuple[torch.Tensor, list[str], torch.Tensor, list[ObjectFacts]]:
    """Unit image embeddings (S, E), canonical captions (S,), labels (S, K) and the first
    object's facts (S,) of ``seeds``."""
    device = next(model.parameters()).device
    embeddings, captions, labels, facts = [], [], [], []
    for start in range(0, len(seeds), batch_size):
        scenes = [
            render_scene(s, two_object=two_object, config=config)
            for s in seeds[start : start + batch_size]
        ]
        images = to_model_input(np.stack([s.image for s in scenes]), (0.5,) * 3, (0.5,) * 3, device)
        embeddings.append(model.encode_image(images, normalize=True).float().cpu())
        captions += [canonical_caption(s).text for s in scenes]
        labels.append(torch.tensor([s.labels for s in scenes]))
        facts += [scene_facts(s)[0] for s in scenes]
    return torch.cat(embeddings), captions, torch.cat(labels), facts


@torch.inference_mode()
def _text_embeddings(model: nn.Module, tokenize: Tokenize, texts: Sequence[str]) -> torch.Tensor:
    """Unit text embeddings (T, E)."""
    device = next(model.parameters()).device
    return model.encode_text(tokenize(list(texts)).to(device), normalize=True).float().cpu()


def _retrieval(model: nn.Module, tokenize: Tokenize, images: torch.Tensor, captions: list[str]):
    """(image→text, text→image) R@1 with identical-text captions counted as hits."""
    unique = sorted(set(captions))
    index = {text: i for i, text in enumerate(unique)}
    truth = torch.tensor([index[c] for c in captions])  # (S,)
    similarity = images @ _text_embeddings(model, tokenize, unique).T  # (S, U)
    image_to_text = (similarity.argmax(1) == truth).float().mean().item()
    best_image = similarity.argmax(0)  # (U,) for each caption text, its best scene
    text_to_image = (truth[best_image[truth]] == truth).float().mean().item()
    return image_to_text, text_to_image


def evaluate_clip(
    model: nn.Module,
    tokenize: Tokenize,
    *,
    count: int = 500,
    split: str = "test",
    size: int = 224,
    template: str = PROMPT_TEMPLATE,
    batch_size: int = 100,
    crisp: bool = False,
) -> ClipMetrics:
    """`ClipMetrics` of ``model`` (an open_clip CLIP, in eval mode) on held-out scenes of side
    ``size`` px, drawn with crisp attributes (`crisp_scene_config`) when ``crisp``."""
    seeds = list(split_seeds(split, count))
    config = crisp_scene_config(size) if crisp else SceneConfig(size=size)
    prompts = _text_embeddings(model, tokenize, [prompt(c, template) for c in CLASSES])  # (8, E)

    images, captions, labels, facts = _image_embeddings(model, seeds, False, config, batch_size)
    zero_shot = ((images @ prompts.T).argmax(1) == labels[:, 0]).float().mean().item()
    i2t, t2i = _retrieval(model, tokenize, images, captions)

    pairs, pair_captions, pair_labels, _ = _image_embeddings(model, seeds, True, config, batch_size)
    pair_i2t, pair_t2i = _retrieval(model, tokenize, pairs, pair_captions)
    scores = pairs @ prompts.T  # (S, 8)
    top2 = scores.topk(2, dim=1).indices.sort(dim=1).values
    both = (top2 == pair_labels.sort(dim=1).values).all(dim=1).float().mean().item()
    present = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, pair_labels, True)
    best_absent = scores.masked_fill(present, float("-inf")).amax(1)  # (S,)
    names, texts = [], []
    for k in range(2):
        own = scores.gather(1, pair_labels[:, k : k + 1])[:, 0]  # (S,)
        names.append((own > best_absent).float().mean().item())
        others = [_next_without(pair_labels, i, int(pair_labels[i, k])) for i in range(count)]
        other = scores[others, pair_labels[:, k]]  # (S,) the same prompt on a scene without it
        texts.append((own > other).float().mean().item())
    attributes = _attribute_top1(model, tokenize, images, facts)
    return ClipMetrics(
        count, zero_shot, i2t, t2i, pair_i2t, pair_t2i, both, *names, *texts, *attributes
    )


_ATTRIBUTE_PROMPTS = (  # attribute, its values, prompt of (shape, value)
    ("colour", tuple(COLOURS), "a {1} {0}."),
    ("position", tuple(WHERE), None),
    ("size", ("small", "large"), "a {1} {0}."),
)


def _attribute_top1(
    model: nn.Module, tokenize: Tokenize, images: torch.Tensor, facts: Sequence[ObjectFacts]
) -> list[float]:
    """Per attribute, the fraction of (S, E) ``images`` whose best prompt among that attribute's
    values (with the object's own shape) names the object's value."""
    out = []
    for key, values, template in _ATTRIBUTE_PROMPTS:
        texts = [
            with_article(template.format(shape, v) if template else f"a {shape} {WHERE[v]}.")
            for shape in CLASSES
            for v in values
        ]
        prompts = _text_embeddings(model, tokenize, texts).reshape(len(CLASSES), len(values), -1)
        shapes = torch.tensor([CLASSES.index(f.shape) for f in facts])  # (S,)
        scores = (prompts[shapes] @ images[:, :, None])[..., 0]  # (S, V)
        truth = torch.tensor([values.index(getattr(f, key)) for f in facts])
        out.append((scores.argmax(1) == truth).float().mean().item())
    return out


def _next_without(labels: torch.Tensor, i: int, label: int) -> int:
    """The first scene after ``i`` (cyclically) whose labels (S, K) do not include ``label``."""
    for step in range(1, labels.shape[0]):
        j = (i + step) % labels.shape[0]
        if label not in labels[j]:
            return j
    raise ValueError("every scene holds that label")


def main(argv: list[str] | None = None) -> int:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="an open_clip model directory (open_clip_config.json)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument(
        "--scenes",
        choices=("crisp", "free"),
        help="scene attributes (default: vitlens.json's 'scenes', else free)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name = f"local-dir:{args.directory}"
    model = open_clip.create_model(name).eval()
    metadata_path = Path(args.directory) / "vitlens.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    scenes = args.scenes or metadata.get("scenes", "free")
    metrics = evaluate_clip(
        model,
        open_clip.get_tokenizer(name),
        count=args.count,
        split=args.split,
        size=int(model.visual.image_size[0]),
        crisp=scenes == "crisp",
    )
    print(json.dumps(metrics.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
