"""Gradient methods on image-text (CLIP) models, over real gRPC, against plain-torch references.

A tiny random open_clip model (hub-dir format) and a tiny Hugging Face ``CLIPModel``
(``save_pretrained``) are served; every method answers a 3-image x 2-text request, and each of
its 6 explanations is compared with a reference computed here, one pair at a time, from the
method's definition: A, ∂y/∂A and the scores of one pair from the adapter's recording
(`capture`), everything else — the head weights, ReLUs, sigmoids, input gradients, the LRP
rules (written here with explicit contribution tensors, one entry per input-output pair), the
masks and masked images of token reflection — in plain torch on the library model.
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
        cap = capture(model, model.preprocess.normalise(self.pixels), self.texts, lrp=True)
        rec = cap.gradients(torch.tensor([0]), torch.tensor([0]))
        self.embeds = {"image": cap.image_embeds.detach()[0], "text": cap.text_embeds.detach()[0]}
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


def _stable(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z == 0, torch.ones_like(z), z)


def lrp_linear(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """α1β0: contributions c_ij = x_j⁺w_ij⁺ + x_j⁻w_ij⁻, R_j = Σ_i c_ij / Σ_j' c_ij' · R_i."""
    c = torch.einsum("...j,ij->...ij", x.clamp(min=0), w.clamp(min=0))
    c = c + torch.einsum("...j,ij->...ij", x.clamp(max=0), w.clamp(max=0))
    z = c.sum(-1, keepdim=True)
    return (c / _stable(z) * (z != 0) * r[..., None]).sum(-2)


def lrp_product(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor):
    """z-rule for z = a @ b, halved to each operand: c_ikj = a_ik b_kj."""
    c = torch.einsum("...ik,...kj->...ikj", a, b)
    share = c / _stable(c.sum(-2, keepdim=True)) * r[..., None, :]  # (..., i, k, j)
    return share.sum(-1) / 2, share.sum(-3) / 2


def lrp_residual(x: torch.Tensor, f: torch.Tensor, r: torch.Tensor):
    """z-rule to both summands, rescaled to |Σ R_x| : |Σ R_f| with the total conserved."""
    z = _stable(x + f)
    rx, rf = x * r / z, f * r / z
    sx, sf = rx.sum(), rf.sum()
    both = sx.abs() + sf.abs()
    return rx * (sx.abs() / both * r.sum() / sx), rf * (sf.abs() / both * r.sum() / sf)


def tower_weights(model, tower: str) -> tuple[list[dict], torch.Tensor]:
    """Per block (qkv, proj, fc1, fc2) weights and the (D, W) projection, from the modules."""
    m = model.module
    if hasattr(m, "text_model"):  # transformers CLIPModel
        part = m.vision_model if tower == "image" else m.text_model
        proj = m.visual_projection if tower == "image" else m.text_projection
        blocks = [
            {
                "qkv": torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
                                  b.self_attn.v_proj.weight]),
                "proj": b.self_attn.out_proj.weight,
                "fc1": b.mlp.fc1.weight,
                "fc2": b.mlp.fc2.weight,
            }
            for b in part.encoder.layers
        ]  # fmt: skip
        return blocks, proj.weight
    part = m.visual.transformer if tower == "image" else m.transformer
    proj = m.visual.proj.T if tower == "image" else m.text_projection.T
    blocks = [
        {
            "qkv": b.attn.in_proj_weight,
            "proj": b.attn.out_proj.weight,
            "fc1": b.mlp.c_fc.weight,
            "fc2": b.mlp.c_proj.weight,
        }
        for b in part.resblocks
    ]
    return blocks, proj


def ref_attribution_matrix(pair: Pair, tower: str) -> torch.Tensor:
    """Chefer CVPR 2021 from the pair's logit: LRP to every R^A_l, then Eq. 13 with Eq. 6."""
    rec = pair.images if tower == "image" else pair.text
    other = pair.embeds["text" if tower == "image" else "image"]
    scale = float(pair.model.logit_scale.exp())
    r_embed = lrp_linear(pair.embeds[tower], scale * other[None], torch.ones(1))  # (D,)
    row = 0 if tower == "image" else pair.eot
    head_in = rec.head_in[0]
    pooled = head_in if head_in.dim() == 1 else head_in[row]
    blocks, projection = tower_weights(pair.model, tower)
    relevance = torch.zeros(rec.graph.num_tokens, pooled.shape[0])
    relevance[row] = lrp_linear(pooled, projection, r_embed)
    heads = rec.graph.num_heads
    rel_attn = [None] * rec.num_layers
    for layer in reversed(range(rec.num_layers)):
        acts, w, att = rec.blocks[layer], blocks[layer], rec.layers[layer]
        a, q, k, v = rec.attention(layer)[0], att.q[0], att.k[0], att.v[0]
        x_mid = acts.x[0] + acts.attn_branch[0]
        mid_skip, mlp_out = lrp_residual(x_mid, acts.mlp_branch[0], relevance)
        hidden = lrp_linear(acts.fc2_in[0], w["fc2"], mlp_out)
        mid = mid_skip + lrp_linear(acts.fc1_in[0], w["fc1"], hidden)
        x_skip, attn_out = lrp_residual(acts.x[0], acts.attn_branch[0], mid)
        o = (a @ v).transpose(0, 1).reshape(a.shape[1], -1)  # (N, h·d) = A·V
        heads_out = lrp_linear(o, w["proj"], attn_out).view(-1, heads, v.shape[-1]).transpose(0, 1)
        rel_attn[layer], rel_v = lrp_product(a, v, heads_out)
        rel_q, rel_kt = lrp_product(q * att.scale, k.transpose(-2, -1), rel_attn[layer])
        qkv = torch.stack([rel_q, rel_kt.transpose(-2, -1), rel_v])  # (3, h, N, d)
        qkv = qkv.permute(2, 0, 1, 3).reshape(a.shape[1], -1)
        relevance = x_skip + lrp_linear(acts.qkv_in[0], w["qkv"], qkv)
    r = torch.eye(rec.graph.num_tokens)
    for layer in range(rec.num_layers):
        _, g, _ = pair.layer(tower, layer)
        r = r + (g * rel_attn[layer]).clamp(min=0).mean(dim=0) @ r
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
    """Seed 004 Eq. 1-4, Fig. 3-4 on Transformer Attribution's R, scored with the pair's text."""
    r_full = ref_attribution_matrix(pair, "image")
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
    text = pair.cut("text", ref_attribution_matrix(pair, "text")[pair.eot])
    if method == "transformer_attribution":
        return pair.cut("image", ref_attribution_matrix(pair, "image")[0]), text
    return ref_reflection(pair), text


