"""Train the exemplar detector (`detr_model`) on generated detection scenes of 1 to 4 objects.

``python -m vitlens_server.training.detr_train --out build/detr`` (``--help`` for the schedule).
Each step renders fresh scenes (`detection_batch`, seeds from the step: a run is reproducible and
a resumed run sees the scenes it would have seen); the loss is Hugging Face DETR's own
(Hungarian matching; class, L1 and GIoU terms, on every decoder layer). The backbone starts as
the demo ViT's trunk and learns at ``trunk_lr``, the rest from scratch at ``lr``; the forward
pass runs in bfloat16 autocast on CPU. Runs checkpoint every few minutes and resume with
``--resume``. The export is the model's ``save_pretrained`` directory (float16 safetensors),
a ``preprocessor_config.json`` and a ``vitlens.json`` with the training record (`detr_export`).
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
from transformers import DetrForObjectDetection

from vitlens_server.data import split_seeds
from vitlens_server.data.detection import MAX_OBJECTS, detection_batch
from vitlens_server.models.default import ASSETS
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.clip_checkpoint import config_key, load_checkpoint, save_checkpoint
from vitlens_server.training.clip_optim import lr_factor
from vitlens_server.training.config_cli import (
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    start_run,
)
from vitlens_server.training.detr_eval import detection_map
from vitlens_server.training.detr_export import export_detr
from vitlens_server.training.detr_model import MEAN, STD, build_detr
from vitlens_server.training.detr_prior import attention_prior_loss, matched_pairs
from vitlens_server.training.optim import trunk_adamw
from vitlens_server.training.train import _device_name

__all__ = ["DetrTrainConfig", "main", "train_detr"]

log = logging.getLogger("vitlens.detr_train")


@dataclass(frozen=True)
class DetrTrainConfig:
    """Hyper-parameters of a run; steps count batches of ``batch_size`` scenes."""

    out: Path = Path("build/detr")  # checkpoint directory
    export_dir: Path | None = None  # None: ASSETS / "vitlens-detr"
    seed: int = 0
    steps: int = 20000
    batch_size: int = 16
    num_queries: int = 9  # a 3 x 3 grid of anchors (`anchors`)
    anchors: bool = True  # queries start anchored on a grid (`detr_model.init_anchor_queries`)
    trunk_blocks: int = 6  # of the demo ViT's 6
    decoder_layers: int = 3
    freeze_trunk: bool = True  # the demo trunk's features as they are (no backward through it)
    single_object_steps: int = 2000  # curriculum: scenes of one object only, then
    pair_steps: int = 2000  # of at most two, then of one to four
    attention_prior: float = 1.0  # weight of `detr_prior`'s first-layer attention loss
    lr: float = 2e-4  # DETR's encoder, decoder, queries and heads
    trunk_lr: float = 5e-5  # the backbone, from the demo ViT (unless frozen)
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_fraction: float = 0.05
    bf16: bool = True  # bfloat16 autocast of the forward pass
    eval_every: int = 1000  # steps between quick box-mAP evaluations on "val" (0: none)
    eval_count: int = 200
    final_eval_count: int = 1000
    device: str = "cpu"
    checkpoint_every_s: float = 240.0

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def export_path(self) -> Path:
        return self.export_dir or ASSETS / "vitlens-detr"


def make_optimizer(model: DetrForObjectDetection, config: DetrTrainConfig) -> torch.optim.AdamW:
    """AdamW groups: the backbone at ``trunk_lr``, the rest at ``lr``; no decay for 1-d tensors
    and embeddings."""
    return trunk_adamw(
        model, config, lambda name: name.startswith("model.backbone."), ("embed", "cls_token")
    )


def train_detr(
    config: DetrTrainConfig,
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
    model = build_detr(
        seed=config.seed,
        trunk_blocks=config.trunk_blocks,
        anchors=config.anchors,
        num_queries=config.num_queries,
        decoder_layers=config.decoder_layers,
    ).to(device)
    if config.freeze_trunk:
        model.model.backbone.requires_grad_(False)
    optimizer = make_optimizer(model, config)
    checkpoint = config.out / "detr.ckpt"
    key = config_key(config, _NOT_RESUME_KEYS)
    step, elapsed_s, curve = 0, 0.0, []
    if resume and checkpoint.is_file():
        step, elapsed_s, curve = load_checkpoint(checkpoint, model, optimizer, key)
        log.info("resumed from %s at step %d", checkpoint, step)
    log.info(
        "training the detector on %s from step %d of %d", _device_name(device), step, config.steps
    )
    seeds = split_seeds("train", config.steps * config.batch_size, base_seed=config.seed)
    started = time.perf_counter() - elapsed_s
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    last_save = window_start = time.perf_counter()
    window: dict[str, float] = {}
    window_steps = 0
    model.train()
    while step < config.steps:
        batch = detection_batch(
            seeds[step * config.batch_size : (step + 1) * config.batch_size],
            most=_most_objects(config, step),
        )
        targets = [
            {key: torch.from_numpy(value).to(device) for key, value in target.items()}
            for target in batch.targets()
        ]
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(config, step)
        pixels = to_model_input(batch.images, MEAN, STD, device)  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = model(
                pixel_values=pixels, labels=targets, output_attentions=config.attention_prior > 0
            )
        loss = out.loss
        if config.attention_prior:
            pairs = matched_pairs(out.logits, out.pred_boxes, targets)
            prior = attention_prior_loss(
                out.cross_attentions[0], pairs, batch.boxes, pixels.shape[-1]
            )
            loss = loss + config.attention_prior * prior
            out.loss_dict["attention_prior"] = prior
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DETR's clipping
        optimizer.step()
        step += 1
        for name in _LOGGED:
            value = loss if name == "loss" else out.loss_dict.get(name, torch.zeros(()))
            window[name] = window.get(name, 0.0) + float(value.detach())
        window_steps += 1
        if step % 50 == 0 or step == config.steps:
            now = time.perf_counter()
            rate = window_steps * config.batch_size / (now - window_start)
            terms = "  ".join(f"{k} {v / window_steps:.3f}" for k, v in sorted(window.items()))
            log.info(
                "step %d/%d  %s  lr %.1e  %.0f img/s  eta %.1f min",
                step,
                config.steps,
                terms,
                optimizer.param_groups[-1]["lr"],
                rate,
                (config.steps - step) * config.batch_size / rate / 60,
            )
            window, window_steps, window_start = {}, 0, now
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics = detection_map(model, "val", config.eval_count)
            minutes = (time.perf_counter() - started) / 60
            curve.append({"step": step, "minutes": round(minutes, 1), **metrics})
            log.info("val @ step %d: %s", step, json.dumps(curve[-1]))
            window_start = time.perf_counter()
        stop = step == stop_at_step or (deadline is not None and time.perf_counter() > deadline)
        due = time.perf_counter() - last_save > config.checkpoint_every_s
        if stop or due or step == config.steps:
            save_checkpoint(
                checkpoint, model, optimizer, key, step, time.perf_counter() - started, curve
            )
            last_save = time.perf_counter()
        if stop and step < config.steps:
            log.info("stopped at step %d; continue with --resume", step)
            return None

    train_seconds = time.perf_counter() - started
    model.half().float()  # evaluate what the export stores: float16-rounded weights
    metrics = detection_map(model, "test", config.final_eval_count)
    log.info("held-out (test) box metrics: %s", json.dumps(metrics))
    metadata = {
        "training_command": command,
        "config": json.loads(key),
        "train_seconds": round(train_seconds, 1),
        "device": _device_name(device),
        "torch": torch.__version__,
        "metrics": metrics,
        "curve": curve,
    }
    export_detr(model, config.export_path, metadata)
    log.info("exported to %s", config.export_path)
    return metadata


def _most_objects(config: DetrTrainConfig, step: int) -> int:
    """The curriculum: one object per scene, then at most two, then one to four."""
    if step < config.single_object_steps:
        return 1
    return 2 if step < config.single_object_steps + config.pair_steps else MAX_OBJECTS


# The loss terms logged (of the last decoder layer; the auxiliary layers' are in the loss).
_LOGGED = ("loss", "loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "attention_prior")

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

# Config fields that are command-line options (``--kebab-case``).
_OPTIONS = (
    "out",
    "export_dir",
    "seed",
    "steps",
    "batch_size",
    "num_queries",
    "anchors",
    "trunk_blocks",
    "decoder_layers",
    "freeze_trunk",
    "single_object_steps",
    "pair_steps",
    "attention_prior",
    "lr",
    "trunk_lr",
    "weight_decay",
    "warmup_steps",
    "bf16",
    "eval_every",
    "eval_count",
    "final_eval_count",
    "device",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_server.training.detr_train", description=__doc__.splitlines()[0]
    )
    add_config_arguments(
        parser,
        DetrTrainConfig,
        _OPTIONS,
        help={
            "out": "checkpoint directory",
            "export_dir": "where the model is exported (default: the shipped asset directory)",
            "device": '"cpu" or a CUDA device ("cuda", "cuda:1")',
        },
    )
    add_run_arguments(parser, "<out>/detr.ckpt")
    args = parser.parse_args(argv)
    run = start_run(parser, args, argv)
    config = config_from_args(DetrTrainConfig, args, _OPTIONS)
    metadata = train_detr(config, run.command, resume=run.resume, max_seconds=run.max_seconds)
    if metadata is not None:
        print(json.dumps(metadata["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
