"""Held-out answer accuracy of an exemplar VQA model, overall and per question kind.

``python -m vitlens_server.training.vqa_eval server/vitlens_server/assets/vitlens-visualbert``
evaluates an exported model on the "test" questions (`vqa_data.held_out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch

from vitlens_server.data.questions import KINDS
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.vqa_data import held_out, tokenize
from vitlens_server.training.vqa_export import load_exported
from vitlens_server.training.vqa_net import MEAN, STD

__all__ = ["evaluate_vqa", "main"]


@torch.inference_mode()
def evaluate_vqa(
    net: torch.nn.Module, split: str, count: int, *, size: int, batch_size: int = 100
) -> dict[str, float]:
    """Accuracy of ``net`` (a `vqa_net.VqaNet`) on ``count`` held-out questions of ``split``:
    ``{"count", "accuracy", "accuracy_<kind>" for each kind}``; leaves ``net`` in eval mode."""
    net.eval()
    device = next(net.parameters()).device
    hits: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for start in range(0, count, batch_size):
        batch = held_out(split, start, min(batch_size, count - start), size=size)
        pixels = to_model_input(batch.images, MEAN, STD, device)
        ids, mask = tokenize(net.tokenizer, batch.questions, device)
        right = (net(pixels, ids, mask).argmax(1).cpu() == batch.answers).tolist()
        for question, ok in zip(batch.questions, right, strict=True):
            asked[question.kind] += 1
            hits[question.kind] += int(ok)
    metrics = {"count": float(count), "accuracy": round(sum(hits.values()) / count, 4)}
    for kind in KINDS:
        if asked[kind]:
            metrics[f"accuracy_{kind}"] = round(hits[kind] / asked[kind], 4)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_server.training.vqa_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model_dir", help="an exported exemplar (vqa_train's export directory)")
    parser.add_argument("--count", type=int, default=1000, help="held-out questions")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, size = load_exported(args.model_dir)
    print(json.dumps(evaluate_vqa(net, args.split, args.count, size=size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