# --- the service against the references -----------------------------------------------------

CASES = [
    ("transformer_attribution", {}, "tokens"),
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
            # LRP divides by sums of contributions: float32 rounding, summed in another order
            # here, moves R by up to ~4e-4 relative; reflection's min-max normalised masks
            # carry that into the masked images' logits (scale e²)
            lrp = method in ("transformer_attribution", "token_reflection")
            rtol = 2e-3 if lrp else 1e-4
            atol = 1e-4 if method == "token_reflection" else 1e-5
            np.testing.assert_allclose(e.heatmap, heatmap, rtol=rtol, atol=atol)
            np.testing.assert_allclose(e.text.relevance, text, rtol=rtol, atol=1e-5)
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
    assert "partial_lrp" not in cards
    assert "Transformer Attribution" in cards["token_reflection"].description
    assert cards["transformer_attribution"].passes == ("forward", "backward", "lrp")
    assert {p.name for p in cards["saliency"].parameters} >= {"mode", "samples", "steps"}
    assert {p.name for p in cards["token_reflection"].parameters} == {"batch_size", "combine"}
    assert cards["gradcam"].passes == ("forward", "backward")
    assert cards["token_reflection"].passes == ("forward", "backward", "lrp", "extra")
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
        lambda: client.explain(images(1), model="hf", method="partial_lrp")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and found == "method"
    assert "transformer_attribution" in message
    code, found, _ = _refusal(
        lambda: client.explain(images(1), model="hf", method="agcam", relevance=True)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and found == "options.return_relevance"
