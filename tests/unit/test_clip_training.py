"""The exemplar CLIP's pieces on tiny sizes: weight mapping, loss, resumable training, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from vitlens_server.data.captions import COLOURS, WHERE, ObjectFacts
from vitlens_server.data.shapes import CLASSES
from vitlens_server.models.default import DEMO_ARCHITECTURE, DEMO_KWARGS, DEMO_WEIGHTS
from vitlens_server.training.clip_aux import attribute_head, attribute_loss, attribute_targets
from vitlens_server.training.clip_export import WEIGHTS_NAME, export_clip, load_clip
from vitlens_server.training.clip_model import (
    EXEMPLAR_IMAGE_SIZE,
    build_clip,
    low_resolution,
    model_cfg_at,
    resample_position_embedding,
    tokenizer,
)
from vitlens_server.training.clip_optim import freeze, is_trunk, lr_factor, make_optimizer
from vitlens_server.training.clip_train import (
    ClipTrainConfig,
    contrastive_loss,
    make_batch,
    train_clip,
)

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 16,
        "width": 32,
        "layers": 1,
        "head_width": 16,
        "no_ln_pre": True,
        "pool_type": "tok",
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def _tiny_config(out: Path, **overrides) -> ClipTrainConfig:
    fields = {
        "out": out,
        "export_dir": None,
        "model_cfg": TINY_CFG,
        "demo_weights": None,
        "low_res": 32,
        "low_res_steps": 3,
        "full_res_steps": 1,
        "batch_size": 8,
        "warmup_steps": 1,
        "eval_every": 0,
        "final_eval_count": 8,
        "precision": "fp32",
    }
    return ClipTrainConfig(**(fields | overrides))


def test_demo_weights_map_onto_the_open_clip_tower():
    clip = build_clip().eval()
    demo = timm.create_model(DEMO_ARCHITECTURE, **DEMO_KWARGS).eval()
    demo.load_state_dict({k: v.float() for k, v in load_file(str(DEMO_WEIGHTS)).items()})
    x = torch.randn(2, 3, 224, 224)
    proj, clip.visual.proj = clip.visual.proj, None
    try:
        with torch.no_grad():
            expected = demo.forward_head(demo.forward_features(x), pre_logits=True)  # (2, 192)
            assert torch.allclose(clip.visual(x), expected, atol=1e-4)
    finally:
        clip.visual.proj = proj


def test_contrastive_loss_by_hand():
    # Two orthonormal pairs, scale e^0 = 1: each row's softmax is (e, 1) / (e + 1).
    image = torch.eye(2)
    loss = contrastive_loss(image, image, torch.tensor(0.0), torch.eye(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)))
    # Both texts true of both images: the target is uniform over the row; with logits
    # diag(s, s), s = e^2, the loss is -(log p_same + log p_other) / 2 = s / 2 + log(1 + e^-s).
    everything = torch.ones(2, 2, dtype=torch.bool)
    s = math.exp(2.0)
    expected = s / 2 + math.log(1 + math.exp(-s))
    loss = contrastive_loss(image, image, torch.tensor(2.0), everything)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_batches_are_a_function_of_the_step(tmp_path):
    config = _tiny_config(tmp_path)
    images, captions, positives, _ = make_batch(config, 5, 32)
    again = make_batch(config, 5, 32)
    assert images.shape == (8, 32, 32, 3) and (images == again[0]).all()
    assert [c.text for c in captions] == [c.text for c in again[1]]
    assert positives.shape == (8, 8) and positives.diagonal().all()


def test_low_resolution_restores_the_parameter_and_passes_gradients():
    clip = build_clip(TINY_CFG, demo_weights=None)
    param = clip.visual.positional_embedding
    with low_resolution(clip.visual, 32):
        assert clip.visual.positional_embedding.shape == (1 + 4, 32)
        clip.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    assert clip.visual.positional_embedding is param and param.grad.abs().sum() > 0


def test_resume_continues_exactly_and_training_is_finite(tmp_path):
    whole = train_clip(_tiny_config(tmp_path / "whole"))
    assert whole is not None and all(math.isfinite(v) for v in whole["metrics"].values())
    split = _tiny_config(tmp_path / "split")
    assert train_clip(split, stop_at_step=2) is None
    train_clip(split, resume=True)
    a = torch.load(tmp_path / "whole" / "clip.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "clip.ckpt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_export_loads_back_in_open_clip_with_the_same_embeddings(tmp_path):
    model = build_clip(TINY_CFG, demo_weights=None).eval()
    with torch.no_grad():  # the export stores fp16: compare with the rounded weights
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.half().float())
    export_clip(model, tmp_path, model_cfg=TINY_CFG, metadata={"note": "test"})
    loaded, preprocess, tokenize, metadata = load_clip(tmp_path)
    assert metadata == {"note": "test"}
    pixels = preprocess(Image.fromarray(np.full((80, 100, 3), 255, np.uint8)))
    assert pixels.shape == (3, 64, 64) and torch.allclose(pixels, torch.ones_like(pixels))
    images = torch.randn(2, 3, 64, 64)
    texts = tokenize(["a photo of a star.", "a red ring on the left."])
    assert torch.equal(
        texts, tokenizer(TINY_CFG)(["a photo of a star.", "a red ring on the left."])
    )
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded.encode_text(texts), model.encode_text(texts), atol=1e-6)


def test_frozen_parts_get_no_gradient_and_no_optimizer_slot(tmp_path):
    cfg = TINY_CFG | {"vision_cfg": TINY_CFG["vision_cfg"] | {"layers": 2}}
    config = _tiny_config(tmp_path, model_cfg=cfg, frozen_blocks=1)
    model = build_clip(cfg, demo_weights=None)
    freeze(model, config)
    optimised = {
        id(p) for group in make_optimizer(model, config).param_groups for p in group["params"]
    }
    for name, param in model.named_parameters():
        frozen = name.startswith(("visual.conv1", "visual.class_embedding",
                                  "visual.positional_embedding", "visual.transformer.resblocks.0.",
                                  "token_embedding"))  # fmt: skip
        assert param.requires_grad is not frozen, name
        assert (id(param) in optimised) is not frozen, name


def test_an_unfinished_run_exports_a_resumable_state(tmp_path):
    whole = _tiny_config(tmp_path / "whole")
    train_clip(whole)
    export = tmp_path / "export"
    part = _tiny_config(tmp_path / "part", export_dir=export)
    assert train_clip(part, stop_at_step=2) is None
    metadata = train_clip(part, resume=True, export_now=True)
    assert metadata["steps_done"] == 2 and not metadata["finished"]
    state = json.loads((export / "train_state.json").read_text())
    assert state["step"] == 2 and state["total_steps"] == 4
    assert load_clip(export)[0] is not None  # the weights load in open_clip as they are
    later = _tiny_config(export)  # a later session resumes from the shipped state
    train_clip(later, resume=True)
    a = torch.load(tmp_path / "whole" / "clip.ckpt", weights_only=True)["model"]
    b = torch.load(export / "clip.ckpt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_while_its_trunk_is_held_resumes_as_if_uninterrupted(tmp_path):
    whole = _tiny_config(tmp_path / "whole", visual_hold_steps=3)
    train_clip(whole)
    part = _tiny_config(tmp_path / "part", visual_hold_steps=3)
    assert train_clip(part, stop_at_step=2) is None  # its checkpoint leaves the held trunk out
    train_clip(part, resume=True)
    a = torch.load(tmp_path / "whole" / "clip.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "clip.ckpt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "visual.conv1.weight" in a  # the trunk trained in the last step


def test_position_embedding_resampling_keeps_the_grid_and_halves_it():
    pos = torch.randn(1 + 14 * 14, 8)
    same = resample_position_embedding(pos, (14, 14))
    assert torch.allclose(same, pos, atol=1e-5)  # bicubic at the same size is the identity
    half = resample_position_embedding(pos, (7, 7))
    assert half.shape == (1 + 49, 8) and torch.equal(half[0], pos[0])


def test_the_exemplar_builds_at_its_native_160_px():
    cfg = model_cfg_at(EXEMPLAR_IMAGE_SIZE)
    model = build_clip(cfg).eval()
    assert tuple(model.visual.grid_size) == (10, 10)
    assert model.visual.positional_embedding.shape == (1 + 100, 192)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 160, 160)).shape == (1, 128)
    full = build_clip().visual.positional_embedding.detach()
    expected = resample_position_embedding(full, (10, 10))
    assert torch.allclose(model.visual.positional_embedding.detach(), expected)


def test_attribute_targets_and_loss_by_hand():
    one = ObjectFacts("star", "red", "large", "left", (0.2, 0.5))
    other = ObjectFacts("disc", "blue", "small", "centre", (0.5, 0.5))
    targets = attribute_targets([(one,), (one, other)])
    assert targets.tolist() == [
        [CLASSES.index("star"), list(COLOURS).index("red"), list(WHERE).index("left"), 1],
        [-1, -1, -1, -1],  # two objects: no single value per attribute
    ]
    head = attribute_head(4)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)  # uniform logits: the loss is the mean log of the sizes
    loss = attribute_loss(head, torch.randn(2, 4), torch.from_numpy(targets))
    expected = (math.log(8) + math.log(10) + math.log(5) + math.log(2)) / 4
    assert loss.item() == pytest.approx(expected)


def test_the_attribute_head_is_trained_and_resumed_but_not_exported(tmp_path):
    export = tmp_path / "export"
    config = _tiny_config(tmp_path / "run", aux_weight=1.0, export_dir=export)
    assert train_clip(config, stop_at_step=2) is None
    state = torch.load(tmp_path / "run" / "clip.ckpt", weights_only=True)["model"]
    assert {"aux_head.weight", "aux_head.bias"} <= state.keys()
    metadata = train_clip(config, resume=True)
    assert metadata["finished"] and "aux" in metadata["schedule"]
    assert not any(k.startswith("aux_head") for k in load_file(str(export / WEIGHTS_NAME)))
    assert load_clip(export)[0] is not None


def test_each_parameter_trains_at_its_group_rate(tmp_path):
    config = _tiny_config(tmp_path, lr=1e-3, visual_lr=2e-4, position_lr=5e-2, logit_scale_lr=7e-3)
    model = build_clip(TINY_CFG, demo_weights=None)
    freeze(model, config)
    rate = {
        id(p): group["base_lr"]
        for group in make_optimizer(model, config).param_groups
        for p in group["params"]
    }
    named = dict(model.named_parameters())
    assert rate[id(named["visual.positional_embedding"])] == 5e-2
    assert rate[id(named["visual.conv1.weight"])] == 2e-4
    assert rate[id(named["visual.proj"])] == 1e-3  # new, not pretrained: the full rate
    assert rate[id(named["logit_scale"])] == 7e-3
    assert rate[id(named["text_projection"])] == 1e-3


def test_the_held_trunk_stays_as_loaded_then_warms_up(tmp_path):
    config = _tiny_config(tmp_path, visual_hold_steps=3, full_res_steps=3, warmup_steps=2)
    assert [lr_factor(config, s, trunk=True) for s in range(3)] == [0.0, 0.0, 0.0]
    assert lr_factor(config, 0) == 0.5  # the rest warms up from the start
    assert 0 < lr_factor(config, 3, trunk=True) < lr_factor(config, 4, trunk=True)
    first = build_clip(TINY_CFG, demo_weights=None, seed=config.seed).state_dict()
    export = tmp_path / "export"
    train_clip(_tiny_config(tmp_path / "held", visual_hold_steps=4, export_dir=export))
    trained = load_clip(export)[0].state_dict()
    for name, before in first.items():  # exported in fp16: compare at that precision
        same = torch.equal(trained[name].half(), before.half())
        assert same is (is_trunk(name) or name == "token_embedding.weight"), name


def test_the_command_line_sets_config_fields_by_name(monkeypatch):
    from vitlens_server.training import clip_train

    seen: list[ClipTrainConfig] = []
    monkeypatch.setattr(clip_train, "train_clip", lambda config, command, **kw: seen.append(config))
    argv = ["--position-lr", "0.02", "--no-crisp", "--device", "cuda:1", "--aux-weight", "0.5"]
    assert clip_train.main([*argv, "--threads", str(torch.get_num_threads())]) == 0
    (config,) = seen
    assert (config.position_lr, config.crisp, config.device, config.aux_weight) == (
        0.02,
        False,
        "cuda:1",
        0.5,
    )
    assert config.visual_lr == ClipTrainConfig().visual_lr  # untouched fields keep defaults
