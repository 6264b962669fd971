"""Gradient methods on image-text (CLIP) models, over real gRPC, against plain-torch references.

A tiny random open_clip model (hub-dir format) and a tiny Hugging Face ``CLIPModel``
(``save_pretrained``) are served; every method answers a 3-image x 2-text request, and each of
its 6 explanations is compared with a reference computed here, one pair at a time, from the
method's definition: A, ∂y/∂A and the scores of one pair from the adapter's recording
(`capture`), everything else — the head weights, ReLUs, sigmoids, input gradients, the masks and
masked images of token reflection — in plain torch on the library model.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.conftest import RunningServer, start_server
from tests.unit.image_text_tiny import (
    VIT_CFG,
    build_open_clip_module,
    write_hf_dir,
    write_open_clip_dir,
)
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.models.image_text import capture, load_image_text_model

TEXTS = ["a red square on black", "two blue circles"]
MODELS = ("clip", "hf")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_text_methods")
    clip = write_open_clip_dir(root / "clip", VIT_CFG, build_open_clip_module(VIT_CFG, seed=5))
    hf = write_hf_dir(root / "hf", seed=6)
    (hf / "vitlens.json").write_text(json.dumps({"labels": ["square", "circle"]}))
    return {"clip": clip, "hf": hf}


@pytest.fixture(scope="module")
def adapters(dirs) -> dict[str, object]:
    return {
        "clip": load_image_text_model(f"open_clip:{dirs['clip']}"),
        "hf": load_image_text_model(f"hf-clip:{dirs['hf']}"),
    }


@pytest.fixture(scope="module")
def served(dirs) -> RunningServer:
    config = ServerConfig(port=0, max_images_per_request=8, max_batch_size=4, cache_bytes=0)
    specs = [
        ModelSpec(name="clip", architecture="open_clip", source=f"open_clip:{dirs['clip']}"),
        ModelSpec(name="hf", architecture="hf-clip", source=f"hf-clip:{dirs['hf']}"),
    ]
    running, stop = start_server(config, ModelRegistry([load_model(s) for s in specs]))
    yield running
    stop()


@pytest.fixture(scope="module")
def client(served):
    with vitlens.Client(served.address, timeout_s=120) as c:
        yield c


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255  # (1, 3, H, W)


# --- references, one pair at a time ---------------------------------------------------------


class Pair:
    """One pair's recorded towers (A, ∂y/∂A, S) and what the references read of them."""

    def __init__(self, model, image: np.ndarray, text: str) -> None:
        self.model, self.pixels = model, _pixels(image)
        self.texts = model.tokenize([text])
        self.length = len(self.texts.tokens[0])  # start + words + end
        cap = capture(model, model.preprocess.normalise(self.pixels), self.texts)
        rec = cap.gradients(torch.tensor([0]), torch.tensor([0]))
        self.images, self.text = rec.images, rec.texts
        self.prefix = model.image_graph.num_prefix_tokens
        self.eot = self.length - 1  # the end token: the last of the text's tokens

    def rows(self, tower: str, matrix: torch.Tensor) -> torch.Tensor:
        """Row of the readout (image: class token 0; text: EOT) of (h, N, N) → (h, N)."""
        return matrix[:, 0] if tower == "image" else matrix[:, self.eot]

    def layer(self, tower: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, ∂y/∂A, S) of one layer, each (h, N, N); text ∂y/∂A zeroed where j > EOT row's
        causal horizon (A is identically 0 there)."""
        rec = self.images if tower == "image" else self.text
        a, g, s = rec.attention(layer)[0], rec.attention_grad(layer)[0], rec.scores(layer)[0]
        if tower == "text":
            allowed = torch.arange(g.shape[-1]) <= self.eot
            g = g * allowed  # only keys the EOT row sees (causal; padding lies beyond EOT)
        return a, g, s

    def cut(self, tower: str, row: torch.Tensor) -> np.ndarray:
        """What the service returns of a (N,) row: the patch grid, or the words' positions."""
        if tower == "image":
            return row[self.prefix :].reshape(self.model.image_graph.grid).numpy()
        return row[1 : self.length - 1].numpy()

    def logit(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n,) similarity logits of (n, 3, H, W) pixels in [0, 1] with the pair's text."""
        m = self.model
        image = m.encode_images(m.preprocess.normalise(pixels))
        return m.similarity(image, m.encode_texts(self.texts))[:, 0]


