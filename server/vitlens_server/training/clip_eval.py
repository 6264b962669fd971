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

import numpy as np
import torch
from torch import nn

from vitlens_server.data import SceneConfig, render_scene, split_seeds
from vitlens_server.data.captions import canonical_caption, prompt
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

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.items()}

    def items(self):
        return dataclasses.asdict(self).items()


@torch.inference_mode()
def _image_embeddings(
    model: nn.Module, seeds: Sequence[int], two_object: bool, size: int, batch_size: int
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Unit image embeddings (S, E), canonical captions (S,) and labels (S, K) of ``seeds``."""
    device = next(model.parameters()).device
    config = SceneConfig(size=size)
    embeddings, captions, labels = [], [], []
    for start in range(0, len(seeds), batch_size):
        scenes = [
            render_scene(s, two_object=two_object, config=config)
            for s in seeds[start : start + batch_size]
        ]
        images = to_model_input(np.stack([s.image for s in scenes]), (0.5,) * 3, (0.5,) * 3, device)
        embeddings.append(model.encode_image(images, normalize=True).float().cpu())
        captions += [canonical_caption(s).text for s in scenes]
        labels.append(torch.tensor([s.labels for s in scenes]))
    return torch.cat(embeddings), captions, torch.cat(labels)


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
) -> ClipMetrics:
    """`ClipMetrics` of ``model`` (an open_clip CLIP, in eval mode) on held-out scenes."""
    seeds = list(split_seeds(split, count))
    prompts = _text_embeddings(model, tokenize, [prompt(c, template) for c in CLASSES])  # (8, E)

    images, captions, labels = _image_embeddings(model, seeds, False, size, batch_size)
    zero_shot = ((images @ prompts.T).argmax(1) == labels[:, 0]).float().mean().item()
    i2t, t2i = _retrieval(model, tokenize, images, captions)

    pairs, pair_captions, pair_labels = _image_embeddings(model, seeds, True, size, batch_size)
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
    return ClipMetrics(count, zero_shot, i2t, t2i, pair_i2t, pair_t2i, both, *names, *texts)


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
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name = f"local-dir:{args.directory}"
    model = open_clip.create_model(name).eval()
    metrics = evaluate_clip(
        model, open_clip.get_tokenizer(name), count=args.count, split=args.split
    )
    print(json.dumps(metrics.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
