"""Train the exemplar CLIP contrastively on generated scenes and their captions, and export it.

``python -m vitlens_server.training.clip_train --out build/clip`` (``--help`` for the schedule).
Every step renders fresh scenes from the "train" seeds (a function of the step: a resumed run
sees the same data as an uninterrupted one), a mix of one- and two-object scenes, each with one
of its captions drawn at random. The loss is CLIP's symmetric InfoNCE with a learnable
temperature, where every caption of the batch that is *true* of an image (``Caption.true_of``:
"a photo of a star." for every star) is one of its positives. The image tower starts from the
demo classifier (its position embedding resampled to the exemplar's native 160 px) and learns at
a lower rate. Scenes have crisp attributes (`crisp_scene_config`) unless ``crisp`` is off. An
optional first phase of ``low_res_steps`` runs at ``low_res`` px (`low_resolution`); the default
schedule has none. On a shared CPU, ``--threads 1`` can be far faster than 2 (see
benchmarks/clip_training.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitlens_server.data import SceneConfig, render_scene, split_seeds
from vitlens_server.data.captions import (
    Caption,
    crisp_scene_config,
    scene_captions,
    scene_facts,
)
from vitlens_server.data.shapes import CLASSES
from vitlens_server.models.default import DEMO_WEIGHTS
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.clip_aux import attribute_head, attribute_loss, attribute_targets
from vitlens_server.training.clip_checkpoint import config_key, load_checkpoint, save_checkpoint
from vitlens_server.training.clip_eval import evaluate_clip
from vitlens_server.training.clip_export import CLIP_ASSET_DIR, export_clip, run_metadata
from vitlens_server.training.clip_loss import contrastive_loss
from vitlens_server.training.clip_model import (
    EXEMPLAR_IMAGE_SIZE,
    MEAN,
    STD,
    TokenCache,
    build_clip,
    low_resolution,
    model_cfg_at,
)
from vitlens_server.training.clip_optim import (
    freeze,
    hold_trunk,
    lr_factor,
    make_optimizer,
    trunk_parameters,
)
from vitlens_server.training.config_cli import (
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    start_run,
)
from vitlens_server.training.train import _device_name, resolve_precision

__all__ = ["ClipTrainConfig", "contrastive_loss", "main", "make_batch", "train_clip"]

log = logging.getLogger("vitlens.clip_train")


@dataclass(frozen=True)
class ClipTrainConfig:
    """Hyper-parameters of a run; steps count batches of ``batch_size`` scenes."""

    out: Path = Path("build/clip")  # checkpoint directory
    export_dir: Path | None = CLIP_ASSET_DIR
    model_cfg: dict[str, Any] = field(default_factory=lambda: model_cfg_at(EXEMPLAR_IMAGE_SIZE))
    demo_weights: Path | None = DEMO_WEIGHTS
    seed: int = 0
    crisp: bool = True  # scenes with crisp attributes (`crisp_scene_config`), train and eval
    low_res: int = 56
    low_res_steps: int = 0
    full_res_steps: int = 3200
    batch_size: int = 48
    lr: float = 1e-3  # text tower and projections
    visual_lr: float = 4e-4  # the pretrained image trunk
    position_lr: float = 1e-2  # its position embedding: the demo's is near-uniform (see docs)
    logit_scale_lr: float = 5e-3  # the log-temperature: it has far to go in a short run
    frozen_blocks: int = 0  # image blocks (and patch/position embeddings) kept as the demo's
    visual_hold_steps: int = 0  # first steps with the image trunk still (`trunk_parameters`)
    train_token_embedding: bool = False
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.1
    warmup_steps: int = 50
    two_object_fraction: float = 0.3  # share of scenes with two objects
    focus_shapes: int = 4  # classes per batch (0: all eight); see `make_batch`
    focus_colours: int = 0  # crisp scenes: palette colours per batch (0: all ten)
    aux_weight: float = 2.0  # weight of the attribute head's loss (`clip_aux`; 0: none)
    canonical_fraction: float = 0.5  # share of scenes captioned with their canonical caption
    eval_every: int = 250  # steps between quick evaluations on the "val" split (0: none)
    eval_count: int = 100
    final_eval_count: int = 500
    precision: str = "auto"
    device: str = "cpu"  # where it trains ("cuda", "cuda:1"); data is rendered on the CPU
    checkpoint_every_s: float = 240.0

    @property
    def total_steps(self) -> int:
        return self.low_res_steps + self.full_res_steps

    @property
    def full_res(self) -> int:
        return int(self.model_cfg["vision_cfg"]["image_size"])


def make_batch(
    config: ClipTrainConfig, step: int, size: int
) -> tuple[np.ndarray, list[Caption], np.ndarray, np.ndarray]:
    """Scenes and captions of ``step``: images (B, S, S, 3) uint8, B captions (one per image),
    positives (B, B) bool (``[i, j]`` when caption j is true of image i) and the attribute
    targets (B, 4) int64 of `attribute_targets`.

    With ``focus_shapes`` the batch's objects take only that many classes (drawn per step), so
    that the batch cannot be told apart by shape alone: hard negatives for colour, position,
    size and relation; with ``focus_colours`` (crisp scenes) the same for colours, so that
    shape and colour together still leave several scenes apart only by position and size
    (captions stay true: they are read from the pixels). Each scene's caption is its canonical
    one with probability ``canonical_fraction``, else one of its other phrasings."""
    batch = config.batch_size
    seeds = split_seeds("train", batch, base_seed=step * batch)
    rng = np.random.default_rng([config.seed, step])
    two = rng.random(batch) < config.two_object_fraction
    classes = rng.permutation(len(CLASSES))[: config.focus_shapes or len(CLASSES)]
    picks = [rng.permutation(classes)[: 1 + int(t)] for t in two]
    scene_config = crisp_scene_config(size) if config.crisp else SceneConfig(size=size)
    if config.crisp and config.focus_colours:
        crisp = scene_config.crisp
        keep = rng.permutation(len(crisp.palette))[: config.focus_colours]
        palette = tuple(crisp.palette[i] for i in sorted(keep))
        scene_config = dataclasses.replace(
            scene_config, crisp=dataclasses.replace(crisp, palette=palette)
        )
    scenes = [
        render_scene(s, two_object=bool(t), labels=labels, config=scene_config)
        for s, t, labels in zip(seeds, two, picks, strict=True)
    ]
    captions = []
    for scene, canonical, pick in zip(
        scenes, rng.random(batch) < config.canonical_fraction, rng.random(batch), strict=True
    ):
        options = scene_captions(scene)
        captions.append(options[0] if canonical else options[1 + int(pick * (len(options) - 1))])
    facts = [scene_facts(scene) for scene in scenes]
    positives = np.array([[c.true_of(f) for c in captions] for f in facts])  # (B, B)
    images = np.stack([s.image for s in scenes])
    return images, captions, positives, attribute_targets(facts)


def train_clip(
    config: ClipTrainConfig,
    command: str = "",
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    max_seconds: float | None = None,
    export_now: bool = False,
) -> dict[str, Any] | None:
    """Train, evaluate on held-out scenes and export; returns the exported metadata, or None
    when ``stop_at_step``/``max_seconds`` stopped the run first (with a checkpoint in
    ``config.out``: rerun with ``resume`` to continue). ``export_now`` skips the remaining steps:
    it evaluates and exports the resumed checkpoint as it is (the metadata records its step)."""
    device = torch.device(config.device)
    precision = resolve_precision(config.precision, device)
    model = build_clip(config.model_cfg, demo_weights=config.demo_weights, seed=config.seed)
    if config.aux_weight:  # trained and checkpointed with the model, dropped before export
        model.aux_head = attribute_head(config.model_cfg["embed_dim"])
    model.to(device)
    freeze(model, config)
    optimizer = make_optimizer(model, config)
    trunk = trunk_parameters(model)
    tokens = TokenCache(config.model_cfg)
    checkpoint = config.out / "clip.ckpt"
    step, elapsed_s, curve = 0, 0.0, []
    hold_trunk(trunk, config, step)  # a checkpoint written during the hold has no trunk
    if resume and checkpoint.is_file():
        step, elapsed_s, curve = load_checkpoint(
            checkpoint, model, optimizer, config_key(config, _NOT_RESUME_KEYS)
        )
        log.info("resumed from %s at step %d", checkpoint, step)
    log.info(
        "training on %s in %s from step %d of %d",
        _device_name(device),
        precision,
        step,
        config.total_steps,
    )
    started = time.perf_counter() - elapsed_s
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    last_save = window_start = time.perf_counter()
    window_loss, window_steps = 0.0, 0
    model.train()
    while step < config.total_steps and not export_now:
        size = config.low_res if step < config.low_res_steps else config.full_res
        images, captions, positives, targets = make_batch(config, step, size)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(config, step, group["trunk"])
        hold_trunk(trunk, config, step)
        x = to_model_input(images, MEAN, STD, device)  # (B, 3, S, S)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            with _at_size(model.visual, size, config.full_res):
                embedding = model.encode_image(x).float()  # (B, E), not normalised
            token_rows = tokens([c.text for c in captions]).to(device)  # (B, L)
            text = model.encode_text(token_rows, normalize=True).float()
        image = F.normalize(embedding, dim=-1)
        positive = torch.from_numpy(positives).to(device)  # (B, B)
        loss = contrastive_loss(image, text, model.logit_scale, positive)
        if config.aux_weight:
            aux = attribute_loss(model.aux_head, embedding, torch.from_numpy(targets).to(device))
            loss = loss + config.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        window_loss, window_steps = window_loss + loss.item(), window_steps + 1
        if step % 20 == 0 or step == config.total_steps:
            now = time.perf_counter()
            rate = window_steps * config.batch_size / (now - window_start)
            log.info(
                "step %d/%d  %dpx  loss %.3f  T %.1f  lr %.1e  %.0f img/s  eta %.1f min",
                step,
                config.total_steps,
                size,
                window_loss / window_steps,
                model.logit_scale.exp().item(),
                optimizer.param_groups[0]["lr"],
                rate,
                _eta_s(config, step, rate) / 60,
            )
            window_loss, window_steps, window_start = 0.0, 0, now
        if config.eval_every and step % config.eval_every == 0:
            model.eval()
            metrics = evaluate_clip(
                model,
                tokens,
                count=config.eval_count,
                split="val",
                size=config.full_res,
                crisp=config.crisp,
            )
            model.train()
            minutes = (time.perf_counter() - started) / 60
            curve.append(
                {
                    "step": step,
                    "images": step * config.batch_size,
                    "minutes": round(minutes, 1),
                    **metrics.as_dict(),
                }
            )
            log.info("val @ step %d: %s", step, json.dumps(curve[-1]))
            window_start = time.perf_counter()
        stop = step == stop_at_step or (deadline is not None and time.perf_counter() > deadline)
        due = time.perf_counter() - last_save > config.checkpoint_every_s
        if stop or due or step == config.total_steps:
            elapsed = time.perf_counter() - started
            key = config_key(config, _NOT_RESUME_KEYS)
            save_checkpoint(checkpoint, model, optimizer, key, step, elapsed, curve)
            last_save = time.perf_counter()
        if stop and step < config.total_steps:
            log.info("stopped at step %d; continue with --resume", step)
            return None

    train_seconds = time.perf_counter() - started
    if step < config.total_steps and config.export_dir is not None:  # unfinished: ship the state
        key = config_key(config, _NOT_RESUME_KEYS)
        save_checkpoint(
            config.export_dir / "clip.ckpt", model, optimizer, key, step, train_seconds, curve
        )
        state = {
            "step": step,
            "total_steps": config.total_steps,
            "train_seconds": train_seconds,
            "config": json.loads(key),
            "command": command,
            "curve": curve,
            "resume": f"--out {config.export_dir} --resume (same hyper-parameters)",
        }
        (config.export_dir / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
    model.aux_head = None  # not part of the exported CLIP
    model.eval()
    with torch.no_grad():  # evaluate what the export stores: fp16-rounded weights
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    metrics = evaluate_clip(
        model,
        tokens,
        count=config.final_eval_count,
        split="test",
        size=config.full_res,
        crisp=config.crisp,
    )
    log.info("held-out (test) metrics: %s", json.dumps(metrics.as_dict()))
    metadata = run_metadata(config, command, precision, train_seconds, metrics.as_dict(), curve)
    metadata["steps_done"] = step
    metadata["finished"] = step >= config.total_steps
    if config.export_dir is not None:
        export_clip(model.cpu(), config.export_dir, model_cfg=config.model_cfg, metadata=metadata)
        log.info("exported to %s", config.export_dir)
    return metadata


def _at_size(visual: nn.Module, size: int, full_res: int):
    return low_resolution(visual, size) if size != full_res else contextlib.nullcontext()


def _eta_s(config: ClipTrainConfig, step: int, rate: float) -> float:
    """Seconds left: 224 px steps assumed 4x as slow as low-resolution ones."""
    low_left = max(0, config.low_res_steps - step)
    full_left = config.total_steps - max(step, config.low_res_steps)
    slowdown = 1.0 if step >= config.low_res_steps else 4.0
    return (low_left + full_left * slowdown) * config.batch_size / max(rate, 1e-9)


# Fields that a resumed run may change: where it writes, how it evaluates and reports.
_NOT_RESUME_KEYS = (
    "out",
    "export_dir",
    "precision",
    "eval_every",
    "eval_count",
    "final_eval_count",
    "checkpoint_every_s",
    "demo_weights",
    "device",
)


# Config fields that are command-line options (``--kebab-case``, types and defaults from
# `ClipTrainConfig`).
_OPTIONS = (
    "out",
    "export_dir",
    "seed",
    "crisp",
    "low_res",
    "low_res_steps",
    "full_res_steps",
    "batch_size",
    "lr",
    "visual_lr",
    "position_lr",
    "warmup_steps",
    "frozen_blocks",
    "visual_hold_steps",
    "train_token_embedding",
    "canonical_fraction",
    "two_object_fraction",
    "focus_shapes",
    "focus_colours",
    "aux_weight",
    "eval_every",
    "eval_count",
    "final_eval_count",
    "precision",
    "device",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_server.training.clip_train", description=__doc__.splitlines()[0]
    )
    add_config_arguments(
        parser,
        ClipTrainConfig,
        _OPTIONS,
        help={
            "out": "checkpoint directory",
            "crisp": "crisp-attribute scenes (--no-crisp: the default scenes)",
            "device": '"cpu" or a CUDA device ("cuda", "cuda:1")',
        },
        choices={"precision": ("auto", "fp32", "bf16")},
    )
    add_run_arguments(parser, "<out>/clip.ckpt")
    parser.add_argument(
        "--export-now",
        action="store_true",
        help="with --resume: evaluate and export the checkpoint as it is",
    )
    args = parser.parse_args(argv)
    run = start_run(parser, args, argv)
    config = config_from_args(ClipTrainConfig, args, _OPTIONS)
    metadata = train_clip(
        config,
        run.command,
        resume=run.resume,
        max_seconds=run.max_seconds,
        export_now=args.export_now,
    )
    if metadata is not None:
        print(json.dumps(metadata["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