def ref_gradcam(pair: Pair, tower: str) -> np.ndarray:
    rec = pair.images if tower == "image" else pair.text
    a, g, _ = pair.layer(tower, rec.num_layers - 1)
    p = pair.prefix if tower == "image" else 0
    a_row, g_row = pair.rows(tower, a)[:, p:], pair.rows(tower, g)[:, p:]  # (h, N - P)
    alpha = g_row.mean(dim=-1, keepdim=True)  # mean gradient per head
    row = torch.relu((alpha * a_row).mean(dim=0))
    return pair.cut(tower, F.pad(row, (p, 0)))


def ref_agcam(pair: Pair, tower: str) -> np.ndarray:
    rec = pair.images if tower == "image" else pair.text
    total = 0
    for layer in range(rec.num_layers):
        _, g, s = pair.layer(tower, layer)
        total = total + (torch.relu(pair.rows(tower, g)) * torch.sigmoid(pair.rows(tower, s))).sum(
            0
        )
    return pair.cut(tower, total)


def ref_generic_matrix(pair: Pair, tower: str) -> torch.Tensor:
    rec = pair.images if tower == "image" else pair.text
    n = rec.graph.num_tokens
    r = torch.eye(n)
    for layer in range(rec.num_layers):
        a, g, _ = pair.layer(tower, layer)
        r = r + (g * a).clamp(min=0).mean(dim=0) @ r
    return r


def ref_saliency_image(pair: Pair, steps: int | None = None) -> np.ndarray:
    """max_c |∂y/∂x| (plain) or |x ⊙ mean_s ∂y/∂x(x·s/steps)| (Integrated Gradients)."""
    x = pair.pixels
    scales = [1.0] if steps is None else [s / steps for s in range(1, steps + 1)]
    total = torch.zeros_like(x)
    for scale in scales:
        xs = (x * scale).requires_grad_(True)
        (grad,) = torch.autograd.grad(pair.logit(xs).sum(), xs)
        total += grad
    attribution = total if steps is None else x * total / steps
    return attribution.abs().amax(dim=1)[0].numpy()  # (H, W)


def ref_saliency_text(pair: Pair) -> np.ndarray:
    """max over the width of |∂y/∂e_j|, e_j the token embedding at position j."""
    m = pair.model.module
    embedding = (
        m.text_model.embeddings.token_embedding if hasattr(m, "text_model") else m.token_embedding
    )
    kept = {}

    def hook(_m, _args, out):
        kept["e"] = out.detach().requires_grad_(True)
        return kept["e"]

    handle = embedding.register_forward_hook(hook)
    try:
        y = pair.logit(pair.pixels).sum()
        (grad,) = torch.autograd.grad(y, kept["e"])
    finally:
        handle.remove()
    return grad[0].abs().amax(dim=-1)[1 : pair.length - 1].numpy()


