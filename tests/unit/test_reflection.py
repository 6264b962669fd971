"""token_reflection (Sago & Hotta 2024, seed 004) against plain loops written from Eq. 1-4 and
Fig. 3-4, on the float64 tiny ViT (4 x 4 grid: 16 masked images per image).

The core (`reflect`) takes any relevance matrix, so these tests do not need Transformer
Attribution: they use random positive or signed matrices and `generic`'s relevance. One test
runs the real Transformer Attribution when `methods/lrp.py` exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded, tiny_vit
from vitlens_server.explain import (
    Explainer,
    ExplainJob,
    Interrupted,
    Pass,
    TargetSpec,
    get_method,
)
from vitlens_server.explain.methods import reflection
from vitlens_server.explain.methods.reflection import (
    ReflectionParams,
    reflect,
    reflected_images,
    reflection_masks,
)
from vitlens_server.explain.params import NoParams, parse_params
from vitlens_server.explain.recording import record
from vitlens_server.explain.records import Recording

P = 1
GRID = (4, 4)
T = GRID[0] * GRID[1]


class Forwards:
    """A ``logits_fn`` that keeps every batch it is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.batches: list[torch.Tensor] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(pixels.clone())
        with torch.no_grad():
            return self.model(pixels)


@dataclasses.dataclass(frozen=True)
class LogitsPasses:
    """`ModelPasses` over a ``logits_fn``, for token reflection, which runs no gradients."""

    pixels: torch.Tensor
    logits: Forwards
    max_rows: int = 1 << 20  # no bound: the chunks are ReflectionParams.batch_size

    def input_gradients(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise AssertionError("token_reflection takes no input gradients")

    def narrow(self, rows: slice) -> LogitsPasses:
        return dataclasses.replace(self, pixels=self.pixels[rows])


@pytest.fixture(scope="module")
def case() -> dict:
    model = tiny_vit(seed=1, dtype=torch.float64)
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([2, 0, 4])
    rec = record(model, pixels, targets)  # fed to the model unnormalised
    with torch.no_grad():
        generic = get_method("generic").fn(rec, targets, NoParams()).relevance  # (B, N, N)
    return {"model": model, "pixels": pixels, "targets": targets, "rec": rec, "generic": generic}


# ---- references, written as loops from the paper's equations -------------------------------


def _normalise(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.0 if high == low else (v - low) / (high - low) for v in values]


def _reference_masks(relevance: np.ndarray, prefix: int) -> np.ndarray:
    """(N, N) → (T, T): Eq. 1, Eq. 2 and Fig. 4 for one image."""
    t = relevance.shape[0] - prefix
    r = [[relevance[prefix + i, prefix + j] for j in range(t)] for i in range(t)]
    r1 = [[0.0 if i == j else r[i][j] for j in range(t)] for i in range(t)]  # Eq. 1
    column_max = [max(r1[i][j] for i in range(t)) for j in range(t)]
    r2 = [[column_max[j] if i == j else r1[i][j] for j in range(t)] for i in range(t)]  # Eq. 2
    green = _normalise([max(r2[i][j] for i in range(t)) for j in range(t)])
    masks = np.zeros((t, t))
    for j in range(t):
        red = _normalise([r2[i][j] for i in range(t)])
        for i in range(t):
            masks[i, j] = red[i] * green[j]
    return masks


def _reference_image(image: np.ndarray, masks: np.ndarray, j: int, grid) -> np.ndarray:
    """X ⊙ nearest_upsample(reshape(M(:, j))) for one (C, H, W) image."""
    _, height, width = image.shape
    gh, gw = grid
    out = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            token = (y * gh // height) * gw + (x * gw // width)  # row-major patch index
            out[:, y, x] = image[:, y, x] * masks[token, j]
    return out


def _reference_images(pixels, relevance, prefix, grid) -> np.ndarray:
    """(B, T, C, H, W): the masked image of every token of every image."""
    out = []
    for b in range(pixels.shape[0]):
        masks = _reference_masks(relevance[b].numpy(), prefix)
        out.append(
            [_reference_image(pixels[b].numpy(), masks, j, grid) for j in range(masks.shape[1])]
        )
    return np.array(out)


def _reference_logits(model, images: np.ndarray, targets, grid) -> np.ndarray:
    """(B, gh, gw): l_j = f(X'_j)[c], one forward per masked image."""
    out = np.zeros(images.shape[:2])
    for b in range(images.shape[0]):
        for j in range(images.shape[1]):
            with torch.no_grad():
                logits = model(torch.from_numpy(images[b, j])[None])
            out[b, j] = logits[0, int(targets[b])].item()
    return out.reshape(-1, *grid)


def _random_relevance(batch: int, n: int, *, signed: bool = False, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, n, n, generator=generator, dtype=torch.float64)
    return values * 2 - 1 if signed else values


# ---- the masks: Eq. 1-2 and Fig. 4 -----------------------------------------------------------


def test_hand_computed_masks() -> None:
    """R = [[5,1,4],[3,4,0],[1,2,9]] over 3 image tokens (after one class token).

    R'' = [[3,1,4],[3,2,0],[1,2,4]]; column maxima (3, 2, 4) → green (0.5, 0, 1); the
    column-wise min-max of R'' is [[1,0,1],[1,1,0],[0,1,1]]; M = red ⊙ green.
    """
    relevance = torch.full((1, 4, 4), 7.0, dtype=torch.float64)  # class-token row/column: ignored
    relevance[0, 1:, 1:] = torch.tensor([[5.0, 1, 4], [3, 4, 0], [1, 2, 9]])
    expected = torch.tensor([[0.5, 0, 1], [0.5, 0, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(reflection_masks(relevance, 1)[0], expected)


@pytest.mark.parametrize("source", ["random", "signed", "generic"])
def test_masks_match_the_loop_reference(case, source) -> None:
    relevance = {
        "random": _random_relevance(3, P + T),
        "signed": _random_relevance(3, P + T, signed=True),
        "generic": case["generic"],
    }[source]
    masks = reflection_masks(relevance, P)
    assert masks.shape == (3, T, T)
    for b in range(3):
        np.testing.assert_allclose(
            masks[b].numpy(), _reference_masks(relevance[b].numpy(), P), rtol=1e-12, atol=1e-15
        )


def test_masks_lie_in_unit_range_with_the_green_vector_on_the_diagonal(case) -> None:
    for relevance in (case["generic"], _random_relevance(4, P + T, signed=True, seed=3)):
        masks = reflection_masks(relevance, P)
        assert masks.min() >= 0 and masks.max() <= 1
        torch.testing.assert_close(masks.amax(dim=(1, 2)), torch.ones(masks.shape[0]).double())
        # Each column peaks on its own token (Eq. 2), at its normalised column maximum.
        diagonal = masks.diagonal(dim1=1, dim2=2)
        torch.testing.assert_close(diagonal, masks.amax(dim=1))


def test_constant_relevance_gives_all_zero_masks() -> None:
    masks = reflection_masks(torch.ones(2, P + T, P + T), P)
    assert torch.equal(masks, torch.zeros(2, T, T))


# ---- masked images and reflected logits: Eq. 3-4 ---------------------------------------------


@pytest.fixture(scope="module")
def reference(case) -> dict:
    """The loop reference's masked images and reflected logits for `generic`'s relevance."""
    images = _reference_images(case["pixels"], case["generic"], P, GRID)
    return {
        "images": images,
        "logits": _reference_logits(case["model"], images, case["targets"], GRID),
    }


def test_masked_images_and_logits_match_the_loop_reference(case, reference) -> None:
    forwards = Forwards(case["model"])
    logits = reflect(
        case["generic"],
        case["pixels"],
        case["targets"],
        forwards,
        grid=GRID,
        num_prefix_tokens=P,
        batch_size=20,
    )
    assert [len(b) for b in forwards.batches] == [20, 20, 8]  # 3 x 16 images, chunks span images
    images = torch.cat(forwards.batches).view(3, T, 3, 32, 32)
    np.testing.assert_allclose(images.numpy(), reference["images"], rtol=1e-12)
    np.testing.assert_allclose(logits.numpy(), reference["logits"], rtol=1e-10)


def test_register_tokens_and_a_non_square_grid() -> None:
    model = tiny_vit(seed=4, dtype=torch.float64, img_size=(32, 48), reg_tokens=2)
    prefix, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    assert (prefix, grid) == (3, (4, 6))
    pixels = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    relevance = _random_relevance(2, prefix + 24, seed=5)
    forwards = Forwards(model)
    logits = reflect(
        relevance, pixels, targets, forwards, grid=grid, num_prefix_tokens=prefix, batch_size=7
    )
    images = torch.cat(forwards.batches).view(2, 24, 3, 32, 48)
    expected = _reference_images(pixels, relevance, prefix, grid)
    np.testing.assert_allclose(images.numpy(), expected, rtol=1e-12)
    reference = _reference_logits(model, expected, targets, grid)
    np.testing.assert_allclose(logits.numpy(), reference, rtol=1e-10)


def test_masked_images_when_patches_do_not_tile_the_image() -> None:
    """The nearest upsampling of a 4 x 6 grid to 30 x 45 px, no multiple of the grid."""
    grid, prefix = (4, 6), 2
    relevance = _random_relevance(2, prefix + 24, seed=8)
    pixels = torch.rand(2, 3, 30, 45, dtype=torch.float64)
    owners, tokens = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 5, 17, 22])
    images = reflected_images(reflection_masks(relevance, prefix), pixels, owners, tokens, grid)
    for image, b, j in zip(images, owners.tolist(), tokens.tolist(), strict=True):
        masks = _reference_masks(relevance[b].numpy(), prefix)
        expected = _reference_image(pixels[b].numpy(), masks, j, grid)
        np.testing.assert_allclose(image.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 5, 16, 17, 1000])
def test_chunk_size_does_not_change_the_result(case, batch_size) -> None:
    args = (case["generic"], case["pixels"], case["targets"], Forwards(case["model"]))
    whole = reflect(*args, grid=GRID, num_prefix_tokens=P, batch_size=48)
    chunked = reflect(*args, grid=GRID, num_prefix_tokens=P, batch_size=batch_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_a_batch_equals_each_image_alone(case) -> None:
    relevance, pixels, targets = case["generic"], case["pixels"], case["targets"]
    forwards = Forwards(case["model"])
    batched = reflect(relevance, pixels, targets, forwards, grid=GRID, num_prefix_tokens=P)
    for b in range(3):
        part = slice(b, b + 1)
        alone = reflect(
            relevance[part], pixels[part], targets[part], forwards, grid=GRID, num_prefix_tokens=P
        )
        torch.testing.assert_close(alone[0], batched[b], rtol=1e-12, atol=1e-12)


# ---- the final map: Fig. 3 -------------------------------------------------------------------


def _minmax(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


@pytest.mark.parametrize("combine", ["sum", "minmax"])
def test_final_map_is_reflected_logits_plus_the_attribution_row(
    case, reference, combine, monkeypatch
) -> None:
    """With `generic`'s relevance standing in for Transformer Attribution's."""
    monkeypatch.setattr(
        reflection, "_transformer_attribution", lambda _rec, _targets: case["generic"]
    )
    passes = LogitsPasses(case["pixels"], Forwards(case["model"]))
    rec: Recording = dataclasses.replace(case["rec"], passes=passes)
    spec = get_method("token_reflection")
    params = parse_params(spec.params, {"combine": combine, "batch_size": 9}, method=spec.name)
    with torch.no_grad():
        heatmap = spec.fn(rec, case["targets"], params).heatmap
    for b in range(3):
        row = case["generic"][b, 0, P:].numpy()  # Transformer Attribution's class-token row
        l = reference["logits"][b].reshape(-1)  # noqa: E741  (the paper's name)
        expected = l + row if combine == "sum" else _minmax(l) + _minmax(row)
        np.testing.assert_allclose(heatmap[b].numpy(), expected.reshape(GRID), rtol=1e-10)


def test_registration() -> None:
    spec = get_method("token_reflection")
    assert Pass.BACKWARD | Pass.LRP | Pass.EXTRA in spec.passes and spec.class_specific
    assert spec.params is ReflectionParams
    assert parse_params(spec.params, {}, method=spec.name) == ReflectionParams(256, "sum")


HAS_LRP = importlib.util.find_spec("vitlens_server.explain.methods.lrp") is not None


@pytest.mark.parametrize(
    "source",
    [
        "generic",
        pytest.param(
            "transformer_attribution",
            marks=pytest.mark.skipif(not HAS_LRP, reason="methods/lrp.py is not there yet"),
        ),
    ],
)
def test_explainer_runs_the_method_end_to_end(source, monkeypatch) -> None:
    """Through `Explainer.explain`: map = reflect(R) + R's class-token row, R the relevance of
    Transformer Attribution, or of `generic` standing in for it (the core does not need TA)."""
    loaded = tiny_loaded(seed=6)
    explainer = Explainer(loaded)
    relevance_spec = get_method(source)
    if source == "generic":
        monkeypatch.setattr(
            reflection,
            "_transformer_attribution",
            lambda rec, targets: relevance_spec.fn(rec, targets, NoParams()).relevance,
        )
    pixels = torch.rand(3, 3, 32, 32)
    target = TargetSpec("top_k", k=2)
    spec = get_method("token_reflection")
    maps = {
        size: explainer.explain(
            ExplainJob(pixels, spec, ReflectionParams(batch_size=size), target)
        ).heatmaps
        for size in (5, 256)
    }
    assert maps[256].shape == (3, 2, *GRID) and np.isfinite(maps[256]).all()
    np.testing.assert_allclose(maps[5], maps[256], rtol=1e-5, atol=1e-5)
    params = parse_params(relevance_spec.params, {}, method=source)
    result = explainer.explain(ExplainJob(pixels, relevance_spec, params, target, relevance=True))
    module = loaded.module
    for k in range(2):
        relevance = torch.from_numpy(result.relevance[:, k])
        targets = torch.from_numpy(result.targets[:, k])
        with torch.no_grad():
            logits = reflect(
                relevance,
                pixels,
                targets,
                lambda x: module((x - 0.5) / 0.5),  # tiny_loaded's mean = std = 0.5
                grid=GRID,
                num_prefix_tokens=P,
            )
        expected = logits + relevance[:, 0, P:].reshape(-1, *GRID)
        np.testing.assert_allclose(maps[256][:, k], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_reflected_forwards_stay_float32_under_bf16_autocast() -> None:
    """bf16 rounding of logits erases the differences token reflection reads, so its extra
    forwards run in float32 even when the model serves in bf16."""
    model = tiny_loaded(seed=3)
    bf16 = dataclasses.replace(model, spec=dataclasses.replace(model.spec, precision="bf16"))
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp32 = Explainer(model)
    fp32_logits = fp32.extra_passes(pixels).logits(pixels)
    fp32.close()  # one set of hooks per module at a time
    explainer = Explainer(bf16)
    assert explainer.autocast().fast_dtype == torch.bfloat16 and explainer.autocast()._enabled
    assert torch.equal(explainer.extra_passes(pixels).logits(pixels), fp32_logits)


@pytest.mark.parametrize("after", [0, 1, 3])
def test_interruption_stops_within_one_chunk_of_masked_images(after: int) -> None:
    """``interrupted`` turns True once ``after`` chunks were classified: no further chunk runs
    (2 images x 16 tokens in chunks of 4 would be 8 chunks), and nothing is returned."""
    loaded = tiny_loaded(seed=6)
    explainer = Explainer(loaded)
    forwards = [0]
    counter = loaded.module.register_forward_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1)
    )
    spec = get_method("token_reflection")
    job = ExplainJob(torch.rand(2, 3, 32, 32), spec, ReflectionParams(batch_size=4), TargetSpec())
    try:
        with pytest.raises(Interrupted):
            explainer.explain_batch([job], interrupted=lambda: forwards[0] >= 1 + after)
        assert forwards[0] == 1 + after  # the capture's forward, then ``after`` chunks
        forwards[0] = 0
        explainer.explain_batch([job], interrupted=lambda: False)
        assert forwards[0] == 1 + 8  # uninterrupted: every chunk
    finally:
        counter.remove()
        explainer.close()
