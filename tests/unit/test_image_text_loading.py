"""Image-text models load from the formats users have (local files only) and agree with the
libraries: open_clip hub directories and built-in architectures + checkpoints, Hugging Face
CLIPModel directories; unsupported towers and unsafe files are refused with clear errors."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from tests.unit.image_text_tiny import (
    CONTEXT,
    PREPROCESS,
    TIMM_CFG,
    VIT_CFG,
    build_open_clip_module,
    write_hf_dir,
    write_open_clip_dir,
)
from vitlens_server.models.image_text import (
    ImageTextLoadError,
    ImageTextSource,
    load_image_text_model,
    parse_image_text_source,
)
from vitlens_server.models.loading import ModelLoadError

TEXTS = ["a photo of a cat", "Two RED squares, left of a circle!", "café"]


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    module = build_open_clip_module(VIT_CFG)
    return write_open_clip_dir(tmp_path_factory.mktemp("oc") / "vit", VIT_CFG, module), module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "clip")


def test_sources_parse_without_torch() -> None:
    assert parse_image_text_source("open_clip:/m/dir") == ImageTextSource(
        "open_clip", Path("/m/dir")
    )
    named = parse_image_text_source("open_clip:ViT-B-32:/m/ckpt.safetensors")
    assert named == ImageTextSource("open_clip", Path("/m/ckpt.safetensors"), "ViT-B-32")
    assert str(named) == "open_clip:ViT-B-32:/m/ckpt.safetensors"
    assert parse_image_text_source("open_clip:/m/a:b").path == Path("/m/a:b")  # ':' in a path
    assert parse_image_text_source("hf-clip:/m/hf") == ImageTextSource("hf-clip", Path("/m/hf"))
    for bad in ("clip:/m", "/m/dir", "hf-clip:"):
        with pytest.raises(ValueError, match="image-text model source"):
            parse_image_text_source(bad)
    with pytest.raises(ImageTextLoadError):
        load_image_text_model("timm:/m")


def test_open_clip_directory_matches_open_clip(vit_dir) -> None:
    path, _ = vit_dir
    model = load_image_text_model(f"open_clip:{path}")
    ref = open_clip.create_model(f"local-dir:{path}").eval()  # open_clip's own loader
    tokens = model.tokenize(TEXTS)
    want_ids = open_clip.get_tokenizer(f"local-dir:{path}")(TEXTS)
    torch.testing.assert_close(tokens.ids, want_ids, rtol=0, atol=0)
    assert tokens.ids.shape == (3, CONTEXT) and model.context_length == CONTEXT
    torch.testing.assert_close(tokens.pooled_index, want_ids.argmax(-1))
    assert tokens.tokens[0] == ("<start_of_text>", "a", "photo", "of", "a", "cat", "<end_of_text>")
    assert tokens.tokens[1][1:7] == ("two", "red", "squares", ",", "left", "of")
    assert tokens.tokens[2][1:-1] == ("café",)
    assert [len(t) for t in tokens.tokens] == tokens.valid.sum(-1).tolist()
    assert not tokens.valid[0, 7:].any() and tokens.valid[0, :7].all()

    x = _pixels()
    with torch.no_grad():
        images, texts = model.encode_images(x), model.encode_texts(tokens)
        logits = model.similarity(images, texts)
        want_images = ref.encode_image(x, normalize=True)
        want_texts = ref.encode_text(want_ids, normalize=True)
        want_logits, _ = ref.get_logits(x, want_ids)
    torch.testing.assert_close(images, want_images)
    torch.testing.assert_close(texts, want_texts)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    assert model.embed_dim == 24 and images.shape == (2, 24)

    pre = model.preprocess
    assert pre.input_size == (3, 32, 32) and pre.interpolation == "bilinear"
    assert pre.mean == pytest.approx(PREPROCESS["mean"]) and pre.std == pytest.approx(
        PREPROCESS["std"]
    )
    image, text = model.image_graph, model.text_graph
    assert (image.num_layers, image.num_heads, image.num_tokens, image.grid) == (2, 2, 17, (4, 4))
    assert (image.num_prefix_tokens, image.readout, image.causal) == (1, "token", False)
    assert (text.num_layers, text.num_heads, text.num_tokens, text.num_prefix_tokens) == (
        2,
        2,
        16,
        0,
    )
    assert (text.readout, text.causal) == ("eot", True)
    assert not any(p.requires_grad for p in model.module.parameters())
    assert not model.module.training


def test_open_clip_stock_timm_tower_matches_open_clip(tmp_path) -> None:
    """A timm tower as stock open_clip configs name it (timm's 6-block test_vit at 160 px; the
    default timm_pool is avg)."""
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit"},
        "text_cfg": VIT_CFG["text_cfg"],
    }
    module = build_open_clip_module(cfg)
    path = write_open_clip_dir(tmp_path / "timm", cfg, module)
    model = load_image_text_model(f"open_clip:{path}")
    ref = open_clip.create_model(f"local-dir:{path}").eval()
    x = _pixels(1, 160)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(x), ref.encode_image(x, normalize=True))
    graph = model.image_graph
    assert (graph.num_layers, graph.num_heads, graph.num_tokens, graph.grid) == (
        6,
        2,
        101,
        (10, 10),
    )
    assert graph.readout == "avg"  # CLIPVisionCfg.timm_pool defaults to avg: the patch rows


def test_open_clip_timm_tower_with_kwargs(tmp_path) -> None:
    """vision_cfg.timm_model_kwargs (vitlens' extension) builds a 2-block tower at 32 px."""
    module = build_open_clip_module(TIMM_CFG, seed=3)
    path = write_open_clip_dir(tmp_path / "timm", TIMM_CFG, module)
    model = load_image_text_model(f"open_clip:{path}")
    assert len(model.module.visual.trunk.blocks) == 2
    x, tokens = _pixels(), model.tokenize(TEXTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(x), module.encode_image(x, normalize=True))
        torch.testing.assert_close(
            model.encode_texts(tokens), module.encode_text(tokens.ids, normalize=True)
        )
    graph = model.image_graph
    assert (graph.num_layers, graph.num_heads, graph.num_tokens, graph.readout) == (
        2,
        2,
        17,
        "token",
    )


def test_builtin_architecture_with_checkpoint_files(tmp_path) -> None:
    """``open_clip:ARCH:FILE``: a registered config, weights as safetensors or a weights-only
    training checkpoint ({"epoch", "state_dict"} with DDP ``module.`` keys)."""
    from open_clip import factory

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "vitlens-test-tiny.json").write_text(json.dumps(VIT_CFG))
    factory.add_model_config(tmp_path / "cfgs")
    try:
        module = build_open_clip_module(VIT_CFG, seed=5)
        state = module.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
        torch.save(
            {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
            tmp_path / "epoch_3.pt",
        )
        x = _pixels()
        with torch.no_grad():
            want = module.encode_image(x, normalize=True)
        for name in ("w.safetensors", "epoch_3.pt"):
            model = load_image_text_model(f"open_clip:vitlens-test-tiny:{tmp_path / name}")
            with torch.no_grad():
                torch.testing.assert_close(model.encode_images(x), want)
            assert model.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    finally:
        factory._MODEL_CONFIG_PATHS.remove(tmp_path / "cfgs")
        factory._MODEL_CONFIGS.pop("vitlens-test-tiny", None)
    with pytest.raises(ImageTextLoadError, match="not a built-in open_clip architecture"):
        load_image_text_model(f"open_clip:vitlens-test-tiny:{tmp_path / 'w.safetensors'}")


def test_open_clip_bin_weights_load(tmp_path, vit_dir) -> None:
    _, module = vit_dir
    path = write_open_clip_dir(
        tmp_path / "bin", VIT_CFG, module, weights_name="open_clip_pytorch_model.bin"
    )
    model = load_image_text_model(f"open_clip:{path}")
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(x), module.encode_image(x, normalize=True))