def ref_reflection(pair: Pair) -> np.ndarray:
    """Seed 004 Eq. 1-4, Fig. 3-4 on generic's image relevance R, scored with the pair's text."""
    r_full = ref_generic_matrix(pair, "image")
    p, (gh, gw) = pair.prefix, pair.model.image_graph.grid
    r = r_full[p:, p:]
    t = r.shape[0]
    r1 = r * (1 - torch.eye(t))  # Eq. 1
    r2 = r1 + torch.diag(r1.max(dim=0).values)  # Eq. 2
    col_min, col_max = r2.min(dim=0).values, r2.max(dim=0).values
    red = (r2 - col_min) / (col_max - col_min)
    green = (col_max - col_max.min()) / (col_max.max() - col_max.min())
    masks = red * green  # (T, T), column j = token j's mask
    h, w = pair.pixels.shape[-2:]
    reflected = []
    for j in range(t):
        mask = masks[:, j].reshape(gh, gw)
        up = mask.repeat_interleave(h // gh, 0).repeat_interleave(w // gw, 1)  # nearest
        reflected.append(pair.pixels[0] * up)
    with torch.no_grad():
        logits = pair.logit(torch.stack(reflected))  # (T,)
    return (logits + r_full[0, p:]).reshape(gh, gw).numpy()


def ref_maps(method: str, pair: Pair, options: dict) -> tuple[np.ndarray, np.ndarray]:
    if method == "gradcam":
        return ref_gradcam(pair, "image"), ref_gradcam(pair, "text")
    if method == "agcam":
        return ref_agcam(pair, "image"), ref_agcam(pair, "text")
    if method == "saliency":
        return ref_saliency_image(pair, options.get("steps")), ref_saliency_text(pair)
    text = pair.cut("text", ref_generic_matrix(pair, "text")[pair.eot])
    return ref_reflection(pair), text


# --- the service against the references -----------------------------------------------------

CASES = [
    ("gradcam", {}, "tokens"),
    ("agcam", {}, "tokens"),
    ("saliency", {}, "input"),
    ("saliency", {"mode": "integrated_gradients", "steps": 3}, "input"),
    ("token_reflection", {"batch_size": 5}, "tokens"),
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("method", "options", "grid"), CASES)
def test_three_images_two_texts_equal_the_per_pair_reference(
    client, adapters, name, method, options, grid
) -> None:
    batch = images(3, seed=len(method))
    result = client.explain(
        batch, model=name, method=method, method_options=options, texts=TEXTS, grid=grid
    )
    assert len(result) == 3
    for image, explained in zip(batch, result, strict=True):
        assert [e.target.label for e in explained.explanations] == TEXTS
        for m, e in enumerate(explained.explanations):
            heatmap, text = ref_maps(method, Pair(adapters[name], image, TEXTS[m]), options)
            np.testing.assert_allclose(e.heatmap, heatmap, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(e.text.relevance, text, rtol=1e-4, atol=1e-5)
            assert len(e.text.relevance) == len(e.text.tokens)


def test_saliency_on_the_token_grid_is_the_patch_mean(client, adapters) -> None:
    batch = images(1, seed=3)
    e = client.explain(batch, model="clip", method="saliency", texts=TEXTS[:1])[0].explanations[0]
    full = ref_saliency_image(Pair(adapters["clip"], batch[0], TEXTS[0]))
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(full)[None], (4, 4))[0].numpy()
    np.testing.assert_allclose(e.heatmap, pooled, rtol=1e-4, atol=1e-6)


def test_zero_shot_top_k_explains_the_chosen_labels(client) -> None:
    result = client.explain(images(2), model="hf", method="gradcam", top_k=2)
    for explained in result:
        assert {e.target.label for e in explained.explanations} == {"square", "circle"}


def test_cards_say_what_each_method_does_for_clip(client) -> None:
    info = client.model("clip")
    cards = {m.name: m for m in info.methods}
    assert "transformer_attribution" not in cards
    assert "Transformer Attribution" in cards["token_reflection"].description
    assert {p.name for p in cards["saliency"].parameters} >= {"mode", "samples", "steps"}
    assert {p.name for p in cards["token_reflection"].parameters} == {"batch_size", "combine"}
    assert cards["gradcam"].passes == ("forward", "backward")
    assert cards["token_reflection"].passes == ("forward", "backward", "extra")
    assert not cards["agcam"].relevance_matrix and cards["generic"].relevance_matrix


def _refusal(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(vitlens.VitlensError) as info:
        call()
    err = info.value
    fields = [v.field for v in err.field_violations]
    return err.code, fields[0] if fields else "", str(err)


@pytest.mark.parametrize(
    ("method", "options", "field"),
    [
        ("saliency", {"samples": 0}, "options.method_options.samples"),
        ("saliency", {"steps": 10_000}, "options.method_options.steps"),
        ("saliency", {"noise": -0.5}, "options.method_options.noise"),
        ("saliency", {"mode": "deconvnet"}, "options.method_options.mode"),
        ("token_reflection", {"batch_size": 0}, "options.method_options.batch_size"),
        ("token_reflection", {"combine": "max"}, "options.method_options.combine"),
        ("gradcam", {"layer": 1}, "options.method_options"),
    ],
)
def test_options_out_of_range_name_the_field(client, method, options, field) -> None:
    code, found, _ = _refusal(
        lambda: client.explain(
            images(1), model="clip", method=method, method_options=options, texts=TEXTS
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and found == field


def test_refusals_say_why(client) -> None:
    code, found, message = _refusal(
        lambda: client.explain(images(1), model="hf", method="transformer_attribution")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and found == "method"
    assert "LRP" in message
    code, found, _ = _refusal(
        lambda: client.explain(images(1), model="hf", method="agcam", relevance=True)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and found == "options.return_relevance"
