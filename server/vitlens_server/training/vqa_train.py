"""Train an exemplar VQA model (ViLT, VisualBERT or LXMERT) on generated scenes and questions.

``python -m vitlens_server.training.vqa_train --arch vilt --out build/vilt`` (``--help`` for the
schedule). Each step renders fresh scenes with one question each (`vqa_data.make_batch`); the
loss is cross-entropy over the closed answer vocabulary. ViLT's encoder starts as the exemplar
CLIP's image tower and learns at ``trunk_lr``; VisualBERT and LXMERT learn from scratch on the
frozen tower's patch tokens (`vqa_model`). Runs checkpoint every few minutes and resume with
``--resume``; ``--init-from CKPT`` starts a new schedule from an earlier run's weights, on the
scenes after its last step. An auxiliary grounding loss (weight ``grounding_weight``) asks the
final patch tokens which of them belong to the objects the question is about (`VqaNet.grounded`,
`vqa_data.patch_targets`): without it neither ViLT nor LXMERT learnt, in 1,500 steps, to match
a question's words to an object (benchmarks/vqa_training.md, runs 1). The export is a Hugging
Face directory (``config.json``, ``model.safetensors`` in float16, ``vocab.txt``) with a
``vitlens.json`` of answers, front-end and training record (`vqa_export`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitlens_server.models.default import ASSETS
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.clip_checkpoint import (
    config_key,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from vitlens_server.training.clip_optim import lr_factor
from vitlens_server.training.config_cli import (
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    start_run,
)
from vitlens_server.training.optim import trunk_adamw
from vitlens_server.training.train import _device_name
from vitlens_server.training.vqa_data import make_batch, patch_targets, tokenize
from vitlens_server.training.vqa_eval import evaluate_vqa
from vitlens_server.training.vqa_export import export_vqa
from vitlens_server.training.vqa_net import ARCHS, MEAN, STD, VqaNet, build_net

__all__ = ["VqaTrainConfig", "main", "train_vqa"]

log = logging.getLogger("vitlens.vqa_train")


@dataclass(frozen=True)
class VqaTrainConfig:
    """Hyper-parameters of a run; steps count batches of ``batch_size`` scene-question pairs."""

    arch: str = "vilt"  # "vilt", "visualbert" or "lxmert"
    out: Path = Path("build/vqa")  # checkpoint directory
    export_dir: Path | None = None  # None: ASSETS / "vitlens-<arch>"
    seed: int = 0
    init_from: Path | None = None  # an earlier run's checkpoint: its weights, a fresh schedule
    image_size: int = 160
    steps: int = 2500
    batch_size: int = 64
    lr: float = 5e-4  # new parts: text embeddings, heads, VisualBERT and LXMERT entirely
    trunk_lr: float = 1e-4  # ViLT's encoder, initialised from the CLIP tower
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_fraction: float = 0.05
    two_object_fraction: float = 0.5
    grounding_weight: float = 1.0  # the auxiliary patch-grounding loss (0: answers only)
    eval_every: int = 250  # steps between quick evaluations on the "val" split (0: none)
    eval_count: int = 200
    final_eval_count: int = 1000
    device: str = "cpu"
    checkpoint_every_s: float = 240.0

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def export_path(self) -> Path:
        return self.export_dir or ASSETS / f"vitlens-{self.arch}"


def make_optimizer(net: VqaNet, config: VqaTrainConfig) -> torch.optim.AdamW:
    """AdamW groups: the pretrained trunk at ``trunk_lr``, the rest at ``lr``; no decay for
    1-d tensors and embeddings. Frozen parameters (LXMERT's front-end) are left out."""
    return trunk_adamw(net, config, net.is_trunk, ("embedding", "cls_token"))


def train_vqa(
    config: VqaTrainConfig,
    command: str = "",
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any] | None:
    """Train, evaluate on held-out scenes and export; the exported metadata, or None when
    ``stop_at_step``/``max_seconds`` stopped the run first (its checkpoint in ``config.out``:
    rerun with ``resume`` to continue)."""
    device = torch.device(config.device)
    net = build_net(config.arch, seed=config.seed).to(device)
    optimizer = make_optimizer(net, config)
    checkpoint = config.out / f"{config.arch}.ckpt"
    key = config_key(config, _NOT_RESUME_KEYS)
    step, elapsed_s, curve = 0, 0.0, []
    if resume and checkpoint.is_file():
        step, elapsed_s, curve = load_checkpoint(checkpoint, net, optimizer, key)
        log.info("resumed from %s at step %d", checkpoint, step)
    earlier = _earlier_run(config.init_from, net, weights=step == 0)
    log.info(
        "training %s on %s from step %d of %d",
        config.arch,
        _device_name(device),
        step,
        config.steps,
    )
    started = time.perf_counter() - elapsed_s
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    last_save = window_start = time.perf_counter()
    window_loss, window_grounding, window_hits, window_steps = 0.0, 0.0, 0, 0
    net.train()
    while step < config.steps:
        batch = make_batch(
            earlier["step"] + step,  # a continuation trains on the scenes after its start's
            batch_size=config.batch_size,
            size=config.image_size,
            two_object_fraction=config.two_object_fraction,
            seed=config.seed,
        )
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(config, step)
        pixels = to_model_input(batch.images, MEAN, STD, device)  # (B, 3, S, S)
        ids, mask = tokenize(net.tokenizer, batch.questions, device)  # (B, T)
        answers = batch.answers.to(device)
        if config.grounding_weight:
            logits, scores = net.grounded(pixels, ids, mask)  # (B, A), (B, n)
            targets = patch_targets(batch, scores.shape[1]).to(device)  # (B, n)
            grounding = F.binary_cross_entropy_with_logits(scores, targets)
        else:
            logits, grounding = net(pixels, ids, mask), torch.zeros((), device=device)
        loss = F.cross_entropy(logits, answers) + config.grounding_weight * grounding
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
        window_loss += loss.item()
        window_grounding += grounding.item()
        window_hits += int((logits.argmax(1) == answers).sum())
        window_steps += 1
        if step % 20 == 0 or step == config.steps:
            now = time.perf_counter()
            rate = window_steps * config.batch_size / (now - window_start)
            log.info(
                "step %d/%d  loss %.3f (grounding %.3f)  train acc %.3f  lr %.1e  %.0f q/s  "
                "eta %.1f min",
                step,
                config.steps,
                window_loss / window_steps,
                window_grounding / window_steps,
                window_hits / (window_steps * config.batch_size),
                optimizer.param_groups[0]["lr"],
                rate,
                (config.steps - step) * config.batch_size / rate / 60,
            )
            window_loss, window_grounding, window_hits, window_steps = 0.0, 0.0, 0, 0
            window_start = now
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics = evaluate_vqa(net, "val", config.eval_count, size=config.image_size)
            minutes = (time.perf_counter() - started) / 60
            curve.append({"step": step, "minutes": round(minutes, 1), **metrics})
            log.info("val @ step %d: %s", step, json.dumps(curve[-1]))
            net.train()
            window_start = time.perf_counter()
        stop = step == stop_at_step or (deadline is not None and time.perf_counter() > deadline)
        due = time.perf_counter() - last_save > config.checkpoint_every_s
        if stop or due or step == config.steps:
            elapsed = time.perf_counter() - started
            save_checkpoint(checkpoint, net, optimizer, key, step, elapsed, curve)
            last_save = time.perf_counter()
        if stop and step < config.steps:
            log.info("stopped at step %d; continue with --resume", step)
            return None

    train_seconds = time.perf_counter() - started
    net.round_to_half()  # evaluate what the export stores: float16-rounded weights
    metrics = evaluate_vqa(net, "test", config.final_eval_count, size=config.image_size)
    log.info("held-out (test) accuracy: %s", json.dumps(metrics))
    metadata = {
        "training_command": command,
        "config": json.loads(key),
        "train_seconds": round(train_seconds, 1),
        "earlier_run": earlier,  # what --init-from started from (step 0: nothing)
        "device": _device_name(device),
        "torch": torch.__version__,
        "metrics": metrics,
        "curve": curve,
    }
    export_vqa(net, config.export_path, metadata)
    log.info("exported to %s", config.export_path)
    return metadata


def _earlier_run(path: Path | None, net: VqaNet, *, weights: bool) -> dict[str, Any]:
    """The run ``--init-from`` continues: its step and training time, and (``weights``) its
    model weights copied into ``net``; ``{"step": 0, ...}`` when there is none."""
    if path is None:
        return {"checkpoint": None, "step": 0, "train_seconds": 0.0}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if weights:
        load_weights(net, state, path)
        log.info("starting from %s (step %d)", path, state["step"])
    return {
        "checkpoint": str(path),
        "step": int(state["step"]),
        "train_seconds": round(float(state["elapsed_s"]), 1),
    }


# Fields that a resumed run may change: where it writes, how it evaluates and reports.
_NOT_RESUME_KEYS = (
    "out",
    "export_dir",
    "eval_every",
    "eval_count",
    "final_eval_count",
    "checkpoint_every_s",
    "device",
)

# Config fields that are command-line options (``--kebab-case``, types and defaults from
# `VqaTrainConfig`).
_OPTIONS = (
    "arch",
    "out",
    "export_dir",
    "seed",
    "init_from",
    "steps",
    "batch_size",
    "lr",
    "trunk_lr",
    "weight_decay",
    "warmup_steps",
    "two_object_fraction",
    "grounding_weight",
    "eval_every",
    "eval_count",
    "final_eval_count",
    "device",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_server.training.vqa_train", description=__doc__.splitlines()[0]
    )
    add_config_arguments(
        parser,
        VqaTrainConfig,
        _OPTIONS,
        help={
            "out": "checkpoint directory",
            "init_from": "an earlier run's checkpoint to start from (weights only)",
            "export_dir": "where the model is exported (default: the shipped asset directory)",
            "device": '"cpu" or a CUDA device ("cuda", "cuda:1")',
        },
        choices={"arch": ARCHS},
    )
    add_run_arguments(parser, "<out>/<arch>.ckpt")
    args = parser.parse_args(argv)
    run = start_run(parser, args, argv)
    config = config_from_args(VqaTrainConfig, args, _OPTIONS)
    metadata = train_vqa(config, run.command, resume=run.resume, max_seconds=run.max_seconds)
    if metadata is not None:
        print(json.dumps(metadata["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