def test_hf_clip_directory_matches_transformers(hf_dir) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    model = load_image_text_model(f"hf-clip:{hf_dir}")
    ref = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(hf_dir, local_files_only=True)
    enc = tok(TEXTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    tokens = model.tokenize(TEXTS)
    torch.testing.assert_close(tokens.ids, enc["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(tokens.valid, enc["attention_mask"].bool(), rtol=0, atol=0)
    assert tokens.tokens[0] == ("<|startoftext|>", "a", "photo", "of", "a", "cat", "<|endoftext|>")
    assert tokens.tokens[2][1:-1] == ("café",)
    assert tokens.pooled_index.tolist() == [6, 10, 2]  # first EOS (pad is EOS too)

    x = _pixels()
    with torch.no_grad():
        images, texts = model.encode_images(x), model.encode_texts(tokens)
        out = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=x)
        want_images = ref.get_image_features(pixel_values=x)
        want_texts = ref.get_text_features(**enc)
    want_images = getattr(want_images, "pooler_output", want_images)
    want_texts = getattr(want_texts, "pooler_output", want_texts)
    torch.testing.assert_close(images, torch.nn.functional.normalize(want_images, dim=-1))
    torch.testing.assert_close(texts, torch.nn.functional.normalize(want_texts, dim=-1))
    torch.testing.assert_close(model.similarity(images, texts), out.logits_per_image)
    pre = model.preprocess
    assert pre.input_size == (3, 32, 32) and pre.interpolation == "bilinear"
    assert pre.mean == pytest.approx((0.5, 0.4, 0.3))
    assert model.text_graph.readout == "eot" and model.image_graph.readout == "token"
    assert model.image_graph.num_tokens == 17 and model.text_graph.num_tokens == CONTEXT


@pytest.mark.slow  # the exemplar's 224 px tower, built by it and by open_clip (~3-6 s)
def test_the_exemplar_clip_export_loads(tmp_path) -> None:
    """The exemplar CLIP (training/clip_model.py: the demo ViT copied into open_clip's
    VisionTransformer), as clip_export writes it (fp16 tensors), equals open_clip's own load."""
    from vitlens_server.training.clip_export import export_clip, load_clip
    from vitlens_server.training.clip_model import CLIP_MODEL_CFG, build_clip

    export_clip(build_clip().eval(), tmp_path / "ex", model_cfg=CLIP_MODEL_CFG, metadata={})
    model = load_image_text_model(f"open_clip:{tmp_path / 'ex'}")
    ref, _, tokenizer, _ = load_clip(tmp_path / "ex")
    tokens = model.tokenize(TEXTS[:2])
    torch.testing.assert_close(tokens.ids, tokenizer(TEXTS[:2]), rtol=0, atol=0)
    x = _pixels(2, 224)
    with torch.no_grad():
        logits = model.similarity(model.encode_images(x), model.encode_texts(tokens))
        torch.testing.assert_close(logits, ref.get_logits(x, tokens.ids)[0])
    assert model.image_graph.num_layers == 6 and model.image_graph.grid == (14, 14)
    assert model.preprocess.mean == (0.5, 0.5, 0.5)


# --- refusals --------------------------------------------------------------------------------


def test_resnet_and_convnext_towers_are_refused(tmp_path) -> None:
    resnet = copy.deepcopy(VIT_CFG)
    resnet["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
    (tmp_path / "rn").mkdir()
    (tmp_path / "rn" / "open_clip_config.json").write_text(json.dumps({"model_cfg": resnet}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "rn" / "open_clip_model.safetensors"))
    with pytest.raises(ImageTextLoadError, match=r"ResNet .*Vision Transformer image towers only"):
        load_image_text_model(f"open_clip:{tmp_path / 'rn'}")

    convnext = copy.deepcopy(VIT_CFG)
    convnext["vision_cfg"] = {
        "image_size": 32,
        "timm_model_name": "convnext_atto",
        "timm_model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
    }
    path = write_open_clip_dir(tmp_path / "cn", convnext, build_open_clip_module(convnext))
    with pytest.raises(ImageTextLoadError, match="ConvNeXt, not a Vision Transformer"):
        load_image_text_model(f"open_clip:{path}")
    with pytest.raises(ImageTextLoadError, match="ResNet"):
        load_image_text_model(f"open_clip:RN50:{tmp_path / 'rn' / 'open_clip_model.safetensors'}")

    qk_norm = copy.deepcopy(VIT_CFG)
    qk_norm["vision_cfg"]["qk_norm"] = True  # open_clip's "custom" block and Attention
    from open_clip.model import CLIP

    path = write_open_clip_dir(tmp_path / "qk", qk_norm, CLIP(**qk_norm))
    with pytest.raises(ImageTextLoadError, match=r"custom attention blocks .* not supported"):
        load_image_text_model(f"open_clip:{path}")


def test_missing_files_are_named(tmp_path, vit_dir) -> None:
    with pytest.raises(ImageTextLoadError, match="does not exist"):
        load_image_text_model(f"open_clip:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageTextLoadError, match=r"no open_clip_config.json"):
        load_image_text_model(f"open_clip:{tmp_path / 'empty'}")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CFG}))
    with pytest.raises(ImageTextLoadError, match="no weights: expected one of open_clip_model"):
        load_image_text_model(f"open_clip:{tmp_path / 'cfg_only'}")
    with pytest.raises(ImageTextLoadError, match=r"weights file .* does not exist"):
        load_image_text_model(f"open_clip:ViT-B-32:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ImageTextLoadError, match=r"no config.json"):
        load_image_text_model(f"hf-clip:{tmp_path / 'empty'}")
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ImageTextLoadError, match="model_type 'siglip'; hf-clip loads CLIPModel"):
        load_image_text_model(f"hf-clip:{tmp_path / 'siglip'}")


def test_pickles_that_weights_only_refuses_are_refused(tmp_path, vit_dir, hf_dir) -> None:
    _, module = vit_dir
    path = write_open_clip_dir(tmp_path / "pkl", VIT_CFG, module, weights_name="x.txt")
    checkpoint = {"state_dict": module.state_dict(), "args": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, path / "open_clip_pytorch_model.bin")
    with pytest.raises(ImageTextLoadError, match=r"weights_only=True\) refuses") as err:
        load_image_text_model(f"open_clip:{path}")
    assert isinstance(err.value, ModelLoadError)  # the server's startup error
    assert "safetensors" in str(err.value)

    hf_pickle = tmp_path / "hf_pickle"
    hf_pickle.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (hf_pickle / name).write_bytes((hf_dir / name).read_bytes())
    from safetensors.torch import load_file

    state = load_file(str(hf_dir / "model.safetensors"))
    torch.save({**state, "args": argparse.Namespace(lr=0.1)}, hf_pickle / "pytorch_model.bin")
    with pytest.raises(ImageTextLoadError, match="weights_only"):
        load_image_text_model(f"hf-clip:{hf_pickle}")


def test_weights_that_do_not_fit_name_the_keys(tmp_path, vit_dir) -> None:
    _, module = vit_dir
    wider = copy.deepcopy(VIT_CFG)
    wider["embed_dim"] = 16
    path = write_open_clip_dir(tmp_path / "wide", wider, module)
    with pytest.raises(
        ImageTextLoadError, match=r"do not fit .*text_projection \(32, 24\) vs \(32, 16\)"
    ):
        load_image_text_model(f"open_clip:{path}")


def test_hf_directory_without_tokenizer_is_refused(tmp_path, hf_dir) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(ImageTextLoadError, match=r"no tokenizer: expected tokenizer.json"):
        load_image_text_model(f"hf-clip:{bare}")
